"""fxopt's built-in passes, one per file."""

from __future__ import annotations

__all__: list[str] = []
