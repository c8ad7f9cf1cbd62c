"""Shared fixtures: the scripted fake model (fast, exact) and the embedded real model (integration)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKE_REGISTRY = ROOT / "tests" / "data" / "models-fake.yaml"
EMBEDDED = "smollm2-135m-instruct"


@pytest.fixture(autouse=True)
def tmp_store(monkeypatch, tmp_path_factory):
    """Every test keeps runs in its own temporary run store (DECLAB_STORE), never in the user's: `declab run` and
    the app store every run by default. Subprocesses started by a test inherit it."""
    path = tmp_path_factory.mktemp("store") / "runs.sqlite"
    monkeypatch.setenv("DECLAB_STORE", str(path))
    return path


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


@pytest.fixture(scope="session")
def draft_lm():
    """The embedded model's trained draft (issue 12); skipped with a message until it is in models.yaml."""
    from declab.registry import load_registry
    from declab.runner import get_lm
    if "smollm2-135m-draft" not in load_registry().models:
        pytest.skip("the trained embedded draft (issue 12) is not in models.yaml yet")
    return get_lm("smollm2-135m-draft")
