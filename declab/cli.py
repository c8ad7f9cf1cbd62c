"""declab command line (a contract: tests and users depend on it; see README).

    declab list [--json]
    declab run --model KEY --strategy NAME [--set PARAM=VALUE ...] (--prompt TEXT | --prompt-file FILE)
               [--prompt-format raw|chat] [--max-new-tokens N] [--seed S] [--grammar-file FILE] [--lame-prompt TEXT]
               [--csv PATH] [--parquet PATH] [--json PATH] [--html PATH] [--store PATH | --no-store]
    declab drafters (--prompt TEXT | --prompt-file FILE) [--model KEY] [--drafters model,aded,...]
               [--set PARAM=VALUE ...] [--prompt-format raw|chat] [--max-new-tokens N] [--seed S]
               [--csv PATH] [--traces DIR] [--store PATH | --no-store]
    declab runs list|show|export|delete|tag|import ...   the run library (see declab/runs_cli.py)
    declab sweep FILE --out DIR [--backend local|ray] [--workers N] [--address ADDR] [--resume]   sweeps
               (see declab/sweep/cli.py)

`declab run` decodes through the background run service (declab/run/service.py), which keeps every run (ok,
stopped with Ctrl-C, or failed) in the run store (declab/run/store.py) unless
--no-store is given.

`declab drafters` is the drafter observatory (declab/run/observatory.py): `spec_tree` once per drafter (default: all
five), the same model, prompt, seed and shared `--set` parameters for each, run one after another through the run
service (each stored like `declab run`; Ctrl-C stops the current one and skips the rest). It prints the summary
table (one row per drafter: acceptance, accepted length, target forwards, speedup, times, run id); `--csv` writes
it spreadsheet-safe, and each drafter's trace goes to `DIR/<drafter>.csv` + `DIR/<drafter>.meta.json` with
`--traces DIR` (created if missing), else beside the summary as `<csv stem>-<drafter>.csv` + `.meta.json`.
Exit status: 0, 1 when a drafter's run failed, 130 when stopped.

Bad input exits with status 2 and one line on stderr, before any model is loaded where possible.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from declab.core import UserError, get_strategy, load_strategies
from declab.core import trace as tr
from declab.core.meta import RunMeta
from declab.models.registry import load_registry
from declab.run import Run, RunRequest, get_lm, validate
from declab.run import observatory as obs
from declab.run import store as run_store
from declab.run import threads
from declab.run.progress import ProgressBar
from declab.run.service import Job, RunService
from declab.run.store import check_writable, writing
from declab.runs_cli import add_runs_parser, add_store_option, cmd_runs
from declab.sweep.cli import add_sweep_parser, cmd_sweep
from viz.report import html_report


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage block too)
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="declab", description="declab: a decoding-strategy lab")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ls = sub.add_parser("list", help="models and strategies, with every parameter, default and range")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    r = sub.add_parser("run", help="run one strategy on one model")
    r.add_argument("--model", default=None, help="model key from models.yaml (default: the registry default)")
    r.add_argument("--strategy", required=True)
    r.add_argument("--set", action="append", default=[], metavar="PARAM=VALUE", help="strategy parameter")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-file")
    r.add_argument("--prompt-format", choices=["raw", "chat"], default=None)
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--grammar-file", default=None)
    r.add_argument("--lame-prompt", default=None, metavar="TEXT",
                   help="uscd: the lame prompt (default: derived from the prompt by removing its examples)")
    r.add_argument("--csv", default=None)
    r.add_argument("--parquet", default=None)
    r.add_argument("--json", default=None)
    r.add_argument("--html", default=None, help="standalone HTML report: figures, text, metadata (opens offline)")
    r.add_argument("--quiet", action="store_true", help="do not print the generated text")
    add_store_option(r)
    r.add_argument("--no-store", action="store_true", help="do not keep this run in the run store")
    d = sub.add_parser("drafters", help="drafter observatory: spec_tree once per drafter, same prompt and seed, "
                                        "one summary table")
    d.add_argument("--model", default=None, help="model key from models.yaml (default: the registry default)")
    d.add_argument("--drafters", default=None, metavar="D1,D2,...",
                   help="comma-separated spec_tree drafters (default: all; `declab list` shows spec_tree's "
                        "drafter choices)")
    d.add_argument("--set", action="append", default=[], metavar="PARAM=VALUE",
                   help="spec_tree parameter shared by every drafter (not drafter)")
    dsrc = d.add_mutually_exclusive_group(required=True)
    dsrc.add_argument("--prompt")
    dsrc.add_argument("--prompt-file")
    d.add_argument("--prompt-format", choices=["raw", "chat"], default=None)
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--csv", default=None, help="the summary table as CSV (spreadsheet-safe)")
    d.add_argument("--traces", default=None, metavar="DIR",
                   help="one trace CSV + .meta.json per drafter in DIR (default: beside --csv as <stem>-<drafter>.csv)")
    add_store_option(d)
    d.add_argument("--no-store", action="store_true", help="do not keep these runs in the run store")
    add_runs_parser(sub)
    add_store_option(add_sweep_parser(sub))
    return p


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None


def cmd_list(args) -> int:
    registry = load_registry()
    data = {
        "default_model": registry.default,
        "models": [{"key": s.key, "source": s.source_text, "dtype": s.dtype, "quantization": s.quantization,
                    "device": s.device, "chat": s.chat, "context_length": s.context_length,
                    "description": s.description, "pairs": list(s.pairs)} for s in registry.models.values()],
        "strategies": [{"name": s.name, "title": s.title, "paper": s.paper, "deterministic": s.deterministic,
                        "params": s.params()} for s in load_strategies().values()],
    }
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    print("models:")
    for m in data["models"]:
        star = " (default)" if m["key"] == registry.default else ""
        print(f"  {m['key']}{star}: {m['description']} [{m['source']}; {m['quantization']}; ctx {m['context_length']}]")
    print("strategies:")
    for s in data["strategies"]:
        print(f"  {s['name']}: {s['title']}")
        for p in s["params"]:
            print(f"    {p['name']} ({p['type']}, default {p['default']!r}, range {p['range']}): {p['help']}")
    return 0


def parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--set expects PARAM=VALUE, got {item!r}")
        out[name.strip()] = value.strip()
    return out


STRATEGY_FLAGS = (("--grammar-file", "grammar_file", "takes_grammar"),
                  ("--lame-prompt", "lame_prompt", "takes_lame_prompt"))   # flag, argparse dest, Strategy attribute


def check_strategy_flags(args) -> None:
    """A strategy-specific flag given to a strategy that does not use it is refused, naming the ones that do."""
    strategy = get_strategy(args.strategy)
    for flag, dest, attr in STRATEGY_FLAGS:
        if getattr(args, dest, None) is not None and not getattr(strategy, attr):
            users = sorted(s.name for s in load_strategies().values() if getattr(s, attr))
            raise UserError(f"{flag} is not used by strategy '{strategy.name}'; the strategies that use it: "
                            f"{', '.join(users) or 'none installed'}")


def cmd_run(args) -> int:
    registry = load_registry()
    prompt = args.prompt if args.prompt is not None else _read_text(args.prompt_file, "prompt file")
    grammar = _read_text(args.grammar_file, "grammar file") if args.grammar_file else None
    check_strategy_flags(args)
    request = RunRequest(model=args.model or registry.default, strategy=args.strategy, prompt=prompt,
                         params=parse_sets(args.set), prompt_format=args.prompt_format,
                         max_new_tokens=args.max_new_tokens, seed=args.seed, grammar=grammar,
                         lame_prompt=args.lame_prompt)
    plan = validate(request, registry)                       # once, before any model is loaded
    for path in (args.csv, args.parquet, args.json, args.html):
        if path:
            check_writable(path)
    run = Run(get_lm(request.model, registry), plan, load=lambda key: get_lm(key, registry))
    service = RunService([Job(args.strategy, run)], kind="cli", source="cli",
                         store_path="" if args.no_store else args.store)
    bar = ProgressBar(run, sys.stderr)                      # only when stderr is a terminal
    try:
        wait_until_interrupted(service, tick=bar.update)
    finally:
        bar.close()
    if 0 in service.errors:
        raise UserError(service.errors[0])
    if 0 in service.unsaved:
        print(f"declab: warning: run not stored in the run store: {service.unsaved[0]}", file=sys.stderr)
    result = run.result
    meta = RunMeta.from_dict(result.meta)
    note = "" if args.no_store or 0 in service.unsaved else f" (the run is stored as {meta.run_id})"
    if args.csv:
        with writing(args.csv, note):
            tr.write_csv(result.frame, args.csv)
            tr.write_json(result.meta, str(Path(args.csv).with_suffix("")) + ".meta.json")
    if args.parquet:
        with writing(args.parquet, note):
            tr.write_parquet(result.frame, args.parquet)
    if args.json:
        with writing(args.json, note):
            tr.write_json(meta.cli_json(), args.json)
    if args.html:
        with writing(args.html, note):
            Path(args.html).write_text(html_report(result.meta, result.frame), encoding="utf-8")
    if not args.quiet:
        for i, s in enumerate(result.sequences):
            prefix = f"[{i}] " if len(result.sequences) > 1 else ""
            print(prefix + s.text)
    if result.status == "failed":
        print(f"declab: run failed: {result.error}", file=sys.stderr)
        return 1
    if result.status == "stopped":
        print("declab: interrupted (the run was stopped; what it produced is kept)", file=sys.stderr)
        return 130
    return 0


def trace_paths(csv: str | None, traces: str | None, drafters: list[str]) -> dict[str, Path]:
    """drafter -> where its trace CSV goes: DIR/<drafter>.csv with --traces, else <csv stem>-<drafter>.csv beside
    the summary, else nowhere."""
    if traces:
        return {d: Path(traces) / f"{d}.csv" for d in drafters}
    if csv:
        base = Path(csv).with_suffix("")
        return {d: base.with_name(f"{base.name}-{d}.csv") for d in drafters}
    return {}


def cmd_drafters(args) -> int:
    registry = load_registry()
    prompt = args.prompt if args.prompt is not None else _read_text(args.prompt_file, "prompt file")
    model = args.model or registry.default
    if args.drafters is not None:
        drafters = args.drafters
    else:                              # the ones this model can run (an unknown model is refused per drafter below)
        drafters = obs.usable_drafters(registry.models[model]) if model in registry.models else obs.legal_drafters()
    requests = obs.drafter_requests(model, prompt, drafters, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                    params=parse_sets(args.set), prompt_format=args.prompt_format,
                                    registry=registry)          # every drafter validated before any model loads
    if args.csv and not Path(args.csv).resolve().parent.is_dir():
        raise UserError(f"cannot write {args.csv}: folder does not exist")
    if args.traces:
        try:
            Path(args.traces).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write traces to {args.traces}: {e.strerror or e}") from None
    lm = get_lm(model, registry)
    jobs = []
    for label, req in requests:
        try:
            jobs.append(Job(label, Run(lm, req, registry=registry, load=lambda key: get_lm(key, registry))))
        except UserError as e:
            raise UserError(f"drafter {label}: {e}") from None
    service = RunService(jobs, kind="drafters", source="cli", store_path="" if args.no_store else args.store)
    wait_until_interrupted(service)
    if service.errors and len(service.errors) == len(jobs):
        i = min(service.errors)
        raise UserError(f"drafter {jobs[i].label}: {service.errors[i]}")
    rows = []
    for i, job in enumerate(jobs):
        result = job.run.result
        if i in service.errors:
            print(f"declab: drafter {job.label}: error: {service.errors[i]}", file=sys.stderr)
        elif result is not None and result.status == "failed":
            print(f"declab: drafter {job.label}: run failed: {result.error}", file=sys.stderr)
        if i in service.unsaved:
            print(f"declab: warning: drafter {job.label}: run not stored in the run store: {service.unsaved[i]}",
                  file=sys.stderr)
        rows.append((job.label, result, "error" if i in service.errors and result is None else None))
    frame = obs.summary_frame(rows)
    print(obs.format_table(frame))
    if args.csv:
        obs.write_summary_csv(frame, args.csv)
    paths = trace_paths(args.csv, args.traces, [job.label for job in jobs])
    for job in jobs:
        path = paths.get(job.label)
        if path is not None and job.run.result is not None:
            tr.write_csv(job.run.result.frame, path)
            tr.write_json(job.run.result.meta, path.with_suffix(".meta.json"))
    statuses = [j.run.result.status if j.run.result is not None else "error" for j in jobs]
    if "stopped" in statuses:
        print("declab: interrupted (the current drafter's run was stopped and the rest skipped; what they produced "
              "is kept)", file=sys.stderr)
        return 130
    return 1 if service.errors or "failed" in statuses else 0


def wait_until_interrupted(service: RunService, tick=None) -> None:
    """Run the service to the end in this thread (RunService.run_here: the thread that loaded the model decodes),
    calling `tick()` every 0.1 s meanwhile from a thread of its own (the progress bar). A first Ctrl-C stops the run
    after the current step, so it is kept (stored, exported) with status 'stopped'; a second Ctrl-C interrupts at
    once."""
    def ticks() -> None:
        while not service.done.wait(0.1):
            tick()

    def wait() -> None:
        if tick is not None:
            threading.Thread(target=ticks, daemon=True, name="declab-progress").start()
        service.run_here()

    if threading.current_thread() is not threading.main_thread():
        wait()
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:                                     # a handler not set from Python: restore the default
        previous = signal.default_int_handler

    def stop(signum, frame):
        service.stop()
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, stop)                       # before the run starts: its first step may be Ctrl-C'd
    try:
        wait()
    finally:
        signal.signal(signal.SIGINT, previous)


def _command(args) -> int:
    try:
        threads.parse(os.environ.get(threads.ENV))           # a bad thread setting is said before any work
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.command == "runs":
        return cmd_runs(args)
    if args.command == "drafters":
        return cmd_drafters(args)
    if args.command == "sweep":
        return cmd_sweep(args)
    return cmd_list(args) if args.command == "list" else cmd_run(args)


def _say_waiting(message: str) -> None:
    print(f"declab: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    run_store.WAIT_NOTICE = _say_waiting                    # a locked run store is said at once
    try:
        args = build_parser().parse_args(argv)
        status = _command(args)
        sys.stdout.flush()                                   # a closed pipe shows here, not at interpreter exit
        return status
    except BrokenPipeError:
        try:                                                 # nothing more can reach the reader: stop writing
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        print("declab: error: output closed before it was all written (broken pipe)", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"declab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("declab: interrupted", file=sys.stderr)
        return 130
