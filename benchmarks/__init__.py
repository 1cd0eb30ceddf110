"""Benchmark scripts (``make bench``); ``benchmarks.table`` is their row format and table."""
