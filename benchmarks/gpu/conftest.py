"""Writes the GPU sparse-GEMM report (a Markdown table and a plot) once the session's cases ran."""

from . import report


def pytest_sessionfinish(session):
    if report.RESULTS or report.QUANT_RESULTS:
        paths = report.write(report.RESULTS, report.QUANT_RESULTS)
        print("\nsparse GEMM report: " + ", ".join(str(p) for p in paths))
