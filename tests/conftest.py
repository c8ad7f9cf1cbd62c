"""Shared fixtures: the scripted fake model (fast, exact) and the embedded real model (integration)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

import tests.fake  # noqa: F401  (registers the `fake` model source kind)

os.environ.setdefault("DECLAB_PLUGINS", "tests.fake")       # subprocesses (CLI, app) register it too
# every run the service starts takes a fixed thread count (torch's default here), not `auto`'s free cores: seeded
# sampling is only reproducible at one thread count, and a busy machine must not change what a test decodes
# (tests/test_threads.py tests auto itself)
os.environ.setdefault("DECLAB_THREADS", str(os.cpu_count() or 1))

ROOT = Path(__file__).resolve().parent.parent
FAKE_REGISTRY = ROOT / "tests" / "data" / "models-fake.yaml"
EMBEDDED = "smollm2-135m-instruct"
APP_PROMPT = "Explain in two sentences why the sky is blue."      # app/forms.py DEFAULT_PROMPT


@functools.lru_cache(maxsize=None)
def script_seed(max_new_tokens: int, prompt: str = APP_PROMPT) -> int:
    """The first seed for which `sample` (defaults) makes the fake model emit its `<script>alert(1)</script>` token
    on this prompt, found by running the engine: escaping tests need hostile model text without depending on the
    sampler's random stream."""
    from tests.fake import FakeLM
    from declab.run import Run, RunRequest
    lm = FakeLM()
    for seed in range(200):
        res = Run(lm, RunRequest(model=lm.key, strategy="sample", prompt=prompt, max_new_tokens=max_new_tokens,
                                 seed=seed)).run_to_end()
        if "<script>alert(1)</script>" in lm.decode(res.sequences[0].token_ids):
            return seed
    raise AssertionError("no seed below 200 makes the fake model emit <script>")


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
    from declab.models.registry import load_registry
    return load_registry()


@pytest.fixture
def fake_lm():
    from tests.fake import FakeLM
    return FakeLM()


@pytest.fixture(scope="session")
def real_lm():
    """The embedded SmolLM2-135M-Instruct, loaded once per test session (float32, CPU)."""
    from declab.run import get_lm
    return get_lm(EMBEDDED)


@pytest.fixture(scope="session")
def draft_lm():
    """The embedded model's trained draft (issue 12); skipped with a message until it is in models.yaml."""
    from declab.models.registry import load_registry
    from declab.run import get_lm
    if "smollm2-135m-draft" not in load_registry().models:
        pytest.skip("the trained embedded draft (issue 12) is not in models.yaml yet")
    return get_lm("smollm2-135m-draft")
