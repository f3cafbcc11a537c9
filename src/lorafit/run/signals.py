"""Signal-safe stops: SIGTERM / SIGUSR1 only set a flag, read at the next optimizer-step boundary (lorafit.run.guard),
where every rank agrees to save a checkpoint and exit with EXIT_STOPPED_TO_RESUME; a second signal stops at once.
"""

from __future__ import annotations

import os
import signal

from lorafit.errors import EXIT_STOPPED_TO_RESUME


class StopSignals:
    """SIGTERM / SIGUSR1 only set a flag, read at the next step boundary; a second one stops at once (128+signum)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, on_hard_stop=None):
        self.received: int | None = None
        self._old: dict = {}
        self.was_blocked: list[str] = []
        self._on_hard_stop = on_hard_stop

    def install(self) -> None:
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._handle)
        # A blocked signal mask is inherited through fork and exec, and a handler does not unblock it: started under
        # a supervisor that blocks SIGTERM/SIGUSR1, the preemption notice would stay pending for ever and the run
        # would be killed without its checkpoint. Defensive: the launchers we test with (accelerate, torchrun,
        # srun, coreutils timeout) leave the mask empty.
        self.was_blocked = sorted(signal.Signals(s).name for s in signal.pthread_sigmask(signal.SIG_UNBLOCK,
                                                                                          self.SIGNALS)
                                  if s in self.SIGNALS)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            # os.write, not logging: a handler may interrupt a logging call that holds the handler's lock
            os.write(
                2,
                f"lorafit: {name} received: saving a checkpoint at the next step boundary, then exiting "
                f"with {EXIT_STOPPED_TO_RESUME} (send it again to stop at once)\n".encode(),
            )
            return
        os.write(2, f"lorafit: second {name}: stopping at once, without a checkpoint\n".encode())
        if self._on_hard_stop:
            self._on_hard_stop()
        os._exit(128 + signum)
