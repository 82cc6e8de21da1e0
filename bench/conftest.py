"""Benchmarks are not part of the default test run: ``pytest bench/ --benchmark-only``."""
