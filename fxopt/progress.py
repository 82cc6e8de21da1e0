"""Progress bars for long work (training, calibration, benchmarks), shown only on a terminal.

``quiet(True)`` silences every fxopt bar in this process, including the ones inside passes
(``fxopt.passes.Calibrate``): it sets ``TQDM_DISABLE``, which tqdm reads for every bar it creates.
"""

from __future__ import annotations

import os
from typing import Iterable, TypeVar

__all__ = ["bar", "quiet"]

T = TypeVar("T")


def quiet(on: bool = True) -> None:
    """Turn all progress bars off (``on=True``) or back to the default (on when stderr is a TTY)."""
    if on:
        os.environ["TQDM_DISABLE"] = "1"
    else:
        os.environ.pop("TQDM_DISABLE", None)


def bar(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """``iterable`` wrapped in a tqdm bar on stderr; a plain iterable when stderr is not a TTY or when quiet."""
    if os.environ.get("TQDM_DISABLE"):
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, disable=None)
