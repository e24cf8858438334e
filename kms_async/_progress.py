"""A progress line for the command line: done / total and a rate, on stderr.

On a terminal the line is redrawn in place (carriage return) at most ten
times a second; when forced on for a pipe or a log file it prints one line
per update, at most one a second, so logs stay readable. Disabled, it does
nothing at all, which is what ``--json`` mode and non-terminals get.
"""

from __future__ import annotations

import time
from typing import TextIO

__all__ = ["Progress"]

_BAR_WIDTH = 24


class Progress:
    """Counts work done out of ``total`` and draws it when ``enabled``."""

    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        unit: str,
        stream: TextIO,
        enabled: bool,
        in_place: bool = True,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0
        self._stream = stream
        self._enabled = enabled
        self._in_place = in_place
        self._interval = 0.1 if in_place else 1.0
        self._started = time.monotonic()
        self._last_draw: float | None = None
        self._drawn = False

    def advance(self, count: int) -> None:
        """Add ``count`` units of work done."""
        self.update(self.done + count)

    def update(self, done: int) -> None:
        """Set the units of work done so far."""
        self.done = done
        if not self._enabled:
            return
        now = time.monotonic()
        finished = self.total is not None and done >= self.total
        if self._last_draw is not None and now - self._last_draw < self._interval and not finished:
            return
        self._last_draw = now
        self._draw(now)

    def close(self) -> None:
        """End the line so what follows starts on a fresh one."""
        if self._enabled and self._drawn and self._in_place:
            self._stream.write("\n")
            self._stream.flush()
        self._drawn = False

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._started, 1e-6)
        rate = self.done / elapsed
        if self.total:
            filled = min(_BAR_WIDTH, _BAR_WIDTH * self.done // self.total)
            bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
            counts = f"[{bar}] {self.done}/{self.total} {self.unit}"
        else:
            counts = f"{self.done} {self.unit}"
        line = f"{self.label} {counts}, {rate:,.0f} {self.unit}/s"
        if self._in_place:
            # Pad so a shorter line fully covers the previous one.
            self._stream.write(f"\r{line:<79}")
        else:
            self._stream.write(line + "\n")
        self._stream.flush()
        self._drawn = True
