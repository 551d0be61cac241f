"""Writes the GPU sparse-GEMM report (a Markdown table and a plot) once the session's cases ran."""

from . import report


def pytest_sessionfinish(session):
    if report.RESULTS:
        paths = report.write(report.RESULTS)
        print("\nsparse GEMM report: " + ", ".join(str(p) for p in paths))
