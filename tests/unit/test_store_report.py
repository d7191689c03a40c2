"""The start-up report of the store, on fake checks: counts, one log line per invalid adapter, stop, failures."""

from __future__ import annotations

import logging
import threading

import pytest

from adapters_store.errors import AdapterNotFound, StoreUnavailable
from server.adapters.store_report import StoreReport

LOGGER = "server.adapters.store_report"


def run(names, verify, strays=()) -> StoreReport:
    report = StoreReport("/store", lambda: list(names), lambda: list(strays), verify)
    report.start()
    assert report.done.wait(10)
    return report


def test_counts_and_one_line_per_invalid_adapter(caplog):
    results = {"good": object(), "nan": "tensor 'x' contains NaN\nor Inf", "shape": "wrong shape", "remote": None}

    def verify(name):
        if name == "gone":
            raise AdapterNotFound("gone")
        if name == "down":
            raise StoreUnavailable("store down")
        return results[name]

    caplog.set_level(logging.INFO, logger=LOGGER)
    report = run(["down", "gone", "good", "nan", "remote", "shape"], verify, strays=[("notes.txt", "a file")])
    check = report.check
    assert (check.state, check.found, check.checked, check.invalid, check.not_checked, check.ignored) == (
        "done", 5, 3, 2, 2, 1,
    )
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "adapter store /store: 6 adapters found; checking them in the background"
    assert "adapter store /store: 'notes.txt' is not an adapter, ignored: a file" in lines
    invalid = [line for line in lines if "is invalid" in line]
    assert invalid == [
        "adapter 'nan' is invalid and not served: tensor 'x' contains NaN or Inf",  # one line, even for two
        "adapter 'shape' is invalid and not served: wrong shape",
    ]
    assert "adapter 'down' could not be checked now: store down" in lines
    assert lines[-1].startswith("adapter store /store: 3 adapters checked in ")
    assert lines[-1].endswith(": 1 valid, 2 invalid; 2 not checked (no copy here yet: checked on first use)")
    warnings = {r.getMessage() for r in caplog.records if r.levelno == logging.WARNING}
    assert set(invalid) <= warnings


def test_a_stop_ends_the_check_after_the_adapter_being_checked():
    entered, release = threading.Event(), threading.Event()
    seen = []

    def verify(name):
        seen.append(name)
        entered.set()
        assert release.wait(10)
        return object()

    report = StoreReport("/store", lambda: ["a", "b", "c"], list, verify)
    report.start()
    assert entered.wait(10)
    assert report.check.state == "running" and not report.done.is_set()
    report.stop()
    release.set()
    assert report.done.wait(10)
    assert seen == ["a"] and report.check.state == "stopped" and report.check.checked == 1


def test_a_store_that_cannot_be_listed_is_reported_and_nothing_else_runs(caplog):
    def names():
        raise StoreUnavailable("s3://bucket: connection refused")

    report = StoreReport("s3://bucket", names, list, lambda name: pytest.fail("nothing to check"))
    report.start()
    assert report.done.wait(10)
    assert report.check.state == "failed"
    assert "adapter store s3://bucket: cannot be listed for the start-up check: s3://bucket: connection refused" in [
        r.getMessage() for r in caplog.records
    ]


def test_an_unexpected_error_is_logged_with_its_traceback_and_marks_the_check_failed(caplog):
    def verify(name):
        raise RuntimeError("bug")

    report = run(["a"], verify)
    assert report.check.state == "failed"
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "the start-up check failed" in record.getMessage() and record.exc_info[0] is RuntimeError
