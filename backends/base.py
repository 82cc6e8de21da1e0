"""What every backend object provides: a name, a support table, a lowerer and a saver."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx

from fxopt.errors import UnsupportedError

__all__ = ["Support", "Backend"]


@dataclass(frozen=True)
class Support:
    """Whether a backend runs a node, and why (always a reason, yes or no)."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


class Backend:
    """Base class of backend objects returned by ``fxopt.backends.get(name)``."""

    name: str = ""

    def supports(self, node: torch.fx.Node) -> Support:  # pragma: no cover - overridden
        return Support(False, f"backend {self.name!r} declares no support table")

    def lower(self, gm: torch.fx.GraphModule) -> torch.nn.Module:  # pragma: no cover - overridden
        raise UnsupportedError(f"backend {self.name!r} cannot lower graphs")

    def save(self, module: torch.nn.Module, path: str | Path) -> None:
        raise UnsupportedError(f"backend {self.name!r} has no saver")

    def __repr__(self) -> str:
        return f"<fxopt backend {self.name!r}>"
