"""Reliability tests: hostile checkpoints, bad runtime input, property tests over random compositions, decode soaks.

Each test module marks its tests ``@pytest.mark.reliability("<category>")``. With ``ZOO_RELIABILITY_LOG=<file>`` set,
every test appends one JSON line ``{category, test, outcome, cases}`` to that file: ``cases`` is how many hostile
inputs / random compositions / tokens the test tried (a test raises it with the ``cases`` fixture; 1 otherwise).
``scripts/reliability_report.py`` runs these tests that way and writes the table of ``reports/reliability.md``.
"""

from __future__ import annotations

import json
import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "reliability(category): what a reliability test tries (for the report)")


class Cases:
    """How many cases a test tried (e.g. one per hypothesis example)."""

    def __init__(self) -> None:
        self.n = 0

    def add(self, n: int = 1) -> None:
        self.n += n


@pytest.fixture()
def cases(request) -> Cases:
    c = Cases()
    request.node._zoo_cases = c
    return c


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    log = os.environ.get("ZOO_RELIABILITY_LOG")
    rep = outcome.get_result()
    marker = item.get_closest_marker("reliability")
    if not log or marker is None or not (rep.when == "call" or (rep.when == "setup" and not rep.passed)):
        return
    counted = getattr(item, "_zoo_cases", None)
    n = counted.n if counted is not None and counted.n else 1
    with open(log, "a") as f:
        f.write(json.dumps({"category": marker.args[0], "test": item.nodeid, "outcome": rep.outcome,
                            "cases": n}) + "\n")
