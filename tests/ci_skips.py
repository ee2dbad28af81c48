"""A pytest plugin (loaded by conftest.py): under CI=true a skipped test is a failure. CI installs
every tool the suite needs (bubblewrap, libtpu), so a skip there means a test silently did not
run; on a developer's machine skips stay skips."""

from __future__ import annotations

import os

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  del item, call
  outcome = yield
  report = outcome.get_result()
  if (report.skipped and os.environ.get("CI", "").lower() == "true"
      and not hasattr(report, "wasxfail")):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true ({reason}): CI must run every test; install what "
                       "it needs in .ci/run")
