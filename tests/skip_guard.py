"""Pytest hooks that fail a run in which a test that must run was skipped.

A test that skips on a fresh clone because a package is missing is no
coverage, and a green run would hide it. With ``DALI_REHEARSAL_NO_SKIPS=1``
(``tests/run.sh`` and CI set it), a skipped test fails the run unless it is
marked with one of the markers that may skip on a CPU machine
(:data:`MAY_SKIP`: ``gpu``, which needs a CUDA device). Expected failures
(``xfail``) are not skips and are not counted.

``tests/conftest.py`` imports the hooks; ``python -m pytest -p skip_guard``
loads them as a plugin (tests/test_skip_guard.py does).
"""

from __future__ import annotations

import os

import pytest

#: Markers whose tests may skip on a CPU machine.
MAY_SKIP = ("gpu",)
ENV = "DALI_REHEARSAL_NO_SKIPS"

_skipped: list[tuple[str, str]] = []
_may_skip: set[str] = set()      # node ids of the tests marked with one of MAY_SKIP


def _strict() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def pytest_collection_finish(session):
    # Markers, not keywords: a report's keywords also hold folder names.
    _may_skip.update(item.nodeid for item in session.items
                     if any(item.get_closest_marker(m) is not None for m in MAY_SKIP))


def pytest_runtest_logreport(report):
    if not report.skipped or hasattr(report, "wasxfail") or report.nodeid in _may_skip:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    _skipped.append((report.nodeid, reason))


def pytest_collectreport(report):
    # a whole module skipped at import (pytest.importorskip at module level)
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, reason))


def pytest_terminal_summary(terminalreporter):
    if _skipped and _strict():
        terminalreporter.section("tests that must run were skipped", sep="=", red=True)
        for nodeid, reason in _skipped:
            terminalreporter.write_line(f"SKIPPED (not allowed): {nodeid}: {reason}")
        terminalreporter.write_line(
            f"only tests marked {', '.join(MAY_SKIP)} may skip ({ENV}=1); install what the "
            "others need through the `test` extra")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if _skipped and _strict() and exitstatus in (pytest.ExitCode.OK,
                                                 pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
