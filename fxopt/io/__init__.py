"""Saving and loading: ``fxopt.save`` / ``fxopt.load`` and the safe formats behind them.

* :mod:`.dispatch`      ``save``/``load``: picks the format from the path (and a lowered module's backend);
* :mod:`.envelope`      the self-contained file of a compiled model (graph + modules + constants as plain data);
* :mod:`.graph_format`  fx graphs as data, rebuilt from allowlisted functions only;
* :mod:`.module_format` modules as data, rebuilt from allowlisted classes only;
* :mod:`.pytree_format` a torch.export graph's input/output structure (e.g. a Hugging Face output class);
* :mod:`.pt2_check`     refuses ``.pt2`` archives that ``torch.export.load`` would run code from.

Imports only the core (``fxopt.meta``, ``fxopt.registry``, ``fxopt.quant.nn``...), never passes or backends.

Public registration hooks: :func:`allow_function` (a function, or an operator outside aten/prims/quantized, a
traced graph calls), :func:`allow_module` (a module class kept as a leaf) and :func:`allow_output_type` (a
dataclass an exported graph returns) let ``save``/``load`` store graphs that use them; register them in the
saving and in the loading process.
"""

from __future__ import annotations

from .dispatch import FORMAT_TAG, load, save
from .graph_format import allow_function
from .module_format import allow_module
from .pt2_check import check_pt2_archive
from .pytree_format import allow_output_type

__all__ = ["FORMAT_TAG", "allow_function", "allow_module", "allow_output_type", "check_pt2_archive", "load", "save"]
