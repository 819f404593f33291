"""Where rounds run: a progress thread per sampler, and what happens at exit.

:class:`Round` is one round as the step and the progress thread share it:
what this process says, and what comes back. :class:`Progress` runs the
rounds a sampler submits, in order, in a daemon thread (the exchange then
overlaps with training), or in the caller's thread when the transport cannot
be used from another one (MPI without ``MPI_THREAD_MULTIPLE``).

A process that exits with a buffer open must tell the others, so that they
raise instead of waiting for its next step: :func:`register` records a live
sampler, and an ``atexit`` handler closes every one still registered, with
the reason (an uncaught exception, or none).
"""

from __future__ import annotations

import atexit
import queue
import sys
import threading
import weakref

from .errors import RemoteError
from .messages import describe_exception

__all__ = ["Round", "Progress", "register", "unregister"]


class Round:
    """One round: what this process says, and what comes back."""

    def __init__(self, kind: int, *, size: int = 0, event=None, note: str | None = None,
                 slots=None, feedback: bool = False):
        self.kind = kind
        self.feedback = feedback    # this process has feedback for others (see .mail)
        self.size = size            # how many samples this process offers to the draws
        self.slots = slots          # which slots they are (None: 0 .. size-1)
        self.event = event          # GPU event: the step's writes are queued before it
        self.note = note            # why this process stops (FAILED, CLOSED)
        self.number = -1            # set when submitted: the same on every process
        self.steps = 0
        self.done = threading.Event()
        self.result = None
        self.exception: BaseException | None = None
        self.reported = False       # the caller has seen the result


class Progress:
    """Runs ``run(round)`` for each submitted round, in submission order.

    ``threaded``: in a daemon thread named ``name`` that first calls
    ``setup()`` (binding the device); otherwise at once, in the caller's
    thread. ``run`` must end every round (set ``round.done``), whatever
    happens: every wait in it is bounded by the transport's timeout.
    """

    def __init__(self, run, *, threaded: bool, name: str, setup=None, rank: int = 0):
        self._run = run
        self._setup = setup
        self._rank = rank
        self.threaded = threaded
        self._queue: queue.Queue = queue.Queue()
        self._thread = None
        if threaded:
            self._thread = threading.Thread(target=self._serve_forever, daemon=True, name=name)
            self._thread.start()

    def submit(self, rnd: Round) -> None:
        if self._thread is not None:
            self._queue.put(rnd)
        else:
            self._run(rnd)

    def wait(self, rnd: Round) -> None:
        """Returns once ``rnd`` has ended; raises :class:`RemoteError` if the
        thread died (only a dead thread could leave a round pending)."""
        while not rnd.done.wait(0.5):
            if self._thread is not None and not self._thread.is_alive():
                raise RemoteError(f"rank {self._rank}: the exchange thread has stopped")

    def stop(self) -> bool:
        """Ends the thread after the rounds already submitted; True when it
        is still running after a bounded wait (a round still pending)."""
        if self._thread is None:
            return False
        self._queue.put(None)
        self._thread.join(timeout=10.0)
        return self._thread.is_alive()

    def _serve_forever(self) -> None:
        if self._setup is not None:
            self._setup()
        while True:
            rnd = self._queue.get()
            if rnd is None:
                return
            self._run(rnd)


_live: "weakref.WeakSet" = weakref.WeakSet()


def register(sampler) -> None:
    """Closes ``sampler`` at interpreter exit if it is still open then."""
    _live.add(sampler)


def unregister(sampler) -> None:
    _live.discard(sampler)


@atexit.register
def _close_at_exit() -> None:
    """A process that exits with a buffer open tells the others, so that they
    raise instead of waiting for its next step."""
    exc = getattr(sys, "last_value", None)     # set by an uncaught exception
    reason = (f"exited with an uncaught exception ({describe_exception(exc)})" if exc
              is not None else "exited without closing its buffer")
    for sampler in list(_live):
        try:
            sampler.close(reason=reason, at_exit=True)
        except BaseException:      # never let cleanup hide the exit status
            pass
