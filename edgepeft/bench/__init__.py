"""Benchmarks on real runtimes: ``run`` measures (measure.py), ``report`` renders (report.py),
``remote`` executes on a device over ssh/adb (remote.py); ``artifacts`` finds and fit-checks
what is benchmarked; ``config`` holds :class:`BenchConfig`. The names below are the public API."""

from edgepeft.bench.artifacts import bytes_per_token, check_fits, discover
from edgepeft.bench.config import DEFAULT_TEXT, SCHEMA, BenchConfig
from edgepeft.bench.measure import measure_bandwidth, pick_runtimes, run, run_case
from edgepeft.bench.report import (
           chart,
           compare,
           compare_table,
           document,
           load_document,
           load_document_obj,
           stored_document,
           table,
           write_document,
)

__all__ = ["DEFAULT_TEXT", "SCHEMA", "BenchConfig", "bytes_per_token", "chart", "check_fits", "compare",
           "compare_table", "discover", "document", "load_document", "load_document_obj", "measure_bandwidth",
           "pick_runtimes", "run", "run_case", "stored_document", "table", "write_document"]
