"""The `demem` command: train, eval, audit, reproduce, bench."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from demem_ext.adversarial.robustness import check_autoattack
from demem_ext.arguments import (device, device_available, ensemble_size, finite_float, nonnegative_float,
                                 nonnegative_int, positive_int)
from demem_ext.config import CLIP_SCOPES, PROXIES, SELECTIONS, THRESHOLDS, DeMemConfig
from demem_ext.outputs import check_output_file, output_folder
from demem_ext.training import OPTIMIZERS, PATHS, SCHEDULES, TrainConfig
from demem_ext.training.config import DEMEM_SCORES
from demem_ext.training.precision import MEMORY_FORMATS, PRECISIONS

_DEMEM_CHOICES = {"proxy": PROXIES, "selection": SELECTIONS, "threshold": THRESHOLDS, "clip_scope": CLIP_SCOPES}
_DEMEM_TYPES = {"max_grad_norm": float, "expected_batch_size": int}
DEFAULT_SHADOW_MODELS = 16


def _add_train_args(p: argparse.ArgumentParser, run_flags: bool = True) -> None:
    """The training configuration's flags; run_flags: also --resume and --final-autoattack (`demem train`)."""
    d = TrainConfig()
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default=d.dataset, choices=["digits", "cifar10", "cifar100", "svhn"])
    g.add_argument("--data-dir", default=None, help="folder holding the torchvision dataset files")
    g.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    g.add_argument("--augment", action="store_true", help="standard augmentation (CIFAR/SVHN)")
    g.add_argument("--model", default=d.model, choices=["cnn", "resnet18", "wrn28-10", "wrn34-10"])
    g.add_argument("--norm", default=None, choices=["none", "batch", "group"])
    g = p.add_argument_group("adversarial training")
    g.add_argument("--at", default=d.at, choices=["pgd", "trades", "mart", "relaxloss", "none"],
                   help="objective (relaxloss: PGD-AT + RelaxLoss, Chen et al. 2022)")
    g.add_argument("--eps", type=nonnegative_float, default=d.eps, help="L-inf budget in [0, 1] pixel units")
    g.add_argument("--alpha", type=nonnegative_float, default=d.alpha, help="attack step size")
    g.add_argument("--attack-steps", type=nonnegative_int, default=d.attack_steps)
    g.add_argument("--beta", type=nonnegative_float, default=d.beta, help="TRADES/MART KL weight")
    g.add_argument("--relax-alpha", type=nonnegative_float, default=d.relax_alpha,
                   help="RelaxLoss target loss level α")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS)
    g.add_argument("--lr", type=finite_float, default=d.lr)
    g.add_argument("--momentum", type=nonnegative_float, default=d.momentum)
    g.add_argument("--weight-decay", type=nonnegative_float, default=d.weight_decay)
    g.add_argument("--schedule", default=d.schedule, choices=SCHEDULES)
    g.add_argument("--epochs", type=positive_int, default=d.epochs)
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    g.add_argument("--seed", type=int, default=d.seed, help="initialisation, shuffling, attack and noise seed")
    g.add_argument("--split-seed", type=int, default=d.split_seed, help="seed of the digits train/test split")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--device", type=device, default=d.device)
    add_precision_args(g)
    g = p.add_argument_group("DeMem (defaults: DeMemConfig)")
    g.add_argument("--no-demem", action="store_true", help="plain training loop without DeMem")
    g.add_argument("--path", default=d.path, choices=PATHS,
                   help="weighting (no per-sample grads) or per_sample (clipping/noise); auto picks")
    g.add_argument("--nonfinite", default=d.nonfinite, choices=["error", "skip"])
    g.add_argument("--demem-score", default=d.demem_score, choices=list(DEMEM_SCORES),
                   help="what the risk rule reads: the training loss, its cross-entropy part (TRADES/MART) or the "
                        "natural loss (default: loss)")
    g.add_argument("--chunk-size", type=positive_int, default=None, help="per-sample gradient rows at once")
    g.add_argument("--sampling", default=d.sampling, choices=["auto", "poisson", "shuffle"],
                   help="how batches are drawn: Poisson (each sample with probability batch_size/N; the only "
                        "sampling ε is reported for) or shuffled fixed-size; auto: Poisson when DeMem adds noise")
    g.add_argument("--target-epsilon", type=finite_float, default=None,
                   help="calibrate the noise multiplier to this ε at --delta (needs --max-grad-norm, "
                        "Poisson sampling and --lam 0 or --threshold fixed)")
    g.add_argument("--delta", type=finite_float, default=d.delta, help="δ of the reported ε (default 1e-5)")
    for f in dataclasses.fields(DeMemConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _DEMEM_TYPES.get(f.name, type(f.default) if f.default is not None else float)
        g.add_argument(flag, dest=f"demem_{f.name}", default=None, type=kind if f.name not in _DEMEM_CHOICES else str,
                       choices=_DEMEM_CHOICES.get(f.name), help=f"default {f.default!r}")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="run folder (default runs/<dataset>-<at>-<time>)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    if run_flags:
        g.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its checkpoint (with the configuration stored there)")
        g.add_argument("--final-autoattack", default="none", choices=["standard", "fast", "none"],
                       help="also run AutoAttack on the test split at the end")


def add_precision_args(g: argparse._ActionsContainer) -> None:
    """--precision and --memory-format (training only; evaluation and audit scoring stay fp32)."""
    g.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="training arithmetic (default fp32): bf16 autocast, or auto = bf16 where the device has native "
                        "bf16 (AMX or AVX512-BF16 CPUs, CUDA), fp32 elsewhere. bf16 is faster but failed the parity "
                        "check for DeMem (docs/benchmarks.md)")
    g.add_argument("--memory-format", default="contiguous", choices=list(MEMORY_FORMATS),
                   help="model and batch layout (default contiguous; auto = channels_last)")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed `demem train` flags (DeMem fields only where given)."""
    demem = {f.name: getattr(args, f"demem_{f.name}") for f in dataclasses.fields(DeMemConfig)
             if getattr(args, f"demem_{f.name}") is not None}
    return TrainConfig(
        dataset=args.dataset, data_dir=args.data_dir, download=args.download, augment=args.augment,
        model=args.model, norm=args.norm, at=args.at, eps=args.eps, alpha=args.alpha,
        attack_steps=args.attack_steps, beta=args.beta, relax_alpha=args.relax_alpha,
        optimizer=args.optimizer, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
        epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, split_seed=args.split_seed,
        device=args.device,
        use_demem=not args.no_demem, path=args.path, nonfinite=args.nonfinite,
        chunk_size=args.chunk_size, demem=demem, demem_score=args.demem_score, sampling=args.sampling,
        target_epsilon=args.target_epsilon,
        delta=args.delta, precision=args.precision, memory_format=args.memory_format)


_RUN_ONLY = {"epochs"}  # with --resume: applied (extends the run), not ignored


def given_train_flags(argv: Sequence[str]) -> dict[str, Any]:
    """The training flags present in argv (by dest), with their parsed values; defaults left out."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_train_args(parser)
    dests = vars(parser.parse_args([]))
    unset = object()
    parser.set_defaults(**dict.fromkeys(dests, unset))
    given, _ = parser.parse_known_args(list(argv))
    return {dest: value for dest, value in vars(given).items() if value is not unset}


def ignored_on_resume(given: dict[str, Any], stored: dict[str, Any]) -> list[str]:
    """The given flags (given_train_flags) whose value differs from the stored run configuration, as
    "--flag value (the run's: stored value)"; flags that are not configuration fields are left out."""
    stored_demem = dataclasses.asdict(TrainConfig.from_dict(stored).demem_config())
    ignored = []
    for dest, value in given.items():
        if dest.startswith("demem_"):
            name = dest[len("demem_"):]
            flag, old = name, stored_demem[name]
        elif dest == "no_demem":
            flag, old = dest, not stored["use_demem"]
        elif dest in stored and dest not in _RUN_ONLY:
            flag, old = dest, stored[dest]
        else:
            continue
        if value != old:
            ignored.append(f"--{flag.replace('_', '-')} {value} (the run's: {old})")
    return ignored


def _resume_epochs(args: argparse.Namespace, ckpt: Path) -> Optional[int]:
    """With --resume: check that the checkpoint exists, warn about every ignored flag, and return the
    --epochs to train on to when it was given (None: the run's own)."""
    from demem_ext.training.checkpoint import load_checkpoint
    from demem_ext.training.validate import check_payload

    if not ckpt.is_file():
        raise FileNotFoundError(f"--resume: there is no checkpoint {ckpt} to continue (check --out)")
    payload = load_checkpoint(ckpt, expected_format="demem-ext/train-v1")
    check_payload(payload, str(ckpt))
    stored = payload["config"]
    given = given_train_flags(args.argv)
    ignored = ignored_on_resume(given, stored)
    if ignored:
        print(f"demem train: warning: --resume continues with the configuration stored in {ckpt}; ignored: "
              + ", ".join(ignored), file=sys.stderr)
    return given.get("epochs")


def _print_table(title: str, result: dict[str, Any]) -> None:
    print(title)
    for key, value in result.items():
        shown = f"{100 * value:.2f}%" if key.endswith("_acc") else value
        print(f"  {key:<22} {shown}")


def cmd_train(args: argparse.Namespace) -> int:
    from demem_ext.middleware import collectives as distributed
    from demem_ext.adversarial.robustness import evaluate
    from demem_ext.training import CHECKPOINT_NAME, torch_distributed_group, train
    from demem_ext.training.loop import privacy_report

    check_autoattack(args.final_autoattack, "--final-autoattack")
    cfg = train_config_from_args(args)
    with torch_distributed_group(cfg.device) as main:  # under torchrun: one process per rank
        out = Path(args.out) if args.out else Path("runs") / f"{cfg.dataset}-{cfg.at}-{time.strftime('%Y%m%d-%H%M%S')}"
        if distributed.is_distributed():
            out = Path(distributed.broadcast_object(str(out)))  # rank 0's default folder name
        epochs = _resume_epochs(args, out / CHECKPOINT_NAME) if args.resume else None
        with output_folder(out):
            if main:
                print(f"run folder: {out}")
            start = time.perf_counter()
            state = train(cfg, out, resume=args.resume, progress=not args.no_progress, epochs=epochs)
            seconds = time.perf_counter() - start
    if not main:  # rank 0 evaluates and reports
        return 0
    result = evaluate(state.model, state.test_set, state.config.eps, state.info.num_classes,
                      clamp=state.info.input_range, autoattack=args.final_autoattack,
                      device=state.device, seed=state.config.seed, progress=not args.no_progress)
    result.update(privacy_report(state))
    result["train_seconds"] = round(seconds, 1)
    result["checkpoint"] = str(out / CHECKPOINT_NAME)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    _print_table("test split", result)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from demem_ext.adversarial.robustness import evaluate
    from demem_ext.training import build
    from demem_ext.training.checkpoint import load_checkpoint
    from demem_ext.training.validate import check_model_state, check_payload

    check_autoattack(args.autoattack)
    if args.json:
        check_output_file(Path(args.json), "--json")
    payload = load_checkpoint(args.checkpoint, expected_format="demem-ext/train-v1")
    cfg = check_payload(payload, args.checkpoint)
    where = args.device
    if where is None:
        where = cfg.device if device_available(cfg.device) else "cpu"
        if where != cfg.device:
            print(f"the checkpoint was trained on {cfg.device}, which is not here: evaluating on cpu")
    # the data source comes from eval's own flags only: never a stored data_dir or download=True
    cfg = dataclasses.replace(cfg, device=where, data_dir=args.data_dir, download=False, use_demem=False)
    state = build(cfg)
    check_model_state(payload["model"], state.model, args.checkpoint)
    state.model.load_state_dict(payload["model"])
    eps = cfg.eps if args.eps is None else args.eps
    result = evaluate(state.model, state.test_set, eps, state.info.num_classes, clamp=state.info.input_range,
                      pgd_steps=args.pgd_steps, autoattack=args.autoattack, batch_size=args.batch_size,
                      device=cfg.device, limit=args.limit, seed=args.seed, progress=not args.no_progress)
    result["checkpoint"] = str(args.checkpoint)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    _print_table("test split", result)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    cfg = train_config_from_args(args)
    out = Path(args.out) if args.out else Path("runs") / f"audit-{cfg.dataset}-{cfg.at}"
    with output_folder(out):
        return _audit(args, cfg, out)


def _audit(args: argparse.Namespace, cfg: TrainConfig, out: Path) -> int:
    """`demem audit` in its (existing) folder out."""
    from demem_ext.audit.report import format_report, run_audit
    from demem_ext.audit.shadow import load_stats, parse_shard, train_shadow_models

    print(f"audit folder: {out}")
    start = time.perf_counter()
    models = DEFAULT_SHADOW_MODELS if args.models is None else args.models
    if args.canaries:
        from demem_ext.audit.canaries import audit_with_canaries

        if args.merge_only or args.shard != "0/1":
            raise ValueError("--canaries trains all models in one process: it takes neither --merge-only nor --shard")
        print(format_report(audit_with_canaries(cfg, out, args.canaries, models, args.keep_seed,
                                                progress=not args.no_progress)))
        print(f"wrote {out / 'audit.json'} ({time.perf_counter() - start:.0f} s)")
        return 0
    if not args.merge_only:
        shard = parse_shard(args.shard)
        train_shadow_models(cfg, out, num_models=models, seed=args.keep_seed, shard=shard,
                            progress=not args.no_progress, ensemble=args.ensemble)
        if shard[1] > 1:
            print(f"shard {args.shard} done in {time.perf_counter() - start:.0f} s; "
                  f"merge with: demem audit --merge-only --out {out}")
            return 0
    stats = load_stats(out, num_models=args.models)
    report = run_audit(stats, out)
    print(format_report(report))
    if args.null_seeds:
        _null_check(stats, args.null_seeds, out)
    print(f"wrote {out / 'audit.json'}, {out / 'roc.png'}, {out / 'memorization_hist.png'} "
          f"({time.perf_counter() - start:.0f} s)")
    return 0


def _null_check(stats: dict, seeds_text: str, out: Path) -> None:
    """The null check of the folder's models (demem_ext.audit.calibration), printed and in null_check.json."""
    from demem_ext.audit.calibration import null_check
    from demem_ext.reproduce import parse_seeds
    from demem_ext.training.checkpoint import write_text_atomic

    result = null_check(stats, parse_seeds(seeds_text) or [])
    write_text_atomic(json.dumps(result, indent=2), out / "null_check.json")
    print(f"null check, fake-mask seeds {seeds_text}: mean TPR over seeds at 0.1% / 1% / 10% FPR "
          f"(! = outside the binomial 99% interval of {result['num_members']} members)")
    for name, row in result["attacks"].items():
        cells = [f"{100 * row[f'tpr_at_fpr_{f}']:.2f}%{'' if row[f'within_{f}'] else '!'}" for f in ("0.001", "0.01", "0.1")]
        print(f"  {name:<56} " + "  ".join(cells))
    print(f"null check {'passed' if result['passed'] else 'FAILED'}; wrote {out / 'null_check.json'}")


def cmd_reproduce(args: argparse.Namespace) -> int:
    import shlex

    from demem_ext.reproduce import parse_configs, parse_seeds, reproduce

    check_autoattack(args.autoattack or "standard")  # None: standard, or fast with --quick
    configs = parse_configs(args.configs)  # unknown slugs fail here, before anything runs
    keep_seeds = parse_seeds(args.keep_seeds)
    out = Path(args.out) if args.out else Path("runs") / f"reproduce-{args.dataset}{'-quick' if args.quick else ''}"
    flags = ["reproduce"] + (["--quick"] if args.quick else []) + ["--dataset", args.dataset, "--out", str(out)]
    for name in ("data_dir", "models", "epochs", "configs", "autoattack", "autoattack_models", "attack_steps",
                 "batch_size", "eval_limit", "keep_seed", "keep_seeds", "results", "threads"):
        if getattr(args, name) is not None:
            flags += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    flags += (["--jobs", str(args.jobs)] if args.jobs != 1 else []) + (["--no-progress"] if args.no_progress else [])
    flags += ["--ensemble", str(args.ensemble)] if args.ensemble != "auto" else []
    flags += [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in ("precision", "memory_format")
              if getattr(args, name) not in ("fp32", "contiguous")]
    command = "demem " + shlex.join(flags)
    overrides = {k: getattr(args, k) for k in ("attack_steps", "batch_size", "data_dir", "precision", "memory_format")
                 if getattr(args, k) is not None}
    with output_folder(out):
        reproduce(out, quick=args.quick, dataset=args.dataset, models=args.models, epochs=args.epochs, configs=configs,
                  jobs=args.jobs, autoattack=args.autoattack, progress=not args.no_progress,
                  base_overrides=overrides, eval_limit=args.eval_limit, keep_seed=args.keep_seed or 0,
                  command=command, results_path=args.results, keep_seeds=keep_seeds, ensemble=args.ensemble,
                  autoattack_models=args.autoattack_models or 1)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="demem", description="DeMem: privacy-enhanced robust adversarial learning")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="adversarial training with DeMem (default: digits, small CNN, PGD-AT)")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="natural, PGD and AutoAttack accuracy of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--autoattack", default="standard", choices=["standard", "fast", "none"])
    p.add_argument("--pgd-steps", type=nonnegative_int, default=20)
    p.add_argument("--eps", type=nonnegative_float, default=None, help="default: the training eps")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N test samples")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--device", type=device, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the result to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (one per attack, with an ETA)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("audit", help="membership-inference audit of a training configuration (shadow models)")
    _add_train_args(p, run_flags=False)  # shadow models always resume; no AutoAttack
    p.add_argument("--models", type=int, default=None,
                   help=f"shadow models M, each trained on a random half (default {DEFAULT_SHADOW_MODELS}; "
                        "with --merge-only: the folder's, checked when given)")
    p.add_argument("--keep-seed", type=int, default=0, help="seed of the inclusion masks")
    p.add_argument("--shard", default="0/1", help="train only models i, i+n, ... (i/n); merge later")
    p.add_argument("--merge-only", action="store_true", help="only merge the saved stats and report")
    p.add_argument("--ensemble", type=ensemble_size, default="auto",
                   help="train K shadow models at once in this process (vectorized; each model as it would be "
                        "alone). Default auto: 1 on a CPU in fp32, where ensembles measured no faster; else as many "
                        "as half the free memory holds (at most 8 on a CPU); docs/benchmarks.md")
    p.add_argument("--null-seeds", default=None,
                   help="also run the null check: score the models against fake masks of these seeds (a,b,...) "
                        "and write null_check.json")
    p.add_argument("--canaries", type=int, default=0,
                   help="known-answer check: give K random population samples a wrong label, report how often "
                        "the primary attack finds them (left out of the population numbers)")
    p.set_defaults(func=cmd_audit)
    p = sub.add_parser("reproduce", help="the paper's comparison: PGD-AT/TRADES vs DP-SGD vs DeMem (shadow models)")
    p.add_argument("--quick", action="store_true", help="4 models x 15 epochs (batch 32), AutoAttack fast: a first look")
    p.add_argument("--dataset", default="digits", choices=["digits", "cifar10", "cifar100", "svhn"])
    p.add_argument("--out", default=None, help="output folder (default runs/reproduce-<dataset>[-quick])")
    p.add_argument("--data-dir", default=None, help="folder holding the torchvision dataset files (CIFAR/SVHN)")
    p.add_argument("--models", type=positive_int, default=None,
                   help="shadow models per configuration (default 16; 4 quick)")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs per model (default 30; 15 quick)")
    p.add_argument("--configs", default=None,
                   help="comma-separated slugs, or all | variants | dp-match | comparison (default: comparison)")
    p.add_argument("--jobs", type=positive_int, default=1, help="train shadow models in N processes")
    p.add_argument("--ensemble", type=ensemble_size, default="auto",
                   help="train K shadow models of a configuration at once in each process (vectorized; each model "
                        "as it would be alone). Default auto: 1 on a CPU in fp32, where ensembles measured no "
                        "faster; else as many as half the free memory holds, shared by the jobs (at most 8 on a CPU)")
    p.add_argument("--autoattack", default=None, choices=["standard", "fast", "none"],
                   help="AutoAttack on model 0 (default standard; fast with --quick)")
    p.add_argument("--autoattack-models", type=positive_int, default=None,
                   help="evaluate models 0..N-1 of each configuration (natural, PGD-20, AutoAttack; the report's "
                        "AutoAttack column is their mean; default 1: model 0)")
    p.add_argument("--attack-steps", type=nonnegative_int, default=None, help="training PGD steps (default 10)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="training batch size (default 64; 32 quick)")
    p.add_argument("--eval-limit", type=positive_int, default=None,
                   help="evaluate the models on the first N test samples")
    p.add_argument("--keep-seed", type=int, default=None, help="seed of the inclusion masks (default 0): a replicate")
    p.add_argument("--keep-seeds", default=None,
                   help="comma-separated mask seeds a,b,c: R independent replicates in <out>/keep-<seed>/, "
                        "summarised with 95%% t-intervals across replicates")
    p.add_argument("--results", default=None, help="also write the report here (e.g. docs/results.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    add_precision_args(p)
    p.set_defaults(func=cmd_reproduce)
    from demem_ext.bench import add_bench_args, cmd_bench

    p = sub.add_parser("bench", help="benchmarks: fused op vs PyTorch/reference/Opacus, training-step costs")
    add_bench_args(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"demem {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
