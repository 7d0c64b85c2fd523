"""`demem reproduce`: the paper's comparison on shadow models (docs/design.md, "The reproduction").

PGD-AT vs PGD-AT + DP-SGD vs PGD-AT + DeMem (λ sweep, loss-trace proxy), and the same with TRADES.
For each configuration: M shadow models (resumable, `train_shadow_models`), the membership-inference
audit (`run_audit`), and the robustness of models 0 .. autoattack_models − 1 (natural, PGD-20, AutoAttack;
cached). Then the
λ of the trace configuration is chosen by a fixed rule, three figures are drawn and a Markdown
report is written. Layout of the output folder (one replicate):

    <slug>/                 one audit folder per configuration (keep.pt, models/, audit.json, roc.png ...)
    <slug>/eval_model<k>.json robustness of model k (reused on rerun when its settings match)
    summary.json            every number of the report
    roc_primary.png  privacy_robustness.png  accuracy_by_memorization.png
    results.md

With several inclusion-mask seeds (`keep_seeds`), each replicate is such a folder, keep-<seed>/, and
out_dir gets the replicates' summary.json and results.md (mean over replicates with t-intervals).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from demem_ext.audit import metrics
from demem_ext.audit.attacks import PRIMARY_RULE
from demem_ext.config import DeMemConfig
from demem_ext.reproduce.configs import (BASELINE_SLUG, DP_REFERENCE_SLUG, FAMILY_BASELINE, FULL_MODELS, QUICK_BATCH,
                                         QUICK_EPOCHS, QUICK_MODELS, SLUGS, TRACE_SLUG, ALL_SLUGS, configurations,
                                         parse_configs)
from demem_ext.reproduce.jobs import Pool, evaluate_all, train_all
from demem_ext.reproduce.plots import plot_accuracy_by_memorization, plot_roc_by_family, plot_tradeoff
from demem_ext.reproduce.report import write_results
from demem_ext.reproduce.rows import LIRA_OFFLINE, accuracy_by_memorization, choose_lambda, evaluate, sweep_rows_on_disk
from demem_ext.reproduce.statistics import BOOTSTRAP_RESAMPLES, add_bootstrap, replicate_table
from demem_ext.training import TrainConfig
from demem_ext.training.checkpoint import write_text_atomic
from demem_ext.training.ensemble_size import check_ensemble

PLOTS = {"roc": "roc_primary.png", "tradeoff": "privacy_robustness.png",
         "memorization": "accuracy_by_memorization.png"}


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



def _base_config(quick: bool, dataset: str, epochs: Optional[int],
                 base_overrides: Optional[dict[str, Any]]) -> TrainConfig:
    values: dict[str, Any] = {"dataset": dataset, **(base_overrides or {})}
    if epochs is not None or quick:
        values["epochs"] = epochs if epochs is not None else QUICK_EPOCHS
    if quick:
        values.setdefault("batch_size", QUICK_BATCH)
    return TrainConfig(**values)


def _figures(ordered: Sequence[dict[str, Any]], stats: dict[str, Any], scores: dict[str, Any], out: Path,
             use_aa: bool, choice: dict[str, Any]) -> tuple[dict[str, Optional[str]], dict[str, Any]]:
    """The three figures of one replicate; returns (plot file names, the accuracy-by-memorization table)."""
    curves: dict[str, dict[str, Any]] = {}
    for r in ordered:
        if r["status"] != "ok":
            continue
        family = curves.setdefault(r["family"], {})
        family[r["name"]] = metrics.roc(*scores[r["slug"]][r["primary"]["attack"]])[:2]
        if FAMILY_BASELINE[r["family"]] == r["slug"]:
            family[f"{r['name']}, {LIRA_OFFLINE}"] = metrics.roc(*scores[r["slug"]][LIRA_OFFLINE])[:2]
    attack = next((r["primary"]["attack"] for r in ordered if r["status"] == "ok"), "")
    plots: dict[str, Optional[str]] = {
        "roc": plot_roc_by_family(curves, out / PLOTS["roc"], f"{attack} (leave-one-out)").name if curves else None,
        "tradeoff": plot_tradeoff(ordered, out / PLOTS["tradeoff"], use_aa).name}
    best_slug = f"pgd-demem-l{choice['lam']:g}"
    default_slug = f"pgd-demem-l{DeMemConfig().lam:g}"
    by_bin: dict[str, Any] = {}
    plots["memorization"] = None
    if BASELINE_SLUG in stats:
        shown = dict.fromkeys((BASELINE_SLUG, DP_REFERENCE_SLUG, default_slug, best_slug))
        names = {r["slug"]: r["name"] for r in ordered}
        by_bin = accuracy_by_memorization(stats[BASELINE_SLUG], {names[s]: stats[s] for s in shown if s in stats})
        plots["memorization"] = plot_accuracy_by_memorization(by_bin, out / PLOTS["memorization"]).name
    return plots, by_bin


def _replicate(out: Path, base: TrainConfig, selected_slugs: Sequence[str], num_models: int, keep_seed: int,
               pool: Pool, autoattack: str, eval_limit: Optional[int], progress: bool,
               log: Callable[[str], None], ensemble: int | str = "auto", autoattack_models: int = 1
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train, audit and evaluate one replicate (one inclusion-mask seed) in out; the summary's numbers, and
    the primary attack's (scores, is_member) per configuration."""
    all_configs = configurations(base)
    first = [c for c in all_configs if c.slug in selected_slugs and c.slug != TRACE_SLUG]
    rows: dict[str, dict[str, Any]] = {}
    stats: dict[str, dict[str, Any]] = {}
    scores: dict[str, Any] = {}
    trained = train_all(first, out, num_models, keep_seed, pool, progress, log, ensemble)
    evaluate_all(first, out, autoattack, eval_limit, pool, log, autoattack_models)
    for c in first:
        evaluate(c, out, num_models, autoattack, eval_limit, log, rows, stats, scores, autoattack_models)
    choice = choose_lambda(sweep_rows_on_disk(all_configs, out, num_models, rows))
    log(f"λ choice: {choice['reason']}")
    if TRACE_SLUG in selected_slugs:
        trace = next(c for c in configurations(base, trace_lam=choice["lam"]) if c.slug == TRACE_SLUG)
        trained.update(train_all([trace], out, num_models, keep_seed, pool, progress, log, ensemble))
        evaluate_all([trace], out, autoattack, eval_limit, pool, log, autoattack_models)
        evaluate(trace, out, num_models, autoattack, eval_limit, log, rows, stats, scores, autoattack_models)
    ordered = [rows[s] for s in ALL_SLUGS if s in rows]
    primary = {s: v[rows[s]["primary"]["attack"]] for s, v in scores.items()}
    add_bootstrap(ordered, primary)
    plots, by_bin = _figures(ordered, stats, scores, out, autoattack != "none", choice)
    best_slug = f"pgd-demem-l{choice['lam']:g}"
    return {"trained": trained, "lambda_choice": choice, "best_sweep_slug": best_slug if best_slug in rows else None,
            "rows": ordered, "accuracy_by_memorization": by_bin, "plots": plots}, primary


def parse_seeds(text: Optional[str | Sequence[int]]) -> Optional[list[int]]:
    """"a,b,c" (or a list) -> distinct non-negative ints in order; None/empty -> None."""
    if text is None:
        return None
    items = [s.strip() for s in text.split(",") if s.strip()] if isinstance(text, str) else list(text)
    try:
        seeds = [int(s) for s in items]
    except ValueError:
        raise ValueError(f"keep_seeds must be comma-separated integers, got {text!r}") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"keep_seeds must be distinct non-negative integers, got {text!r}")
    return seeds or None


def reproduce(out_dir: str | Path, quick: bool = False, dataset: str = "digits", models: Optional[int] = None,
              epochs: Optional[int] = None, configs: Optional[str | Sequence[str]] = None, jobs: int = 1,
              autoattack: Optional[str] = None, progress: bool = False, log: Callable[[str], None] = print,
              base_overrides: Optional[dict[str, Any]] = None, eval_limit: Optional[int] = None,
              keep_seed: int = 0, command: Optional[str] = None, results_path: Optional[str | Path] = None,
              keep_seeds: Optional[str | Sequence[int]] = None, ensemble: int | str = "auto",
              autoattack_models: int = 1) -> dict[str, Any]:
    """Run (or resume) the comparison in out_dir; returns the summary (also out_dir/summary.json).

    quick: M = 4 models, 15 epochs of batch 32, AutoAttack "fast"; else M = 16, TrainConfig's epochs, "standard".
    configs: slugs or keywords (default: the comparison, SLUGS; see parse_configs). jobs > 1: shadow models in parallel processes.
    base_overrides: TrainConfig fields applied to the base configuration (e.g. attack_steps, batch_size).
    eval_limit: evaluate the models on the first N test samples only. autoattack_models: natural, PGD-20 and
    AutoAttack accuracy of models 0 .. N − 1 (the report's AutoAttack column is their mean; model 0 alone is
    also reported). results_path: also write the report
    there (PNGs copied next to it); out_dir/results.md is always written.
    keep_seeds: R >= 2 inclusion-mask seeds: R replicates in out_dir/keep-<seed>/, summarised in out_dir
    (mean over replicates with 95% t-intervals); otherwise the one replicate keep_seed, in out_dir itself.
    ensemble: train K models of a configuration at once per process (vectorized, `train_ensemble`); "auto":
    the fastest measured K that fits the memory budget (`demem_ext.training.ensemble_size`).
    """
    start = time.perf_counter()
    out = Path(out_dir)
    selected_slugs = parse_configs(configs) or list(SLUGS)
    seeds = parse_seeds(keep_seeds) or [keep_seed]
    num_models = models if models is not None else (QUICK_MODELS if quick else FULL_MODELS)
    if isinstance(num_models, bool) or not isinstance(num_models, int) or num_models < 2:
        raise ValueError(f"models must be an integer >= 2 (leave-one-out LiRA), got {num_models!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    check_ensemble(ensemble, num_models)
    if (isinstance(autoattack_models, bool) or not isinstance(autoattack_models, int)
            or not 1 <= autoattack_models <= num_models):
        raise ValueError(f"autoattack_models must be an integer in [1, {num_models}] (the models), "
                         f"got {autoattack_models!r}")
    autoattack = autoattack or ("fast" if quick else "standard")
    if autoattack not in ("standard", "fast", "none"):
        raise ValueError(f"autoattack must be 'standard', 'fast' or 'none', got {autoattack!r}")
    base = _base_config(quick, dataset, epochs, base_overrides)
    out.mkdir(parents=True, exist_ok=True)
    log(f"reproduce: {len(selected_slugs)} configuration(s), {num_models} models x {base.epochs} epochs, "
        f"AutoAttack {autoattack}, {jobs} process(es), mask seed(s) {', '.join(map(str, seeds))}, folder {out}")
    use_aa = autoattack != "none"
    common = {
        "command": command or f"demem_ext.reproduce.reproduce({str(out)!r}, quick={quick}, models={models}, "
                              f"epochs={epochs}, configs={configs!r}, jobs={jobs}, ensemble={ensemble!r}, "
                              f"autoattack={autoattack!r}, autoattack_models={autoattack_models}, "
                              f"keep_seeds={seeds})",
        "quick": quick, "dataset": dataset, "num_models": num_models, "epochs": base.epochs,
        "autoattack": autoattack, "autoattack_models": autoattack_models, "eval_limit": eval_limit, "jobs": jobs,
        "ensemble": ensemble,
        "base_config": base.to_dict(), "base_overrides": base_overrides or {}, "versions": _versions(),
        "bootstrap_resamples": BOOTSTRAP_RESAMPLES, "primary_attack": None, "primary_rule": PRIMARY_RULE,
        "robust_axis": (("AutoAttack accuracy of model 0" if autoattack_models == 1 else
                         f"mean AutoAttack accuracy of models 0-{autoattack_models - 1}") if use_aa
                        else "mean PGD-20 test accuracy")}
    summaries: dict[int, dict[str, Any]] = {}
    primary_scores: dict[int, dict[str, Any]] = {}
    pool = Pool(jobs)
    try:
        for seed in seeds:
            folder = out if len(seeds) == 1 else out / f"keep-{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            numbers, primary_scores[seed] = _replicate(folder, base, selected_slugs, num_models, seed, pool,
                                                       autoattack, eval_limit, progress, log, ensemble,
                                                       autoattack_models)
            primary = next((r["primary"]["attack"] for r in numbers["rows"] if r["status"] == "ok"), None)
            summary = {**common, **numbers, "out_dir": str(folder), "keep_seed": seed, "primary_attack": primary,
                       "seeds": {"keep_seed": seed, "model_seeds": f"base seed {base.seed} + model id "
                                 f"(0..{num_models - 1})", "split_seed": base.split_seed,
                                 "eval_seed": f"each configuration's model-0 seed ({base.seed})"},
                       "wall_seconds": round(time.perf_counter() - start, 1)}
            write_text_atomic(json.dumps(summary, indent=2, default=str), folder / "summary.json")
            write_results(summary, folder / "results.md")
            summaries[seed] = summary
    finally:
        pool.close()
    if len(seeds) == 1:
        summary = summaries[seeds[0]]
    else:  # the replicates' report: replicate table, and replicate 0's per-configuration detail
        first = summaries[seeds[0]]
        summary = {**first, "out_dir": str(out), "keep_seeds": seeds, "replicates": replicate_table(summaries, primary_scores),
                   "replicate_folders": {s: f"keep-{s}" for s in seeds},
                   "plots": {k: (f"keep-{seeds[0]}/{v}" if v else None) for k, v in first["plots"].items()},
                   "wall_seconds": round(time.perf_counter() - start, 1)}
        write_text_atomic(json.dumps(summary, indent=2, default=str), out / "summary.json")
        write_results(summary, out / "results.md")
    if results_path is not None:
        write_results(summary, results_path)
    log(f"wrote {out / 'results.md'}" + (f" and {results_path}" if results_path else "")
        + f" ({time.perf_counter() - start:.0f} s)")
    return summary
