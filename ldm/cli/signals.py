"""Ctrl-C and SIGTERM during a run: stop at the next iteration boundary and save."""
from __future__ import annotations

import os
import signal
import threading

EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopOnSignals:
    """While active, SIGINT/SIGTERM ask the sampler to stop at the next iteration boundary (a
    second signal stops at once, without saving; the last periodic state stays). The previous
    handlers come back on exit. Only in the main thread (where Python delivers signals)."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_SIGNAL:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        return False

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        # os.write, not print: a handler may run in the middle of another write to stderr.
        os.write(2, f"\n{signal.Signals(signum).name} received: stopping after the current "
                    "iteration to save the run (send it again to stop at once, without saving)\n"
                    .encode())

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name
