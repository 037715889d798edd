"""Progress display for work that takes more than a second.

``with progress.stage("compiling for arm64"):`` prints the stage and, when it ends, how long it
took. On a terminal a ticker redraws the elapsed time in place; in logs (CI) each stage is one
line when it ends, plus one when it starts if it runs for more than a second. Everything goes to stderr, so ``--json`` output on
stdout stays clean.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import IO, Iterator

__all__ = ["Progress"]


class Progress:
    def __init__(self, enabled: bool = True, stream: IO[str] | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.timings: list[tuple[str, float]] = []
        self._detail = ""
        self._last_update = 0.0

    def update(self, text: str, every: float = 15.0) -> None:
        """Progress inside the current stage (trials done, ETA): shown in the ticker on a terminal,
        one line at most every ``every`` seconds in logs."""
        self._detail = text
        if self.enabled and not self.tty and time.monotonic() - self._last_update >= every:
            self._last_update = time.monotonic()
            print(f"  {text}", file=self.stream, flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            print(f"  {text}", file=self.stream, flush=True)

    def _announce(self, title: str) -> None:
        print(f"… {title}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def stage(self, title: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self._detail = ""
        stop = threading.Event()
        ticker = None
        if self.tty:
            def tick() -> None:
                while not stop.wait(0.25):
                    detail = f": {self._detail}" if self._detail else ""
                    self.stream.write(f"\r\033[K… {title} ({time.perf_counter() - t0:.1f} s){detail}")
                    self.stream.flush()

            ticker = threading.Thread(target=tick, daemon=True)
            ticker.start()
        elif self.enabled:
            # In logs, announce a stage only once it has run for a second: quick stages get one line.
            ticker = threading.Thread(target=lambda: stop.wait(1.0) or self._announce(title), daemon=True)
            ticker.start()
        ok = False
        try:
            yield
            ok = True
        finally:
            stop.set()
            if ticker is not None:
                ticker.join()
            dt = time.perf_counter() - t0
            self.timings.append((title, dt))
            if self.enabled and ok:
                prefix = "\r\033[K" if self.tty else ""
                print(f"{prefix}✓ {title} ({dt:.1f} s)", file=self.stream, flush=True)
            elif self.tty:  # a failed stage: clear the ticker; the caller reports the error in one line
                self.stream.write("\r\033[K")
                self.stream.flush()
