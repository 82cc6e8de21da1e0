"""Backend lowerers, one per file, found by name through fxopt's registry (imported lazily).

``available()`` lists the names; ``get(name)`` returns the backend object. Third-party backends
register through the ``fxopt.backends`` entry-point group (``name = "package.module:BackendClass"``).
"""

from __future__ import annotations

from fxopt.registry import Backend, Support, available, get, register

__all__ = ["Backend", "Support", "available", "get", "register"]
