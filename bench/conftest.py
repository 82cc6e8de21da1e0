"""Benchmarks are not part of the default test run: ``python -m pytest bench/ --benchmark-only``.

Shared helpers live in ``bench/quant_reference.py``, ``bench/models.py`` and ``bench/zoo.py`` (imported as
``bench.*``; the repository root is on pytest's ``pythonpath``; scripts run as ``python -m bench.<name>``).
bench/ imports fxopt and its own modules only, never tests/.

``FXOPT_BENCH_SMOKE=1 python -m pytest bench/ --benchmark-disable`` is the CI smoke run (``.ci/run``): every
benchmark runs once at small sizes (bench/zoo.py) and the torch.ao comparison suites keep one model each,
so the suites cannot rot.
"""

import os
from pathlib import Path

import pytest
import torch

SMOKE = os.environ.get("FXOPT_BENCH_SMOKE", "") not in ("", "0")
# In smoke mode, the reference-comparison suites (bench_static, bench_dynamic) keep these parametrizations.
_SMOKE_KEEP = {"bench_static.py": {"name": {"resnet18"}}, "bench_dynamic.py": {"case": {"lstm"}}}


def pytest_collection_modifyitems(config, items):
    if not SMOKE:
        return
    keep, drop = [], []
    for item in items:
        rules = _SMOKE_KEEP.get(Path(str(item.fspath)).name, {})
        params = getattr(getattr(item, "callspec", None), "params", {})
        ok = all(params.get(k) in allowed for k, allowed in rules.items() if k in params)
        (keep if ok else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def two_threads():
    """Benchmarks time 2 intra-op threads (the machine's cores), restoring the caller's setting after."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)
