"""The user's pipeline seen as a stream of rows.

:class:`SourceStream` runs the source pipeline one batch at a time, checks the
batch through the step object (``StepCore.admit``) and hands out its
rows in order. It knows how to run a source (with the stage's CUDA stream, or
host-synchronously on DALI's legacy executors), resets a source that raised
``StopIteration`` so that its next epoch can start, remembers the layouts of
its outputs, and makes sure that a source pipeline feeds one stage at a time.
"""

from __future__ import annotations

import weakref

from .. import profiling as _prof

__all__ = ["SourceStream", "runs_with_stream"]


def runs_with_stream(source) -> bool:
    """Whether the stage runs ``source`` on its CUDA stream (``source.run(stream)``).

    DALI hands outputs over on a caller's stream only on its dynamic executor:
    ``Pipeline.run(cuda_stream)`` raises for a pipeline with
    ``prefetch_queue_depth`` given as a dict, ``exec_dynamic=False`` or
    ``exec_async=False`` (``_require_exec_dynamic`` in DALI's pipeline.py). Such
    sources, and sources without a GPU (``device_id=None``: host outputs only),
    run without a stream; their outputs are then host-synchronous, and
    :meth:`SourceStream.fetch` synchronises the stage's stream before the next
    run recycles them.
    """
    return bool(source.exec_dynamic) and source.device_id is not None


def _runs_as_dali(source) -> bool:
    """Whether ``source.run()`` is DALI's own ``Pipeline.run``, i.e.
    ``schedule_run()`` then ``outputs()``."""
    from nvidia.dali.pipeline import Pipeline
    return getattr(type(source), "run", None) is Pipeline.run


class _Claim:
    """Which stage reads a source pipeline, and whether it has read from it."""

    __slots__ = ("stage", "read")

    def __init__(self, stage):
        self.stage = weakref.ref(stage)
        self.read = False


#: source pipeline -> _Claim (weak keys: the registry keeps no pipeline alive)
_claims: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _claim(source, stage) -> _Claim:
    previous = _claims.get(source)
    if previous is not None:
        other = previous.stage()
        if other is not None and other is not stage and not other.stopped:
            raise ValueError(
                "this source pipeline already feeds another rehearsal stage that is still "
                "running; each mixing pipeline needs its own source pipeline (build a new "
                "one per mixing pipeline, and a new pair per task)")
        if previous.read:
            raise ValueError(
                "this source pipeline was already read by an earlier rehearsal stage: it is "
                "part way through its data, so a new stage could not tell where its epochs "
                "end; build a new source pipeline for the new mixing pipeline")
    claim = _Claim(stage)
    _claims[source] = claim
    return claim


class SourceStream:
    """The rows of the source pipeline's batches, in order.

    ``batch`` holds the current source batch (the buffer's arrays, batch
    first) and ``labels`` its labels on the host; ``pos`` is the next row.
    """

    def __init__(self, source, core, stage, *, stream=None):
        self.source = source
        self.core = core
        self.stream = stream
        self._claim = _claim(source, stage)
        source.build()
        self.with_stream = stream is not None and runs_with_stream(source)
        # run as schedule_run() + outputs(), which is what DALI's run() does;
        # a pipeline class with a run() of its own is run with it
        self._scheduled = _runs_as_dali(source)
        self._ran = False
        self.batch = None
        self.labels = None
        self.pos = 0
        #: the layout of each output (``""`` for none), from the first batch
        self.layouts: list[str] | None = None

    @property
    def remaining(self) -> int:
        """Rows of the current batch not handed out yet."""
        return 0 if self.labels is None else len(self.labels) - self.pos

    def _run(self):
        # schedule_run() + outputs() is what run() does, less one of its
        # per-call API checks (each builds a class in DALI 2.4's Python).
        if self._scheduled:
            try:
                self.source.schedule_run()
            except RuntimeError as e:
                # A source the user ran with run() before cannot switch: DALI
                # checks this before it runs anything. Keep to run() then.
                if self._ran or "API type" not in str(e):
                    raise
                self._scheduled = False
            else:
                self._ran = True
                return self.source.outputs(self.stream) if self.with_stream \
                    else self.source.outputs()
        if self.with_stream:
            return self.source.run(self.stream)
        return self.source.run()

    def fetch(self) -> None:
        """Runs the source for its next batch.

        Raises what the source raises: ``StopIteration`` at the end of its data
        (after resetting it, so that the next call starts its next epoch), DALI's
        own error for a batch that failed (a corrupt file: DALI's dynamic
        executor goes on with the next batch), or the buffer's error for a batch
        it cannot store. The previous batch is dropped in every case.
        """
        if self.stream is not None and self.batch is not None:
            # The source's outputs are valid only until it runs again (DALI
            # recycles them): the copies out of the previous batch, queued on
            # the stage's stream, must be done first.
            self.core.backend.synchronize(self.stream)
        self.batch, self.labels, self.pos = None, None, 0
        self._claim.read = True
        try:
            with _prof.phase("source"):
                outputs = self._run()
        except StopIteration:
            self.source.reset()
            raise
        try:   # dense tensors, no copy: CPU ones expose the array interface, GPU ones CUDA's
            fields = [o.as_tensor() for o in outputs]
        except RuntimeError as e:
            raise ValueError("the source pipeline's samples must have one fixed shape per output "
                             "(e.g. fn.resize(..., size=(H, W)) in the source pipeline): "
                             f"{e}") from e
        if self.layouts is None:
            self.layouts = [str(o.layout() or "") for o in outputs]
        arrays, labels = self.core.admit(fields, self.stream)
        self.batch, self.labels = arrays, labels

    def take(self, n: int, out, offset: int, labels) -> None:
        """Copies the next ``n`` rows into ``out`` from row ``offset`` (queued
        on the stage's stream) and their labels into ``labels``."""
        p = self.pos
        whole = p == 0 and n == len(self.labels)
        rows = self.batch if whole else [f[p:p + n] for f in self.batch]
        self.core.copy_rows(rows, out, offset, self.stream)
        labels[offset:offset + n] = self.labels if whole else self.labels[p:p + n]
        self.pos = p + n

    def skip(self, n: int) -> None:
        """Skips the next ``n`` rows."""
        self.pos += n
