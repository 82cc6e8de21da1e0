"""fxopt: composable torch.fx passes that make PyTorch models smaller and faster on CPUs and edge devices."""

from __future__ import annotations

from .benchmark import LatencyComparison, Timing, benchmark, benchmark_many
from .compare import Comparison, compare
from .compiler import compile, lower
from .errors import (
    CalibrationError,
    FxoptError,
    NumericsError,
    PassContractError,
    PassError,
    PostconditionError,
    PreconditionError,
    TraceError,
    UnsupportedError,
    VerificationError,
)
from .finetune import finetune
from .io import load, save
from .meta import records
from .pass_base import FunctionPass, Pass, PassContext, PassResult, function_pass
from .pipeline import DumpGraphs, Instrument, NumericsCheck, PassManager, PassRecord, TimingInstrument
from .report import Report, report
from .rewrite import RewritePass, RewriteRule, rule
from .rewrite_explain import explain
from .tracing import trace, untraced
from .verify import verify

__version__ = "0.1.0"

__all__ = [
    "compile",
    "lower",
    "finetune",
    "trace",
    "untraced",
    "report",
    "Report",
    "compare",
    "Comparison",
    "benchmark",
    "benchmark_many",
    "Timing",
    "LatencyComparison",
    "save",
    "load",
    "verify",
    "records",
    "RewriteRule",
    "RewritePass",
    "rule",
    "explain",
    "Pass",
    "PassResult",
    "PassContext",
    "FunctionPass",
    "function_pass",
    "PassManager",
    "PassRecord",
    "Instrument",
    "TimingInstrument",
    "DumpGraphs",
    "NumericsCheck",
    "FxoptError",
    "TraceError",
    "PassError",
    "PassContractError",
    "PreconditionError",
    "PostconditionError",
    "NumericsError",
    "VerificationError",
    "CalibrationError",
    "UnsupportedError",
]


def __getattr__(name: str):
    # Submodules that import heavier dependencies are loaded on first use.
    if name in ("passes", "backends", "recipes"):
        import importlib

        return importlib.import_module(f"fxopt.{name}")
    raise AttributeError(f"module 'fxopt' has no attribute {name!r}")
