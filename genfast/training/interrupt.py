"""Ctrl-C during training: finish the current step, save a checkpoint, then exit.

    with StopOnInterrupt() as stop:
        for step in ...:
            train_step()
            if stop.requested:          # set by the first Ctrl-C (SIGINT), SIGTERM or SIGHUP
                save(); break

SIGHUP (the terminal closed, an ssh session dropped) is treated like SIGTERM: without it the default action
kills the process mid-save and leaves a temporary folder behind. A second Ctrl-C raises KeyboardInterrupt at
once, for when saving itself hangs. Outside the main thread
(where Python cannot install signal handlers) the context does nothing and Ctrl-C behaves as usual.
"""

from __future__ import annotations

import signal
import sys
import threading

# SIGHUP does not exist on Windows.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


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
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
