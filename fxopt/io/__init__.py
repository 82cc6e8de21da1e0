"""Saving and loading: ``fxopt.save`` / ``fxopt.load`` and the safe formats behind them.

* :mod:`.dispatch`      ``save``/``load``: picks the format from the path (and a lowered module's backend);
* :mod:`.int8_format`   the self-contained int8 envelope (graph + modules + constants as plain data);
* :mod:`.graph_format`  fx graphs as data, rebuilt from allowlisted functions only;
* :mod:`.module_format` modules as data, rebuilt from allowlisted classes only;
* :mod:`.pt2_check`     refuses ``.pt2`` archives that ``torch.export.load`` would run code from.

Imports only the core (``fxopt.meta``, ``fxopt.registry``, ``fxopt.quant.nn``...), never passes or backends.
"""

from __future__ import annotations

from .dispatch import FORMAT_TAG, load, save
from .pt2_check import check_pt2_archive

__all__ = ["FORMAT_TAG", "check_pt2_archive", "load", "save"]
