"""A one-line progress bar for the study: drawn on a terminal, silent otherwise."""

from __future__ import annotations

import sys
import threading
import time

__all__ = ["Progress"]


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60:d}:{seconds % 60:02d}"


class Progress:
    """Weighted progress over units of work, redrawn a few times a second on ``stream``.

    Disabled (every method a no-op) unless ``enabled``; the caller decides that from
    ``--quiet`` and ``stream.isatty()``.
    """

    def __init__(self, enabled: bool, stream=None, width: int = 28):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.total = 0.0
        self.done = 0.0
        self.runs_total = 0
        self.runs_done = 0
        self.label = ""
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_len = 0

    # ---- state --------------------------------------------------------------------------
    def set_label(self, label: str) -> None:
        with self._lock:
            self.label = label
        self._draw()

    def add(self, cost: float, runs: int = 0) -> None:
        with self._lock:
            self.total += cost
            self.runs_total += runs

    def advance(self, cost: float, runs: int = 1, label: str | None = None) -> None:
        with self._lock:
            self.done += cost
            self.runs_done += runs
            if label is not None:
                self.label = label
        self._draw()

    # ---- drawing ------------------------------------------------------------------------
    def __enter__(self) -> Progress:
        if self.enabled:
            self.t0 = time.perf_counter()
            self._thread = threading.Thread(target=self._tick, name="paramshare-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.stream.write("\r" + " " * self._last_len + "\r")
            self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(0.25):
            self._draw()

    def line(self) -> str:
        with self._lock:
            frac = self.done / self.total if self.total else 0.0
            elapsed = time.perf_counter() - self.t0
            filled = int(round(frac * self.width))
            bar = "#" * filled + "-" * (self.width - filled)
            eta = f"  ~{_clock(elapsed * (1 - frac) / frac)} left" if 0.02 < frac < 1 else ""
            runs = f"  {self.runs_done}/{self.runs_total} runs" if self.runs_total else ""
            label = f"  {self.label}" if self.label else ""
            return f"study [{bar}] {frac:4.0%}  {_clock(elapsed)}{eta}{runs}{label}"

    def _draw(self) -> None:
        if not self.enabled or self._thread is None:
            return
        text = self.line()
        try:
            import shutil

            cols = shutil.get_terminal_size((100, 20)).columns
        except Exception:  # pragma: no cover
            cols = 100
        text = text[: max(10, cols - 1)]
        pad = max(0, self._last_len - len(text))
        with self._lock:
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
            self._last_len = len(text)
