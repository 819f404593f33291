"""Handing the stage's output batches to DALI.

The mixing pipeline's ``external_source`` receives, for every step, one dense
``(rows, ...)`` array per field (plus the replay flags), written by the stage
into a ring of preallocated output arrays. Two questions decide whether that is
correct: when may DALI read an array (the ordering), and when may the stage
write into the same ring slot again (the ring depth).

**Ordering.** On the GPU the stage writes a batch with kernels queued on its
own non-blocking stream. DALI must not read the batch before they are done.
:meth:`Handover._order` synchronises the stage's stream before the batch
leaves the stage: in the worker thread (``prepare_ahead > 0``) before the batch
is queued, which costs the training thread nothing, or in DALI's thread just
before the callback returns (``prepare_ahead=0``). After it, the batch is
complete in device memory, so any reader on any stream sees it. This does not
depend on which stream DALI uses: its zero-copy path
(``InputOperator::ShareUserData``) keeps the order given by the array's CUDA
array interface, read in DALI's feeding thread (the legacy default stream,
which does not wait for a non-blocking stream), and its copy path
(``CopyUserData``) copies on the ``cuda_stream`` given to ``external_source``.

**Ring depth.** Let ``d`` be the mixing pipeline's prefetch depth and ``p``
``prepare_ahead``; steps take ring slots in order, and the ring has
``d + p + 2`` slots.

- On the GPU the stage hands its batches over with ``no_copy=False`` and
  ``cuda_stream`` set to its stream, so DALI copies each batch into its own
  memory when it is fed, on the stage's stream; DALI and the framework
  iterator never hold the stage's arrays (the batch a training loop keeps is
  DALI's copy, as with any DALI pipeline). DALI feeds step ``k`` right after the
  callback returns it, before it calls the callback for step ``k + 1``. The
  stage writes into a slot again only for step ``k + d + p + 2``, which it
  starts building after the callback took step ``k + d + 1`` from its queue
  (the worker is at most ``p + 1`` steps ahead of the callback), hence after
  the copy of step ``k`` was queued on the same stream: stream order puts the
  copy first. ``p + 2`` slots would be enough.
- On the CPU the stage hands its arrays over without a copy (``no_copy=True``)
  and DALI reads them while it runs step ``k``; the pipeline's outputs are
  DALI's own buffers, not the stage's arrays (the test suite holds on to
  delivered batches and checks that they never change). DALI calls the
  callback for step ``k + d`` only after it returned step ``k`` to the
  consumer (``pipe.run()`` calls it while returning step ``k + 1``, a framework
  iterator after taking step ``k``), hence after it finished running step
  ``k``. The stage starts writing step ``k + d + p + 2`` into step ``k``'s
  slot only after the callback took step ``k + d + 1`` from its queue: one
  step later than needed, a margin.
- Between epochs the worker also takes the fresh rows of the next epoch's
  first ``F`` steps before DALI asks for them (``F = min(d + 1, p + 2)``, see
  :mod:`.worker`). The callback has by then been called for the step after
  the epoch's last step ``L``, so DALI has finished every step up to
  ``L + 1 - d``; step ``L + F`` reuses the slot of step ``L + F - d - p - 2
  <= L - d``: a finished step.

**Metadata.** DALI operators downstream may depend on the layout of their
inputs (DALI conditionals require both branches to agree, and several
operators read the channel axis from it). Each output whose source output had
a layout is handed over as a ``TensorList`` with that layout (no copy), in
DALI's thread (:meth:`Handover.with_layouts`): the stage itself deals in plain
arrays of its backend. On the CPU every output goes over as a ``TensorListCPU``
(the ones without a layout with an empty one): DALI takes a tensor list as it
is, where it would inspect a NumPy array and convert it, which costs the
thread that drives the mixing pipeline more than the wrapping does. The tensor
lists that wrap the ring's arrays are made once and handed over again each
time their slot comes round (a tensor list wraps the array's memory, no copy:
handing it over again is handing over the slot again, which the ring depth
above covers); only a partial batch (a view of a slot) is wrapped anew.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Handover", "FRESH", "REPLAYED", "FILLER"]

#: replay flag values: a fresh sample, a representative, a filler row
#: (a copy of a fresh row of the same batch; ``static_batch`` only)
FRESH, REPLAYED, FILLER = 0, 1, 2


class Handover:
    """The ring of output arrays and the hand-over of each batch to DALI."""

    def __init__(self, core, *, batch_size: int, depth: int, stream=None):
        self.core = core
        self.backend = core.backend
        self.batch_size = int(batch_size)
        self.depth = int(depth)
        self.stream = stream
        self._ring = None
        self._flags = None
        self._next = 0
        self._wrap = None
        self._wrap_cpu = None
        self._tensor_lists: dict = {}   # id(ring array) -> (array, its TensorListCPU)

    def take(self):
        """The next ring slot: ``(out, flags)``, one array per field and the
        uint8 flags, ``batch_size`` rows each. The storage layout must be known
        (``core.allocated``)."""
        if self._ring is None:
            be = self.backend
            self._ring = [self.core.empty_rows(self.batch_size) for _ in range(self.depth)]
            self._flags = [be.empty(self.batch_size, np.uint8) for _ in range(self.depth)]
        i = self._next
        self._next = (i + 1) % self.depth
        return self._ring[i], self._flags[i]

    def _order(self) -> None:
        """The ordering point of the hand-over (see the module docstring):
        every device operation that wrote the batch is complete on return."""
        self.backend.synchronize(self.stream)

    def publish(self, out, flags, rows: int, *, with_flag: bool) -> list:
        """The batch as it leaves the stage, ordered: the first ``rows`` rows of
        every field, then the flags."""
        self._order()
        if rows == self.batch_size:     # the ring's own arrays (see with_layouts)
            result = list(out)
            if with_flag:
                result.append(flags)
            return result
        result = [o[:rows] for o in out]
        if with_flag:
            result.append(flags[:rows])
        return result

    def set_layouts(self, layouts) -> None:
        """Remembers the source's output layouts (``""`` for none)."""
        if self._wrap is not None or layouts is None:
            return
        be = self.backend
        if be.is_gpu:
            if not any(layouts):
                self._wrap = ()
                return
            from nvidia.dali.tensors import TensorListGPU

            def wrap(a, layout, _device=be.device_id):
                return TensorListGPU(a, layout, _device)
            self._wrap = tuple((i, layout, wrap) for i, layout in enumerate(layouts) if layout)
        else:
            from nvidia.dali.tensors import TensorListCPU

            # Every host output, layout or not (and the flags): DALI takes a
            # tensor list as it is, where it would inspect and convert an array.
            # The tensor lists of the ring's arrays (full batches) are made once.
            self._tensor_lists = {id(a): (a, None) for slot in self._ring or () for a in slot}
            self._tensor_lists.update((id(f), (f, None)) for f in self._flags or ())
            self._wrap_cpu = TensorListCPU
            self._wrap = tuple(layouts) + ("",)

    def with_layouts(self, batch: list) -> list:
        """``batch`` as DALI's ``external_source`` receives it: the outputs that
        had a layout in the source wrapped, without a copy, in DALI tensor lists
        that carry it (called in DALI's thread, on published batches only). On
        the CPU every output is wrapped so."""
        wrap = self._wrap
        if not wrap:
            return batch
        if self._wrap_cpu is not None:
            made, result = self._tensor_lists, []
            for a, layout in zip(batch, wrap):
                known = made.get(id(a))
                if known is None:               # a partial batch: a view, wrapped once
                    result.append(self._wrap_cpu(a, layout))
                    continue
                if known[1] is None:            # a ring array, wrapped the first time
                    known = made[id(a)] = (a, self._wrap_cpu(a, layout))
                result.append(known[1])
            return result
        for i, layout, fn in wrap:
            batch[i] = fn(batch[i], layout)
        return batch
