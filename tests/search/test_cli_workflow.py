"""The failure workflow and resuming an edited study, through the ``autoquant`` command.

A real (tiny) task: ``cli_tiny_task:tiny_task``, a whole search in seconds.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from _studies import tiny_study
from optuna.trial import TrialState

from autoquant.cli import main
from autoquant.search import (
    SearchContext,
    load_existing_study,
    load_study_spec,
    param_distributions,
    read_float_baseline,
    read_record,
    read_study_record,
)
from autoquant.search._optuna_compat import study_user_attrs

pytestmark = pytest.mark.slow


@pytest.fixture
def make_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AUTOQUANT_RUNS", str(tmp_path / "runs"))

    def make(trials: int = 2, w_bits: str = "[4, 8]") -> Path:
        f = tmp_path / "tiny.toml"
        flag = tmp_path / "broken"
        options = f'{{ broken_flag = "{flag}" }}'
        f.write_text(tiny_study("tiny", trials=trials, w_bits=w_bits, options=options))
        return f

    return make


def _study(f: Path) -> optuna.Study:
    return load_existing_study(load_study_spec(f))


def test_a_search_stopped_by_failures_exits_1_and_a_rerun_after_the_fix_continues(
    make_file, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = make_file(trials=2)
    (tmp_path / "broken").touch()
    assert main(["search", str(f), "-q"]) == 1
    out, err = capsys.readouterr()
    # A plain message, not an empty table, and one line that says where to look.
    assert "Empty DataFrame" not in out and "(no rows)" not in out
    assert "no trial is on the Pareto front: study 'tiny' has no complete trial (5 failed" in out
    assert "stopped short: 0 of 2 trials judged, and 5 trials of this run failed" in err
    assert f"`autoquant front {f} --failed`" in err
    first = _study(f).get_trials()
    assert [t.state for t in first] == [TrialState.FAIL] * 5  # max(5, trials)
    first_run = read_record(first[0]).run
    assert first_run and {read_record(t).run for t in first} == {first_run}

    # `front` works on a study with a float baseline and no complete trial.
    assert main(["front", str(f)]) == 0
    assert "no trial is on the Pareto front" in capsys.readouterr().out

    (tmp_path / "broken").unlink()  # the user fixes the task; the old failures stay
    assert main(["search", str(f), "-q"]) == 0
    out, err = capsys.readouterr()
    assert "stopped short" not in err and "accuracy" in out.splitlines()[1]
    trials = _study(f).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 2
    # The uniform baselines failed with the broken task: the rerun ran them again.
    assert {read_record(t).baseline for t in complete} == {"w8a8", "w4a8"}
    second_run = read_record(complete[0]).run
    assert second_run not in (None, first_run)

    # `front --failed` still lists every failure, with the run that had it.
    assert main(["front", str(f), "--failed", "--format", "csv"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].split(",")[:2] == ["trial", "run"] and len(rows) == 1 + 5
    assert all(r.split(",")[1] == first_run for r in rows[1:])


def test_an_edited_space_stops_before_any_trial_and_fork_continues_from_what_is_valid(
    make_file, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    f = make_file(trials=2, w_bits="[4, 8]")
    assert main(["search", str(f), "-q"]) == 0
    source = _study(f)
    before = source.get_trials()
    assert source.metric_names == ["accuracy", "size_bytes", "latency_ms"]
    capsys.readouterr()

    f = make_file(trials=3, w_bits="[6, 8]")  # 4 bits removed, 6 added
    assert main(["search", str(f), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"{f}: the search space differs from the one study 'tiny' was run with" in err
    assert "space.w_bits: [4, 8] -> [6, 8]" in err
    assert "parameters: 2 changed (0/w_bits: choices [4, 8] -> choices [6, 8]" in err
    assert '[study] name = "tiny-v2"' in err and f"autoquant search {f} --fork" in err
    assert len(_study(f).get_trials()) == len(before), "no trial may start"

    # --fork: nothing is measured again (the float baseline and the cached latency of the
    # copied plan come from the source).
    def no_float_baseline(self: SearchContext) -> dict:
        raise AssertionError("the fork measured the float baseline again")

    monkeypatch.setattr(SearchContext, "float_baseline", no_float_baseline)
    assert main(["search", str(f), "-q", "--fork"]) == 0
    out = capsys.readouterr().out
    assert "forked study 'tiny' into 'tiny-fork1'" in out and "1 of 2 complete trials" in out
    fork_spec = load_study_spec(f)
    fork = load_existing_study(replace(fork_spec, name="tiny-fork1"))
    assert read_float_baseline(fork) == read_float_baseline(source)
    assert read_study_record(fork).forked_from == "tiny"
    assert read_study_record(fork).spec["space"]["w_bits"] == [6, 8]
    cache = {k: v for k, v in study_user_attrs(source).items() if k.startswith("latency:")}
    assert cache and all(study_user_attrs(fork)[k] == v for k, v in cache.items())
    assert fork.metric_names == ["accuracy", "size_bytes", "latency_ms"]

    # The w8 trial is valid in the new space and copied as a complete trial with the new
    # distributions (the sampler learns from it); the w4 one is not.
    trials = fork.get_trials()
    copies = [t for t in trials if read_record(t).forked_from]
    (w8,) = [t for t in before if t.params == {"0/w_bits": 8, "2/w_bits": 8}]
    assert [read_record(t).forked_from for t in copies] == [{"study": "tiny", "trial": w8.number}]
    (copy,) = copies
    assert copy.number == 0 and copy.state == TrialState.COMPLETE
    assert copy.values == w8.values and copy.params == w8.params
    layers = read_study_record(fork).layer_names
    assert copy.distributions == param_distributions(fork_spec.space, layers)
    assert copy.constraints == {
        "accuracy_drop": pytest.approx(read_record(w8).accuracy_drop - 0.05)
    }
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    # The source is untouched, and a second fork gets the next free name.
    assert len(_study(f).get_trials()) == len(before)
    assert main(["search", str(f), "-q", "--fork", "--trials", "1"]) == 0
    assert "into 'tiny-fork2'" in capsys.readouterr().out


def test_a_fixed_knob_changed_under_a_study_warns_on_resume_and_export_names_it(
    make_file,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A study run with min/max weights (the old default), resumed with a study file that now
    gives MSE: the parameters are the same, so the search goes on, but it says that the
    complete trials ran with other settings; exporting one of them names the difference."""
    f = make_file(trials=2)
    text = f.read_text()
    f.write_text(text.replace("[space]\n", '[space]\nw_calib = ["minmax"]\n'))
    assert main(["search", str(f), "-q"]) == 0
    (old,) = [t for t in _study(f).get_trials() if read_record(t).baseline == "w8a8"]
    capsys.readouterr()

    f.write_text(text)  # w_calib left out: the default, ["mse"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="autoquant"):
        assert main(["search", str(f), "-q", "--trials", "3"]) == 0
    (warning,) = [r.getMessage() for r in caplog.records if "goes on" in r.getMessage()]
    assert "study 'tiny' goes on, but its 2 complete trials ran with other settings" in warning
    assert "space.w_calib: ['minmax'] -> ['mse'] (the default became" in warning
    assert "(layer 0: weight calibration 'minmax' -> 'mse')" in warning
    assert sum(t.state == TrialState.COMPLETE for t in _study(f).get_trials()) == 3

    out = tmp_path / "export"
    assert main(["export", str(f), "--trial", str(old.number), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"trial {old.number}: the study file's space no longer yields the stored plan" in err
    assert "(layer 0: weight calibration 'minmax' -> 'mse';" in err
    assert 'w_calib = ["minmax"]' in err
    assert not out.exists()
