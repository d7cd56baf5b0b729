"""SIGINT and SIGTERM during training: stop at the end of the iteration, after a checkpoint."""

from __future__ import annotations

import signal
import sys
import threading


class Stopped(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM (a checkpoint was written unless a second
    signal cut it short). ``exit_code`` is 128 + the signal's number: 130 or 143."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number
        self.exit_code = 128 + signal_number


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks between iterations.

    Stopping mid-iteration could leave Adam half-applied; at the end of an iteration the
    state is consistent and can be checkpointed. A second signal stops at once.
    """

    def __init__(self):
        self.signal_number = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        if self.signal_number is not None:
            raise Stopped(number)
        self.signal_number = number
        print(f"\nfastmeta: {signal.Signals(number).name}: stopping after this iteration and writing a checkpoint", file=sys.stderr)

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
