"""The storage password never leaks: every form libpq and SQLAlchemy accept is masked, and a
search, a worker, ``front`` and ``report`` run with a ``?password=`` URL print, log, store and
write it nowhere (PostgreSQL when ``AUTOQUANT_TEST_POSTGRES_URL`` is set, else SQLite, which
ignores the unknown URI parameter)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import optuna
import pytest
from _studies import digits_study

from autoquant.cli import main
from autoquant.search import mask_password, open_storage

SECRET = "Tr0ub4dor&3"

MASKED = [
    # URL userinfo, any driver, raw or percent-encoded
    ("postgresql://u:Tr0ub4dor&3@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgresql+psycopg://u:Tr0ub4dor%263@h/db", "postgresql+psycopg://u:***@h/db"),
    ("postgresql+psycopg2://u:Tr0ub4dor&3@h/db", "postgresql+psycopg2://u:***@h/db"),
    ("mysql+pymysql://u:Tr0ub4dor&3@h/db", "mysql+pymysql://u:***@h/db"),
    ("postgresql://:Tr0ub4dor&3@h/db", "postgresql://:***@h/db"),
    # an unencoded '@' or '/' in the password (a user's mistake must not leak either)
    ("postgresql://u:Tr0ub@dor&3@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u:Tr0ub/dor&3@h/db", "postgresql://u:***@h/db"),
    # query parameters, any case, first or later, encoded
    ("postgresql://u@h/db?password=Tr0ub4dor%263", "postgresql://u@h/db?password=***"),
    (
        "postgresql://u@h/db?sslmode=require&PassWord=Tr0ub4dor%263&port=5",
        "postgresql://u@h/db?sslmode=require&PassWord=***&port=5",
    ),
    ("postgresql://u@h/db?sslpassword=Tr0ub4dor%263", "postgresql://u@h/db?sslpassword=***"),
    (
        "postgresql://u:Tr0ub4dor&3@h/db?password=Tr0ub4dor%263",
        "postgresql://u:***@h/db?password=***",
    ),
    # libpq keyword/value strings, plain or quoted (spaces, escaped quotes)
    ("host=h password=Tr0ub4dor&3 dbname=db", "host=h password=*** dbname=db"),
    ("host=h PASSWORD = 'Tr0ub 4dor\\'&3' dbname=db", "host=h PASSWORD = *** dbname=db"),
    ("password=Tr0ub4dor&3", "password=***"),
    # nothing to hide
    ("sqlite:////tmp/a@b/study.db", "sqlite:////tmp/a@b/study.db"),
    ("postgresql://u@h:5432/db", "postgresql://u@h:5432/db"),
]


@pytest.mark.parametrize(("url", "masked"), MASKED, ids=[m[0][:40] for m in MASKED])
def test_every_form_of_password_is_masked(url: str, masked: str) -> None:
    assert mask_password(url) == masked
    for form in (SECRET, quote(SECRET, safe=""), "Tr0ub", "4dor"):
        assert form not in mask_password(url)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u@127.0.0.1:1/db?password=Tr0ub4dor%263",
        "postgresql://u:Tr0ub4dor%263@127.0.0.1:1/db",
        "postgresql://u@127.0.0.1:1/db?sslmode=disable&PASSWORD=Tr0ub4dor%263",
    ],
)
def test_an_unreachable_storage_error_hides_a_query_password(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    from autoquant.search import StorageError

    with pytest.raises(StorageError) as info:
        open_storage(url)
    assert str(info.value).startswith(f"cannot open storage {mask_password(url)}: ")
    for form in (SECRET, quote(SECRET, safe="")):
        assert form not in str(info.value) and form not in caplog.text


def _password_url(tmp_path: Path) -> tuple[str, str]:
    """A storage URL with the password in ``?password=``, and that password."""
    pg = os.environ.get("AUTOQUANT_TEST_POSTGRES_URL", "")
    if pg:
        parts = urlsplit(pg)
        password = parts.password or ""
        netloc = f"{parts.username}@{parts.hostname}:{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, f"password={password}", "")), password
    # SQLite ignores URI parameters it does not know: a dummy password rides along.
    return f"sqlite:///file:{tmp_path / 'pw.db'}?password={quote(SECRET, safe='')}&uri=true", SECRET


@pytest.mark.slow
def test_search_worker_front_and_report_never_show_a_query_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url, password = _password_url(tmp_path)
    forms = {password, quote(password, safe="")}
    name = f"pw-{os.getpid()}-{tmp_path.name[-6:]}".replace("_", "-")
    f = tmp_path / "study.toml"
    f.write_text(digits_study(name, storage=url, fast_latency=True))
    out = tmp_path / "report"
    assert main(["-v", "search", str(f), "-q"]) == 0
    assert main(["-v", "worker", str(f), "--storage", url, "-q"]) == 0
    assert main(["front", str(f), "--failed"]) == 0
    assert main(["report", str(f), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out + captured.err + caplog.text
    assert f"worker joins study {name!r} at {mask_password(url)}" in printed
    assert "password=***" in printed

    storage = open_storage(url)
    study = optuna.load_study(study_name=name, storage=storage)
    stored = json.dumps(
        [(s.study_name, s.user_attrs, s.system_attrs) for s in storage.get_all_studies()]
        + [(t.user_attrs, t.system_attrs) for t in study.get_trials()],
        default=str,
    )
    assert "password=***" in stored  # the study's settings, with the storage masked
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"report.html", "report.md", "trials.csv"}
    for form in forms:
        assert form not in printed
        assert form not in stored
        assert not [p for p in files if form.encode() in p.read_bytes()]


@pytest.mark.slow
def test_a_report_of_an_old_study_with_an_unmasked_password_masks_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Studies written before every form was masked may hold ``?password=`` in their settings:
    the report masks it again."""
    from autoquant.report import write_report
    from autoquant.search import (
        SearchContext,
        StudyRecord,
        read_study_record,
        run_search,
        study_spec_from_dict,
        write_study_record,
    )

    class FastContext(SearchContext):
        def _latencies(self, model: object, plan: object) -> list[dict[str, object]]:
            return [{"median_ms": 1.0, "iqr_ms": 0.0, "batch_size": 1, "key": "k"}]

    monkeypatch.setenv("AUTOQUANT_RUNS", str(tmp_path))
    spec = study_spec_from_dict(
        {
            "study": {"name": "old", "trials": 2},
            "task": {"name": "digits-cnn"},
            "space": {"w_bits": [4, 8], "a_bits": [8]},
            "qat": {"steps": 2, "calib_batches": 1},
        },
        "old.toml",
    )
    study = run_search(spec, ctx=FastContext(spec), progress=False)
    old_url = f"postgresql://u@db/x?password={quote(SECRET, safe='')}"
    stored = {**(read_study_record(study).spec or {}), "storage": old_url}
    write_study_record(study, StudyRecord(spec=stored))  # as an old version stored it
    paths = write_report(study, tmp_path / "report")
    files = [p for p in (tmp_path / "report").rglob("*") if p.is_file()]
    assert files and "optuna-dashboard postgresql://u@db/x?password=***" in Path(
        paths["html"]
    ).read_text(encoding="utf-8")
    for form in (SECRET, quote(SECRET, safe="")):
        assert not [p for p in files if form.encode() in p.read_bytes()]
