"""Ctrl-C during training: finish the current step, save a checkpoint, then exit.

    with StopOnInterrupt() as stop:
        for step in ...:
            train_step()
            if stop.requested:          # set by the first Ctrl-C (SIGINT) or SIGTERM
                save(); break

A second Ctrl-C raises KeyboardInterrupt at once, for when saving itself hangs. Outside the main thread
(where Python cannot install signal handlers) the context does nothing and Ctrl-C behaves as usual.
"""

from __future__ import annotations

import signal
import sys
import threading


class StopOnInterrupt:
    def __init__(self, message: str = "interrupted: saving a checkpoint, then stopping (Ctrl-C again to abort)"):
        self.requested = False
        self.message = message
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{self.message}", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
