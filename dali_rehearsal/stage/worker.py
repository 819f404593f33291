"""Preparing the stage's next steps in a background thread.

DALI calls the stage on the thread that drives the mixing pipeline, between
training steps. The worker runs the mixer (the source pipeline, the exchange,
the copies and inserts) up to ``prepare_ahead`` steps ahead, so that this work
overlaps with training; the DALI callback only takes the next prepared batch.
Epoch ends and errors travel through the channel in order.

The hand-over is a small bounded channel (:class:`_Channel`): both sides sleep
on a condition until the other side (or a stop) wakes them, with no polling
and no timeouts, so that an idle stage costs nothing and a prepared batch is
handed over at once. The worker builds a step, then waits for room to hand it
over: it is at most ``prepare_ahead + 1`` steps ahead of the callback (what
the output ring is sized for, see :mod:`.handover`). It never works ahead
across an epoch end: after handing over the end of an epoch it only takes the
fresh rows of the next epoch's first steps from the source (the slow part of
a step; the buffer is left untouched): as many as DALI asks for at once when
it resets (the mixing pipeline's prefetch depth, plus one for the first
``next()``), at most ``prepare_ahead + 2``; then it waits until
DALI asks for the next epoch's first batch (after the iterator's reset) to
complete those steps. So
the buffer receives exactly the samples of the epochs the training loop
consumed, whenever the loop stops between epochs (a task's last epoch, then
the next task's pipelines): the same seed gives the same buffer and the same
batches whatever the timing. After a step that raised
(a source batch that failed) it prepares nothing more until the callback has
taken that error: what the buffer holds when the training loop sees an error
does not depend on timing, and nothing past the failed batch is inserted
before the loop has seen it.

The thread holds only a weak reference to the mixer (a strong one only while
it builds a step): when the last pipeline using a stage is dropped, the stage
is freed at once, without waiting for the garbage collector, and its thread
stops; so do the source pipeline and its threads.
"""

from __future__ import annotations

import atexit
import collections
import threading
import traceback
import weakref

from .. import profiling as _prof

__all__ = ["Worker", "END"]

#: the item that marks an epoch end in the channel
END = object()

_live: "weakref.WeakSet[Worker]" = weakref.WeakSet()


class _Channel:
    """A bounded FIFO between one producer (the worker) and one consumer.

    ``stop`` ends the producer at once, ``drain`` once the channel is full;
    ``close`` (the producer has ended) wakes a waiting consumer. The lock is
    re-entrant: ``stop`` may run from a finaliser at any point.
    """

    __slots__ = ("_items", "_capacity", "_lock", "_not_empty", "_not_full",
                 "stopping", "draining", "closed", "_asking")

    def __init__(self, capacity: int):
        self._items: collections.deque = collections.deque()
        self._capacity = int(capacity)
        self._lock = threading.RLock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self.stopping = False
        self.draining = False
        self.closed = False
        self._asking = False     # the consumer waits on an empty channel

    def put(self, item) -> bool:
        """Hands ``item`` over once there is room; False (item dropped) when
        the channel is stopped, or full while draining."""
        with self._lock:
            while len(self._items) >= self._capacity:
                if self.stopping or self.draining:
                    return False
                self._not_full.wait()
            if self.stopping:
                return False
            self._items.append(item)
            self._not_empty.notify()
            return True

    def wait_taken(self) -> bool:
        """Waits until the consumer has taken everything handed over; False
        when the channel is stopped or draining first."""
        with self._lock:
            while self._items:
                if self.stopping or self.draining:
                    return False
                self._not_full.wait()
            return not self.stopping

    def wait_asked(self) -> bool:
        """Waits until the consumer has taken everything handed over and asks
        for more; False when the channel is stopped or draining first."""
        with self._lock:
            while self._items or not self._asking:
                if self.stopping or self.draining:
                    return False
                self._not_full.wait()
            return not self.stopping

    def get(self):
        """The next item; ``_CLOSED`` once the producer ended and nothing is left."""
        with self._lock:
            while not self._items:
                if self.closed:
                    return _CLOSED
                if not self._asking:
                    self._asking = True
                    self._not_full.notify()      # a producer waiting in wait_asked
                self._not_empty.wait()
            self._asking = False
            item = self._items.popleft()
            self._not_full.notify()
            return item

    def stop(self, *, drain: bool = False) -> None:
        with self._lock:
            if drain:
                self.draining = True
            else:
                self.stopping = True
            self._not_full.notify_all()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._not_empty.notify_all()


#: what ``_Channel.get`` returns once the worker has ended and nothing is left
_CLOSED = object()


def _work(ref, channel: _Channel, backend) -> None:
    try:
        backend.use_device()
        while not channel.stopping:
            mixer = ref()
            if mixer is None:
                return
            try:
                with _prof.phase("stage"):
                    item = mixer.run_step()
            except StopIteration:
                item = END
            except BaseException as e:  # handed to the consumer, in order
                # drop the frames' locals (the mixer among them): no reference cycle
                traceback.clear_frames(e.__traceback__)
                item = e
            failed = mixer.failed
            del mixer
            if not channel.put(item) or failed:
                return
            if isinstance(item, BaseException) and not channel.wait_taken():
                return
            if item is END:
                mixer = ref()
                if mixer is None:
                    return
                # the next epoch's first fresh rows, the buffer untouched
                mixer.fill_ahead(mixer.fill_steps)
                del mixer
                if not channel.wait_asked():
                    return
    finally:
        channel.close()


class Worker:
    """The background thread of one mixer, and its channel."""

    def __init__(self, mixer):
        self._channel = _Channel(mixer.prepare_ahead)
        self._thread = threading.Thread(
            target=_work, args=(weakref.ref(mixer), self._channel, mixer.core.backend),
            daemon=True, name="dali-rehearsal-stage")
        # the stage is dropped: its thread stops (the callback holds no mixer)
        weakref.finalize(mixer, self._channel.stop)
        _live.add(self)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def next(self):
        """The next prepared step (raises what building it raised)."""
        with _prof.phase("stage_wait"):
            item = self._channel.get()
        if item is _CLOSED:
            raise RuntimeError("the rehearsal stage's worker has stopped (the stage "
                               "failed earlier or was stopped)")
        if item is END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stops the thread; with ``drain``, once its channel is full."""
        self._channel.stop(drain=drain)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._channel.stop()


@atexit.register
def _stop_workers() -> None:
    # Before the interpreter tears down DALI and CUDA under a running worker.
    for worker in list(_live):
        worker.stop(drain=False, timeout=5.0)
