"""The work of `demem reproduce` on disk: training the shadow models of the configurations (in-process
or in a spawn pool), recording divergence, and the cached robustness evaluation of model 0."""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from demem_ext.audit.shadow import missing_models, model_dir, prepare_masks, train_shadow_models
from demem_ext.eta import progress_text
from demem_ext.ops.functional import NonFiniteError
from demem_ext.reproduce.configs import Configuration
from demem_ext.training import TrainConfig
from demem_ext.training.checkpoint import load_checkpoint, read_json, write_text_atomic
from demem_ext.training.ensemble_size import check_ensemble, resolve_ensemble
from demem_ext.training.metrics import read_rows

def eval_name(model: int) -> str:
    """The file caching model `model`'s robustness evaluation in a configuration folder."""
    return f"eval_model{model}.json"


EVAL_NAME = eval_name(0)
DIVERGED_NAME = "diverged.json"


def _worker_init() -> None:
    torch.set_num_threads(1)


def shards(num_models: int, ensemble: int) -> int:
    """How many shards the M models of a configuration are split into: shard s holds models s, s + S, ...,
    at most `ensemble` of them (one model each when ensemble is 1), trained together in one process."""
    return -(-num_models // ensemble)


def _train_shard(cfg_dict: dict[str, Any], out_dir: str, num_models: int, keep_seed: int, shard: int,
                 ensemble: int) -> list[int]:
    """Train the missing models of one shard (in a worker process); an ensemble when it holds several."""
    return train_shadow_models(TrainConfig.from_dict(cfg_dict), out_dir, num_models=num_models, seed=keep_seed,
                               shard=(shard, shards(num_models, ensemble)), progress=False, log=lambda _: None,
                               ensemble=ensemble)


class Pool:
    """A spawn-context process pool started on first use and shared by the phases of one reproduction."""

    def __init__(self, jobs: int) -> None:
        self.jobs, self.executor = jobs, None

    def get(self) -> concurrent.futures.ProcessPoolExecutor:
        if self.executor is None:
            context = multiprocessing.get_context("spawn")
            self.executor = concurrent.futures.ProcessPoolExecutor(self.jobs, mp_context=context,
                                                                   initializer=_worker_init)
        return self.executor

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None


def divergence(c: Configuration, out: Path) -> Optional[dict[str, Any]]:
    """The recorded divergence of c's training (None if none is recorded for this configuration)."""
    path = out / c.folder / DIVERGED_NAME
    if not path.exists():
        return None
    record = read_json(path)
    return record if isinstance(record, dict) and c.config.matches(record.get("config")) else None


def _record_divergence(c: Configuration, out: Path, model_id: int, exc: Exception,
                       log: Callable[[str], None]) -> None:
    """Write DIVERGED_NAME: training c is deterministic, so a rerun does not train it again."""
    if divergence(c, out) is not None:
        return
    metrics = model_dir(out / c.folder, model_id) / "metrics.jsonl"
    epochs = len(read_rows(metrics, log)) if metrics.exists() else 0
    record = {"config": c.config.to_dict(), "model": model_id, "epochs_completed": epochs, "error": str(exc)}
    write_text_atomic(json.dumps(record, indent=2), out / c.folder / DIVERGED_NAME)
    log(f"[{c.slug}] diverged: model {model_id} after {epochs} epochs: {exc}")


def train_all(selected: Sequence[Configuration], out: Path, num_models: int, keep_seed: int, pool: Pool,
               progress: bool, log: Callable[[str], None], ensemble: int | str = "auto") -> dict[str, list[int]]:
    """Train the missing shadow models of the configurations; returns the ids trained per folder.

    ensemble: K, or "auto" (`resolve_ensemble`, per configuration, for pool.jobs processes at once). K > 1:
    a configuration's models are trained K at a time in one process (shards, see `shards`).
    A configuration whose training turns non-finite (NonFiniteError) is recorded as diverged and its
    other models are not trained; the run goes on with the other configurations.
    """
    check_ensemble(ensemble, num_models)
    trained: dict[str, list[int]] = {c.folder: [] for c in selected}
    live = [c for c in selected if divergence(c, out) is None]
    sizes = {c.slug: resolve_ensemble(ensemble, num_models, c.config, processes=pool.jobs) for c in live}
    counts = {slug: shards(num_models, k) for slug, (k, _) in sizes.items()}
    todo = [(c, s, missing) for c in live for s in range(counts[c.slug])
            for missing in [[i for i in missing_models(out / c.folder, num_models) if i % counts[c.slug] == s]]
            if missing]
    if not todo:
        return trained
    for c in live:
        prepare_masks(c.config, out / c.folder, num_models, keep_seed)  # before workers race; refuses a mismatch
        if sizes[c.slug][0] > 1 or ensemble != 1:
            log(f"[{c.slug}] ensemble of {sizes[c.slug][0]} ({sizes[c.slug][1]})")
    start = time.perf_counter()
    total = sum(len(missing) for _, _, missing in todo)
    finished = 0
    if pool.jobs <= 1:
        for c, s, missing in todo:
            if divergence(c, out) is not None:
                continue
            log(f"[{c.slug}] training shadow model(s) {', '.join(str(i + 1) for i in missing)} of {num_models} "
                f"({c.name}); all models: {progress_text(time.perf_counter() - start, finished, total)}")
            try:
                trained[c.folder] += train_shadow_models(c.config, out / c.folder, num_models=num_models,
                                                         seed=keep_seed, shard=(s, counts[c.slug]),
                                                         progress=progress, log=lambda m, s=c.slug: log(f"[{s}] {m}"),
                                                         ensemble=sizes[c.slug][0])
            except NonFiniteError as exc:
                _record_divergence(c, out, missing[0], exc, log)
            finished += len(missing)
        return trained
    log(f"training {total} shadow models in {pool.jobs} processes")
    executor = pool.get()
    futures = {executor.submit(_train_shard, c.config.to_dict(), str(out / c.folder), num_models, keep_seed, s,
                               sizes[c.slug][0]): (c, missing) for c, s, missing in todo}
    for future in concurrent.futures.as_completed(futures):
        c, missing = futures[future]
        if future.cancelled():
            continue
        finished += len(missing)
        try:
            trained[c.folder] += future.result()
        except NonFiniteError as exc:
            _record_divergence(c, out, missing[0], exc, log)
            for other, (c2, _) in futures.items():
                if c2 is c:
                    other.cancel()  # models of c not started yet
            continue
        log(f"[{c.slug}] model(s) {', '.join(map(str, missing))} done; all models: "
            f"{progress_text(time.perf_counter() - start, finished, total)}")
    for ids in trained.values():
        ids.sort()
    return trained


def _eval_settings(autoattack: str, limit: Optional[int], model: int = 0) -> dict[str, Any]:
    return {"autoattack": autoattack, "limit": limit, "model": model}


def _cached_evaluation(folder: Path, autoattack: str, limit: Optional[int],
                       model: int = 0) -> Optional[dict[str, Any]]:
    path = folder / eval_name(model)
    if path.exists():
        cached = read_json(path)
        if isinstance(cached, dict) and cached.get("settings") == _eval_settings(autoattack, limit, model):
            return cached
    return None


def evaluate_model(folder: Path, autoattack: str, limit: Optional[int], model: int = 0) -> dict[str, Any]:
    """Natural, PGD-20 and AutoAttack accuracy of one model on the test split (seeded by its training seed),
    cached in eval_name(model)."""
    from demem_ext.adversarial.robustness import evaluate
    from demem_ext.training import restore

    cached = _cached_evaluation(folder, autoattack, limit, model)
    if cached is not None:
        return cached
    start = time.perf_counter()
    path = model_dir(folder, model) / "checkpoint.pt"
    state = restore(load_checkpoint(path, expected_format="demem-ext/train-v1"), str(path))
    cfg = state.config
    result = evaluate(state.model, state.test_set, cfg.eps, state.info.num_classes, clamp=state.info.input_range,
                      autoattack=autoattack, device=cfg.device, limit=limit, seed=cfg.seed)
    result["settings"] = _eval_settings(autoattack, limit, model)
    result["seconds"] = round(time.perf_counter() - start, 1)
    write_text_atomic(json.dumps(result, indent=2), folder / eval_name(model))
    return result


def evaluate_all(selected: Sequence[Configuration], out: Path, autoattack: str, limit: Optional[int], pool: Pool,
                  log: Callable[[str], None], models: int = 1) -> None:
    """Evaluate models 0 .. models − 1 of every trained, undiverged configuration lacking a cached result (in the
    pool)."""
    todo = [(c, k) for c in selected if divergence(c, out) is None for k in range(models)
            if _cached_evaluation(out / c.folder, autoattack, limit, k) is None]
    if not todo:
        return
    log(f"evaluating {len(todo)} model(s) (natural, PGD-20, AutoAttack {autoattack}; models 0-{models - 1} of each "
        f"configuration)")
    if pool.jobs <= 1:
        for c, k in todo:
            evaluate_model(out / c.folder, autoattack, limit, k)
        return
    futures = {pool.get().submit(evaluate_model, out / c.folder, autoattack, limit, k): (c, k) for c, k in todo}
    for future in concurrent.futures.as_completed(futures):
        future.result()
        c, k = futures[future]
        log(f"[{c.slug}] model {k} evaluated")


def train_seconds(folder: Path, num_models: int) -> float:
    """Sum of the per-epoch training times recorded in the models' metrics.jsonl (survives reruns)."""
    total = 0.0
    for i in range(num_models):
        path = model_dir(folder, i) / "metrics.jsonl"
        if path.exists():
            total += sum(row.get("seconds", 0.0) for row in read_rows(path, _ignore))
    return total


def _ignore(_: str) -> None:
    pass
