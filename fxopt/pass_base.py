"""Passes: small, frozen, honest.

A pass is a frozen dataclass whose fields are its options and whose ``name`` is a unique kebab-case
string. Calling it on a ``GraphModule`` runs ``requires`` → ``call`` → ``ensures`` and returns a
:class:`PassResult`. ``modified`` is exact: a pass that changed nothing says ``False``.

Contracts checked on every call: ``requires`` failing raises :class:`PreconditionError`, ``ensures``
failing :class:`PostconditionError` (both name the pass); ``call`` must return a ``PassResult`` for the
same GraphModule it was given (passes work in place), with a real bool ``modified``.

What a pass may need from the pipeline it runs in (the target backend) comes in a :class:`PassContext`
that the :class:`fxopt.PassManager` hands to :meth:`Pass.with_context` before the pass runs.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch.fx

from . import meta
from .errors import PassContractError, PassError, PostconditionError, PreconditionError, in_pass
from .verify import verify

__all__ = ["Pass", "PassContext", "PassResult", "FunctionPass", "function_pass", "pass_label"]

_KEBAB = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


@dataclass
class PassResult:
    """What a pass returns: the (same, in-place edited) graph module and whether it changed.

    ``intended_change``: the pass changed the numerics on purpose (it quantized part of the model, as
    ``QuantizeIslands`` does inside a static int8 recipe); ``compile(check=True)`` then compares the passes
    after it with its outputs instead of calling it a break."""

    graph_module: torch.fx.GraphModule
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    intended_change: bool = False


@dataclass(frozen=True)
class PassContext:
    """What the pipeline tells its passes: the backend ``compile``/``lower`` targets (a name or a backend
    object; ``None`` when none was named, and then passes that need one use :data:`DEFAULT_BACKEND`)."""

    backend: Any = None

    DEFAULT_BACKEND: ClassVar[str] = "x86"

    @property
    def target_backend(self) -> Any:
        """The backend to prepare for: the one named, else ``"x86"``."""
        return self.backend if self.backend is not None else self.DEFAULT_BACKEND

    def resolve(self, p: "Pass", follows: str) -> "Pass":
        """``p`` with its ``backend`` option bound: ``None`` follows the pipeline's target; an explicit backend
        that contradicts the one compile/lower was asked for is a ``ValueError`` (``follows`` names the recipe
        or option that would have followed it)."""
        from . import registry

        if p.backend is None:
            return dataclasses.replace(p, backend=self.target_backend)
        if self.backend is not None and not registry.same(p.backend, self.backend):
            raise ValueError(
                f"pass {p.name!r} prepares the graph for backend {p.backend!r} but compile was asked for "
                f"backend={registry.get(self.backend).name!r}; name the backend once, in compile ({follows} "
                f"follows it), or use the same one in both")
        return p


@dataclass(frozen=True)
class Pass:
    """Base class of every fxopt pass.

    Subclasses set ``name`` and implement :meth:`call`. Options are dataclass fields, so a pass
    has a readable ``repr``, compares by value and prints as ``name{option=value}``.
    """

    name: ClassVar[str] = ""
    # Debug switch (the test suite turns it on): verify the graph after every call, modified or not.
    debug_verify: ClassVar[bool] = False
    #: ``True`` for a pass that works on the module tree (replaces or edits submodules by qualified name)
    #: and needs no graph: it also runs on a model whose root could not be traced, which ``compile``
    #: then keeps as an untraced root (``fxopt.untraced(gm) == [""]``). A graph pass (``False``)
    #: given such a module does nothing and says so: ``modified=False`` and a note.
    module_level: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if isinstance(name, str) and not _KEBAB.match(name):
            raise ValueError(f"pass name {name!r} of {cls.__qualname__} must be kebab-case, e.g. 'fold-bn'")

    # Optional hooks: default bodies, not abstract.
    def with_context(self, context: PassContext) -> "Pass":
        """This pass with what it leaves to the pipeline filled in from ``context`` (default: itself).

        Raise ``ValueError`` when an explicit option contradicts the context."""
        return self

    def requires(self, gm: torch.fx.GraphModule) -> None:
        """Raise if ``gm`` does not meet this pass's preconditions."""

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        """Raise if ``gm`` does not meet this pass's postconditions."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:  # pragma: no cover - overridden
        raise PassContractError(f"{type(self).__qualname__} must implement call(self, gm) -> fxopt.PassResult")

    def __call__(self, gm: torch.fx.GraphModule, context: PassContext | None = None) -> PassResult:
        if not isinstance(gm, torch.fx.GraphModule):
            raise TypeError(
                f"pass {self.label()!r} expects a torch.fx.GraphModule, got {type(gm).__name__}; "
                "use fxopt.trace(model) or fxopt.compile(model, passes=[...])"
            )
        bound = self.with_context(context if context is not None else PassContext())
        if bound is not self:
            return bound(gm, context)
        label = self.label()
        root = meta.untraced_root(gm)
        if root is not None and not self.module_level:
            return PassResult(gm, False, notes=[
                f"no graph: {label} works on the graph and did nothing; the model is an {root.reason}"])
        try:
            self.requires(gm)
        except PassError:
            raise
        except Exception as exc:
            raise in_pass(exc, f"pass {label!r} cannot run on this graph: {exc}", pass_name=label,
                          kind=PreconditionError) from exc
        result = check_result(label, self.call(gm), gm)
        try:
            self.ensures(result.graph_module)
        except PassError:
            raise
        except Exception as exc:
            raise in_pass(exc, f"pass {label!r} broke its own postcondition: {exc}", pass_name=label,
                          kind=PostconditionError) from exc
        if Pass.debug_verify:
            verify(result.graph_module, pass_name=label)
        return result

    def label(self) -> str:
        """``name{opt=value,...}`` with the options that differ from their defaults."""
        base = self.name or type(self).__name__
        if not dataclasses.is_dataclass(self):
            return base
        opts = []
        for f in dataclasses.fields(self):
            if not f.repr:
                continue
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING
            )
            try:
                same = value == default
                same = bool(same)
            except Exception:  # tensors, data loaders...: always show by type
                same = False
            if not same:
                shown = repr(value) if _short(value) else type(value).__name__
                opts.append(f"{f.name}={shown}")
        return f"{base}{{{','.join(opts)}}}" if opts else base


def _short(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool, type(None), tuple)) and len(repr(value)) <= 60


def check_result(label: str, result: Any, gm: torch.fx.GraphModule) -> PassResult:
    """Enforce the pass contract: a PassResult for ``gm`` itself (passes work in place) whose ``modified`` is a
    real bool."""
    if result is None:
        raise PassContractError(
            f"pass {label!r} returned None; a pass must return fxopt.PassResult(gm, modified=...) "
            "(modified=False when it changed nothing)"
        )
    if not isinstance(result, PassResult):
        raise PassContractError(
            f"pass {label!r} returned {type(result).__name__}; a pass must return "
            "fxopt.PassResult(gm, modified=...)"
        )
    if not isinstance(result.modified, bool):
        raise PassContractError(f"pass {label!r} returned modified={result.modified!r}; it must be True or False")
    if not isinstance(result.graph_module, torch.fx.GraphModule):
        raise PassContractError(f"pass {label!r} returned a PassResult whose graph_module is not a GraphModule")
    if result.graph_module is not gm:
        raise PassContractError(
            f"pass {label!r} returned a different GraphModule than it was given; passes edit the graph module in "
            "place and return it: PassResult(gm, modified=...)")
    return result


@dataclass(frozen=True)
class FunctionPass(Pass):
    """A pass made from a function ``GraphModule -> bool`` (see :func:`function_pass`)."""

    fn: Callable[[torch.fx.GraphModule], bool] = field(default=None, repr=False, compare=True)  # type: ignore[assignment]
    pass_name: str = ""

    def label(self) -> str:
        return self.pass_name

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.pass_name

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        modified = self.fn(gm)
        if modified is None:
            raise PassContractError(
                f"function pass {self.pass_name!r} returned None; return True if it changed the graph "
                "and False if it did not"
            )
        if not isinstance(modified, bool):
            raise PassContractError(
                f"function pass {self.pass_name!r} returned {type(modified).__name__}; return True or False"
            )
        return PassResult(gm, modified)


def function_pass(name: str) -> Callable[[Callable[[torch.fx.GraphModule], bool]], FunctionPass]:
    """Decorator: turn ``fn(gm) -> bool`` (modified or not) into a named pass."""
    if not isinstance(name, str) or not _KEBAB.match(name):
        raise ValueError(f"function_pass name {name!r} must be kebab-case, e.g. 'drop-asserts'")

    def wrap(fn: Callable[[torch.fx.GraphModule], bool]) -> FunctionPass:
        return FunctionPass(fn=fn, pass_name=name)

    return wrap


def pass_label(p: Any) -> str:
    """A printable name for anything usable as a pass (Pass or plain callable)."""
    if isinstance(p, Pass):
        return p.label()
    return getattr(p, "__name__", None) or type(p).__name__
