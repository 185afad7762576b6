"""The ``autoquant`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import optuna

from autoquant.types import PlanError


def _study_from_args(args: argparse.Namespace) -> tuple[optuna.Study, object]:
    from autoquant.search import load_study, load_study_spec

    spec = load_study_spec(args.study)
    return load_study(spec, args.storage), spec


def cmd_search(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from autoquant.report import format_table, front_frame
    from autoquant.search import load_study_spec, run_search, storage_url
    from autoquant.search._spec import mask_password

    spec = load_study_spec(args.study)
    changes = {k: v for k, v in (("seed", args.seed), ("device", args.device)) if v is not None}
    spec = replace(spec, **changes)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    url = storage_url(spec, args.storage)
    print(f"study {spec.name!r} on task {spec.task!r}; storage {mask_password(url)}")
    study = run_search(spec, trials=args.trials, storage=url, progress=not args.quiet)
    print(format_table(front_frame(study, spec.max_accuracy_drop)))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from autoquant.search import load_study_spec, run_search
    from autoquant.search._spec import mask_password

    spec = load_study_spec(args.study)
    if args.device:
        spec = replace(spec, device=args.device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(f"worker joins study {spec.name!r} at {mask_password(args.storage)}")
    study = run_search(spec, trials=args.trials, storage=args.storage, progress=not args.quiet)
    done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    print(f"worker done: the study has {done} complete trials")
    return 0


def _context(study: optuna.Study, spec: object) -> object:
    from autoquant.measure import LatencyCache
    from autoquant.search import OptunaAttrStore, SearchContext

    return SearchContext(spec, latency_cache=LatencyCache(OptunaAttrStore(study)))


def cmd_export(args: argparse.Namespace) -> int:
    import json

    from autoquant.search import export_trial

    study, spec = _study_from_args(args)
    meta = export_trial(study, _context(study, spec), args.trial, args.out)
    print(
        json.dumps(
            {
                k: meta[k]
                for k in ("trial", "stored", "replayed", "deployed_accuracy_onnxruntime", "files")
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")
    return 0


def cmd_bench_latency(args: argparse.Namespace) -> int:
    from autoquant.search import bench_trial_latency, read_record

    study, spec = _study_from_args(args)
    results = bench_trial_latency(
        study,
        _context(study, spec),
        args.trial,
        repeats=args.repeats,
        budget_s=args.budget_s,
        backend=args.backend,
        threads=args.threads,
        batch_sizes=tuple(args.batch_size) if args.batch_size else None,
    )
    stored = read_record(study.trials[args.trial]).latency or []
    for r in results:
        old = next((s for s in stored if s.get("batch_size") == r["batch_size"]), None)
        was = f"  (stored {old['median_ms']:.4f} ms)" if old else ""
        print(
            f"trial {args.trial} {r['backend']} batch {r['batch_size']} threads {r['threads']}: "
            f"median {r['median_ms']:.4f} ms, IQR {r['iqr_ms']:.4f} ms, n={r['n']}{was}"
        )
    return 0


def cmd_front(args: argparse.Namespace) -> int:
    from autoquant.report import failed_frame, format_frame, front_frame

    study, spec = _study_from_args(args)
    df = failed_frame(study) if args.failed else front_frame(study, spec.max_accuracy_drop)
    print(format_frame(df, args.format), end="" if args.format == "csv" else "\n")
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    import json

    from autoquant.report import best_payload, best_trial, format_best, format_frame, plan_frame

    study, spec = _study_from_args(args)
    max_drop = (
        args.max_drop
        if args.max_drop is not None
        else (spec.max_accuracy_drop if spec.max_accuracy_drop is not None else 0.01)
    )
    trial = best_trial(study, max_drop=max_drop, minimize=args.minimize)
    if trial is None:
        print(f"autoquant: no complete trial has accuracy drop <= {max_drop}", file=sys.stderr)
        return 1
    fmt = "json" if args.json else args.format
    if fmt == "json":
        print(json.dumps(best_payload(study, trial, study_ref=args.study), indent=2))
    elif fmt == "csv":
        print(format_frame(plan_frame(study, trial), "csv"), end="")
    else:
        print(format_best(study, trial, study_ref=args.study))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from autoquant.report import write_report
    from autoquant.search import load_study, load_study_spec

    study, _ = _study_from_args(args)
    compare = None
    if args.compare:
        compare = load_study(load_study_spec(args.compare), args.compare_storage)
    paths = write_report(
        study,
        args.out,
        compare=compare,
        max_drop_reco=args.max_drop,
        size_fraction=args.size_fraction,
        study_ref=args.study,
    )
    print(paths["html"])
    return 0


DESCRIPTION = """\
Search per-layer quantization plans of a PyTorch model: each trial fine-tunes a plan with
quantization-aware training and scores accuracy, packed size and latency measured on integer
kernels. A study file (studies/*.toml) names the task, the search space and the budget."""

EPILOG = """\
examples:
  autoquant search studies/digits.toml          run or resume a study
  autoquant front studies/digits.toml           the Pareto front
  autoquant report studies/digits.toml --out report/
  autoquant export studies/digits.toml --trial 3 --out export-trial3"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("autoquant")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoquant",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"autoquant {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show Optuna's logs")
    sub = parser.add_subparsers(dest="command", required=True)

    def study_cmd(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("study", help="the study file (studies/*.toml)")
        p.add_argument(
            "--storage",
            help="Optuna storage URL (default: the study file's, "
            "else sqlite under $AUTOQUANT_RUNS or ./autoquant-runs)",
        )
        return p

    p = study_cmd("search", "run or resume a study")
    p.add_argument("--trials", type=int, help="complete trials wanted (default: the file's)")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch threads for QAT")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("worker", help="join a shared study (any number of workers, any machine)")
    p.add_argument("study", help="the study file (studies/*.toml)")
    p.add_argument(
        "--storage",
        required=True,
        help="the shared Optuna storage, e.g. postgresql://user:password@host/db",
    )
    p.add_argument("--trials", type=int, help="complete trials wanted (default: the file's)")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch threads for QAT in this worker")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_worker)

    p = study_cmd("front", "print the Pareto front")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--failed", action="store_true", help="list failed trials and reasons")
    p.set_defaults(func=cmd_front)

    p = study_cmd("export", "write a trial's plan, ONNX model, metadata and state dict")
    p.add_argument("--trial", type=int, required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_export)

    p = study_cmd("bench-latency", "re-measure one trial's latency with more repeats")
    p.add_argument("--trial", type=int, required=True)
    p.add_argument("--repeats", type=int, default=500)
    p.add_argument("--budget-s", type=float, default=10.0)
    p.add_argument("--backend", choices=["onnxruntime", "torch-x86"])
    p.add_argument("--threads", type=int)
    p.add_argument("--batch-size", type=int, action="append", help="repeatable")
    p.set_defaults(func=cmd_bench_latency)

    p = study_cmd("best", "print the best trial under an accuracy-drop limit, and its plan")
    p.add_argument(
        "--max-drop", type=float, help="fraction (default: the study's constraint, else 0.01)"
    )
    p.add_argument("--minimize", choices=["size", "latency"], default="size")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--json", action="store_true", help="same as --format json")
    p.set_defaults(func=cmd_best)

    p = study_cmd("report", "write report.html, report.md, trials.csv and front.csv")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--compare", help="another study file whose hypervolume is drawn too")
    p.add_argument("--compare-storage", help="storage URL of the --compare study")
    p.add_argument(
        "--max-drop",
        type=float,
        default=0.01,
        help="accuracy-drop limit of the recommendations (fraction)",
    )
    p.add_argument(
        "--size-fraction",
        type=float,
        default=0.25,
        help="size limit, as a fraction of float, of 'most accurate at <= size'",
    )
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from autoquant.search import InfrastructureError, StorageError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return args.func(args)
    except (PlanError, FileNotFoundError, StorageError, ValueError) as e:
        print(f"autoquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoquant: interrupted; completed trials are kept, rerun to resume", file=sys.stderr)
        return 130
    except InfrastructureError as e:  # the storage failed: exit code 3, one line
        print(f"autoquant: error: {e}; completed trials are kept, rerun to resume", file=sys.stderr)
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
