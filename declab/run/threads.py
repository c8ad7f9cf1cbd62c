"""Torch's CPU thread count, chosen at the start of every run the service decodes (the app's and the CLI's).

PyTorch's intra-op threads spin at a barrier after every operation, and decoding a small model is thousands of
small operations a second: when more threads want the cores than there are cores (a second run in the same app, a
second torch process, a sweep), each operation waits for a thread that is not running, and decoding collapses
(issue 21 measured an app run at 0.75 tokens/s beside another job, against about 20 alone). So each run takes

    auto (the default): the cores this process may use, minus the runnable threads of other work on the machine
                        right now (/proc/loadavg; a run beside another in the same process counts its threads
                        too); at least 1;
    N:                  exactly N threads.

Set it with the environment variable DECLAB_THREADS (`auto` or a number), or for the app in the sidebar's
settings. Decoding one small model is bound by memory bandwidth, so one thread loses little against two (the
measured ratio is in README.md), while an oversubscribed core loses most of its speed.

Which thread: torch's OpenMP keeps a pool of worker threads for every thread that has run a parallel operation,
for as long as that thread lives. While two such pools exist and their threads outnumber the cores, GNU OpenMP
stops spinning between operations, and every operation of the decoding thread waits for a sleeping worker:
decoding in a second thread after the main thread had loaded the model measured 2.2x slower per step (README.md,
issue 21). So a process decodes in the thread that did its torch work (the CLI: `RunService.run_here`), or does
that work in a thread that ends with it (the app's model loads: `in_passing_thread`).
"""

from __future__ import annotations

import os
import threading
import time

import torch

ENV = "DECLAB_THREADS"
_lock = threading.Lock()


def cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def busy_elsewhere(samples: int = 3, gap_s: float = 0.005) -> int:
    """Runnable threads on the machine besides the one asking: the 4th field of /proc/loadavg ('running/total',
    which counts the caller too), the least of a few readings `gap_s` apart, so a thread that runs for a moment
    (a page being drawn) is not taken for a busy core; 0 where /proc is missing."""
    least = None
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        least = running if least is None else min(least, running)
        if i + 1 < samples:
            time.sleep(gap_s)
    return max(0, (least or 1) - 1)


def parse(value) -> int | None:
    """None for auto, else a positive thread count; raises ValueError with the legal values."""
    text = str(value).strip().lower() if value is not None else "auto"
    if text in ("", "auto", "0"):
        return None
    n = int(text) if text.isdigit() else -1
    if n < 1:
        raise ValueError(f"{ENV} must be 'auto' or a whole number of threads >= 1, got {value!r}")
    return n


def choose(setting=None) -> int:
    """The thread count for a run: `setting` (None = $DECLAB_THREADS, default auto)."""
    n = parse(os.environ.get(ENV) if setting is None else setting)
    return n if n is not None else max(1, cores() - busy_elsewhere())


def apply(setting=None) -> int:
    """Choose the thread count for a run starting now and set it (process-wide: a run that starts beside another in
    the same process sees the other's threads busy, and both go on with the smaller count). Returns it."""
    with _lock:
        n = choose(setting)
        torch.set_num_threads(n)
    return n


def in_passing_thread(fn):
    """fn() in a thread of its own that ends with it; its result, or its exception re-raised here.

    For torch work (a model load: weight packing, a compile's warm-up) asked for by a thread that lives on while a
    run decodes in another, such as a page's script thread showing the run's progress: the passing thread takes its
    OpenMP pool with it when it ends (see "Which thread" above)."""
    box: dict = {}

    def work() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:          # handed to the caller as it is
            box["error"] = e

    t = threading.Thread(target=work, name="declab-load")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
