"""Sample storage: preallocated rows of every per-sample field on one device.

:class:`SampleStore` is the buffer's memory and the one place that moves
rows in and out of it. It knows nothing about policies or sampling: slots are
plain row indices. Everything that queues device work takes the stream it
must be ordered on.

On the GPU each row movement (copy, gather, scatter) is one kernel launch
for all fields together, whatever their number: the fields' pointers and row
sizes travel in a descriptor table with the step's indices, in one
host-to-device copy into scratch memory kept between steps
(:mod:`dali_rehearsal.kernels.movement`). Nothing is allocated per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._backend import Backend, to_host
from .kernels import (copy_fields, gather_fields, gather_rows_host, scatter_fields,
                      scatter_rows_host)

__all__ = ["FieldSpec", "SampleStore"]


@dataclass(frozen=True)
class FieldSpec:
    """Shape and dtype of one per-sample field (image, label, logits, ...)."""

    shape: tuple
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def describe(self) -> str:
        return f"{tuple(self.shape)} {np.dtype(self.dtype).name}"


def spec_of(arrays) -> tuple[FieldSpec, ...]:
    """The per-sample layout of a batch (one array per field, batch first)."""
    return tuple(FieldSpec(tuple(int(d) for d in a.shape[1:]), np.dtype(a.dtype)) for a in arrays)


def _host(index) -> np.ndarray:
    """Host int64 indices (the multi-field kernels upload them with their table)."""
    if hasattr(index, "__cuda_array_interface__"):
        index = to_host(index)
    return np.ascontiguousarray(index, dtype=np.int64)


def _check_slots(slots: np.ndarray, capacity: int) -> None:
    # One reduction: a negative int64 is a huge uint64.
    if int(slots.view(np.uint64).max()) >= capacity:
        raise IndexError(f"internal: slots outside [0, {capacity}): "
                         f"[{slots.min()}, {slots.max()}]")


class SampleStore:
    """``capacity`` rows per field, allocated once from the first layout."""

    def __init__(self, backend: Backend, capacity: int):
        self.backend = backend
        self.capacity = int(capacity)
        self.spec: tuple[FieldSpec, ...] | None = None
        self.fields: tuple | None = None

    @property
    def allocated(self) -> bool:
        return self.fields is not None

    @property
    def row_nbytes(self) -> int:
        return 0 if self.spec is None else sum(f.nbytes for f in self.spec)

    @property
    def nbytes(self) -> int:
        return self.capacity * self.row_nbytes

    def allocate(self, spec: tuple[FieldSpec, ...]) -> None:
        if self.fields is not None:
            raise RuntimeError("internal: the store is already allocated")
        spec = tuple(spec)
        # the rows first: a reader that sees the layout finds them there
        self.fields = tuple(self.backend.empty((self.capacity,) + f.shape, f.dtype)
                            for f in spec)
        self.spec = spec

    def reset(self) -> None:
        """Forgets the layout and frees the rows (a load that failed after
        allocating them): the next layout allocates afresh."""
        self.spec = None        # the layout first: a reader that sees it finds the rows
        self.fields = None

    def empty_rows(self, n: int) -> list:
        """Uninitialised arrays for ``n`` rows of every field (output batches)."""
        return [self.backend.empty((n,) + f.shape, f.dtype) for f in self.spec]

    # -------------------------------------------------------- row movement
    def index(self, values, stream=None):
        """An int64 index array on this store's device (uploaded on ``stream``)."""
        return self.backend.asarray(np.ascontiguousarray(values, dtype=np.int64), stream)

    # On the host the store moves rows with the kernels' unchecked NumPy row
    # path (gather_rows_host, scatter_rows_host): the arrays are its own
    # (fixed layout, C-contiguous) and every slot index comes from the policy
    # or the sampler, so the checks of the wrappers would only repeat what is
    # already known; slot ranges are still checked, once per call, because a
    # wrong slot would silently move the wrong sample.
    def gather(self, slots, out, offset: int = 0, stream=None) -> None:
        """``out[f][offset + k] = field f of slot slots[k]``, every field (one
        launch on the GPU). ``slots``: host int64 indices."""
        n = len(slots)
        if n == 0:
            return
        slots = _host(slots)
        if self.backend.is_gpu:
            gather_fields(self.fields, slots, out, dst_offset=offset, stream=stream)
            return
        _check_slots(slots, self.capacity)
        for src, dst in zip(self.fields, out):
            gather_rows_host(src, slots, dst, offset)

    def scatter(self, rows, batch_index, slots, stream=None, *, fields=None) -> None:
        """Writes ``rows[f][batch_index[k]]`` into slot ``slots[k]``, every
        field (one launch on the GPU), or the store's fields ``fields`` (their
        indices, one per array of ``rows``). Host int64 indices; slots distinct."""
        if len(slots) == 0:
            return
        batch_index, slots = _host(batch_index), _host(slots)
        dsts = self.fields if fields is None else [self.fields[i] for i in fields]
        if self.backend.is_gpu:
            scatter_fields(rows, batch_index, dsts, slots, stream=stream)
            return
        _check_slots(slots, self.capacity)
        for src, dst in zip(rows, dsts):
            scatter_rows_host(src, batch_index, dst, slots)

    def copy(self, rows, out, offset: int = 0, stream=None) -> None:
        """``out[f][offset:offset + len] = rows[f]``, every field (one launch
        on the GPU); ``out`` may hold more fields (the feedback ones), left as they are."""
        out = out[:len(rows)]
        if self.backend.is_gpu:
            copy_fields(rows, out, dst_offset=offset, stream=stream)
            return
        for src, dst in zip(rows, out):
            dst[offset:offset + len(src)] = src

    # ---------------------------------------------------------- host access
    def read(self, size: int, stream=None) -> list[np.ndarray]:
        """Host copies of rows ``0..size-1`` of every field, ordered after the
        work queued on ``stream`` (the stream that writes into the store)."""
        if self.fields is None:
            return []
        return [np.array(self.backend.to_host(f[:size], stream)) for f in self.fields]

    def write(self, host_fields, stream=None) -> None:
        """Fills rows ``0..len-1`` of every field from host arrays, queued on
        ``stream`` (so later work on that stream sees them)."""
        for saved, store in zip(host_fields, self.fields):
            if len(saved):
                self.backend.from_host(store[: len(saved)], saved, stream)
