"""Prints what the image tests measured (build times, image sizes) at the end of the run."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    report = getattr(config, "_exllsm_image_report", None)
    if not report:
        return
    terminalreporter.section("stage images")
    for key, value in report.items():
        terminalreporter.write_line(f"{key}: {value}")
