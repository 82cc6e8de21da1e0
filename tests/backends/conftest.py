"""Make the shared helpers of tests/backends (int8_testutil) importable from its test files."""

import pathlib
import sys

_HERE = str(pathlib.Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
