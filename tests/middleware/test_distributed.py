"""DeMem under torch.distributed: 2 ranks (gloo, spawned processes) give the update of one process.

One pair of spawned processes (starting them costs seconds) runs every case of CASES in turn: the
ranks train a tiny float64 MLP on their shares of the same batches, or check a refusal. The
single-process reference runs in the pytest process (torch.distributed not initialised there).
The last test runs `demem train` under torchrun.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import demem_ext as dx

WORLD = 2
STEPS = 4
BATCH = 12
DATASET = 40  # trace proxy: batches are drawn from this many samples
FEATURES, CLASSES = 5, 3
JOIN_TIMEOUT_S = 90


# ---------------------------------------------------------------------------------------- the run
def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(DATASET, FEATURES, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (DATASET,), generator=g)
    return x, y


def _batches() -> list[torch.Tensor]:
    """STEPS batches of BATCH dataset indices (a fresh random draw each step)."""
    g = torch.Generator().manual_seed(2)
    return [torch.randperm(DATASET, generator=g)[:BATCH] for _ in range(STEPS)]


def _share(step: int, rank: int, split: str) -> slice:
    """This rank's rows of a batch: 'even' halves, 'uneven' 3 / BATCH-3, 'shifting' a cut that moves."""
    cut = {"even": BATCH // 2, "uneven": 3, "shifting": 2 + 3 * step}[split]
    return slice(0, cut) if rank == 0 else slice(cut, BATCH)


def _loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, -inf where ok is 0 (a non-finite loss whose gradient is still finite)."""
    return F.cross_entropy(model(x), y, reduction="none") + torch.log(ok)


def _ok(bad: str) -> torch.Tensor:
    """1 per dataset sample; with bad set, 0 for rank 0's whole share of the first batch ('shifting')."""
    ok = torch.ones(DATASET, dtype=torch.float64)
    if bad:
        ok[_batches()[0][_share(0, 0, "shifting")]] = 0.0
    return ok


def _train(demem: dict, path: str, split: str, rank: Optional[int] = None,
           wrap: Callable[[nn.Module], nn.Module] = lambda m: m, bad: str = "") -> dict[str, Any]:
    """STEPS optimizer steps of DeMem on the batches (this rank's share of each, or all of it).

    bad: "" (all finite), "loss" (where _ok is 0: a -inf loss) or "grad" (there: a finite loss whose
    gradient is not finite; per-sample path only).
    """
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    trained = wrap(model)
    x, y = _data()
    ok = _ok(bad)
    seed = None if demem.get("secure_noise") else 1234
    with dx.DeMem(trained, optimizer, num_samples=DATASET, num_classes=CLASSES, seed=seed, **demem) as dm:
        for step, batch in enumerate(_batches()):
            idx = batch if rank is None else batch[_share(step, rank, split)]
            optimizer.zero_grad(set_to_none=True)
            if path == "weighting":
                dm.backward(_loss_fn(trained, x[idx], y[idx], ok[idx]), indices=idx, labels=y[idx])
            else:
                loss_fn = _bad_gradient_loss_fn if bad == "grad" else _loss_fn
                dm.backward_per_sample(loss_fn, x[idx], y[idx], ok[idx], indices=idx, labels=y[idx])
            optimizer.step()
    state = dm.state_dict()
    return {"params": [p.detach().clone() for p in model.parameters()], "trace": state["trace"],
            "class_moments": state["class_moments"], "noisy_batch_sizes": state["noisy_batch_sizes"], "steps": state["steps"]}


# ---------------------------------------------------------------------------------------- spawning
def _ddp(model: nn.Module) -> nn.Module:
    return DistributedDataParallel(model)


def _train_scenario(rank: int, demem: dict, path: str, split: str, bad: str = "") -> dict[str, Any]:
    return _train(demem, path, split, rank=rank, wrap=_ddp, bad=bad)


def _refusal_scenario(rank: int, demem_by_rank: list[dict], wrap: bool) -> str:
    """The error entering DeMem raises on this rank ('' if none)."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        with dx.DeMem(_ddp(model) if wrap else model, optimizer, **demem_by_rank[rank]):
            pass
    except ValueError as exc:
        return str(exc)
    return ""


def _nonfinite_scenario(rank: int) -> str:
    """Rank 1 has a NaN loss: both ranks stop with a ValueError (nothing waits forever)."""
    model = _ddp(_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    with dx.DeMem(model, optimizer) as dm:
        losses = _loss_fn(model, x[:4], y[:4], torch.ones(4, dtype=torch.float64))
        if rank == 1:
            losses = losses * torch.tensor([1.0, float("nan"), 1.0, 1.0], dtype=losses.dtype)
        try:
            dm.backward(losses)
        except ValueError as exc:
            return str(exc)
    return ""


class _NonFiniteGrad(torch.autograd.Function):
    """Identity whose backward divides by `flag`: a finite loss with a non-finite gradient where flag is 0."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (flag,) = ctx.saved_tensors
        return grad / flag.unsqueeze(-1), None


def _bad_gradient_loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Cross-entropy whose gradient is not finite where ok is 0 (the loss is)."""
    return F.cross_entropy(_NonFiniteGrad.apply(model(x), ok), y, reduction="none")


def _nonfinite_grad_scenario(rank: int, chunk_size: Optional[int]) -> str:
    """Per-sample path, rank 1 has a sample with a non-finite gradient only: every rank raises at the
    step (the error is found after the batch threshold was shared), in chunks or in one."""
    model = _ddp(_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    flag = torch.tensor([1.0, 1.0, 0.0 if rank == 1 else 1.0, 1.0], dtype=torch.float64)

    def loss_fn(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(_NonFiniteGrad.apply(m(xb), fb), yb, reduction="none")

    with dx.DeMem(model, optimizer, max_grad_norm=1.0, chunk_size=chunk_size) as dm:
        dm.backward_per_sample(loss_fn, x[:4], y[:4], flag)
        try:
            optimizer.step()
        except ValueError as exc:
            return str(exc)
    return ""


def _batch_size_scenario(rank: int) -> str:
    """`demem train`'s build with a global batch that 2 ranks cannot share evenly."""
    from demem_ext.training import TrainConfig, build

    try:
        build(TrainConfig(batch_size=255, epochs=1))
    except ValueError as exc:
        return str(exc)
    return ""


SCENARIOS: dict[str, Callable[..., Any]] = {
    "train": _train_scenario, "refusal": _refusal_scenario, "nonfinite": _nonfinite_scenario,
    "nonfinite_grad": _nonfinite_grad_scenario, "batch_size": _batch_size_scenario}
PER_SAMPLE = {"lam": 0.8, "threshold": "quantile", "quantile": 0.6, "max_grad_norm": 0.5, "noise_multiplier": 0.7}
TRACE = {"lam": 1.0, "proxy": "trace", "trace_decay": 0.5, "threshold": "mean", "k": 0.0}
ZTRACE = {**TRACE, "proxy": "ztrace"}
IQR = {**TRACE, "proxy": "iqr", "trace_window": 3, "k": 0.5}
CLASS = {"lam": 0.8, "threshold": "class", "class_decay": 0.5, "k": 0.0}
CASES: dict[str, tuple[str, dict]] = {  # all run in one pair of processes (starting them costs seconds)
    "weighting-mean": ("train", {"demem": {"lam": 0.8, "threshold": "mean", "k": 0.5}, "path": "weighting",
                                 "split": "even"}),
    "weighting-quantile": ("train", {"demem": {"lam": 1.5, "threshold": "quantile", "quantile": 0.7},
                                     "path": "weighting", "split": "even"}),
    "weighting-uneven-expected": ("train", {"demem": {"lam": 0.8, "expected_batch_size": 16},
                                            "path": "weighting", "split": "uneven"}),
    "per_sample-even": ("train", {"demem": PER_SAMPLE, "path": "per_sample", "split": "even"}),
    "per_sample-uneven": ("train", {"demem": PER_SAMPLE, "path": "per_sample", "split": "uneven"}),
    "per_sample-uneven-chunked": ("train", {"demem": {**PER_SAMPLE, "chunk_size": 2}, "path": "per_sample",
                                            "split": "uneven"}),
    "per_sample-secure": ("train", {"demem": {"lam": 0.5, "max_grad_norm": 0.5, "noise_multiplier": 1.0,
                                              "secure_noise": True}, "path": "per_sample", "split": "uneven"}),
    "trace-weighting": ("train", {"demem": TRACE, "path": "weighting", "split": "shifting"}),
    "trace-per_sample": ("train", {"demem": TRACE, "path": "per_sample", "split": "shifting"}),
    "ztrace-weighting": ("train", {"demem": ZTRACE, "path": "weighting", "split": "shifting"}),
    "ztrace-per_sample": ("train", {"demem": ZTRACE, "path": "per_sample", "split": "shifting"}),
    "iqr-weighting": ("train", {"demem": IQR, "path": "weighting", "split": "shifting"}),
    "iqr-per_sample": ("train", {"demem": IQR, "path": "per_sample", "split": "shifting"}),
    "class-weighting": ("train", {"demem": CLASS, "path": "weighting", "split": "shifting"}),
    "class-per_sample-chunked": ("train", {"demem": {**CLASS, "max_grad_norm": 0.5, "chunk_size": 2},
                                           "path": "per_sample", "split": "shifting"}),
    "skip-weighting": ("train", {"demem": {"lam": 0.8, "nonfinite": "skip"}, "path": "weighting",
                                 "split": "shifting", "bad": "loss"}),
    "skip-per_sample": ("train", {"demem": {**PER_SAMPLE, "nonfinite": "skip"}, "path": "per_sample",
                                  "split": "shifting", "bad": "loss"}),
    "skip-per_sample-gradient": ("train", {"demem": {**PER_SAMPLE, "nonfinite": "skip"}, "path": "per_sample",
                                           "split": "shifting", "bad": "grad"}),
    "mismatch": ("refusal", {"demem_by_rank": [{"lam": 0.5}, {"lam": 1.0}], "wrap": True}),
    "no-ddp": ("refusal", {"demem_by_rank": [{}, {}], "wrap": False}),
    "nonfinite": ("nonfinite", {}),
    "nonfinite-grad-chunked": ("nonfinite_grad", {"chunk_size": 2}),
    "nonfinite-grad-one-chunk": ("nonfinite_grad", {"chunk_size": None}),
    "batch_size": ("batch_size", {}),
}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    """Run every case in turn on this rank; the results so far are saved after each one."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=20))
    results: dict[str, Any] = {}
    try:
        for name, (scenario, kwargs) in CASES.items():
            try:
                results[name] = SCENARIOS[scenario](rank, **kwargs)
            except Exception as exc:  # recorded for the test of this case; later collectives may not match
                results[name] = {"unexpected error": f"{type(exc).__name__}: {exc}"}
                break
            finally:
                torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Any]]:
    """Every case's result on each of 2 gloo ranks (spawned processes), by case name."""
    tmp = tmp_path_factory.mktemp("ranks")
    ctx = mp.start_processes(_worker, args=(str(tmp / "pg-init"), str(tmp)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                break
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
    saved = [torch.load(tmp / f"rank{r}.pt", weights_only=False) if (tmp / f"rank{r}.pt").exists() else {}
             for r in range(WORLD)]
    return {name: [s.get(name, {"unexpected error": "not run (an earlier case failed or hung)"}) for s in saved]
            for name in CASES}


def _results(ranks: dict[str, list[Any]], case: str) -> list[Any]:
    for r, result in enumerate(ranks[case]):
        if isinstance(result, dict) and "unexpected error" in result:
            pytest.fail(f"case {case!r}, rank {r}: {result['unexpected error']}")
    return ranks[case]


def _assert_same_as_one_process(ranks: dict[str, list[Any]], case: str) -> list[dict]:
    results = _results(ranks, case)
    kwargs = CASES[case][1]
    demem = {k: v for k, v in kwargs["demem"].items() if k != "chunk_size"}
    single = _train(demem, kwargs["path"], "all", bad=kwargs.get("bad", ""))
    for r, result in enumerate(results):
        for got, want in zip(result["params"], single["params"]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"rank {r} parameters")
        torch.testing.assert_close(result["trace"], single["trace"], rtol=1e-10, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(result["class_moments"], single["class_moments"], rtol=1e-10, atol=1e-12)
        assert torch.equal(result["noisy_batch_sizes"], single["noisy_batch_sizes"])
        assert result["steps"] == single["steps"] == STEPS
    _assert_ranks_agree(results)
    return results


def _assert_ranks_agree(results: list[dict]) -> None:
    for got, want in zip(results[1]["params"], results[0]["params"]):
        assert torch.equal(got, want), "the ranks' parameters drifted apart"


# ---------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", ["weighting-mean", "weighting-quantile", "weighting-uneven-expected"])
def test_weighting_path_equals_one_process(ranks: dict, case: str) -> None:
    _assert_same_as_one_process(ranks, case)


@pytest.mark.parametrize("case", ["per_sample-even", "per_sample-uneven", "per_sample-uneven-chunked"])
def test_per_sample_path_with_clipping_and_noise_equals_one_process(ranks: dict, case: str) -> None:
    results = _assert_same_as_one_process(ranks, case)
    assert results[0]["noisy_batch_sizes"].tolist() == [BATCH] * STEPS  # the global count


def test_secure_noise_is_the_same_on_every_rank(ranks: dict) -> None:
    results = _results(ranks, "per_sample-secure")
    _assert_ranks_agree(results)
    single = _train({"lam": 0.5, "max_grad_norm": 0.5, "noise_multiplier": 1.0}, "per_sample", "all")
    assert not torch.allclose(results[0]["params"][0], single["params"][0])  # the OS seed, not 1234


@pytest.mark.parametrize("case", ["class-weighting", "class-per_sample-chunked"])
def test_class_threshold_equals_one_process(ranks: dict, case: str) -> None:
    """The class moments gather every rank's scores: τ_c, the update and the moments equal one process's."""
    results = _assert_same_as_one_process(ranks, case)
    assert int(results[0]["class_moments"][:, 0].gt(0).sum()) == CLASSES


@pytest.mark.parametrize("case", ["trace-weighting", "trace-per_sample", "ztrace-weighting", "ztrace-per_sample",
                                  "iqr-weighting", "iqr-per_sample"])
def test_trace_proxy_equals_one_process(ranks: dict, case: str) -> None:
    """Batches overlap across steps (the trace matters) and the cut between ranks moves every step; the
    z-scores of proxy="ztrace" take the global batch's moments; proxy="iqr" keeps every rank's losses."""
    results = _assert_same_as_one_process(ranks, case)
    trace = results[0]["trace"]
    filled = trace.isfinite().sum() if trace.dim() == 2 else trace.ne(0).sum()
    assert int(filled) > BATCH  # several batches' samples are in the trace


@pytest.mark.parametrize("case", ["skip-weighting", "skip-per_sample", "skip-per_sample-gradient"])
def test_rank_without_finite_samples_still_takes_part(ranks: dict, case: str) -> None:
    """nonfinite="skip" drops all of rank 0's first share: it contributes nothing but does not block.
    With non-finite gradients (finite losses) they count in the batch threshold and leave the sum only,
    in one process (chunks of 8) as on the ranks (one chunk each, or two)."""
    _assert_same_as_one_process(ranks, case)


@pytest.mark.parametrize("case", ["nonfinite-grad-chunked", "nonfinite-grad-one-chunk"])
def test_nonfinite_gradient_on_one_rank_stops_every_rank_at_the_step(ranks: dict, case: str) -> None:
    messages = _results(ranks, case)
    assert "non-finite per-sample gradients for samples at batch positions [2]" in messages[1]
    assert "non-finite per-sample gradients on 1 other rank(s)" in messages[0]
    assert all("every rank stops at the step" in m for m in messages)


def test_global_batch_must_divide_over_the_ranks(ranks: dict) -> None:
    for message in _results(ranks, "batch_size"):
        assert "batch_size 255 is the global batch" in message and "(2)" in message


def test_mismatched_config_is_refused_on_every_rank(ranks: dict) -> None:
    for message in _results(ranks, "mismatch"):
        assert "differs across ranks in lam" in message
        assert "rank 0: 0.5" in message and "rank 1: 1.0" in message


def test_model_without_ddp_is_refused_with_the_wrapper_order(ranks: dict) -> None:
    for message in _results(ranks, "no-ddp"):
        assert "DeMem(DistributedDataParallel(model), optimizer)" in message
        assert "DDP inside, DeMem outside" in message


def test_nonfinite_loss_on_one_rank_stops_every_rank(ranks: dict) -> None:
    messages = _results(ranks, "nonfinite")
    assert "non-finite" in messages[1] and "positions [1]" in messages[1]
    assert "rank 1 has non-finite" in messages[0]


# ---------------------------------------------------------------------------------------- torchrun
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_train(out: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "demem_ext.cli", "train", "--epochs", "2", "--attack-steps", "1", "--batch-size", "256",
               "--schedule", "none", "--threads", "1", "--no-progress", "--out", str(out), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.slow
def test_torchrun_train_writes_a_checkpoint_and_resumes(tmp_path: Path) -> None:
    """`demem train` under torchrun: one checkpoint per epoch from rank 0, then a resume on 2 ranks.

    The first run is stopped after epoch 1 (its checkpoint is edited to say so: as if killed),
    the resume trains epoch 2 on both ranks.
    """
    from demem_ext.training.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path / "run"
    first = _torchrun_train(out, "--epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("run folder:") == 1  # rank 0 alone reports
    payload = load_checkpoint(out / "checkpoint.pt", expected_format="demem-ext/train-v1")
    assert payload["epoch"] == 1 and payload["demem"]["steps"] == 5  # ceil(1198 / 2 / 128) steps
    assert payload["config"]["batch_size"] == 256
    before = {k: v.clone() for k, v in payload["model"].items()}
    assert all(not k.startswith("module.") for k in before)  # the unwrapped model's state

    payload["config"]["epochs"] = 2  # a 2-epoch run killed after epoch 1
    save_checkpoint(payload, out / "checkpoint.pt")
    resumed = _torchrun_train(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    payload = load_checkpoint(out / "checkpoint.pt", expected_format="demem-ext/train-v1")
    assert payload["epoch"] == 2 and payload["demem"]["steps"] == 10
    assert any(not torch.equal(payload["model"][k], v) for k, v in before.items())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    result = json.loads((out / "eval.json").read_text())  # rank 0's evaluation of the final model
    assert 0.0 <= result["pgd20_acc"] <= result["natural_acc"] <= 1.0
