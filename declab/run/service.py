"""The background run service: runs decoded one after another in a worker thread, streamed, stoppable, each kept
in the run library as soon as it ends. The app (a batch per page: one run, a comparison, a teaching run) and the
CLI (one run, Ctrl-C = Stop) both go through it.

    service = RunService([Job("greedy", run)], kind="run", source="cli", store_path=None).start()
    while not service.done.wait(0.1): show(service.jobs[service.current].run.latest)
    service.stop()                     # ends the current run after its step and skips the rest (kept as stopped)

One forward at a time per service keeps timings fair; nothing a page does (a rerun, a widget, leaving the page)
touches the thread, so only `stop()` ends a run.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field

from declab.core import UserError
from declab.run import threads
from declab.run.runner import Run
from declab.run.store import open_store


@dataclass
class Job:
    label: str
    run: Run


@dataclass
class RunService:
    jobs: list[Job]
    kind: str = "run"                            # what started it: run | compare | teach | cli ...
    source: str = "app"                          # the run library's `source` column
    store_path: str | None = None                # None: the default run library; "" : keep nothing
    stop_all: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    current: int = 0
    errors: dict = field(default_factory=dict)   # job index -> one-line message (a UserError raised mid-run)
    unsaved: dict = field(default_factory=dict)  # job index -> why its run is not in the run library
    collected: bool = False                      # the app moved the results into its session history
    threads: str | int | None = None             # torch threads per run: None = $DECLAB_THREADS (default auto),
                                                 # 'auto' or N (declab/run/threads.py)
    used_threads: dict = field(default_factory=dict)   # job index -> the thread count it ran with

    def start(self) -> "RunService":
        threading.Thread(target=self._work, daemon=True, name=f"declab-{self.kind}").start()
        return self

    def run_here(self) -> "RunService":
        """Run the jobs in the calling thread, to the end: the CLI, whose main thread loaded the model, decodes there
        too (one thread with torch's OpenMP pool: see declab/run/threads.py, "Which thread")."""
        self._work()
        return self

    def _work(self) -> None:
        if hasattr(signal, "pthread_sigmask") and threading.current_thread() is not threading.main_thread():
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})   # Ctrl-C goes to the main thread
        try:
            for i, job in enumerate(self.jobs):
                self.current = i
                if self.stop_all.is_set():
                    job.run.stop.set()
                try:
                    self.used_threads[i] = threads.apply(self.threads)
                    for _ in job.run.events():
                        pass
                except UserError as e:
                    self.errors[i] = str(e)
                except Exception as e:  # the runner records failures itself; this is a last resort
                    self.errors[i] = f"{type(e).__name__}: {e}"
                if job.run.result is not None and self.store_path != "":
                    problem = self._save(job.run.result)
                    if problem:
                        self.unsaved[i] = problem
        finally:
            self.done.set()

    def _save(self, result) -> str | None:
        """Keep a finished run (ok, stopped or failed) in the run library; None, or why it could not."""
        try:
            open_store(self.store_path).save(result, source=self.source)
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return None

    def stop(self) -> None:
        self.stop_all.set()
        for job in self.jobs:
            job.run.stop.set()

    def wait(self, poll_s: float = 0.1) -> None:
        """Block until every job has ended (in short waits, so the main thread still takes Ctrl-C)."""
        while not self.done.wait(poll_s):
            pass

    @property
    def running(self) -> bool:
        return not self.done.is_set()
