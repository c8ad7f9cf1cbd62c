"""Text corpora: the default corpus every machine has (CPython's own documentation prose) and a user's text file or
folder, as lists of documents. Used by superposed decoding's n-gram tables and by the draft build (tools/).

Default corpus ("python-docs"): the Python Language Reference topics (`pydoc_data/topics.py`) and the docstrings of
the standard library modules (extracted with `ast`, tests and GUI packages left out): English prose that ships
with every CPython, so it is there without network and without a download step.
"""

from __future__ import annotations

import ast
import os
import sys
import sysconfig
from pathlib import Path

from declab.core.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
ENV_CORPUS_DIR = "DECLAB_CORPUS_DIR"  # the folder whose corpora the app may read (a server's files stay the server's)
PATH_PARAM_SUFFIXES = ("_corpus", "_file", "_path", "_dir", "_folder")   # parameters that name a file
MAX_CORPUS_FILES = 2000              # text files one corpus folder may have
MAX_WALK_ENTRIES = 20_000            # folder entries a corpus walk looks at before giving up
STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "site-packages", "dist-packages",
               "pydoc_data", "ensurepip", "venv"}


def default_corpus_documents(max_chars: int | None = None) -> list[str]:
    """The default corpus: CPython's Language Reference topics plus standard-library docstrings (see module doc);
    with max_chars, the first documents up to that size."""
    docs: list[str] = []
    try:
        from pydoc_data.topics import topics
        docs.extend(str(v) for _, v in sorted(topics.items()))
    except ImportError:                                          # a stripped Python: docstrings only
        pass
    if max_chars is not None and sum(map(len, docs)) >= max_chars:
        out, size = [], 0
        for d in docs:
            if size >= max_chars:
                break
            out.append(d)
            size += len(d)
        return out
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(part in STDLIB_SKIP for part in rel[:-1]) or rel[-1].startswith("test_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    docs.append(doc)
    return docs


def corpus_root() -> Path:
    """The folder the app's file fields are confined to: $DECLAB_CORPUS_DIR, else the data folder's corpora
    ($XDG_DATA_HOME/declab/corpora or ~/.local/share/declab/corpora). The built-in corpus (an empty field) is always
    allowed; the CLI reads any file of its user."""
    env = os.environ.get(ENV_CORPUS_DIR)
    if env:
        return Path(env).expanduser().resolve()
    data = os.environ.get("XDG_DATA_HOME")
    base = Path(data) if data and Path(data).is_absolute() else Path.home() / ".local" / "share"
    return (base / "declab" / "corpora").resolve()


def confine(text: str, what: str) -> str:
    """A path typed into the app, as a path inside `corpus_root()` (relative paths are taken from there), or a
    one-line UserError that names the allowed folder but never what is outside it."""
    text = str(text or "").strip()
    if not text:
        return ""
    root = corpus_root()
    path = (root / Path(text).expanduser()).resolve()          # an absolute text replaces root; '..' is resolved
    if path != root and root not in path.parents:
        raise UserError(f"{what}: the app reads files only from the server's corpus folder (${ENV_CORPUS_DIR}); "
                        "give a file or folder inside it, as a path relative to it")
    return str(path)


def confine_params(params: dict) -> dict:
    """Every file-naming parameter (a name ending in one of PATH_PARAM_SUFFIXES) of an app request, confined."""
    return {k: confine(v, k) if isinstance(v, str) and k.endswith(PATH_PARAM_SUFFIXES) else v
            for k, v in params.items()}


def _corpus_files(path: Path) -> list[Path]:
    """The text files of a corpus file or folder: a bounded walk (no symlinked folders, at most MAX_WALK_ENTRIES
    entries looked at and MAX_CORPUS_FILES files)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files, seen = [], 0
        for folder, dirs, names in os.walk(path):
            dirs.sort()
            seen += len(dirs) + len(names)
            if seen > MAX_WALK_ENTRIES:
                raise UserError(f"superposed: ngram_corpus folder {path} has more than {MAX_WALK_ENTRIES} entries; "
                                "give a smaller folder")
            files += [Path(folder) / n for n in names if Path(n).suffix.lower() in TEXT_SUFFIXES
                      and (Path(folder) / n).is_file()]
            if len(files) > MAX_CORPUS_FILES:
                raise UserError(f"superposed: ngram_corpus folder {path} has more than {MAX_CORPUS_FILES} text "
                                "files; give a smaller folder")
        if files:
            return sorted(files)
        raise UserError(f"superposed: ngram_corpus folder {path} has no {'/'.join(TEXT_SUFFIXES)} files")
    raise UserError(f"superposed: ngram_corpus {path} is not a file or folder")


def corpus_identity(corpus: str) -> str:
    """A string that changes when the corpus changes (paths, sizes, mtimes; the Python version for the default)."""
    if not corpus:
        return f"python-docs:{sys.version_info[:3]}:{sysconfig.get_paths()['stdlib']}"
    parts = []
    for f in _corpus_files(Path(corpus).expanduser()):
        st = f.stat()
        parts.append(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


def corpus_documents(corpus: str) -> list[str]:
    """A user corpus: each file is split into documents at blank-line runs of paragraphs (~4 KB blocks)."""
    if not corpus:
        return default_corpus_documents()
    docs: list[str] = []
    for f in _corpus_files(Path(corpus).expanduser()):
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise UserError(f"superposed: cannot read ngram_corpus file {f}: {e}") from None
        block: list[str] = []
        size = 0
        for para in text.split("\n\n"):
            block.append(para)
            size += len(para)
            if size > 4000:
                docs.append("\n\n".join(block))
                block, size = [], 0
        if block:
            docs.append("\n\n".join(block))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"superposed: ngram_corpus {corpus} has no text")
    return docs
