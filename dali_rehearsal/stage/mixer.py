"""The mixer: the ``external_source`` callback of the mixing pipeline.

Each call returns one output batch: the fresh samples in the source's order,
then the representatives (and, with ``replay_flag``, a uint8 flag per row). At
the end of an epoch it raises ``StopIteration``; the next call starts the next
epoch.

A step is built in two phases. First the fresh rows are read from the source
into a ring slot; a source batch that fails (DALI's error for a corrupt file,
or the buffer's for a batch it cannot store) is skipped, as plain DALI skips
it, the error is raised once, and the step stays open: the next call goes on
filling it from the next source batch, so no row is lost or mispaired. Then
the buffer draws the representatives, writes them after the fresh rows and
offers the fresh rows to its policy. Errors in that second phase leave the
stage failed.
"""

from __future__ import annotations

import collections

import logging

import numpy as np

from .. import profiling as _prof
from ..step import StepCore
from ..epochs import EpochPlan, LastBatchPolicy, policy_name
from .handover import FILLER, FRESH, REPLAYED, Handover
from .source import SourceStream
from .worker import Worker

__all__ = ["Mixer"]

log = logging.getLogger("dali_rehearsal")


class _Step:
    """A step being built: its ring slot, the labels and the fresh rows so far."""

    __slots__ = ("out", "flags", "labels", "fresh")

    def __init__(self, out, flags, batch_size: int):
        self.out, self.flags = out, flags
        self.labels = np.empty(batch_size, dtype=np.int64)
        self.fresh = 0


class Mixer:
    """Builds the mixing pipeline's batches from the source and the buffer.

    Args mirror :func:`dali_rehearsal.fn.rehearsal`; ``out_batch_size`` is the
    mixing pipeline's batch size and ``ring_depth + prepare_ahead`` the number
    of output arrays (see :mod:`dali_rehearsal.stage.handover`).
    """

    def __init__(self, source, core: StepCore, *, out_batch_size: int,
                 reader_name: str | None = None, last_batch_policy=LastBatchPolicy.PARTIAL,
                 replay_flag: bool = False, ring_depth: int = 4, prepare_ahead: int = 2,
                 static_batch: bool = False, continuous_epochs: bool = False):
        self.prepare_ahead = prepare_ahead     # checked by rehearsal()
        # DALI's reset asks the stage for ``d`` batches at once (the mixing
        # pipeline's prefetch depth) and the first next() for one more: the
        # steps whose fresh rows the worker takes between epochs. At most
        # ``prepare_ahead + 2``: the ring (``d + prepare_ahead + 2`` slots) then
        # reuses only slots of steps DALI has finished (see handover.py).
        prefetch_depth = int(ring_depth) - 2       # rehearsal() gives the ring d + 2
        self.fill_steps = min(prefetch_depth + 1, prepare_ahead + 2)
        self.core = core
        self.last_batch_policy = policy_name(last_batch_policy)
        self.replay_flag = bool(replay_flag)
        self.static_batch = bool(static_batch)
        self.continuous = bool(continuous_epochs)     # epochs end without StopIteration
        self.out_batch_size = int(out_batch_size)
        self.fresh_batch_size = int(source.max_batch_size)
        self.stopped = False
        self.failed = False                 # an error that leaves the stage unusable
        self._source_failed = False         # the error being raised is the source's
        self._stream = core.backend.new_stream()
        self.source = SourceStream(source, core, self, stream=self._stream)
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
        self.plan = (EpochPlan(readers[reader_name], self.fresh_batch_size,
                               self.last_batch_policy) if reader_name else None)
        if self.continuous and self.plan is None:
            raise ValueError("continuous_epochs=True needs a source pipeline with a reader: its "
                             "epochs are known in advance, so the iterator can count them")
        if self.plan is not None and self.plan.steps(0) == 0:
            r = self.plan.reader
            raise ValueError(
                f"last_batch_policy=DROP with a batch of {self.fresh_batch_size} and shards of "
                f"{r.size // r.num_shards} samples: every epoch would be empty; use FILL or "
                "PARTIAL, or a smaller batch")
        self.handover = Handover(core, batch_size=self.out_batch_size,
                                 depth=int(ring_depth) + prepare_ahead, stream=self._stream)
        self.epoch = 0
        self.steps = 0                      # steps delivered in this epoch
        self._epoch_steps: int | None = None  # steps of this epoch (None: not started)
        self._source_ended = False          # a source without reader ended its epoch
        self._step: _Step | None = None     # the step being built
        self._filled: collections.deque = collections.deque()  # next epoch's steps, fresh rows only
        # an error of fill_ahead, and the filled step it belongs to (None: the first)
        self._ahead_error: tuple[_Step | None, BaseException] | None = None
        self._worker: Worker | None = None
        core.attach_writer(self.stop)
        # Written-back values wait until no step built ahead can depend on
        # their timing: DALI's prefetch depth + prepare_ahead + 2 (feedback.py).
        core.feedback.horizon = int(ring_depth) + prepare_ahead

    @property
    def stream(self):
        """The CUDA stream the stage works on (None on the CPU)."""
        return self._stream

    def steps_per_epoch(self, epoch: int = 0) -> int | None:
        """Steps of epoch ``epoch`` (None for a source without a reader)."""
        return None if self.plan is None else self.plan.steps(epoch)

    # ------------------------------------------------------------- a step
    def __call__(self):
        if self.prepare_ahead == 0:
            return self.run_step()
        if self._worker is None:
            self._worker = Worker(self)
        return self._worker.next()

    def run_step(self):
        """Builds one output batch in the calling thread (StopIteration at an epoch end)."""
        if self.failed:
            raise RuntimeError("this rehearsal stage failed earlier (see the first error); "
                               "build new pipelines to go on")
        if self.stopped:
            raise RuntimeError("this rehearsal stage was stopped: a newer stage uses its buffer")
        be = self.core.backend
        try:
            if self._stream is None:        # the host: no device, no stream to make current
                return self._build()
            with be.device_context(), be.stream_context(self._stream):
                return self._build()
        except StopIteration:
            raise
        except Exception:
            if self._source_failed:     # the step stays open: the next call goes on
                self._source_failed = False
            else:
                self.failed = True
                self.core.fail()
            raise

    def fill_ahead(self, steps: int) -> None:
        """Between epochs (the worker waits for DALI to ask for the next
        epoch): takes the fresh rows of the next epoch's first ``steps`` steps
        from the source, the slow part of a step, without touching the buffer;
        each step is completed (representatives, inserts) when DALI asks for
        it, so the buffer still receives only the epochs asked for. Only for a
        source with a reader (its epochs are known in advance). Never raises:
        an error is raised when the step whose rows it interrupted is asked
        for, after the steps filled before it, as it would have been."""
        if self.plan is None or self.failed or self.stopped or self._step is not None \
                or self._filled or not self.core.allocated:
            return
        be = self.core.backend
        try:
            if self._epoch_steps is None:
                self._start_epoch()
            for _ in range(min(steps, self._epoch_steps - self.steps)):
                step = _Step(*self.handover.take(), self.fresh_batch_size)
                self._filled.append(step)
                if self._stream is None:
                    self._fill(step)
                else:
                    with be.device_context(), be.stream_context(self._stream):
                        self._fill(step)
        except BaseException as e:    # noqa: BLE001 - raised again in its place
            self._ahead_error = (self._filled[-1] if self._filled else None, e)

    def stop(self, *, drain: bool = True) -> None:
        """Stops preparing batches (the buffer moves on to a newer stage).

        With ``drain`` the worker first fills its channel, so the buffer always
        ends ``prepare_ahead + 1`` steps beyond what DALI asked for, whatever
        the timing: runs stay reproducible across tasks (a worker waiting for
        the loop to see an error stops where it is: nothing past the failed
        batch, also independent of timing). On return no device work of the
        stage is running: the buffer can be read or saved.
        """
        if self._worker is not None:
            self._worker.stop(drain=drain)
        self.stopped = True
        self.core.backend.synchronize(self._stream)

    # ------------------------------------------------------------ epochs
    def _start_epoch(self) -> None:
        self._epoch_steps = self.plan.steps(self.epoch) if self.plan is not None else -1
        self.steps = 0

    def _end_epoch(self, *, synced: bool = False) -> None:
        """Ends the epoch: StopIteration, or with continuous epochs a return
        (the caller goes on with the next epoch's first step)."""
        if not synced:
            # every process ends the epoch at the same step (global sampling)
            self.core.begin(active=False)
        log.debug("epoch %d: %d steps", self.epoch, self.steps)
        self.epoch += 1
        self._epoch_steps = None
        self._source_ended = False
        self._open_next_epoch()
        if not self.continuous:
            raise StopIteration
        self._start_epoch()

    def _open_next_epoch(self) -> None:
        """Opens the round for the next epoch's first step at once, so that
        it runs while the loop turns over the epoch (global sampling).

        Every process reaches this point at the same step: each has just
        consumed the round that ended the epoch (the one its own last step
        opened with ``next_active=False``, or the one another process ended),
        and nothing has been inserted since, so the round serves the same
        snapshot whatever the timing. Whether this process has a step in the
        next epoch is known from the plan; a source without a reader tells it
        only when the step is built, so its round still opens then."""
        if self.plan is None:
            return
        try:
            self.core.open(active=self.plan.steps(self.epoch) > 0)
        except Exception:      # noqa: BLE001 - stopped, closed: the next step raises it
            pass

    def _raise_ahead_error(self, step) -> None:
        if self._ahead_error is not None and self._ahead_error[0] is step:
            error, self._ahead_error = self._ahead_error[1], None
            raise error

    def _build(self):
        self._raise_ahead_error(None)
        if self._epoch_steps is None:
            self._start_epoch()
        if self.steps == self._epoch_steps or (self._source_ended and self._step is None):
            # every process ends the epoch at the same step (global sampling)
            self._end_epoch()
        step = self._step
        if step is None and self._filled:
            step = self._step = self._filled.popleft()
            self._raise_ahead_error(step)   # the step stays open, as after a failed fill
        if step is None:
            if not self.core.allocated:
                try:
                    self._fetch()           # the first batch fixes the layout
                except StopIteration:
                    self._end_epoch()
            # The step keeps its ring slot until it is delivered, even across
            # an error or an epoch end: slots are used in delivery order.
            step = self._step = _Step(*self.handover.take(), self.fresh_batch_size)
        self._fill(step)
        if step.fresh == 0 and self.plan is None:
            self._end_epoch()               # the source's epoch ended before this step
        # From the representatives to the insert, no other thread uses the buffer.
        with self.core.lock:
            with _prof.phase("exchange"):
                reps = self.core.begin(active=True)
            if reps is None and self.continuous:
                raise RuntimeError(
                    "continuous_epochs=True: another process ended its epoch at another step; "
                    "every process needs the same steps per epoch (equal shards, "
                    "last_batch_policy=DROP or a padded reader)")
            if reps is None:
                # another process ended its epoch: this step's fresh rows open the next one
                log.log(self.core.log_level, "epoch %d ends early on rank %d (another rank "
                        "ended its epoch); %d fresh samples open the next epoch", self.epoch,
                        self.core.rank, step.fresh)
                self._end_epoch(synced=True)
            if step.fresh + reps.count == 0:
                # nothing to deliver (an empty buffer): DALI cannot pass an empty batch
                if self.continuous:     # a reader's step always has fresh rows
                    raise RuntimeError("internal: an empty step with continuous epochs")
                self._end_epoch()
            self._step = None
            rows = self._insert(step, reps)
        return self._finish(step, rows)

    # ------------------------------------------------------------ fresh rows
    def _fetch(self) -> None:
        """The source's next batch; a batch that fails is skipped (the reader's
        positions it held are gone) and its error raised."""
        try:
            self.source.fetch()
        except StopIteration:
            raise
        except Exception:
            if self.plan is not None:
                self.plan.skip_positions(self.fresh_batch_size)
            self._source_failed = True
            raise

    def _fetch_reader(self) -> None:
        try:
            self._fetch()
        except StopIteration:
            # A reader does not end; an external_source beside it did, and the
            # source was reset: its reader goes on.
            try:
                self._fetch()
            except StopIteration:
                raise RuntimeError(
                    f"the source pipeline raised StopIteration twice in a row although its "
                    f"reader {self.reader_name!r} sets the epoch") from None

    def _fill(self, step: _Step) -> None:
        if self.plan is None:
            return self._fill_unbounded(step)
        b, plan, src = self.fresh_batch_size, self.plan, self.source
        policy = self.last_batch_policy
        while step.fresh < b:
            if policy == "PARTIAL":
                want = min(b - step.fresh, plan.real_left(self.epoch))
                if want == 0:
                    return
            else:
                want = b - step.fresh
            if src.remaining == 0:
                self._fetch_reader()
            kind, count, _ = plan.head()
            if kind == "pad" and policy != "FILL":
                k = min(count, src.remaining)
                src.skip(k)
                plan.consume(k)
                continue
            k = min(count, src.remaining, want)
            src.take(k, step.out, step.fresh, step.labels)
            plan.consume(k)
            step.fresh += k

    def _fill_unbounded(self, step: _Step) -> None:
        """A source without a reader: its samples until it raises StopIteration."""
        b, src, policy = self.fresh_batch_size, self.source, self.last_batch_policy
        while step.fresh < b:
            if src.remaining == 0:
                if self._source_ended:
                    return
                try:
                    self._fetch()
                except StopIteration:
                    if policy == "PARTIAL" or step.fresh == 0:
                        self._source_ended = True       # a shorter last step, or none
                        return
                    if policy == "DROP":
                        self._end_epoch()   # too few for a full batch: they open the next epoch
                    # FILL: the last step takes the first samples of the source's next
                    # epoch; the epoch ends after it, the rest opens the next one
                    self._source_ended = True
                    try:
                        self._fetch()
                    except StopIteration:
                        raise ValueError("the source pipeline raised StopIteration right "
                                         "after a reset: it has no samples") from None
            k = min(src.remaining, b - step.fresh)
            src.take(k, step.out, step.fresh, step.labels)
            step.fresh += k

    # ------------------------------------------------------------ the output
    def _insert(self, step: _Step, reps) -> int:
        """Writes the representatives after the fresh rows and inserts the
        fresh rows; returns the row count."""
        fresh = step.fresh
        if fresh + reps.count > self.out_batch_size:
            raise ValueError(f"{fresh} fresh + {reps.count} representatives exceed the mixing "
                             f"pipeline's batch size {self.out_batch_size}")
        # With a reader the plan says whether this process has a next step, and
        # the round for it opens now, overlapped with training. A source without
        # a reader tells only when the next step is built (its StopIteration may
        # come then): that round opens then (None), so that every process ends
        # its epoch at the same step; the worker still builds it ahead.
        next_active = self.steps + 1 < self._epoch_steps if self.plan is not None else None
        return self.core.commit(step.out, fresh, step.labels, reps, stream=self._stream,
                                    next_active=next_active)

    def _finish(self, step: _Step, rows: int):
        fresh, out, flags = step.fresh, step.out, step.flags
        if self.replay_flag:
            flags[:fresh] = FRESH
            flags[fresh:rows] = REPLAYED
        if self.static_batch and rows < self.out_batch_size:
            rows = self._fill_static(out, flags, fresh, rows)
        self.steps += 1
        layouts = self.source.layouts
        if layouts is not None:         # the feedback fields (if any) have none
            layouts = list(layouts) + [""] * self.core.feedback.num_extra
        self.handover.set_layouts(layouts)
        return self.handover.publish(out, flags, rows, with_flag=self.replay_flag)

    def _fill_static(self, out, flags, fresh: int, rows: int) -> int:
        """Fills the rows the buffer could not (it holds fewer than ``r``
        samples) with copies of this batch's fresh rows, flagged FILLER."""
        end = self.out_batch_size
        while rows < end and fresh > 0:
            k = min(fresh, end - rows)
            self.core.copy_rows([o[:k] for o in out], out, rows, self._stream)
            if self.replay_flag:
                flags[rows:rows + k] = FILLER
            rows += k
        return rows
