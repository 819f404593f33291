"""Row movement between C-contiguous arrays: copy, gather and scatter.

A row is one sample, i.e. ``array[i]``; rows are moved as raw bytes, so any
dtype works as long as source and destination agree.  Each function accepts
either NumPy arrays (CPU reference path, also the library's CPU backend) or
CuPy arrays (one launch of the matching kernel of ``movement.cu``); mixing
the two is a :class:`TypeError`.  Both backends validate their inputs the
same way and raise the same errors.

Contract shared by both backends (not checked on the GPU, where it would cost
a synchronisation): the source rows read and the destination rows written
must not overlap, and ``scatter_rows`` destination indices must be unique.
NumPy additionally checks that index values are in range (``IndexError``).
"""

import math
import operator

import numpy as np

from . import WORD_TYPES, get_module, word_type_for

_BLOCK_X = 256
_MAX_GRID_X = 1024
_MAX_GRID_Y = 65535
_WARP = 32
_ROW_LOOP_MAX = 1024          # NumPy scatter: rows moved one by one up to this many,
_ROW_LOOP_MIN_BYTES = 4096    # and only rows at least this large


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
        # In-range indices: "clip" is exact and, unlike "raise", unbuffered.
        np.take(src, index, axis=0, mode="clip",
                out=dst[dst_offset:dst_offset + len(index)])
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
    if len(src_index) != len(dst_index):
        raise ValueError(
            f"src_index and dst_index lengths differ: {len(src_index)} != "
            f"{len(dst_index)}")
    if xp is np:
        _check_index_values("src_index", src_index, len(src))
        _check_index_values("dst_index", dst_index, len(dst))
        if len(src_index) <= _ROW_LOOP_MAX and src[:1].nbytes >= _ROW_LOOP_MIN_BYTES:
            # One copy per byte: fancy indexing would first build src[src_index];
            # for small rows the per-row Python call costs more than that copy.
            for i, j in zip(src_index.tolist(), dst_index.tolist()):
                dst[j] = src[i]
        else:
            dst[dst_index] = src[src_index]
        return
    _launch("scatter_rows", src, dst, len(src_index), stream,
            lambda row_words: (src, src_index, dst, dst_index,
                               np.int64(len(src_index)), row_words))


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


def _launch(kernel, src, dst, n_rows, stream, make_args):
    """Launch ``kernel`` moving ``n_rows`` rows from ``src`` to ``dst``.

    ``make_args(row_words)`` returns the kernel arguments once the word
    type, hence the row length in words, is known.
    """
    import cupy

    row_bytes = src.itemsize * math.prod(src.shape[1:])
    if n_rows == 0 or row_bytes == 0:
        return
    word = word_type_for(row_bytes, src.data.ptr, dst.data.ptr)
    row_words = row_bytes // word
    grid, block = launch_config(row_words, n_rows)
    device_id = dst.device.id
    with cupy.cuda.Device(device_id):
        function = get_module("movement", device_id).get_function(
            f"{kernel}<{WORD_TYPES[word]}>")
        if stream is None:
            stream = cupy.cuda.get_current_stream()
        with stream:
            function(grid, block, make_args(np.int64(row_words)))


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
