"""A one-line progress bar for a run the CLI is waiting on (`declab run`): written to a terminal only.

    bar = ProgressBar(run, sys.stderr)      # silent unless sys.stderr.isatty()
    while not service.done.wait(0.1):
        bar.update()
    bar.close()                            # clears the line

Per-token strategies show `[####....] 12/64 tokens · 85.3 tok/s · ETA 0.6 s`. A strategy that draws several
samples one after another (a config with `num_samples` > 1: ASAp, GCD) shows samples done instead
(`sample 3/10 · 240 tokens · ... · ETA`), counted from its trace's `finish` rows. Tokens/s and the ETA come from
the time since the first token (the prompt's prefill and the model load are not counted).
"""

from __future__ import annotations

import time

WIDTH = 24                       # bar characters
MIN_INTERVAL_S = 0.1             # redraw at most this often


class ProgressBar:
    def __init__(self, run, stream, clock=time.monotonic):
        self.run, self.stream, self.clock = run, stream, clock
        self.enabled = bool(getattr(stream, "isatty", lambda: False)())
        self.total = int(run.request.max_new_tokens)
        samples = getattr(run.cfg, "num_samples", 1)
        self.samples = int(samples) if isinstance(samples, int) and samples > 1 else 0
        self.t_first = None
        self.last_draw = -1.0
        self._seen = 0                       # trace rows counted so far
        self._tokens = 0                     # token rows (all samples)
        self._finished = 0                   # finish rows (samples done)
        self.drawn = False

    def _count(self) -> None:
        rows = self.run.trace.rows
        n = len(rows)                        # rows are only appended, by the run's thread
        for row in rows[self._seen:n]:
            kind = row.get("kind")
            self._tokens += kind == "token"
            self._finished += kind == "finish"
        self._seen = n

    def line(self) -> str | None:
        """The bar's text now (None before the first token)."""
        self._count()
        tokens = self._tokens if self.samples else len(self.run.latest)
        if tokens == 0:
            return None
        now = self.clock()
        if self.t_first is None:
            self.t_first = now
            return None
        elapsed = now - self.t_first
        rate = (tokens - 1) / elapsed if elapsed > 0 else 0.0
        if self.samples:
            done = min(self._finished, self.samples)
            frac = done / self.samples
            what = f"sample {min(done + 1, self.samples)}/{self.samples} ({done} done) · {tokens} tokens"
        else:
            frac = min(tokens / self.total, 1.0)
            what = f"{tokens}/{self.total} tokens"
        if not self.samples and rate > 0:                   # tokens left at the rate so far
            eta = f"ETA {(self.total - tokens) / rate:.1f} s"
        elif self.samples and 0 < frac < 1:                 # samples left at the time per sample so far
            eta = f"ETA {elapsed * (1 - frac) / frac:.1f} s"
        else:
            eta = "ETA ?"
        filled = int(round(frac * WIDTH))
        return f"[{'#' * filled}{'.' * (WIDTH - filled)}] {what} · {rate:.1f} tok/s · {eta}"

    def update(self) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if now - self.last_draw < MIN_INTERVAL_S:
            return
        text = self.line()
        if text is None:
            return
        self.last_draw = now
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        """Clear the bar's line (the text and messages that follow start on a clean line)."""
        if self.enabled and self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
