"""The non-editable install: `pip install` of the repository into a fresh virtual environment outside the checkout
gives a working `declab` command (registry, strategies, the embedded model and its draft weights as package data),
importing nothing from the checkout.

The new environment sees the already installed dependencies through a `.pth` file holding the path of this
interpreter's site-packages (a plain path line: the .pth files there, the editable install's finder among them, are
not processed), so nothing is downloaded. The build runs on a copy of the checkout's files (git's tracked and
untracked-but-not-ignored ones), so setuptools' `build/` and `*.egg-info` never land in the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"smollm2-135m-instruct", "smollm2-135m-draft"}
NUM_STRATEGIES = 18                 # as tests/test_contract.py: the 15 of waves one and two, sampler_chain, cautious, adadec
IGNORED = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", "*.egg-info", "build", "dist",
                                 ".pytest_cache", "node_modules", "results")

PROBE = """
import importlib.metadata as md, json
import declab, strategies, viz
from declab.models import draft, registry
print(json.dumps({"declab": declab.__file__, "strategies": strategies.__file__, "viz": viz.__file__,
                  "registry": str(registry.DEFAULT_PATH), "weights": str(draft.DEFAULT_WEIGHTS),
                  "weights_exist": draft.DEFAULT_WEIGHTS.is_file(),
                  "files": [str(f) for f in md.files("declab")]}))
"""


def _dependency_paths() -> list[str]:
    """Where this interpreter's installed packages live (its venv's site-packages)."""
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    out = []
    for p in paths:
        if Path(p).is_dir() and p not in out:
            out.append(p)
    return out


def _copy_source(dest: Path) -> Path:
    """The checkout's files as a clean clone plus the work in progress would have them."""
    try:
        listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        shutil.copytree(ROOT, dest, symlinks=True, ignore=IGNORED)
        return dest
    for rel in filter(None, listed.decode().split("\0")):
        src = ROOT / rel
        if not (src.is_file() or src.is_symlink()):                  # deleted in the work tree
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel, follow_symlinks=False)
    return dest


def _env() -> dict:
    env = dict(os.environ)                  # HOME / DECLAB_CACHE kept: the converted embedded model is reused
    for name in ("DECLAB_MODELS", "DECLAB_PLUGINS", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"):
        env.pop(name, None)
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PIP_NO_CACHE_DIR="1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def _run(cmd: list, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} exited {res.returncode}\nstdout:\n{res.stdout[-3000:]}\nstderr:\n" \
                                f"{res.stderr[-3000:]}"
    return res


@pytest.mark.slow
@pytest.mark.model
def test_non_editable_install_runs_outside_the_checkout(tmp_path):
    assert not tmp_path.resolve().is_relative_to(ROOT)
    venv, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, 120)
    py = venv / "bin" / "python"
    site_dir = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work,
                         60).stdout.strip())
    assert site_dir.resolve().is_relative_to(venv.resolve())
    (site_dir / "declab-test-deps.pth").write_text("".join(p + "\n" for p in _dependency_paths()))

    src = _copy_source(tmp_path / "src")
    # pip comes from the visible dependencies; the build backend (setuptools) too, with --no-build-isolation
    _run([py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", src], work, 600)

    # imported from the new environment, never the checkout; the package data is there
    probe = json.loads(_run([py, "-c", PROBE], work, 120).stdout)
    for key in ("declab", "strategies", "viz", "registry", "weights"):
        path = Path(probe[key]).resolve()
        assert path.is_relative_to(site_dir.resolve()) and not path.is_relative_to(ROOT), (key, path)
    assert probe["weights_exist"]
    files = set(probe["files"])
    assert "declab/models/models.yaml" in files
    assert any(f.startswith("declab/models/drafts/") and f.endswith(".safetensors") for f in files), files
    assert any(f.startswith("strategies/") and f.endswith(".ebnf") for f in files), files
    assert not any(f.startswith(("tests/", "tools/", "bench/", "app/")) for f in files)

    declab = venv / "bin" / "declab"
    listing = json.loads(_run([declab, "list", "--json"], work, 180).stdout)
    assert len(listing["strategies"]) == NUM_STRATEGIES, [s["name"] for s in listing["strategies"]]
    assert MODELS <= {m["key"] for m in listing["models"]}

    for strategy in ("speculative",):        # the target and the draft weights shipped as package data, in one run
        out = work / f"{strategy}.json"
        _run([declab, "run", "--strategy", strategy, "--prompt", "Hi", "--max-new-tokens", "4", "--no-store",
              "--quiet", "--json", out], work, 420)
        result = json.loads(out.read_text())
        assert result["strategy"] == strategy
        assert result["sequences"] and result["sequences"][0]["token_ids"], result
