"""The ``autoquant`` command.

Exit codes (also in ``autoquant --help``): 0 done; 1 a search or worker stopped short of its
budget because too many trials of this run failed (``best``: no trial qualifies); 2 bad
input (study file, arguments, unknown study or trial, output folder); 3 the storage or disk
failed under us (a database outage past the retries, a full or read-only disk); 4 an export
was written but
its deployed model failed its check; 130 interrupted (Ctrl-C or SIGTERM).

One module of about 500 lines on purpose: the command's whole surface (the commands, the
argument types that validate each value, the exit codes) reads in one place, while the work
is done in :mod:`autoquant.search` and :mod:`autoquant.report`.
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

import optuna

from autoquant.types import PlanError

EXIT_OK = 0
EXIT_FAILURES = 1  # search/worker stopped short on failures; best: no trial qualifies
EXIT_BAD_INPUT = 2
EXIT_INFRASTRUCTURE = 3  # the storage failed (outage, full or read-only disk)
EXIT_DEPLOY_CHECK = 4  # export written, but the deployed model failed its check
EXIT_INTERRUPTED = 130


def _study_from_args(args: argparse.Namespace) -> tuple[optuna.Study, Any]:
    """The study of a read-only command: opened, never created."""
    from autoquant.search import load_existing_study, load_study_spec

    spec = load_study_spec(args.study)
    return load_existing_study(spec, args.storage), spec


def _storage_flag(args: argparse.Namespace, spec: Any) -> str | None:
    """The storage to name in printed commands: ``--storage`` when it is not the file's."""
    storage = getattr(args, "storage", None)
    return storage if storage and storage != spec.storage else None


def _command(args: argparse.Namespace, spec: Any, *words: str) -> str:
    """An ``autoquant`` command line for this study (with ``--storage`` when needed)."""
    from autoquant.search import mask_password

    line = " ".join(["autoquant", words[0], shlex.quote(args.study), *words[1:]])
    storage = _storage_flag(args, spec)
    return line + (f" --storage {shlex.quote(mask_password(storage))}" if storage else "")


def _front_or_message(study: optuna.Study, spec: Any, args: argparse.Namespace) -> str:
    """The front as a table, or a plain sentence when no trial is on it."""
    from autoquant.report import format_table, front_frame, points_text

    df = front_frame(study, spec.max_accuracy_drop)
    if not df.empty:
        return format_table(df)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    complete = states.count(optuna.trial.TrialState.COMPLETE)
    failed = states.count(optuna.trial.TrialState.FAIL)
    if complete == 0:
        why = f"study {study.study_name!r} has no complete trial"
        if failed:
            why += f" ({failed} failed; see `{_command(args, spec, 'front', '--failed')}`)"
        return f"no trial is on the Pareto front: {why}"
    return (
        f"no trial is on the Pareto front: none of the {complete} complete trials has an "
        f"accuracy drop <= {points_text(spec.max_accuracy_drop or 0.0)}"
    )


def _stopped_short(outcome: Any, args: argparse.Namespace, spec: Any) -> int:
    if not outcome.stopped_on_failures:
        return EXIT_OK
    failed = _command(args, spec, "front", "--failed")
    print(f"autoquant: {outcome.summary(failed)}", file=sys.stderr)
    return EXIT_FAILURES


def cmd_search(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from autoquant.search import (
        fork_study,
        load_study_spec,
        mask_password,
        new_run_id,
        run_outcome,
        run_search,
        storage_url,
    )

    spec = load_study_spec(args.study)
    changes = {k: v for k, v in (("seed", args.seed), ("device", args.device)) if v is not None}
    spec = replace(spec, **changes)
    if args.fork is not None:
        fork = fork_study(spec, args.fork or None, storage=args.storage)
        print(fork.summary())
        spec = fork.spec
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    url = storage_url(spec, args.storage)
    print(f"study {spec.name!r} on task {spec.task!r}; storage {mask_password(url)}")
    run = new_run_id()
    study = run_search(
        spec,
        trials=args.trials,
        storage=url,
        progress=not args.quiet,
        run=run,
        timeout=args.timeout,
    )
    print(_front_or_message(study, spec, args))
    return _stopped_short(run_outcome(study, run, args.trials or spec.trials), args, spec)


def cmd_worker(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from autoquant.search import (
        load_study_spec,
        mask_password,
        new_run_id,
        run_outcome,
        run_search,
    )

    spec = load_study_spec(args.study)
    if args.device:
        spec = replace(spec, device=args.device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(f"worker joins study {spec.name!r} at {mask_password(args.storage)}")
    run = new_run_id()
    study = run_search(
        spec,
        trials=args.trials,
        storage=args.storage,
        progress=not args.quiet,
        run=run,
        timeout=args.timeout,
    )
    outcome = run_outcome(study, run, args.trials or spec.trials)
    print(f"worker done: the study has {outcome.complete} judged trials")
    return _stopped_short(outcome, args, spec)


def _context(study: optuna.Study, spec: object) -> object:
    from autoquant.measure import LatencyCache
    from autoquant.search import OptunaAttrStore, SearchContext

    return SearchContext(spec, latency_cache=LatencyCache(OptunaAttrStore(study)))


def cmd_export(args: argparse.Namespace) -> int:
    import json

    from autoquant.search import EXPORT_FILES, DeploymentCheck, check_output_folder, export_trial

    # Before loading the task and replaying: a bad --out is known at once.
    check_output_folder(args.out, force=args.force, owned=EXPORT_FILES.__contains__, what="export")
    study, spec = _study_from_args(args)
    try:
        meta = export_trial(study, _context(study, spec), args.trial, args.out, force=args.force)
    except OSError as e:
        return _write_failed(args, e)
    keys = ("trial", "stored", "replayed", "deployed_accuracy_onnxruntime", "deployed_check")
    print(json.dumps({k: meta[k] for k in keys + ("files",)}, indent=2))
    print(f"wrote {args.out}")
    check = meta["deployed_check"]
    if check["ok"]:
        return EXIT_OK
    fields = {k: check[k] for k in DeploymentCheck.__dataclass_fields__}
    print(
        f"autoquant: WARNING: {DeploymentCheck(**fields).message()}.\n"
        f"autoquant: WARNING: the files are written to {args.out}, but the deployed model "
        "does not behave as the search measured it: check it before shipping. The check is "
        "stored with the trial; `autoquant front` and the report flag it.",
        file=sys.stderr,
    )
    return EXIT_DEPLOY_CHECK


def _write_failed(args: argparse.Namespace, e: OSError) -> int:
    if isinstance(e, FileNotFoundError):  # a missing input (data file): bad input, as before
        raise e
    print(f"autoquant: error: could not write {args.out}, nothing was: {e}", file=sys.stderr)
    return EXIT_INFRASTRUCTURE


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
    return EXIT_OK


def cmd_sensitivity(args: argparse.Namespace) -> int:
    import json

    from autoquant.report import format_frame, sensitivity_cost, sensitivity_table_frame
    from autoquant.search import ensure_sensitivity, load_study, load_study_spec, read_study_record

    spec = load_study_spec(args.study)
    study = load_study(spec, args.storage)  # it computes: creates the study like `search`
    if not read_study_record(study).sensitivity:  # measure it, claimed like in a search
        mode = spec.strategy.sensitivity if spec.strategy.sensitivity != "off" else "kl"
        ensure_sensitivity(study, _context(study, spec), mode=mode)
    df = sensitivity_table_frame(study)
    assert df is not None
    if args.format == "json":
        print(json.dumps(read_study_record(study).sensitivity, indent=2))
        return EXIT_OK
    if args.format == "table":
        cost = sensitivity_cost(study) or {}
        per_trial = f" (≈ {cost['trials']:.1f} trials)" if cost.get("trials") else ""
        print(
            f"sensitivity pre-pass of study {spec.name!r} ({cost.get('mode')}): "
            f"{cost.get('evaluations')} evaluations on {cost.get('held_out') or 0:.0f} "
            f"held-out samples, {cost.get('wall_s') or 0:.1f} s{per_trial}"
        )
    print(format_frame(df, args.format), end="" if args.format == "csv" else "\n")
    return EXIT_OK


def cmd_front(args: argparse.Namespace) -> int:
    from autoquant.report import failed_frame, format_frame

    study, spec = _study_from_args(args)
    if args.failed:
        df = failed_frame(study)
        if df.empty and args.format == "table":
            print(f"study {study.study_name!r} has no failed trials")
            return EXIT_OK
        print(format_frame(df, args.format), end="" if args.format == "csv" else "\n")
        return EXIT_OK
    if args.format == "table":
        print(_front_or_message(study, spec, args))
        return EXIT_OK
    from autoquant.report import front_frame

    df = front_frame(study, spec.max_accuracy_drop)
    print(format_frame(df, args.format), end="" if args.format == "csv" else "\n")
    return EXIT_OK


def cmd_best(args: argparse.Namespace) -> int:
    import json

    from autoquant.report import best_choice, best_payload, format_best, format_frame, plan_frame

    study, spec = _study_from_args(args)
    max_drop = (
        args.max_drop
        if args.max_drop is not None
        else (spec.max_accuracy_drop if spec.max_accuracy_drop is not None else 0.01)
    )
    choice = best_choice(study, max_drop=max_drop, minimize=args.minimize, tolerance=args.tolerance)
    if choice is None:
        print(f"autoquant: no complete trial has accuracy drop <= {max_drop}", file=sys.stderr)
        return EXIT_FAILURES
    trial = choice.trial
    storage = _storage_flag(args, spec)
    fmt = "json" if args.json else args.format
    if fmt == "json":
        payload = best_payload(study, trial, study_ref=args.study, storage=storage, choice=choice)
        print(json.dumps(payload, indent=2))
    elif fmt == "csv":
        print(format_frame(plan_frame(study, trial), "csv"), end="")
    else:
        print(format_best(study, trial, study_ref=args.study, storage=storage, choice=choice))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from autoquant.report import report_file, write_report
    from autoquant.search import check_output_folder, load_existing_study, load_study_spec

    check_output_folder(args.out, force=args.force, owned=report_file, what="report")
    study, spec = _study_from_args(args)
    compare = None
    if args.compare:
        compare = load_existing_study(load_study_spec(args.compare), args.compare_storage)
    try:
        paths = write_report(
            study,
            args.out,
            compare=compare,
            max_drop_reco=args.max_drop,
            size_fraction=args.size_fraction,
            study_ref=args.study,
            storage=_storage_flag(args, spec),
            tolerance=args.tolerance,
            force=args.force,
        )
    except OSError as e:
        return _write_failed(args, e)
    print(paths["html"])
    return EXIT_OK


DESCRIPTION = """\
Search per-layer quantization plans of a PyTorch model: each trial fine-tunes a plan with
quantization-aware training and scores accuracy, packed size and latency measured on integer
kernels. A study file (studies/*.toml) names the task, the search space and the budget."""

EPILOG = """\
examples:
  autoquant search studies/digits.toml          run or resume a study
  autoquant search studies/digits.toml --fork   continue an edited space as a new study
  autoquant front studies/digits.toml           the Pareto front
  autoquant front studies/digits.toml --failed  failed trials, their run and reason
  autoquant sensitivity studies/digits.toml     the per-layer sensitivity table
  autoquant report studies/digits.toml --out report/
  autoquant export studies/digits.toml --trial 3 --out export-trial3

exit codes:
  0    done (search/worker: the study's trial budget is judged, or the time budget is spent)
  1    search/worker stopped short: too many trials of this run failed (max(5, trials));
       best: no trial qualifies
  2    bad input: study file, arguments, unknown study or trial, output folder
  3    the storage or disk failed under us (database outage past the retries, full or
       read-only disk); completed trials are kept, rerun to resume
  4    export written, but its deployed model failed its check (ONNX Runtime accuracy
       more than 0.5 points from the simulation, or a drop over the study's limit)
  130  interrupted (Ctrl-C or SIGTERM); completed trials are kept, rerun to resume"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("autoquant")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


# -- argument types: each error names the value and the allowed values --------------------------


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    allowed = f"an integer {low}..{high}" if high is not None else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an integer; allowed values: {allowed}"
            ) from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is not allowed; allowed values: {allowed}")
        return value

    return parse


def _threads(text: str) -> int:
    from autoquant.search import threads_problem

    value = _int_in(1)(text)
    problem = threads_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def _float_in(low: float, high: float = math.inf, *, open_low: bool = False) -> Callable:
    bound = f"> {low:g}" if open_low else f">= {low:g}"
    allowed = f"a number {bound}" + (f" and <= {high:g}" if math.isfinite(high) else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number; allowed values: {allowed}"
            ) from None
        if not math.isfinite(value) or value < low or (open_low and value == low) or value > high:
            raise argparse.ArgumentTypeError(f"{text} is not allowed; allowed values: {allowed}")
        return value

    return parse


def _study_name(text: str) -> str:
    from autoquant.search import study_name_problem

    problem = study_name_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


TIMEOUT_HELP = (
    "stop starting trials after this wall time (seconds, or e.g. 90s, 10m, 2h; default the "
    "study file's [study] timeout); the trial in flight finishes"
)


def _duration(text: str) -> float:
    from autoquant.search._strategy import StrategyError, parse_duration

    try:
        return parse_duration(text, "--timeout")
    except StrategyError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from autoquant.search import MAX_SEED

    parser = argparse.ArgumentParser(
        prog="autoquant",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"autoquant {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show Optuna's logs")
    sub = parser.add_subparsers(dest="command", required=True)
    fraction = _float_in(0.0, 1.0)
    trials_help = "trials to judge (complete or pruned), >= 1 (default: the study file's)"

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
    p.add_argument("--trials", type=_int_in(1), help=trials_help)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=_int_in(0, MAX_SEED))
    p.add_argument("--threads", type=_threads, help="torch threads for QAT")
    p.add_argument("--timeout", type=_duration, help=TIMEOUT_HELP)
    p.add_argument(
        "--fork",
        nargs="?",
        const="",
        type=lambda t: t if t == "" else _study_name(t),
        metavar="NEWNAME",
        help="start a new study NEWNAME (default: <name>-fork<k>) in the same storage from "
        "this one: its float baseline, latency measurements and the complete trials valid "
        "in the study file's (edited) space",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("worker", help="join a shared study (any number of workers, any machine)")
    p.add_argument("study", help="the study file (studies/*.toml)")
    p.add_argument(
        "--storage",
        required=True,
        help="the shared Optuna storage, e.g. postgresql://user:password@host/db",
    )
    p.add_argument("--trials", type=_int_in(1), help=trials_help)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=_threads, help="torch threads for QAT in this worker")
    p.add_argument("--timeout", type=_duration, help=TIMEOUT_HELP)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_worker)

    p = study_cmd(
        "sensitivity",
        "the per-layer sensitivity table of the study's pre-pass (measured once if missing)",
    )
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.set_defaults(func=cmd_sensitivity)

    p = study_cmd("front", "print the Pareto front")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument(
        "--failed", action="store_true", help="list failed trials of every run, with reasons"
    )
    p.set_defaults(func=cmd_front)

    p = study_cmd("export", "write a trial's plan, ONNX model, metadata and state dict")
    p.add_argument("--trial", type=_int_in(0), required=True)
    p.add_argument("--out", required=True, help="output folder: new or empty")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a previous autoquant export in --out (other files are never deleted)",
    )
    p.set_defaults(func=cmd_export)

    p = study_cmd("bench-latency", "re-measure one trial's latency with more repeats")
    p.add_argument("--trial", type=_int_in(0), required=True)
    p.add_argument("--repeats", type=_int_in(1), default=500)
    p.add_argument("--budget-s", type=_float_in(0.0, open_low=True), default=10.0)
    p.add_argument("--backend", choices=["onnxruntime", "torch-x86"])
    p.add_argument("--threads", type=_threads)
    p.add_argument("--batch-size", type=_int_in(1), action="append", help="repeatable")
    p.set_defaults(func=cmd_bench_latency)

    tolerance_help = (
        "take the most accurate trial within (1 + TOLERANCE) x the smallest size or latency "
        "(a fraction, default 0.01 = 1 %%; 0 = the optimum itself)"
    )
    p = study_cmd("best", "print the best trial under an accuracy-drop limit, and its plan")
    p.add_argument(
        "--max-drop", type=fraction, help="fraction (default: the study's constraint, else 0.01)"
    )
    p.add_argument("--minimize", choices=["size", "latency"], default="size")
    p.add_argument("--tolerance", type=_float_in(0.0), default=0.01, help=tolerance_help)
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--json", action="store_true", help="same as --format json")
    p.set_defaults(func=cmd_best)

    p = study_cmd("report", "write report.html, report.md, trials.csv and front.csv")
    p.add_argument("--out", required=True, help="output folder: new or empty")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a previous autoquant report in --out (other files are never deleted)",
    )
    p.add_argument("--compare", help="another study file whose hypervolume is drawn too")
    p.add_argument("--compare-storage", help="storage URL of the --compare study")
    p.add_argument(
        "--max-drop",
        type=fraction,
        default=0.01,
        help="accuracy-drop limit of the recommendations (fraction)",
    )
    p.add_argument(
        "--size-fraction",
        type=_float_in(0.0, open_low=True),
        default=0.25,
        help="size limit, as a fraction of float, of 'most accurate at <= size'",
    )
    p.add_argument("--tolerance", type=_float_in(0.0), default=0.01, help=tolerance_help)
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from autoquant.search import InfrastructureError, StorageError, StudyNotFoundError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help / --version (0), or a bad argument (2: argparse's message)
        return e.code if isinstance(e.code, int) else EXIT_OK
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return args.func(args)
    except (PlanError, FileNotFoundError, StorageError, StudyNotFoundError, ValueError) as e:
        print(f"autoquant: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("autoquant: interrupted; completed trials are kept, rerun to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except InfrastructureError as e:  # the storage failed: one line, exit code 3
        print(f"autoquant: error: {e}; completed trials are kept, rerun to resume", file=sys.stderr)
        return EXIT_INFRASTRUCTURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
