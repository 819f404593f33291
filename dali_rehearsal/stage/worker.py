"""Preparing the stage's next steps in a background thread.

DALI calls the stage on the thread that drives the mixing pipeline, between
training steps. The worker runs the mixer (the source pipeline, the exchange,
the copies and inserts) up to ``prepare_ahead`` steps ahead, so that this work
overlaps with training; the DALI callback only takes the next prepared batch.
Epoch ends and errors travel through the queue in order.

The thread holds only a weak reference to the mixer (a strong one only while
it builds a step): when the last pipeline using a stage is dropped, the stage
is freed at once, without waiting for the garbage collector, and its thread
stops; so do the source pipeline and its threads.
"""

from __future__ import annotations

import atexit
import queue
import threading
import traceback
import weakref

__all__ = ["Worker", "END"]

#: the item that marks an epoch end in the queue
END = object()

_POLL = 0.05      # seconds between checks of the stop flags while blocked

_live: "weakref.WeakSet[Worker]" = weakref.WeakSet()


def _put(q: queue.Queue, item, stop: threading.Event, drain: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL)
            return True
        except queue.Full:
            if drain.is_set():
                return False      # drained: the queue is full, stop here
    return False


def _work(ref, q: queue.Queue, stop: threading.Event, drain: threading.Event, backend) -> None:
    backend.use_device()
    while not stop.is_set():
        mixer = ref()
        if mixer is None:
            return
        try:
            item = mixer.run_step()
        except StopIteration:
            item = END
        except BaseException as e:  # handed to the consumer, in order
            # drop the frames' locals (the mixer among them): no reference cycle
            traceback.clear_frames(e.__traceback__)
            item = e
        failed = mixer.failed
        del mixer
        if not _put(q, item, stop, drain) or failed:
            return


class Worker:
    """The background thread of one mixer, and its queue."""

    def __init__(self, mixer):
        self._queue: queue.Queue = queue.Queue(maxsize=mixer.prepare_ahead)
        self._stop = threading.Event()       # stop now
        self._drain = threading.Event()      # stop once the queue is full
        self._thread = threading.Thread(
            target=_work, args=(weakref.ref(mixer), self._queue, self._stop, self._drain,
                                mixer.buffer.backend),
            daemon=True, name="dali-rehearsal-stage")
        # the stage is dropped: its thread stops (the callback holds no mixer)
        weakref.finalize(mixer, self._stop.set)
        _live.add(self)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def next(self):
        """The next prepared step (raises what building it raised)."""
        while True:
            try:
                item = self._queue.get(timeout=_POLL)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the rehearsal stage's worker has stopped (the stage "
                                       "failed earlier or was stopped)") from None
        if item is END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stops the thread; with ``drain``, once its queue is full."""
        (self._drain if drain else self._stop).set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._stop.set()


@atexit.register
def _stop_workers() -> None:
    # Before the interpreter tears down DALI and CUDA under a running worker.
    for worker in list(_live):
        worker.stop(drain=False, timeout=5.0)
