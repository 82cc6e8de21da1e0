"""Shared fixtures. Every test runs single-threaded and seeded so results are repeatable on 2 cores, and every
pass a test runs has its graph verified afterwards (``fxopt.verify``), whether it reports a change or not."""

from __future__ import annotations

import random

import pytest
import torch

from fxopt.pass_base import Pass


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    random.seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _verify_after_every_pass(monkeypatch):
    """TVM's practice: the well-formedness check runs after every transform in every test."""
    monkeypatch.setattr(Pass, "debug_verify", True)
