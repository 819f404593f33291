"""Row movement between C-contiguous arrays: copy, gather and scatter.

A row is one sample, i.e. ``array[i]``; rows are moved as raw bytes, so any
dtype works as long as source and destination agree.  Each function accepts
either NumPy arrays (CPU reference path, also the library's CPU backend) or
CuPy arrays (kernels of ``movement.cu``); mixing the two is a
:class:`TypeError`.  Both backends validate their inputs the same way and
raise the same errors.

Two families:

* ``copy_rows``, ``gather_rows``, ``scatter_rows``: one array, one launch,
  index arrays on the same backend as the data;
* ``copy_fields``, ``gather_fields``, ``scatter_fields``: every field of a
  sample (image, label, extras) in **one launch per call, whatever the
  number of fields**. Index arrays are host (NumPy) int64 arrays; on the GPU
  they travel with the descriptor table (one row per field: source and
  destination pointers, row length, word size) in a single host-to-device
  copy from pinned memory into a device scratch buffer that is kept between
  calls. The scratch is a ring of slots: a slot is written again only after
  the host has waited for the event recorded after its last kernel, so
  neither the pinned source of an upload nor the device table is overwritten
  while the GPU may still read it, whatever streams the calls use.

On NumPy arrays every wrapper checks its inputs and then moves rows with
``gather_rows_host`` or ``scatter_rows_host``: the host row path, unchecked,
which the CPU :class:`~dali_rehearsal.storage.SampleStore` calls directly.

Contract shared by both backends (not checked on the GPU for device index
arrays, where it would cost a synchronisation): the source rows read and the
destination rows written must not overlap, and scatter destination indices
must be unique.  Host index values are checked (``IndexError``).
"""

import math
import operator
import threading

import numpy as np

from .compile import get_kernel, kernel_name, word_type_for

_BLOCK_X = 256
_MAX_GRID_X = 1024
_MAX_GRID_Y = 65535
_MAX_GRID_Z = 65535
_WARP = 32
_ROW_LOOP_MAX = 1024          # host scatter: rows moved one by one up to this many,
_ROW_LOOP_MIN_BYTES = 4096    # and only rows at least this large

#: Host layout of ``struct dr_field`` in movement.cu (32 bytes per field).
FIELD_DTYPE = np.dtype([("src", "<u8"), ("dst", "<u8"), ("row_words", "<i8"),
                        ("word_bytes", "<i8")])


# ------------------------------------------------------------------ one field

def copy_rows(src, dst, *, dst_offset=0, stream=None):
    """Copy all rows of ``src`` into ``dst[dst_offset:dst_offset + len(src)]``.

    ``stream`` (CuPy only) is the stream to launch on; ``None`` means CuPy's
    current stream.
    """
    xp = _backend(src, dst)
    _check_rows(src, dst)
    dst_offset = _check_span("dst_offset", dst_offset, len(src), len(dst))
    if xp is np:
        dst[dst_offset:dst_offset + len(src)] = src
        return
    _launch("copy_rows", src, dst, len(src), stream,
            lambda row_words: (src, dst, np.int64(len(src)), row_words,
                               np.int64(dst_offset)))


def gather_rows(src, index, dst, *, dst_offset=0, stream=None):
    """Write ``src[index[k]]`` to ``dst[dst_offset + k]`` for every ``k``.

    ``index`` is a 1-D int64 array (repeats allowed) on the same backend and
    device as the data.
    """
    xp = _backend(src, index, dst)
    _check_rows(src, dst)
    _check_index("index", index)
    dst_offset = _check_span("dst_offset", dst_offset, len(index), len(dst))
    if xp is np:
        _check_index_values("index", index, len(src))
        gather_rows_host(src, index, dst, dst_offset)
        return
    _launch("gather_rows", src, dst, len(index), stream,
            lambda row_words: (src, index, dst, np.int64(len(index)),
                               row_words, np.int64(dst_offset)))


def scatter_rows(src, src_index, dst, dst_index, *, stream=None):
    """Write ``src[src_index[k]]`` to ``dst[dst_index[k]]`` for every ``k``.

    Both indices are 1-D int64 arrays of equal length; ``dst_index`` must not
    repeat.
    """
    xp = _backend(src, src_index, dst, dst_index)
    _check_rows(src, dst)
    _check_index("src_index", src_index)
    _check_index("dst_index", dst_index)
    _check_same_length(src_index, dst_index)
    if xp is np:
        _check_index_values("src_index", src_index, len(src))
        _check_index_values("dst_index", dst_index, len(dst))
        scatter_rows_host(src, src_index, dst, dst_index)
        return
    _launch("scatter_rows", src, dst, len(src_index), stream,
            lambda row_words: (src, src_index, dst, dst_index,
                               np.int64(len(src_index)), row_words))


# ------------------------------------------------------- the host row path
# The NumPy reference of the kernels and the buffer's CPU backend
# (SampleStore): one implementation, without checks. Callers have checked
# what these rely on: NumPy arrays of matching rows, index values in range,
# scatter destinations distinct.

def gather_rows_host(src, index, dst, dst_offset=0):
    """``dst[dst_offset + k] = src[index[k]]`` with NumPy, unchecked."""
    # In-range indices: "clip" is exact and, unlike "raise", unbuffered. (The
    # method: np.take would add a Python-level dispatch per field.)
    src.take(index, axis=0, mode="clip", out=dst[dst_offset:dst_offset + len(index)])


def scatter_rows_host(src, src_index, dst, dst_index):
    """``dst[dst_index[k]] = src[src_index[k]]`` with NumPy, unchecked."""
    if len(src_index) <= _ROW_LOOP_MAX and src[:1].nbytes >= _ROW_LOOP_MIN_BYTES:
        # One copy per byte: fancy indexing would first build src[src_index];
        # for small rows the per-row Python call costs more than that copy.
        for i, j in zip(src_index.tolist(), dst_index.tolist()):
            dst[j] = src[i]
    else:
        dst[dst_index] = src[src_index]


# ---------------------------------------------------------------- all fields

def copy_fields(srcs, dsts, *, dst_offset=0, stream=None):
    """``copy_rows(srcs[f], dsts[f], dst_offset=...)`` for every field ``f``,
    in one launch on the GPU. Every source holds the same number of rows."""
    srcs, dsts, xp = _check_fields(srcs, dsts)
    n = len(srcs[0]) if srcs else 0
    if any(len(s) != n for s in srcs):
        raise ValueError(f"every source field must hold the same number of rows, got "
                         f"{[len(s) for s in srcs]}")
    for d in dsts:
        dst_offset = _check_span("dst_offset", dst_offset, n, len(d))
    if xp is np:
        for s, d in zip(srcs, dsts):
            d[dst_offset:dst_offset + n] = s
        return
    _launch_fields("copy_fields", srcs, dsts, n, stream, (),
                   lambda table, idx: (table, np.int64(n), np.int64(dst_offset)))


def gather_fields(srcs, index, dsts, *, dst_offset=0, stream=None):
    """``dsts[f][dst_offset + k] = srcs[f][index[k]]`` for every field ``f``
    and every ``k``, in one launch on the GPU. ``index``: host int64 indices
    (repeats allowed)."""
    srcs, dsts, xp = _check_fields(srcs, dsts)
    index = _host_index("index", index)
    for d in dsts:
        dst_offset = _check_span("dst_offset", dst_offset, len(index), len(d))
    for s in srcs:
        _check_index_values("index", index, len(s))
    if xp is np:
        for s, d in zip(srcs, dsts):
            gather_rows_host(s, index, d, dst_offset)
        return
    n = len(index)
    _launch_fields("gather_fields", srcs, dsts, n, stream, (index,),
                   lambda table, idx: (table, idx[0], np.int64(n), np.int64(dst_offset)))


def scatter_fields(srcs, src_index, dsts, dst_index, *, stream=None):
    """``dsts[f][dst_index[k]] = srcs[f][src_index[k]]`` for every field
    ``f`` and every ``k``, in one launch on the GPU. Host int64 indices of
    equal length; ``dst_index`` must not repeat."""
    srcs, dsts, xp = _check_fields(srcs, dsts)
    src_index = _host_index("src_index", src_index)
    dst_index = _host_index("dst_index", dst_index)
    _check_same_length(src_index, dst_index)
    for s, d in zip(srcs, dsts):
        _check_index_values("src_index", src_index, len(s))
        _check_index_values("dst_index", dst_index, len(d))
    if xp is np:
        for s, d in zip(srcs, dsts):
            scatter_rows_host(s, src_index, d, dst_index)
        return
    n = len(src_index)
    _launch_fields("scatter_fields", srcs, dsts, n, stream, (src_index, dst_index),
                   lambda table, idx: (table, idx[0], idx[1], np.int64(n)))


def _check_fields(srcs, dsts):
    srcs, dsts = list(srcs), list(dsts)
    if len(srcs) != len(dsts):
        raise ValueError(f"{len(srcs)} source fields but {len(dsts)} destination fields")
    if not srcs:
        return srcs, dsts, np
    xp = _backend(*srcs, *dsts)
    for s, d in zip(srcs, dsts):
        _check_rows(s, d)
    return srcs, dsts, xp


def _host_index(name, index):
    """``index`` as a host int64 array (device arrays are copied, blocking)."""
    if not isinstance(index, np.ndarray):
        if hasattr(index, "__cuda_array_interface__"):
            raise TypeError(f"{name} must be a host (NumPy) int64 array for the multi-field "
                            "kernels: it travels with their descriptor table")
        index = np.asarray(index)
    if index.dtype != np.int64:
        if index.size and index.dtype.kind not in "iu":
            raise TypeError(f"{name} must be int64, got {index.dtype}")
        index = index.astype(np.int64)
    if index.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {index.shape}")
    return np.ascontiguousarray(index)


def _backend(*arrays):
    """Return ``numpy`` or ``cupy``, the array module shared by ``arrays``."""
    if all(isinstance(a, np.ndarray) for a in arrays):
        return np
    try:
        import cupy
    except ImportError:
        cupy = None
    if cupy is not None and all(isinstance(a, cupy.ndarray) for a in arrays):
        if len({a.device.id for a in arrays}) != 1:
            raise ValueError("all arrays must be on the same CUDA device")
        return cupy
    kinds = sorted({f"{type(a).__module__}.{type(a).__qualname__}"
                    for a in arrays})
    raise TypeError("arrays must be all numpy.ndarray or all cupy.ndarray, "
                    f"got {', '.join(kinds)}")


def _check_rows(src, dst):
    """Check that ``src`` and ``dst`` hold contiguous rows of the same kind."""
    if src.ndim == 0 or dst.ndim == 0:
        raise ValueError("src and dst need at least one (row) dimension")
    if src.dtype != dst.dtype:
        raise TypeError(
            f"dtype mismatch: src is {src.dtype}, dst is {dst.dtype}")
    if src.shape[1:] != dst.shape[1:]:
        raise ValueError(f"row shape mismatch: src rows are {src.shape[1:]}, "
                         f"dst rows are {dst.shape[1:]}")
    for name, array in (("src", src), ("dst", dst)):
        if not array.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")


def _check_index(name, index):
    """Check that ``index`` is a contiguous 1-D int64 array."""
    if index.dtype != np.int64:
        raise TypeError(f"{name} must be int64, got {index.dtype}")
    if index.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {index.shape}")
    if not index.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


def _check_same_length(src_index, dst_index):
    if len(src_index) != len(dst_index):
        raise ValueError(
            f"src_index and dst_index lengths differ: {len(src_index)} != "
            f"{len(dst_index)}")


def _check_span(name, offset, count, n_rows):
    """Check that rows ``[offset, offset + count)`` fit in ``n_rows`` rows."""
    offset = operator.index(offset)
    if offset < 0 or offset + count > n_rows:
        raise ValueError(
            f"{name}={offset} with {count} rows is out of bounds for dst "
            f"with {n_rows} rows")
    return offset


def _check_index_values(name, index, n_rows):
    """Check that all values of the NumPy ``index`` lie in ``[0, n_rows)``."""
    if len(index) and (index.min() < 0 or index.max() >= n_rows):
        raise IndexError(
            f"{name} values must lie in [0, {n_rows}), got range "
            f"[{index.min()}, {index.max()}]")


# ------------------------------------------------------------------ launches

def _current_stream(stream):
    if stream is None:
        import cupy
        stream = cupy.cuda.get_current_stream()
    return stream


def _launch(kernel, src, dst, n_rows, stream, make_args):
    """Launch single-field ``kernel`` moving ``n_rows`` rows from ``src`` to ``dst``.

    ``make_args(row_words)`` returns the kernel arguments once the word
    type, hence the row length in words, is known.
    """
    row_bytes = src.itemsize * math.prod(src.shape[1:])
    if n_rows == 0 or row_bytes == 0:
        return
    word = word_type_for(row_bytes, src.data.ptr, dst.data.ptr)
    row_words = row_bytes // word
    grid, block = launch_config(row_words, n_rows)
    function = get_kernel("movement", kernel_name(kernel, word), dst.device.id)
    function(grid, block, make_args(np.int64(row_words)), stream=_current_stream(stream))


def _launch_fields(kernel, srcs, dsts, n_rows, stream, indices, make_args):
    """One launch of multi-field ``kernel`` over every field with bytes.

    The descriptor table and the ``indices`` (host int64 arrays) go to the
    device in one copy through a staging slot; ``make_args(table, index
    pointers)`` returns the kernel arguments.
    """
    records = []
    for s, d in zip(srcs, dsts):
        row_bytes = s.itemsize * math.prod(s.shape[1:])
        if row_bytes == 0:
            continue
        word = word_type_for(row_bytes, s.data.ptr, d.data.ptr)
        records.append((s.data.ptr, d.data.ptr, row_bytes // word, word))
    if n_rows == 0 or not records:
        return
    if len(records) > _MAX_GRID_Z:
        raise ValueError(f"at most {_MAX_GRID_Z} fields per launch, got {len(records)}")
    table = np.array(records, dtype=FIELD_DTYPE)
    grid, block = fields_launch_config(int(table["row_words"].max()), n_rows, len(records))
    device_id = dsts[0].device.id
    stream = _current_stream(stream)
    function = get_kernel("movement", kernel, device_id)
    staging = _staging_for(device_id)
    with staging.slot(table.nbytes + sum(i.nbytes for i in indices), stream) as slot:
        pointers = slot.fill([table] + list(indices))
        function(grid, block, make_args(np.uint64(pointers[0]),
                                        [np.uint64(p) for p in pointers[1:]]), stream=stream)


def launch_config(row_words, n_rows):
    """Return the ``(grid, block)`` dimensions used to move rows.

    Words of a row run on x, rows on y; both axes are capped and covered by
    the kernels' grid-stride loops.  Short rows get a smaller (whole-warp)
    block rather than idle threads.
    """
    block_x = min(_BLOCK_X, -(-row_words // _WARP) * _WARP)
    grid = (min(-(-row_words // block_x), _MAX_GRID_X),
            min(n_rows, _MAX_GRID_Y), 1)
    return grid, (block_x, 1, 1)


def fields_launch_config(max_row_words, n_rows, n_fields):
    """``(grid, block)`` of a multi-field launch: sized for the longest row,
    fields on z (blocks beyond a shorter field's row return at once)."""
    (gx, gy, _), block = launch_config(max_row_words, n_rows)
    return (gx, gy, n_fields), block


# ------------------------------------------------------------------- staging

class _Slot:
    __slots__ = ("host", "device", "event")

    def __init__(self):
        self.host = None      # pinned host bytes
        self.device = None    # device bytes
        self.event = None     # recorded after the last kernel that read this slot


class _SlotUse:
    """A staging slot held for one upload and launch (under the ring's lock)."""

    def __init__(self, ring, slot, nbytes, stream):
        self.ring, self._slot, self.nbytes, self.stream = ring, slot, nbytes, stream

    def __enter__(self):
        return self

    def fill(self, arrays):
        """Copies ``arrays`` (host) into the slot, uploads them on the stream in
        one copy; returns the device address of each."""
        slot, host = self._slot, self._slot.host
        pointers, offset = [], 0
        for a in arrays:
            n = a.nbytes
            host[offset:offset + n] = a.reshape(-1).view(np.uint8)
            pointers.append(slot.device.data.ptr + offset)
            offset += n
        slot.device[:offset].set(host[:offset], stream=self.stream)
        return pointers

    def __exit__(self, *exc):
        try:
            if not _capturing(self.stream):
                event = self.ring.cupy.cuda.Event(disable_timing=True)
                event.record(self.stream)
                self._slot.event = event
        finally:
            self.ring.lock.release()
        return False


def _capturing(stream):
    is_capturing = getattr(stream, "is_capturing", None)
    return bool(is_capturing()) if is_capturing is not None else False


class _StagingRing:
    """Pinned host and device scratch for descriptor tables and indices.

    ``SLOTS`` slots used in turn. Before a slot is filled again the host waits
    for the event recorded after the kernel that last read it (normally long
    done). One lock serialises fill, upload and launch, so threads that move
    rows on different streams (the stage's worker, the exchange) share it.
    Inside a CUDA graph capture no event is recorded or awaited: a captured
    graph re-reads the slot when replayed, so replays must move the rows
    written at capture (what the benchmark's graph mode does).
    """

    SLOTS = 8
    MIN_BYTES = 4096

    def __init__(self, cupy, device_id):
        self.cupy, self.device_id = cupy, device_id
        self.lock = threading.Lock()
        self._slots = [_Slot() for _ in range(self.SLOTS)]
        self._next = 0

    def reserve(self, nbytes):
        """Allocates every slot for uploads of up to ``nbytes`` (before a
        CUDA graph capture, where a slot cannot grow)."""
        with self.lock:
            for slot in self._slots:
                if slot.event is not None:
                    slot.event.synchronize()
                    slot.event = None
                self._grow(slot, nbytes)

    def _grow(self, slot, nbytes):
        if slot.host is None or slot.host.nbytes < nbytes:
            size = max(self.MIN_BYTES, 1 << (int(nbytes) - 1).bit_length())
            with self.cupy.cuda.Device(self.device_id):
                import cupyx
                slot.host = cupyx.empty_pinned(size, dtype=np.uint8)
                slot.device = self.cupy.empty(size, dtype=np.uint8)

    def slot(self, nbytes, stream):
        self.lock.acquire()
        try:
            slot = self._slots[self._next]
            self._next = (self._next + 1) % self.SLOTS
            if slot.event is not None and not _capturing(stream):
                slot.event.synchronize()     # the GPU is done with this slot's last use
                slot.event = None
            if slot.host is None or slot.host.nbytes < nbytes:
                if _capturing(stream):
                    raise RuntimeError("a staging slot must grow during a CUDA graph capture: "
                                       "call reserve_staging() before capturing")
                self._grow(slot, nbytes)
            return _SlotUse(self, slot, nbytes, stream)
        except BaseException:
            self.lock.release()
            raise


_staging: dict = {}
_staging_lock = threading.Lock()


def _staging_for(device_id):
    ring = _staging.get(device_id)
    if ring is None:
        import cupy
        with _staging_lock:
            ring = _staging.setdefault(device_id, _StagingRing(cupy, device_id))
    return ring


def reserve_staging(device_id, nbytes=_StagingRing.MIN_BYTES):
    """Allocates the staging slots of ``device_id`` for descriptor tables and
    indices of up to ``nbytes`` bytes; call it before capturing multi-field
    movements in a CUDA graph."""
    _staging_for(int(device_id)).reserve(nbytes)


def clear_staging():
    """Drops the staging rings (kernels.clear_caches)."""
    with _staging_lock:
        _staging.clear()
