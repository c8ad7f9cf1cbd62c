"""Where a sweep's runs execute. Every backend maps (settings, runs) to Outcomes as the runs finish (in any order);
the driver (declab.sweep.driver) stores each one as it arrives.

    inline   in the driver's own process, one after another (tests, the Python API; `load` may give a fake model)
    local    N worker processes (spawned, not forked), torch's threads split between them (total // N each), the
             model loaded once per worker
    ray      each run a Ray task on a pool of N worker actors (`--address` of a running cluster, default a local Ray
             started for the sweep on 127.0.0.1 and stopped after), the model loaded once per actor; outcomes (row,
             metadata, trace) come back to the driver, which stores them

A worker that ends without a result (killed, out of memory) stops the sweep with a message; what finished is kept
and `--resume` runs the rest.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
from pathlib import Path

import torch

from declab.core import UserError, load_strategies
from declab.sweep.work import Outcome, Settings, execute

BACKENDS = ("local", "ray")
ROOT = Path(__file__).resolve().parent.parent.parent
ENV_KEYS = ("DECLAB_MODELS", "DECLAB_PLUGINS", "DECLAB_FAKE_DELAY", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
RAY_OBJECT_STORE_BYTES = 200 * 1024 * 1024


def threads_per_worker(workers: int, total: int | None = None) -> int:
    """torch intra-op threads for each of `workers` workers: the driver's count split evenly, at least 1."""
    total = total or torch.get_num_threads()
    return max(1, total // max(1, workers))


def setup_worker(threads: int, env: dict | None = None, paths: tuple[str, ...] = ()) -> None:
    """Once per worker process or actor: environment, import path, torch threads, the strategy registry."""
    os.environ.update(env or {})
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    torch.set_num_threads(threads)
    load_strategies()


def run_inline(settings: Settings, runs, load=None):
    for run in runs:
        yield execute(settings, run, load=load)


# ------------------------------------------------------------------------------------------------ local processes
def _worker_main(tasks, results, threads: int, parent: int) -> None:  # pragma: no cover - runs in the child
    signal.signal(signal.SIGINT, signal.SIG_IGN)           # Ctrl-C is the driver's: it ends the workers
    setup_worker(threads)
    results.cancel_join_thread()                          # exiting never waits on a reader that is gone
    while os.getppid() == parent:                          # the driver is gone (killed): do not linger
        try:
            item = tasks.get(timeout=1.0)
        except queue.Empty:
            continue
        if item is None:
            return
        results.put(execute(*item))


def run_local(settings: Settings, runs, workers: int):
    """Outcomes from `workers` spawned processes as they finish; the workers end when this generator is closed."""
    runs = list(runs)
    if not runs:
        return
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    threads = threads_per_worker(workers)
    procs = [ctx.Process(target=_worker_main, args=(tasks, results, threads, os.getpid()), daemon=True,
                         name=f"declab-sweep-{i}") for i in range(min(workers, len(runs)))]
    for p in procs:
        p.start()
    try:
        for run in runs:
            tasks.put((settings, run))
        for _ in procs:
            tasks.put(None)
        for _ in runs:
            while True:
                try:
                    out: Outcome = results.get(timeout=1.0)
                    break
                except queue.Empty:
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise UserError(f"sweep worker {dead[0].name} ended with exit code {dead[0].exitcode} "
                                        "(killed? out of memory?); the finished runs are kept: --resume runs the "
                                        "rest") from None
                    if all(p.exitcode is not None for p in procs):
                        raise UserError("every sweep worker ended before the sweep did; --resume runs the rest")
            yield out
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
        tasks.close()
        results.close()


# ------------------------------------------------------------------------------------------------ ray
class SweepActor:
    """A Ray actor: one worker with its own loaded model (get_lm caches it per process)."""

    def __init__(self, threads: int, env: dict, paths: tuple[str, ...]):
        setup_worker(threads, env, paths)

    def run(self, settings: Settings, run) -> Outcome:
        return execute(settings, run)


def start_ray(address: str | None, workers: int):
    """Connect to the cluster at `address`, else start a local one on 127.0.0.1 with `workers` CPUs (no dashboard).
    Returns (ray module, whether this call started it)."""
    try:
        import ray
    except ImportError:
        raise UserError("the ray backend needs the `ray` package: pip install -r requirements.txt") from None
    if ray.is_initialized():
        return ray, False
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")      # no GPUs asked for: quiet warning
    common = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        if address:
            ray.init(address=address, **common)
        else:
            ray.init(num_cpus=workers, _node_ip_address="127.0.0.1", object_store_memory=RAY_OBJECT_STORE_BYTES,
                     **common)
    except Exception as e:  # an unreachable address, a cluster that would not start: one line
        raise UserError(f"cannot start Ray{' at ' + address if address else ''}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return ray, True


def run_ray(settings: Settings, runs, workers: int, address: str | None = None):
    """Outcomes of Ray tasks on `workers` actors as they finish; actors (and a Ray started here) end afterwards."""
    runs = list(runs)
    if not runs:
        return
    ray, started = start_ray(address, workers)
    env = {k: os.environ[k] for k in ENV_KEYS if k in os.environ}
    threads = threads_per_worker(workers)
    actors = []
    try:
        Actor = ray.remote(num_cpus=1)(SweepActor)
        actors = [Actor.remote(threads, env, (str(ROOT),)) for _ in range(min(workers, len(runs)))]
        pending = {}
        todo = list(runs)
        for actor in actors:                               # one task in flight per actor
            if todo:
                pending[actor.run.remote(settings, todo.pop(0))] = actor
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(done[0])
            try:
                out = ray.get(done[0])
            except Exception as e:  # an actor that died (RayActorError): stop, keep what finished
                raise UserError(f"a Ray sweep worker failed: {type(e).__name__}: {str(e).splitlines()[0]}; the "
                                "finished runs are kept: --resume runs the rest") from None
            if todo:
                pending[actor.run.remote(settings, todo.pop(0))] = actor
            yield out
    finally:
        for actor in actors:
            try:
                ray.kill(actor)
            except Exception:
                pass
        if started:
            ray.shutdown()
