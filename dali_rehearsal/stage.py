"""The DALI stage: a mixing pipeline fed by the user's own pipeline.

DALI does not let an operator change the batch size, so the stage is the
source of a second pipeline (batch ``b + r``): an ``external_source`` whose
callback, :class:`Mixer`, runs the user's pipeline for ``b`` fresh samples,
writes them and up to ``r`` representatives into one output batch, and
stores the fresh samples in the buffer. Everything after the stage (random
crops, flips, normalisation) then applies to fresh samples and
representatives alike, and any DALI framework iterator consumes the result.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref

import numpy as np

from .buffer import RehearsalBuffer
from .epochs import EpochPlan

__all__ = ["Mixer", "LastBatchPolicy"]

log = logging.getLogger("dali_rehearsal")

try:
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
except ImportError:  # DALI is optional for the buffer alone
    import enum

    class LastBatchPolicy(enum.Enum):
        FILL = 0
        DROP = 1
        PARTIAL = 2


def _policy_name(policy) -> str:
    name = getattr(policy, "name", policy)
    if not isinstance(name, str) or name.upper() not in ("FILL", "DROP", "PARTIAL"):
        raise ValueError(f"last_batch_policy must be a LastBatchPolicy (FILL, DROP or PARTIAL), "
                         f"got {policy!r}")
    return name.upper()


class Mixer:
    """The ``external_source`` callback of the mixing pipeline.

    Each call returns one output batch: the fresh samples in the source's
    order, then the representatives (and, with ``replay_flag``, a uint8 flag
    per sample: 0 fresh, 1 replayed). At the end of the source's epoch it
    raises ``StopIteration``; the next call starts the next epoch.
    """

    def __init__(self, source, buffer: RehearsalBuffer, *, out_batch_size: int,
                 reader_name: str | None = None, last_batch_policy=LastBatchPolicy.PARTIAL,
                 replay_flag: bool = False, ring_depth: int = 4, prepare_ahead: int = 2):
        if isinstance(prepare_ahead, bool) or not isinstance(prepare_ahead, int) \
                or prepare_ahead < 0:
            raise ValueError(f"prepare_ahead must be an integer >= 0, got {prepare_ahead!r}")
        self.prepare_ahead = prepare_ahead
        self.source = source
        self.buffer = buffer
        self.last_batch_policy = _policy_name(last_batch_policy)
        self.replay_flag = bool(replay_flag)
        self.out_batch_size = int(out_batch_size)
        # Output arrays in use: DALI's queue, the prepared steps, the one being built.
        self.ring_depth = int(ring_depth) + prepare_ahead
        self.fresh_batch_size = int(source.max_batch_size)
        source.build()
        readers = source.reader_meta()
        if reader_name is None and len(readers) > 1:
            raise ValueError(f"the source pipeline has several readers {sorted(readers)}: "
                             "pass reader_name= to say which one sets the epoch")
        if reader_name is not None and reader_name not in readers:
            raise ValueError(f"the source pipeline has no reader named {reader_name!r} "
                             f"(readers: {sorted(readers)})")
        if reader_name is None and readers:
            (reader_name,) = readers
        self.reader_name = reader_name
        self.plan = (EpochPlan(readers[reader_name], self.fresh_batch_size)
                     if reader_name else None)
        self.epoch = 0
        self.steps = 0                   # steps delivered in this epoch
        self._left: int | None = None    # fresh samples left in this epoch (None: not started)
        self._batch = None               # current source batch (backend arrays)
        self._labels = None              # its labels on the host
        self._pos = 0
        self._ring = None
        self._ring_next = 0
        self._stream = buffer.backend.new_stream()
        self._worker: _Worker | None = None
        self._stopped = False
        buffer.attach_stage(self)

    @property
    def stream(self):
        """The CUDA stream the stage works on (None on the CPU)."""
        return self._stream

    # ---------------------------------------------------------- the stream
    def _fetch(self) -> None:
        if self._stream is not None and self._batch is not None:
            # The source's GPU outputs are valid only until it runs again: the
            # copies out of the previous batch must be done first.
            self._stream.synchronize()
        outputs = self.source.run(self._stream) if self._stream is not None else self.source.run()
        try:   # dense tensors, no copy: CPU ones expose the array interface, GPU ones CUDA's
            fields = [o.as_tensor() for o in outputs]
        except RuntimeError as e:
            raise ValueError("the source pipeline's samples must have one fixed shape per output "
                             "(e.g. fn.resize(..., size=(H, W)) in the source pipeline): "
                             f"{e}") from e
        arrays, labels = self.buffer.check_batch(fields, self._stream)
        self.buffer.ensure_storage(arrays)
        self._batch, self._labels, self._pos = arrays, labels, 0

    def _advance(self, runs, out=None, offset=0, labels=None) -> int:
        """Applies ``(action, count)`` runs to the stream; copies the used rows
        into ``out`` from row ``offset``; returns the new offset."""
        for action, count in runs:
            while count > 0:
                if self._batch is None or self._pos == len(self._labels):
                    self._fetch()
                m = min(count, len(self._labels) - self._pos)
                if action == "use":
                    self.buffer.store.copy([src[self._pos:self._pos + m] for src in self._batch],
                                           out, offset, self._stream)
                    labels[offset:offset + m] = self._labels[self._pos:self._pos + m]
                    offset += m
                self._pos += m
                count -= m
        return offset

    # ------------------------------------------------------------ outputs
    def _outputs(self):
        """The next output arrays of the ring (DALI reads them without a copy)."""
        if self._ring is None:
            be = self.buffer.backend
            self._ring = [self.buffer.store.empty_rows(self.out_batch_size)
                          for _ in range(self.ring_depth)]
            self._flags = [be.empty(self.out_batch_size, np.uint8)
                           for _ in range(self.ring_depth)]
        i = self._ring_next
        self._ring_next = (i + 1) % self.ring_depth
        return self._ring[i], self._flags[i]

    def _deliverable(self) -> int:
        b, left = self.fresh_batch_size, self._left
        if self.last_batch_policy == "DROP" and left < b:
            return 0
        return min(b, left)

    # ------------------------------------------------------------- a step
    def __call__(self):
        if self.prepare_ahead == 0:
            return self.run_step()
        if self._worker is None:
            self._worker = _Worker(self)
        return self._worker.next()

    def run_step(self):
        """Builds one output batch in the calling thread (StopIteration at an epoch end)."""
        if self._stopped:
            raise RuntimeError("this rehearsal stage was stopped: a newer stage uses its buffer")
        try:
            with self.buffer.backend.stream_context(self._stream):
                return self._step()
        except StopIteration:
            raise
        except Exception:
            self.buffer.fail_step()
            raise

    def stop(self, *, drain: bool = True) -> None:
        """Stops preparing batches (the buffer moves on to a newer stage).

        With ``drain`` the worker first fills its queue, so the buffer always
        ends ``prepare_ahead + 1`` steps beyond what DALI asked for, whatever
        the timing: runs stay reproducible across tasks.
        """
        if self._worker is not None:
            self._worker.stop(drain=drain)
        self._stopped = True

    def _start_epoch(self) -> None:
        self._left = self.plan.start_epoch(self.epoch) if self.plan else -1   # -1: unbounded
        self.steps = 0

    def _end_epoch(self, reason: str) -> None:
        if self.plan is not None and self._left:
            if reason == "drop":
                self._advance(self.plan.drop_real(self._left))
            else:
                log.log(self.buffer.log_level, "epoch %d ends early on rank %d (another rank "
                        "ended its epoch); %d fresh samples open the next epoch", self.epoch,
                        self.buffer.rank, self._left)
        log.debug("epoch %d: %d steps", self.epoch, self.steps)
        self.epoch += 1
        self._left = None
        raise StopIteration

    def _step(self):
        if self._left is None:
            self._start_epoch()
        if self.plan is None:
            return self._step_unbounded()
        n = self._deliverable()
        reps = self.buffer.begin_step(active=n > 0)
        if reps is None or n == 0:
            self._end_epoch("drop" if n == 0 else "stopped")
        if self.buffer.spec is None:
            self._fetch()
        out, flags = self._outputs()
        labels = np.empty(self.fresh_batch_size, dtype=np.int64)
        fresh = self._advance(self.plan.take(n, padding="skip"), out, 0, labels)
        self._left -= n
        if fresh < self.fresh_batch_size and self.last_batch_policy == "FILL":
            fresh = self._advance(self.plan.take(self.fresh_batch_size - fresh, padding="use"),
                                  out, fresh, labels)
        return self._finish(out, flags, fresh, labels, reps, next_active=self._deliverable() > 0)

    def _step_unbounded(self):
        """A source without a reader: one whole source batch per step, until
        the source raises StopIteration."""
        if self._batch is None or self._pos == len(self._labels):
            try:
                self._fetch()
            except StopIteration:
                self._batch = None
        has_batch = self._batch is not None
        reps = self.buffer.begin_step(active=has_batch)
        if reps is None or not has_batch:
            self._left = None       # a fetched batch, if any, opens the next epoch
            self.epoch += 1
            raise StopIteration
        out, flags = self._outputs()
        n = len(self._labels)
        labels = np.empty(self.fresh_batch_size, dtype=np.int64)
        self._advance([("use", n)], out, 0, labels)
        return self._finish(out, flags, n, labels, reps, next_active=True)

    def _finish(self, out, flags, fresh, labels, reps, *, next_active):
        if fresh + reps.count > self.out_batch_size:
            raise ValueError(f"{fresh} fresh + {reps.count} representatives exceed the mixing "
                             f"pipeline's batch size {self.out_batch_size}")
        rows = self.buffer.end_step(out, fresh, labels, reps, stream=self._stream,
                                    next_active=next_active)
        self.steps += 1
        result = [o[:rows] for o in out]
        if self.replay_flag:
            flags[:fresh] = 0
            flags[fresh:rows] = 1
            result.append(flags[:rows])
        return result


_STOP = object()
_live_workers: "weakref.WeakSet[_Worker]" = weakref.WeakSet()


class _Worker:
    """Prepares the mixer's next steps in a background thread.

    DALI calls the stage on the thread that drives the pipeline, between
    training steps. The worker runs the mixer (the source pipeline, the
    exchange, the copies and inserts) up to ``prepare_ahead`` steps ahead, so
    that this work overlaps with training; the DALI callback only takes the
    next prepared batch. Epoch ends travel through the queue in order.
    """

    def __init__(self, mixer: Mixer):
        self._mixer = mixer
        self._queue: queue.Queue = queue.Queue(maxsize=mixer.prepare_ahead)
        self._stop = threading.Event()       # stop now
        self._drain = threading.Event()      # stop once the queue is full
        self._backend = mixer.buffer.backend
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="dali-rehearsal-stage")
        _live_workers.add(self)
        self._thread.start()

    def _run(self) -> None:
        self._backend.use_device()
        while not self._stop.is_set():
            try:
                item = self._mixer.run_step()
            except StopIteration:
                item = _STOP
            except BaseException as e:  # handed to the consumer, in order
                self._put(e)
                return
            if not self._put(item):
                return

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                if self._drain.is_set():
                    return False      # drained: the queue is full, stop here
        return False

    def next(self):
        while True:
            try:
                item = self._queue.get(timeout=0.05)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the rehearsal stage's worker has stopped") from None
        if item is _STOP:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        (self._drain if drain else self._stop).set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._stop.set()


@atexit.register
def _stop_workers() -> None:
    # Before the interpreter tears down DALI and CUDA under a running worker.
    for worker in list(_live_workers):
        worker.stop(drain=False, timeout=5.0)


def rehearsal(source, *, buffer: RehearsalBuffer, reader_name: str | None = None,
              last_batch_policy=LastBatchPolicy.PARTIAL, replay_flag: bool = False,
              prepare_ahead: int = 2, name: str | None = None):
    """Mixes representatives into the batches of ``source``, inside a pipeline.

    Call it in the definition of the *mixing* pipeline, whose batch size must
    be at least ``source``'s batch size plus ``buffer.num_representatives``::

        @pipeline_def(batch_size=56 + 7, num_threads=4, device_id=0)
        def train(source):
            images, labels = dr.fn.rehearsal(source, buffer=buffer)
            ...

    Args:
        source: the user's pipeline (not built, or built); every output must
            have a fixed sample shape. One output is the label
            (``buffer.label_index``, the second by default); all outputs go
            through the buffer together.
        buffer: the :class:`RehearsalBuffer`. It outlives the pipelines: give
            the same buffer to the next task's pipelines.
        reader_name: the reader of ``source`` that sets the epoch; needed only
            when ``source`` has several readers. A source without a reader
            ends its epoch when it raises ``StopIteration``.
        last_batch_policy: DALI's ``LastBatchPolicy``; ``PARTIAL`` (default)
            delivers every fresh sample exactly once per epoch.
        replay_flag: add one more output, a uint8 per sample: 0 for fresh,
            1 for a representative.
        prepare_ahead: steps the stage prepares ahead in a background thread
            (running the source pipeline, the exchange, the copies and the
            inserts while the training step runs). ``0`` does the work in the
            thread that drives the mixing pipeline, when DALI asks for it.
        name: name of the ``external_source`` operator.

    Returns:
        The outputs of ``source`` (plus the flag), ``b`` fresh samples then up
        to ``r`` representatives, on the buffer's device.
    """
    from nvidia.dali import fn as dali_fn
    from nvidia.dali.pipeline import Pipeline

    pipe = Pipeline.current()
    if pipe is None:
        raise RuntimeError("dali_rehearsal.fn.rehearsal must be called inside the definition "
                           "of the mixing pipeline (a @pipeline_def function)")
    if not isinstance(source, Pipeline):
        raise TypeError(f"source must be a DALI Pipeline (the user's pipeline), got "
                        f"{type(source).__name__}")
    if not isinstance(buffer, RehearsalBuffer):
        raise TypeError(f"buffer must be a RehearsalBuffer, got {type(buffer).__name__}")
    r = buffer.num_representatives
    room = pipe.max_batch_size - source.max_batch_size
    if r > pipe.max_batch_size:
        raise ValueError(f"num_representatives={r} is larger than the mixing pipeline's "
                         f"batch size {pipe.max_batch_size}")
    if room < r:
        raise ValueError(
            f"the mixing pipeline's batch size ({pipe.max_batch_size}) must be at least the "
            f"source's batch size ({source.max_batch_size}) + num_representatives ({r}) = "
            f"{source.max_batch_size + r}")
    num_outputs = source.num_outputs
    if num_outputs is None or num_outputs < 2:
        raise ValueError("the source pipeline must return at least two outputs: the samples "
                         "and their labels")
    if buffer.label_index >= num_outputs:
        raise ValueError(f"buffer.label_index={buffer.label_index} but the source pipeline "
                         f"has {num_outputs} outputs")
    depth = pipe.prefetch_queue_depth
    if isinstance(depth, dict):
        depth = depth["cpu_size"] * depth["gpu_size"]
    mixer = Mixer(source, buffer, out_batch_size=pipe.max_batch_size, reader_name=reader_name,
                  last_batch_policy=last_batch_policy, replay_flag=replay_flag,
                  ring_depth=int(depth) + 2, prepare_ahead=prepare_ahead)
    kwargs = dict(source=mixer, num_outputs=num_outputs + int(replay_flag), batch=True,
                  device=buffer.device, no_copy=True)
    if mixer.stream is not None:
        kwargs["cuda_stream"] = mixer.stream
    if name is not None:
        kwargs["name"] = name
    outputs = dali_fn.external_source(**kwargs)
    return list(outputs)
