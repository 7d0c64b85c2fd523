"""`demem reproduce`: the paper's comparison on shadow models (DESIGN.md section 6).

PGD-AT vs PGD-AT + DP-SGD vs PGD-AT + DeMem (λ sweep, loss-trace proxy), and the same with TRADES.
For each configuration: M shadow models (resumable, `train_shadow_models`), the membership-inference
audit (`run_audit`), and the robustness of model 0 (natural, PGD-20, AutoAttack; cached). Then the
λ of the trace configuration is chosen by a fixed rule, three figures are drawn and a Markdown
report is written. Layout of the output folder:

    <slug>/                 one audit folder per configuration (keep.pt, models/, audit.json, roc.png ...)
    <slug>/eval_model0.json robustness of model 0 (reused on rerun when its settings match)
    summary.json            every number of the report
    roc_lira_online.png  privacy_robustness.png  accuracy_by_memorization.png
    results.md
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from demem_ext.training.checkpoint import load_checkpoint, write_text_atomic
from demem_ext.config import DeMemConfig
from demem_ext.ops.functional import NonFiniteError
from demem_ext.reproduce.report import (accuracy_by_memorization, plot_accuracy_by_memorization, plot_tradeoff,
                                        write_results)
from demem_ext.audit.shadow import (STATS_FORMAT, load_stats, missing_models, model_dir, prepare_masks,
                                      train_shadow_models)
from demem_ext.training import TrainConfig

QUICK_MODELS, QUICK_EPOCHS, QUICK_BATCH = 4, 15, 32  # smaller batches: more steps per epoch
FULL_MODELS = 16
SWEEP_LAMBDAS = (0.25, 0.5, 0.75, 1.0, 2.0)
DP_NOISE = (0.5, 1.0)
DP_CLIP = 1.0
FALLBACK_LAMBDA = 0.5
ROBUSTNESS_MARGIN = 0.02  # the chosen λ keeps mean PGD-20 within 2 points of PGD-AT's
TRACE_SLUG = "pgd-demem-trace"
BASELINE_SLUG = "pgd-at"
DP_REFERENCE_SLUG = "pgd-dp-s1"
LIRA = "LiRA online"
LIRA_ADV = "LiRA online (adversarial queries)"
EVAL_NAME = "eval_model0.json"
FAMILY_BASELINE = {"PGD-AT": BASELINE_SLUG, "TRADES": "trades"}
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 200, 0
DIVERGED_NAME = "diverged.json"
PLOTS = {"roc": "roc_lira_online.png", "tradeoff": "privacy_robustness.png",
         "memorization": "accuracy_by_memorization.png"}
SELECTION_RULE = (f"among the PGD-AT + DeMem sweep λ ∈ {{{', '.join(f'{x:g}' for x in SWEEP_LAMBDAS)}}}, the λ "
                  f"with the lowest LiRA online TPR at 1% FPR whose mean PGD-20 test accuracy (over the "
                  f"M models) is within {100 * ROBUSTNESS_MARGIN:g} points of PGD-AT's (ties: higher "
                  f"PGD-20, then smaller λ); if none qualifies, or the sweep or PGD-AT has no results, "
                  f"λ = {FALLBACK_LAMBDA:g}")


@dataclass(frozen=True)
class Configuration:
    """One row of the comparison."""

    name: str
    slug: str
    config: TrainConfig
    family: str                   # "PGD-AT" | "TRADES"
    method: str                   # "baseline" | "dp" | "demem" | "demem-trace"
    lam: Optional[float] = None   # DeMem λ (None: no DeMem)
    noise: Optional[float] = None  # DP-SGD σ
    report_epsilon: bool = False  # a DP-SGD configuration: ε is reported

    @property
    def folder(self) -> str:
        """The folder of its audit; the trace configuration's λ is part of it (chosen at run time)."""
        return f"{self.slug}-l{self.lam:g}" if self.method == "demem-trace" else self.slug


def demem_fields(**overrides: Any) -> dict[str, Any]:
    """Every DeMemConfig field, spelled out: a later change of the defaults cannot reuse stale models."""
    return dataclasses.asdict(DeMemConfig(**overrides))


def _dp(base: TrainConfig, noise: float) -> dict[str, Any]:
    return {"use_demem": True, "demem": demem_fields(lam=0.0, max_grad_norm=DP_CLIP, noise_multiplier=noise,
                                                     clip_scope="all", expected_batch_size=base.batch_size)}


# Variants of the rule (DESIGN.md section 2) tried to move the trade-off; run with --configs variants|all.
# Pinned to the provisional rule (hard selection, τ = mean + 1·std) except where they say otherwise.
PROVISIONAL_RULE = {"selection": "hard", "threshold": "mean", "k": 1.0, "proxy": "loss"}
VARIANTS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (  # slug, family, label, DeMem fields
    ("pgd-demem-l1-k1.5", "PGD-AT", "λ = 1, τ = mean + 1.5·std", {"lam": 1.0, "k": 1.5}),
    ("pgd-demem-l1-k2", "PGD-AT", "λ = 1, τ = mean + 2·std", {"lam": 1.0, "k": 2.0}),
    ("pgd-demem-l1-soft", "PGD-AT", "λ = 1, soft selection T = 0.25",
     {"lam": 1.0, "selection": "soft", "temperature": 0.25}),
    ("pgd-demem-l0.5-clip", "PGD-AT", "λ = 0.5, high-risk clipping C = 1",
     {"lam": 0.5, "max_grad_norm": 1.0, "clip_scope": "high_risk"}),
    ("trades-demem-l0.75", "TRADES", "λ = 0.75", {"lam": 0.75}),
)


def configurations(base: TrainConfig, trace_lam: float = FALLBACK_LAMBDA) -> list[Configuration]:
    """The comparison's configurations, built from `base` (dataset, epochs, attack ...) by overrides."""
    default_lam = DeMemConfig().lam
    pgd = dataclasses.replace(base, at="pgd")
    trades = dataclasses.replace(base, at="trades")

    def make(name: str, slug: str, start: TrainConfig, family: str, method: str, lam: Optional[float] = None,
             noise: Optional[float] = None, **overrides: Any) -> Configuration:
        return Configuration(name, slug, dataclasses.replace(start, **overrides), family, method, lam, noise,
                             report_epsilon=method == "dp")

    out = [make("PGD-AT", BASELINE_SLUG, pgd, "PGD-AT", "baseline", use_demem=False, demem={})]
    for sigma in DP_NOISE:
        out.append(make(f"PGD-AT + DP-SGD (C = {DP_CLIP:g}, σ = {sigma:g})", f"pgd-dp-s{sigma:g}", pgd, "PGD-AT",
                        "dp", noise=sigma, **_dp(base, sigma)))
    for lam in SWEEP_LAMBDAS:
        out.append(make(f"PGD-AT + DeMem (λ = {lam:g})", f"pgd-demem-l{lam:g}", pgd, "PGD-AT", "demem", lam=lam,
                        use_demem=True, demem=demem_fields(lam=lam)))
    out.append(make(f"PGD-AT + DeMem, loss trace (λ = {trace_lam:g})", TRACE_SLUG, pgd, "PGD-AT", "demem-trace",
                    lam=trace_lam, use_demem=True, demem=demem_fields(lam=trace_lam, proxy="trace")))
    out.append(make("TRADES", "trades", trades, "TRADES", "baseline", use_demem=False, demem={}))
    out.append(make(f"TRADES + DP-SGD (C = {DP_CLIP:g}, σ = 1)", "trades-dp-s1", trades, "TRADES", "dp", noise=1.0,
                    **_dp(base, 1.0)))
    out.append(make(f"TRADES + DeMem (λ = {default_lam:g})", "trades-demem", trades, "TRADES", "demem",
                    lam=default_lam, use_demem=True, demem=demem_fields(lam=default_lam)))
    for slug, family, label, overrides in VARIANTS:
        out.append(make(f"{family} + DeMem variant ({label})", slug, pgd if family == "PGD-AT" else trades, family,
                        "demem-variant", lam=overrides["lam"], use_demem=True,
                        demem=demem_fields(**{**PROVISIONAL_RULE, **overrides})))
    return out


ALL_SLUGS = tuple(c.slug for c in configurations(TrainConfig()))
VARIANT_SLUGS = tuple(slug for slug, *_ in VARIANTS)
SLUGS = tuple(s for s in ALL_SLUGS if s not in VARIANT_SLUGS)  # the comparison (the default selection)
KEYWORDS = {"all": ALL_SLUGS, "variants": VARIANT_SLUGS, "comparison": SLUGS}


def parse_configs(text: Optional[str | Iterable[str]]) -> Optional[list[str]]:
    """"a,b" (or a list; keywords all/variants/comparison) -> validated slugs in order; None/empty -> None."""
    if text is None:
        return None
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    if not items:
        return None
    expanded = {slug for item in items for slug in KEYWORDS.get(item, (item,))}
    unknown = [s for s in items if s not in ALL_SLUGS and s not in KEYWORDS]
    if unknown:
        raise ValueError(f"unknown configuration(s) {', '.join(map(repr, unknown))}; "
                         f"choose from: {', '.join(ALL_SLUGS)} (or {', '.join(KEYWORDS)})")
    return [s for s in ALL_SLUGS if s in expanded]


# ---------------------------------------------------------------- training (in-process or parallel)

def _worker_init() -> None:
    torch.set_num_threads(1)


def _train_model(cfg_dict: dict[str, Any], out_dir: str, num_models: int, keep_seed: int, model_id: int) -> list[int]:
    """Train exactly one shadow model (shard (model_id, M) holds only that model); in a worker process."""
    return train_shadow_models(TrainConfig.from_dict(cfg_dict), out_dir, num_models=num_models, seed=keep_seed,
                               shard=(model_id, num_models), progress=False, log=lambda _: None)


class _Pool:
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
    record = json.loads(path.read_text())
    return record if record.get("config") == c.config.to_dict() else None


def _record_divergence(c: Configuration, out: Path, model_id: int, exc: Exception,
                       log: Callable[[str], None]) -> None:
    """Write DIVERGED_NAME: training c is deterministic, so a rerun does not train it again."""
    if divergence(c, out) is not None:
        return
    metrics = model_dir(out / c.folder, model_id) / "metrics.jsonl"
    epochs = len([line for line in metrics.read_text().splitlines() if line.strip()]) if metrics.exists() else 0
    record = {"config": c.config.to_dict(), "model": model_id, "epochs_completed": epochs, "error": str(exc)}
    write_text_atomic(json.dumps(record, indent=2), out / c.folder / DIVERGED_NAME)
    log(f"[{c.slug}] diverged: model {model_id} after {epochs} epochs: {exc}")


def _train_all(selected: Sequence[Configuration], out: Path, num_models: int, keep_seed: int, pool: _Pool,
               progress: bool, log: Callable[[str], None]) -> dict[str, list[int]]:
    """Train the missing shadow models of the configurations; returns the ids trained per folder.

    A configuration whose training turns non-finite (NonFiniteError) is recorded as diverged and its
    other models are not trained; the run goes on with the other configurations.
    """
    trained: dict[str, list[int]] = {c.folder: [] for c in selected}
    live = [c for c in selected if divergence(c, out) is None]
    todo = [(c, i) for c in live for i in missing_models(out / c.folder, num_models)]
    if not todo:
        return trained
    for c in live:
        prepare_masks(c.config, out / c.folder, num_models, keep_seed)  # before workers race; refuses a mismatch
    if pool.jobs <= 1:
        for c, i in todo:
            if divergence(c, out) is not None:
                continue
            log(f"[{c.slug}] training shadow model {i + 1}/{num_models} ({c.name})")
            try:
                trained[c.folder] += train_shadow_models(c.config, out / c.folder, num_models=num_models,
                                                         seed=keep_seed, shard=(i, num_models), progress=progress,
                                                         log=lambda m, s=c.slug: log(f"[{s}] {m}"))
            except NonFiniteError as exc:
                _record_divergence(c, out, i, exc, log)
        return trained
    log(f"training {len(todo)} shadow models in {pool.jobs} processes")
    executor = pool.get()
    futures = {executor.submit(_train_model, c.config.to_dict(), str(out / c.folder), num_models, keep_seed, i): (c, i)
               for c, i in todo}
    for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
        c, i = futures[future]
        if future.cancelled():
            continue
        try:
            trained[c.folder] += future.result()
        except NonFiniteError as exc:
            _record_divergence(c, out, i, exc, log)
            for other, (c2, _) in futures.items():
                if c2 is c:
                    other.cancel()  # models of c not started yet
            continue
        log(f"[{c.slug}] model {i} done ({done}/{len(todo)})")
    for ids in trained.values():
        ids.sort()
    return trained


# ---------------------------------------------------------------- evaluation of one configuration

def _eval_settings(autoattack: str, limit: Optional[int]) -> dict[str, Any]:
    return {"autoattack": autoattack, "limit": limit, "model": 0}


def _cached_evaluation(folder: Path, autoattack: str, limit: Optional[int]) -> Optional[dict[str, Any]]:
    path = folder / EVAL_NAME
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("settings") == _eval_settings(autoattack, limit):
            return cached
    return None


def _evaluate_model0(folder: Path, autoattack: str, limit: Optional[int]) -> dict[str, Any]:
    """Natural, PGD-20 and AutoAttack accuracy of model 0 on the test split, cached in EVAL_NAME."""
    from demem_ext.adversarial.robustness import evaluate
    from demem_ext.training import restore

    cached = _cached_evaluation(folder, autoattack, limit)
    if cached is not None:
        return cached
    start = time.perf_counter()
    payload = load_checkpoint(model_dir(folder, 0) / "checkpoint.pt", expected_format="demem-ext/train-v1")
    state = restore(payload)
    cfg = state.config
    result = evaluate(state.model, state.test_set, cfg.eps, state.info.num_classes, clamp=state.info.input_range,
                      autoattack=autoattack, device=cfg.device, limit=limit, seed=cfg.seed)
    result["settings"] = _eval_settings(autoattack, limit)
    result["seconds"] = round(time.perf_counter() - start, 1)
    write_text_atomic(json.dumps(result, indent=2), folder / EVAL_NAME)
    return result


def _evaluate_all(selected: Sequence[Configuration], out: Path, autoattack: str, limit: Optional[int], pool: _Pool,
                  log: Callable[[str], None]) -> None:
    """Evaluate model 0 of every trained, undiverged configuration lacking a cached result (in the pool)."""
    todo = [c for c in selected if divergence(c, out) is None and _cached_evaluation(out / c.folder, autoattack, limit)
            is None]
    if not todo:
        return
    log(f"evaluating model 0 of {len(todo)} configuration(s) (natural, PGD-20, AutoAttack {autoattack})")
    if pool.jobs <= 1:
        for c in todo:
            _evaluate_model0(out / c.folder, autoattack, limit)
        return
    futures = {pool.get().submit(_evaluate_model0, out / c.folder, autoattack, limit): c for c in todo}
    for future in concurrent.futures.as_completed(futures):
        future.result()
        log(f"[{futures[future].slug}] model 0 evaluated")


def _train_seconds(folder: Path, num_models: int) -> float:
    """Sum of the per-epoch training times recorded in the models' metrics.jsonl (survives reruns)."""
    total = 0.0
    for i in range(num_models):
        path = model_dir(folder, i) / "metrics.jsonl"
        if path.exists():
            total += sum(json.loads(line).get("seconds", 0.0) for line in path.read_text().splitlines() if line.strip())
    return total


def _identity(c: Configuration) -> dict[str, Any]:
    return {"name": c.name, "slug": c.slug, "folder": c.folder, "family": c.family, "method": c.method,
            "lam": c.lam, "noise_multiplier": c.noise, "report_epsilon": c.report_epsilon, "config": c.config.to_dict()}


def _diverged_row(c: Configuration, out: Path, num_models: int, record: dict[str, Any]) -> dict[str, Any]:
    """A configuration whose training diverged: the record, and the test accuracy of its finished models."""
    finished = [i for i in range(num_models) if i not in missing_models(out / c.folder, num_models)]
    stats = [load_checkpoint(model_dir(out / c.folder, i) / "stats.pt", expected_format=STATS_FORMAT) for i in finished]

    def mean(key: str) -> Optional[float]:
        return sum(float(s[key]) for s in stats) / len(stats) if stats else None

    return {"status": "diverged", **_identity(c), "divergence": {k: v for k, v in record.items() if k != "config"},
            "finished_models": len(finished), "mean_test_natural_acc": mean("test_natural_acc"),
            "mean_test_pgd20_acc": mean("test_pgd20_acc"), "train_seconds": round(_train_seconds(out / c.folder,
                                                                                                  num_models), 1)}


def _row(c: Configuration, report: dict[str, Any], evaluation: dict[str, Any], seconds: float) -> dict[str, Any]:
    attacks = report["attacks"]
    return {
        "status": "ok", **_identity(c),
        "mean_test_natural_acc": report["test_accuracy"]["natural"],
        "mean_test_pgd20_acc": report["test_accuracy"]["pgd20"],
        "model0": {k: evaluation.get(k) for k in ("natural_acc", "pgd20_acc", "autoattack_acc", "autoattack_version",
                                                  "num_samples")},
        "lira_online": {k: attacks[LIRA][k] for k in ("auc", "tpr_at_fpr_0.001", "tpr_at_fpr_0.01", "tpr_at_fpr_0.1")},
        "lira_online_adv": {k: attacks[LIRA_ADV][k] for k in ("auc", "tpr_at_fpr_0.001", "tpr_at_fpr_0.01")},
        "epsilon": report["privacy"].get("epsilon"), "epsilon_delta": report["privacy"].get("delta"),
        "epsilon_reason": report["privacy"].get("reason"),
        "train_seconds": round(seconds, 1),
    }


def _evaluate(c: Configuration, out: Path, num_models: int, autoattack: str, eval_limit: Optional[int],
              log: Callable[[str], None], rows: dict[str, dict[str, Any]], stats: dict[str, dict[str, Any]]) -> None:
    """rows[c.slug] (and stats[c.slug] unless c diverged)."""
    record = divergence(c, out)
    if record is not None:
        rows[c.slug] = _diverged_row(c, out, num_models, record)
        return
    rows[c.slug], stats[c.slug] = _run_configuration(c, out, num_models, autoattack, eval_limit, log)


def _run_configuration(c: Configuration, out: Path, num_models: int, autoattack: str, eval_limit: Optional[int],
                       log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Audit (always recomputed from the saved stats: cheap) and the cached model-0 evaluation."""
    from demem_ext.audit.report import run_audit

    folder = out / c.folder
    stats = load_stats(folder, num_models)
    if stats["settings"]["config"] != c.config.to_dict():
        raise ValueError(f"{folder} holds models trained with another configuration than {c.slug!r} has now "
                         f"(e.g. after a change of DeMemConfig's defaults): use another --out or remove the folder")
    report = run_audit(stats, folder, title=f"{c.name}: membership inference")
    evaluation = _evaluate_model0(folder, autoattack, eval_limit)
    row = _row(c, report, evaluation, _train_seconds(folder, num_models))
    log(f"[{c.slug}] natural {100 * row['mean_test_natural_acc']:.2f}%  PGD-20 {100 * row['mean_test_pgd20_acc']:.2f}%"
        f"  LiRA TPR@1% {100 * row['lira_online']['tpr_at_fpr_0.01']:.2f}%  AUC {row['lira_online']['auc']:.3f}")
    return row, stats


# ---------------------------------------------------------------- the λ choice

def _add_bootstrap(rows: Sequence[dict[str, Any]], pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Sampling uncertainty of LiRA's TPR at 1% FPR: a 95% bootstrap interval per row and, paired on
    the same resamples, of its relative change from its family's baseline (PGD-AT or TRADES)."""
    import numpy as np

    from demem_ext.audit import metrics

    if not pairs:
        return
    slugs = list(pairs)
    draws = metrics.bootstrap_tpr_at_fpr([pairs[s] for s in slugs], 0.01, resamples=BOOTSTRAP_RESAMPLES,
                                         seed=BOOTSTRAP_SEED)
    column = {s: draws[:, k] for k, s in enumerate(slugs)}
    for r in rows:
        if r["slug"] not in column:
            continue
        mine = column[r["slug"]]
        r["lira_online"]["tpr_at_fpr_0.01_ci95"] = [float(x) for x in np.percentile(mine, [2.5, 97.5])]
        base = FAMILY_BASELINE[r["family"]]
        if base != r["slug"] and base in column:
            relative = mine / np.maximum(column[base], 1e-12) - 1
            point = r["lira_online"]["tpr_at_fpr_0.01"] / max(
                next(x for x in rows if x["slug"] == base)["lira_online"]["tpr_at_fpr_0.01"], 1e-12) - 1
            r["tpr_at_fpr_0.01_vs_baseline"] = {"baseline": base, "relative": float(point),
                                                "ci95": [float(x) for x in np.percentile(relative, [2.5, 97.5])]}


def choose_lambda(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Apply SELECTION_RULE to the result rows (by slug); returns {lam, rule, reason, candidates}."""
    base = rows.get(BASELINE_SLUG)
    sweep = [r for r in rows.values()
             if r["method"] == "demem" and r["family"] == "PGD-AT" and r.get("status", "ok") == "ok"]
    choice = {"rule": SELECTION_RULE, "lam": FALLBACK_LAMBDA, "candidates": []}
    if base is None or not sweep:
        choice["reason"] = (f"fallback λ = {FALLBACK_LAMBDA:g}: no results for "
                            f"{'PGD-AT' if base is None else 'the λ sweep'} in this folder")
        return choice
    floor = base["mean_test_pgd20_acc"] - ROBUSTNESS_MARGIN
    for r in sorted(sweep, key=lambda r: r["lam"]):
        choice["candidates"].append({"lam": r["lam"], "tpr_at_fpr_0.01": r["lira_online"]["tpr_at_fpr_0.01"],
                                     "mean_test_pgd20_acc": r["mean_test_pgd20_acc"],
                                     "qualifies": r["mean_test_pgd20_acc"] >= floor - 1e-12})
    qualified = [c for c in choice["candidates"] if c["qualifies"]]
    if not qualified:
        choice["reason"] = (f"fallback λ = {FALLBACK_LAMBDA:g}: no swept λ keeps mean PGD-20 within "
                            f"{100 * ROBUSTNESS_MARGIN:g} points of PGD-AT ({100 * base['mean_test_pgd20_acc']:.2f}%)")
        return choice
    best = min(qualified, key=lambda c: (c["tpr_at_fpr_0.01"], -c["mean_test_pgd20_acc"], c["lam"]))
    choice["lam"] = best["lam"]
    choice["reason"] = (f"λ = {best['lam']:g}: LiRA online TPR@1% {100 * best['tpr_at_fpr_0.01']:.2f}%, mean PGD-20 "
                        f"{100 * best['mean_test_pgd20_acc']:.2f}% (PGD-AT {100 * base['mean_test_pgd20_acc']:.2f}%)")
    return choice


def _sweep_rows_on_disk(all_configs: Sequence[Configuration], out: Path, num_models: int,
                        rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Rows for the λ choice: this run's, completed by audit.json files of earlier runs in the folder."""
    found = dict(rows)
    for c in all_configs:
        if c.slug in found or not (c.slug == BASELINE_SLUG or (c.method == "demem" and c.family == "PGD-AT")):
            continue
        path = out / c.folder / "audit.json"
        if path.exists() and not missing_models(out / c.folder, num_models):
            report = json.loads(path.read_text())
            if report.get("num_models") == num_models and report.get("config") == c.config.to_dict():
                found[c.slug] = {"method": c.method, "family": c.family, "lam": c.lam,
                                 "mean_test_pgd20_acc": report["test_accuracy"]["pgd20"],
                                 "lira_online": {"tpr_at_fpr_0.01": report["attacks"][LIRA]["tpr_at_fpr_0.01"]}}
    return found


# ---------------------------------------------------------------- the whole comparison

def _versions() -> dict[str, str]:
    import numpy

    try:
        import torchattacks

        ta = getattr(torchattacks, "__version__", "unknown")
    except ImportError:
        ta = "not installed"
    return {"python": platform.python_version(), "torch": torch.__version__, "torchattacks": ta,
            "numpy": numpy.__version__, "platform": platform.platform(), "processor": platform.processor() or "",
            "torch_threads": str(torch.get_num_threads())}


def reproduce(out_dir: str | Path, quick: bool = False, dataset: str = "digits", models: Optional[int] = None,
              epochs: Optional[int] = None, configs: Optional[str | Sequence[str]] = None, jobs: int = 1,
              autoattack: Optional[str] = None, progress: bool = False, log: Callable[[str], None] = print,
              base_overrides: Optional[dict[str, Any]] = None, eval_limit: Optional[int] = None,
              keep_seed: int = 0, command: Optional[str] = None, results_path: Optional[str | Path] = None
              ) -> dict[str, Any]:
    """Run (or resume) the comparison in out_dir; returns the summary (also out_dir/summary.json).

    quick: M = 4 models, 15 epochs of batch 32, AutoAttack "fast"; else M = 16, TrainConfig's epochs, "standard".
    configs: slugs or keywords (default: the comparison, SLUGS; see parse_configs). jobs > 1: shadow models in parallel processes.
    base_overrides: TrainConfig fields applied to the base configuration (e.g. attack_steps, batch_size).
    eval_limit: evaluate model 0 on the first N test samples only. results_path: also write the report
    there (PNGs copied next to it); out_dir/results.md is always written.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    selected_slugs = parse_configs(configs) or list(SLUGS)
    num_models = models if models is not None else (QUICK_MODELS if quick else FULL_MODELS)
    if isinstance(num_models, bool) or not isinstance(num_models, int) or num_models < 2:
        raise ValueError(f"models must be an integer >= 2 (leave-one-out LiRA), got {num_models!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    autoattack = autoattack or ("fast" if quick else "standard")
    if autoattack not in ("standard", "fast", "none"):
        raise ValueError(f"autoattack must be 'standard', 'fast' or 'none', got {autoattack!r}")
    base_values: dict[str, Any] = {"dataset": dataset, **(base_overrides or {})}
    if epochs is not None or quick:
        base_values["epochs"] = epochs if epochs is not None else QUICK_EPOCHS
    if quick:
        base_values.setdefault("batch_size", QUICK_BATCH)
    base = TrainConfig(**base_values)
    out.mkdir(parents=True, exist_ok=True)

    all_configs = configurations(base)
    first = [c for c in all_configs if c.slug in selected_slugs and c.slug != TRACE_SLUG]
    rows: dict[str, dict[str, Any]] = {}
    stats: dict[str, dict[str, Any]] = {}
    trained: dict[str, list[int]] = {}
    log(f"reproduce: {len(selected_slugs)} configuration(s), {num_models} models x {base.epochs} epochs, "
        f"AutoAttack {autoattack}, {jobs} process(es), folder {out}")
    pool = _Pool(jobs)
    try:
        trained.update(_train_all(first, out, num_models, keep_seed, pool, progress, log))
        _evaluate_all(first, out, autoattack, eval_limit, pool, log)
        for c in first:
            _evaluate(c, out, num_models, autoattack, eval_limit, log, rows, stats)
        choice = choose_lambda(_sweep_rows_on_disk(all_configs, out, num_models, rows))
        log(f"λ choice: {choice['reason']}")
        if TRACE_SLUG in selected_slugs:
            trace = next(c for c in configurations(base, trace_lam=choice["lam"]) if c.slug == TRACE_SLUG)
            trained.update(_train_all([trace], out, num_models, keep_seed, pool, progress, log))
            _evaluate_all([trace], out, autoattack, eval_limit, pool, log)
            _evaluate(trace, out, num_models, autoattack, eval_limit, log, rows, stats)
    finally:
        pool.close()

    ordered = [rows[s] for s in ALL_SLUGS if s in rows]
    plots: dict[str, Optional[str]] = {}
    curves = {}
    from demem_ext.audit import lira, metrics

    pairs = {}
    for r in ordered:
        if r["status"] != "ok":
            continue
        s = stats[r["slug"]]
        pairs[r["slug"]] = lira.leave_one_out(lira.logit_confidence(s["logits"], s["labels"]), s["keep"], online=True)
        curves[r["name"]] = metrics.roc(*pairs[r["slug"]])
    _add_bootstrap(ordered, pairs)
    plots["roc"] = metrics.plot_roc(curves, out / PLOTS["roc"], "LiRA online (natural queries, leave-one-out)").name
    use_aa = autoattack != "none"
    plots["tradeoff"] = plot_tradeoff(ordered, out / PLOTS["tradeoff"], use_aa).name
    best_slug = f"pgd-demem-l{choice['lam']:g}"
    default_slug = f"pgd-demem-l{DeMemConfig().lam:g}"
    by_bin: dict[str, Any] = {}
    if BASELINE_SLUG in stats:
        shown = dict.fromkeys((BASELINE_SLUG, DP_REFERENCE_SLUG, default_slug, best_slug))
        chosen = {rows[s]["name"]: stats[s] for s in shown if s in stats}
        by_bin = accuracy_by_memorization(stats[BASELINE_SLUG], chosen)
        plots["memorization"] = plot_accuracy_by_memorization(by_bin, out / PLOTS["memorization"]).name
    else:
        plots["memorization"] = None

    summary = {
        "command": command or f"demem_ext.reproduce.reproduce({str(out)!r}, quick={quick}, models={models}, "
                              f"epochs={epochs}, configs={configs!r}, jobs={jobs}, autoattack={autoattack!r})",
        "out_dir": str(out), "quick": quick, "dataset": dataset, "num_models": num_models, "epochs": base.epochs,
        "autoattack": autoattack, "eval_limit": eval_limit, "jobs": jobs, "keep_seed": keep_seed,
        "base_config": base.to_dict(), "base_overrides": base_overrides or {},
        "seeds": {"keep_seed": keep_seed, "model_seeds": f"base seed {base.seed} + model id (0..{num_models - 1})",
                  "split_seed": base.split_seed, "eval_seed": f"each configuration's model-0 seed ({base.seed})"},
        "versions": _versions(), "wall_seconds": round(time.perf_counter() - start, 1),
        "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
        "trained": trained, "lambda_choice": choice, "best_sweep_slug": best_slug if best_slug in rows else None,
        "rows": ordered, "accuracy_by_memorization": by_bin, "plots": plots,
        "robust_axis": "AutoAttack accuracy of model 0" if use_aa else "mean PGD-20 test accuracy",
    }
    write_text_atomic(json.dumps(summary, indent=2, default=str), out / "summary.json")
    write_results(summary, out / "results.md")
    if results_path is not None:
        write_results(summary, results_path)
    log(f"wrote {out / 'results.md'}" + (f" and {results_path}" if results_path else "")
        + f" ({summary['wall_seconds']:.0f} s)")
    return summary
