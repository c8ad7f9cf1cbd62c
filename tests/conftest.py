"""Shared fixtures: the scripted fake model (fast, exact) and the embedded real model (integration)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKE_REGISTRY = ROOT / "tests" / "data" / "models-fake.yaml"
EMBEDDED = "smollm2-135m-instruct"


@pytest.fixture
def fake_registry(monkeypatch):
    """Point the registry at tests/data/models-fake.yaml (default model: the scripted fake)."""
    monkeypatch.setenv("DECLAB_MODELS", str(FAKE_REGISTRY))
    from declab.registry import load_registry
    return load_registry()


@pytest.fixture
def fake_lm():
    from declab.fake import FakeLM
    return FakeLM()


@pytest.fixture(scope="session")
def real_lm():
    """The embedded SmolLM2-135M-Instruct, loaded once per test session (float32, CPU)."""
    from declab.runner import get_lm
    return get_lm(EMBEDDED)
