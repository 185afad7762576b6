"""Trials per minute of a study with 1 worker and with N workers sharing it on PostgreSQL.

The cores are split, not oversubscribed: 1 worker x C threads against N workers x C/N threads
(C = the cores, 2 here). Each run is a fresh study (own name), so both pay the same latency
measurements. Rates are over the trial window (first trial start to last trial end, i.e.
without process start-up and the float baseline) and over the wall clock of the whole run.

Usage:
    .venv/bin/python scripts/bench_workers.py                       # starts its own PostgreSQL
    .venv/bin/python scripts/bench_workers.py --storage postgresql://u:pw@host/db --trials 30
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start_postgres() -> tuple[str, str]:
    out = subprocess.run(
        [str(ROOT / "scripts" / "start_postgres.sh")], check=True, capture_output=True, text=True
    ).stdout
    env = dict(
        line.removeprefix("export ").split("=", 1) for line in out.splitlines() if "=" in line
    )
    return env["AUTOQUANT_TEST_POSTGRES_URL"].strip("'"), env["AUTOQUANT_PG_DIR"].strip("'")


def run(study: Path, url: str, workers: int, threads: int, trials: int) -> dict[str, float]:
    import optuna
    from optuna.trial import TrialState

    from autoquant.search import load_study_spec, open_storage

    spec = load_study_spec(study)
    name = f"{spec.name}-bench-{workers}w-{uuid.uuid4().hex[:6]}"
    text = study.read_text().replace(f'name = "{spec.name}"', f'name = "{name}"', 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.toml"
        path.write_text(text)
        assert load_study_spec(path).name == name, "could not rename the study"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "autoquant.cli", "worker", str(path), "--storage", url]
        cmd += ["--threads", str(threads), "--trials", str(trials), "-q"]
        t0 = time.monotonic()
        procs = [
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            for _ in range(workers)
        ]
        outputs = [p.communicate()[0].decode(errors="replace") for p in procs]
        wall = time.monotonic() - t0
    if any(p.returncode for p in procs):
        raise SystemExit("a worker failed:\n" + "\n".join(outputs))
    done = optuna.load_study(study_name=name, storage=open_storage(url)).get_trials()
    finished = [t for t in done if t.datetime_complete is not None and t.datetime_start]
    window = (
        max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)
    ).total_seconds()
    complete = sum(t.state == TrialState.COMPLETE for t in done)
    return {
        "complete": complete,
        "pruned": sum(t.state == TrialState.PRUNED for t in done),
        "failed": sum(t.state == TrialState.FAIL for t in done),
        "window_s": window,
        "wall_s": wall,
        "per_min": 60 * complete / window,
        "per_min_wall": 60 * complete / wall,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", type=Path, default=ROOT / "studies" / "digits.toml")
    p.add_argument("--storage", default=os.environ.get("AUTOQUANT_TEST_POSTGRES_URL"))
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--workers", type=int, default=2, help="workers of the parallel run")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeat", type=int, default=1, help="alternate the runs this often")
    p.add_argument(
        "--one-thread-too",
        action="store_true",
        help="also run 1 worker x 1 thread (separates thread scaling from worker scaling)",
    )
    args = p.parse_args()

    from autoquant.search import mask_password
    from autoquant.tasks import get_task

    pg_dir = None
    url = args.storage
    if not url:
        url, pg_dir = start_postgres()
    try:
        get_task("digits-cnn")  # the model is trained once, before workers start in parallel
        threads = max(1, args.cores // args.workers)
        print(f"study {args.study.name}, {args.trials} trials, storage {mask_password(url)}")
        print(
            f"{args.cores} cores: 1 worker x {args.cores} threads vs "
            f"{args.workers} workers x {threads} threads"
        )
        configs = ((1, args.cores), (args.workers, threads))
        if args.one_thread_too:
            configs += ((1, 1),)
        results: dict[tuple[int, int], list[dict[str, float]]] = {c: [] for c in configs}
        for _ in range(args.repeat):
            for workers, t in configs:
                load = os.getloadavg()[0]
                r = run(args.study, url, workers, t, args.trials)
                r["load"] = (load + os.getloadavg()[0]) / 2
                results[(workers, t)].append(r)
        print(
            f"{'workers':>8} {'threads':>8} {'complete':>9} {'pruned':>7} {'window_s':>9} "
            f"{'trials/min':>11} {'wall_s':>7} {'trials/min(wall)':>17} {'loadavg':>8}"
        )
        for (w, t), rs in results.items():
            for r in rs:
                print(
                    f"{w:>8} {t:>8} {r['complete']:>9} {r['pruned']:>7} {r['window_s']:>9.1f} "
                    f"{r['per_min']:>11.1f} {r['wall_s']:>7.1f} {r['per_min_wall']:>17.1f} "
                    f"{r['load']:>8.2f}"
                )
        one, many = results[configs[0]], results[configs[1]]

        def median(rs: list[dict[str, float]], key: str) -> float:
            return sorted(r[key] for r in rs)[len(rs) // 2]

        print(
            f"scaling ratio ({args.workers} workers / 1, median of {args.repeat}): "
            f"{median(many, 'per_min') / median(one, 'per_min'):.2f}x over the trial window, "
            f"{median(many, 'per_min_wall') / median(one, 'per_min_wall'):.2f}x over the wall clock"
        )
        if args.one_thread_too:
            single = results[(1, 1)]
            print(
                f"{args.workers} workers x {threads} thread(s) / 1 worker x 1 thread: "
                f"{median(many, 'per_min') / median(single, 'per_min'):.2f}x over the trial window"
            )
        print("loadavg > cores means other processes shared the CPUs: the figures are noisy.")
    finally:
        if pg_dir:
            subprocess.run(
                [str(ROOT / "scripts" / "start_postgres.sh"), "--stop", pg_dir], check=False
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
