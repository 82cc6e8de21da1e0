"""Benchmarks are not part of the default test run: ``python -m pytest bench/ --benchmark-only``.

The shared helpers (bench/quant_reference.py) are importable by the suites.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
