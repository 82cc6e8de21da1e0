"""Benchmarks are not part of the default test run: ``python -m pytest bench/ --benchmark-only``.

Shared helpers live in ``bench/quant_reference.py`` and ``bench/models.py`` (imported as ``bench.*``; the
repository root is on pytest's ``pythonpath``; scripts run as ``python -m bench.<name>``). bench/ imports
fxopt and its own modules only, never tests/.
"""
