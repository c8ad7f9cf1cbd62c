"""`declab runs ...`: the run library (declab/store.py) from the command line.

    declab runs list [--model M] [--strategy S] [--status ok|stopped|failed] [--tag T] [--since DATE] [--until DATE]
                     [--search TEXT] [--limit N] [--json]
    declab runs show ID [--json] [--trace]
    declab runs export ID [ID ...] (--csv PATH | --parquet PATH | --json PATH | --html PATH | --dir DIR [--format F])
    declab runs delete ID [ID ...]
    declab runs tag ID [ID ...] --add TAG [--add TAG ...] [--remove TAG ...]
    declab runs import TRACE [--meta JSON]

Every subcommand takes `--store PATH` (default: $DECLAB_STORE, else the user's data folder). ID is a run id, a
unique prefix of one, or `latest`. Bad input exits with status 2 and one line on stderr, as for `declab run`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from declab.core.errors import UserError
from declab.core.meta import RunMeta
from declab.run.store import check_writable, open_store, writing


def add_store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=None, metavar="PATH",
                        help="run store (SQLite file); default: $DECLAB_STORE, else "
                             "$XDG_DATA_HOME/declab/runs.sqlite or ~/.local/share/declab/runs.sqlite")


def add_runs_parser(sub) -> None:
    runs = sub.add_parser("runs", help="the run library: list, show, export, delete, tag and import stored runs")
    rsub = runs.add_subparsers(dest="runs_command", required=True, parser_class=type(runs))
    ls = rsub.add_parser("list", help="stored runs, newest first")
    ls.add_argument("--model", action="append", default=None, help="only this model (repeatable)")
    ls.add_argument("--strategy", action="append", default=None, help="only this strategy (repeatable)")
    ls.add_argument("--status", action="append", default=None, choices=["ok", "stopped", "failed"])
    ls.add_argument("--tag", action="append", default=None, help="only runs with this tag (repeatable: any)")
    ls.add_argument("--since", default=None, metavar="DATE", help="YYYY-MM-DD (that whole day on) or ISO time")
    ls.add_argument("--until", default=None, metavar="DATE", help="YYYY-MM-DD (up to that whole day) or ISO time")
    ls.add_argument("--search", default=None, metavar="TEXT", help="case-insensitive, in the prompt and the text")
    ls.add_argument("--limit", type=int, default=None)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    show = rsub.add_parser("show", help="one run: settings, metrics and generated text")
    show.add_argument("run_id", metavar="ID")
    show.add_argument("--json", action="store_true", help="the full metadata as JSON")
    show.add_argument("--trace", action="store_true", help="also print the token rows of the trace")
    exp = rsub.add_parser("export", help="write stored runs as files (importable again with `runs import`)")
    exp.add_argument("run_ids", nargs="+", metavar="ID")
    exp.add_argument("--csv", default=None, help="trace as CSV, metadata beside it as <name>.meta.json (one run)")
    exp.add_argument("--parquet", default=None, help="trace as Parquet + <name>.meta.json (one run)")
    exp.add_argument("--json", default=None, help="metadata as JSON (one run)")
    exp.add_argument("--html", default=None, help="one standalone HTML report of every run given")
    exp.add_argument("--dir", default=None, help="one file per run (and its .meta.json) in this folder")
    exp.add_argument("--format", default="csv", choices=["csv", "parquet", "html"], help="file type for --dir")
    dl = rsub.add_parser("delete", help="delete runs (trace and tags included)")
    dl.add_argument("run_ids", nargs="+", metavar="ID")
    tg = rsub.add_parser("tag", help="add or remove tags")
    tg.add_argument("run_ids", nargs="+", metavar="ID")
    tg.add_argument("--add", action="append", default=[], metavar="TAG")
    tg.add_argument("--remove", action="append", default=[], metavar="TAG")
    imp = rsub.add_parser("import", help="import a run exported elsewhere (CSV/Parquet trace + JSON metadata)")
    imp.add_argument("trace", help="the .csv or .parquet trace")
    imp.add_argument("--meta", default=None, help="its JSON metadata (default: <name>.meta.json or <name>.json)")
    imp.add_argument("--replace", action="store_true", help="replace a stored run with the same id")
    for p in (ls, show, exp, dl, tg, imp):
        add_store_option(p)


def one_line(text, width: int) -> str:
    """Text for a terminal table: control characters and line breaks made visible, cut to `width`."""
    s = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text or ""))
    return s if len(s) <= width else s[: width - 1] + "…"


def printable(text) -> str:
    """Stored text for the terminal: line breaks and tabs kept, every other control character (an escape sequence,
    a carriage return, a bell) shown as its Python escape, so stored data never drives the terminal."""
    return "".join(ch if ch.isprintable() or ch in "\n\t" else repr(ch)[1:-1] for ch in str(text or ""))


def cmd_runs(args) -> int:
    store = open_store(args.store)
    return {"list": _list, "show": _show, "export": _export, "delete": _delete, "tag": _tag,
            "import": _import}[args.runs_command](store, args)


def _list(store, args) -> int:
    rows = store.list(model=args.model, strategy=args.strategy, status=args.status, tag=args.tag, since=args.since,
                      until=args.until, search=args.search, limit=args.limit)
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False, default=str))
        return 0
    if not rows:
        print(f"no runs (store {store.path})", file=sys.stderr)
        return 0
    print(f"{'run id':12}  {'started':19}  {'status':7}  {'strategy':18}  {'model':24}  {'tokens':>6}  "
          f"{'tags':16}  text")
    for r in rows:
        print(f"{one_line(r['run_id'], 64):12}  {one_line(r['started_at'], 32):19}  {one_line(r['status'], 16):7}  "
              f"{one_line(r['strategy'], 18):18}  "
              f"{one_line(r['model'], 24):24}  {'' if r['new_tokens'] is None else r['new_tokens']:>6}  "
              f"{one_line(','.join(r['tags']), 16):16}  {one_line(r['text'], 60)}")
    return 0


def _show(store, args) -> int:
    meta, frame = store.get(args.run_id)
    if args.json:
        print(json.dumps(meta, indent=2, ensure_ascii=False, default=str))
    else:
        m = RunMeta.from_dict(meta)
        info = store.info(m.run_id)
        out = [f"run {m.run_id} · {info['status']} · {info['started_at']} · from {info['source'] or '?'}"
               + (f" · tags {', '.join(info['tags'])}" if info["tags"] else "")]
        if m.error:
            out.append(f"error: {m.error}")
        out.append(f"model {m.model} ({m.device or '?'}, {m.dtype or '?'}, quantization {m.quantization or '?'}) · "
                   f"strategy {m.strategy} · seed {m.seed} · {m.prompt_format or '?'} prompt · max new tokens "
                   f"{m.max_new_tokens}")
        out.append(f"params: {json.dumps(m.params, ensure_ascii=False, default=str)}")
        out.append("metrics: " + ", ".join(f"{k} {v}" for k, v in m.metrics.items()) + f" · wall {m.wall_s} s")
        out.append(f"trace: {len(frame)} rows, {len(frame.columns)} columns")
        out += ["prompt:", m.prompt]
        for i, s in enumerate(m.sequences):
            ids = s.get("token_ids")
            out.append(f"sequence {i + 1} ({len(ids) if isinstance(ids, list) else 0} tokens, score "
                       f"{s.get('score')}):")
            out.append(s.get("text", ""))
        for line in out:
            print(printable(line))
    if args.trace:
        tok = frame[frame["kind"] == "token"] if "kind" in frame.columns else frame
        cols = [c for c in ("step", "branch_id", "token_id", "token_text", "logprob", "entropy", "dt_ms")
                if c in tok.columns]
        for row in tok[cols].itertuples(index=False):
            print("\t".join(repr(v) if c == "token_text" else one_line(v, 80) for c, v in zip(cols, row)))
    return 0


def _export(store, args) -> int:
    single = {"csv": args.csv, "parquet": args.parquet, "json": args.json}
    chosen = {k: v for k, v in single.items() if v}
    if not chosen and not args.html and not args.dir:
        raise UserError("runs export needs --csv, --parquet, --json, --html or --dir")
    ids = [store.resolve(i) for i in args.run_ids]
    if chosen and len(ids) != 1:
        raise UserError("--csv, --parquet and --json write one run; use --dir for several (or --html for one report)")
    written = []
    for fmt, path in chosen.items():
        written += store.export(ids[0], path, fmt)
    if args.html:
        path = Path(args.html)
        check_writable(path)
        data = store.export_bytes(ids, "html")
        with writing(path):
            path.write_bytes(data)
        written.append(path)
    if args.dir:
        folder = Path(args.dir)
        if not folder.is_dir():
            raise UserError(f"cannot write into {folder}: folder does not exist")
        for run_id in ids:
            stem = RunMeta(run_id=run_id, strategy=store.info(run_id)["strategy"] or "run").stem  # safe characters
            written += store.export(run_id, folder / f"{stem}.{args.format}", args.format)
    for path in written:
        print(printable(path))
    return 0


def _delete(store, args) -> int:
    n = store.delete(args.run_ids)
    print(f"deleted {n} run{'s' if n != 1 else ''}")
    return 0


def _tag(store, args) -> int:
    if not args.add and not args.remove:
        raise UserError("runs tag needs --add TAG or --remove TAG")
    store.tag(args.run_ids, add=args.add, remove=args.remove)
    for run_id in args.run_ids:
        info = store.info(run_id)
        print(f"{info['run_id']}: {', '.join(info['tags']) or '(no tags)'}")
    return 0


def _import(store, args) -> int:
    run_id = store.import_run(args.trace, args.meta, replace=args.replace)
    print(run_id)
    return 0
