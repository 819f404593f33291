"""``cupy.RawModule`` for the emulation: kernels run a NumPy reference.

The module checks that the source defines every entry point asked for (as
NVRTC would fail to find it) and the launch shape (CUDA's limits), then
queues on the launch stream a NumPy reference of the kernel that works on
emulated device memory through the pointers it is given: array arguments,
and the descriptor table of the multi-field kernels, read when the kernel
runs. Index values and row bounds are checked against the live allocations
(an out-of-range row is an illegal-address error).

The kernel *code* is checked separately: tests/kernel_shim runs the CUDA
source itself on the CPU against the same NumPy semantics.

``RawModule.compiled`` and ``RawModule.lookups`` count compiles and
``get_function`` calls (the library must cache both).
"""

from __future__ import annotations

import re

import numpy as np

from . import runtime as rt

FIELD_DTYPE = np.dtype([("src", "<u8"), ("dst", "<u8"), ("row_words", "<i8"),
                        ("word_bytes", "<i8")])


def _ptr(arg):
    """Device address of a kernel argument (array, or a pointer as an integer)."""
    if hasattr(arg, "data") and hasattr(arg.data, "ptr"):
        return int(arg.data.ptr)
    return int(arg)


def _int(arg):
    return int(arg)


def _move(device, src_ptr, dst_ptr, row_bytes, src_rows, dst_rows, word):
    """Moves whole rows between emulated memory (checked accesses)."""
    if src_ptr % word or dst_ptr % word or row_bytes % word:
        raise rt.CUDARuntimeError(f"cudaErrorMisalignedAddress: {word}-byte words at "
                                  f"{src_ptr:#x} -> {dst_ptr:#x}, rows of {row_bytes} bytes")
    for s, d in zip(np.asarray(src_rows).tolist(), np.asarray(dst_rows).tolist()):
        src = rt.MEMORY.bytes_at(src_ptr + s * row_bytes, row_bytes, device_id=device,
                                 what="kernel read")
        dst = rt.MEMORY.bytes_at(dst_ptr + d * row_bytes, row_bytes, device_id=device,
                                 what="kernel write")
        dst[...] = src


def _indices(device, ptr, n):
    return rt.MEMORY.bytes_at(ptr, 8 * n, device_id=device, what="index read").view(
        np.int64).copy()


def _table(device, ptr, n_fields):
    return rt.MEMORY.bytes_at(ptr, FIELD_DTYPE.itemsize * n_fields, device_id=device,
                              what="descriptor read").view(FIELD_DTYPE).copy()


def _single(kernel, word):
    def run(device, grid, args):
        if kernel == "copy_rows":
            src, dst, n, row_words, offset = args
            n, row_words, offset = _int(n), _int(row_words), _int(offset)
            src_rows, dst_rows = np.arange(n), offset + np.arange(n)
        elif kernel == "gather_rows":
            src, index, dst, n, row_words, offset = args
            n, row_words, offset = _int(n), _int(row_words), _int(offset)
            src_rows, dst_rows = _indices(device, _ptr(index), n), offset + np.arange(n)
        else:
            src, src_index, dst, dst_index, n, row_words = args
            n, row_words = _int(n), _int(row_words)
            src_rows = _indices(device, _ptr(src_index), n)
            dst_rows = _indices(device, _ptr(dst_index), n)
        _move(device, _ptr(src), _ptr(dst), row_words * word, src_rows, dst_rows, word)
    return run


def _fields(kernel):
    def run(device, grid, args):
        n_fields = grid[2]
        if kernel == "copy_fields":
            table, n, offset = args
            n, offset = _int(n), _int(offset)
            src_rows, dst_rows = np.arange(n), offset + np.arange(n)
        elif kernel == "gather_fields":
            table, index, n, offset = args
            n, offset = _int(n), _int(offset)
            src_rows, dst_rows = _indices(device, _ptr(index), n), offset + np.arange(n)
        else:
            table, src_index, dst_index, n = args
            n = _int(n)
            src_rows = _indices(device, _ptr(src_index), n)
            dst_rows = _indices(device, _ptr(dst_index), n)
        for f in _table(device, _ptr(table), n_fields):
            word = int(f["word_bytes"])
            _move(device, int(f["src"]), int(f["dst"]), int(f["row_words"]) * word,
                  src_rows, dst_rows, word)
    return run


REFERENCES = {f"{k}_w{w}": _single(k, w)
              for k in ("copy_rows", "gather_rows", "scatter_rows") for w in (1, 2, 4, 8, 16)}
REFERENCES.update({k: _fields(k) for k in ("copy_fields", "gather_fields", "scatter_fields")})


class RawKernel:
    def __init__(self, module, name):
        self.module, self.name = module, name
        self._run = REFERENCES[name]

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None):
        from .fake_cupy import _check_devices, get_current_stream
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        if not (1 <= grid[0] < 2**31 and 1 <= grid[1] <= 65535 and 1 <= grid[2] <= 65535):
            raise rt.CUDARuntimeError(f"cudaErrorInvalidConfiguration: grid {grid}")
        if min(block) < 1 or block[0] * block[1] * block[2] > 1024 or block[2] > 64:
            raise rt.CUDARuntimeError(f"cudaErrorInvalidConfiguration: block {block}")
        stream = get_current_stream() if stream is None else stream
        _check_devices(stream, *args)
        device = stream.device_id
        args = tuple(args)
        self.module.launches += 1
        stream.enqueue(lambda: self._run(device, grid, args), self.name)


class RawModule:
    """Compiles nothing; checks the entry points exist in the source."""

    compiled = 0            # modules compiled in this process
    lookups = 0             # get_function calls
    instances: list = []

    def __init__(self, *, code=None, path=None, options=(), backend="nvrtc",
                 name_expressions=None, **kwargs):
        self.code, self.options = code, tuple(options)
        self.name_expressions = name_expressions
        self.launches = 0
        self._compiled = False
        RawModule.instances.append(self)

    def compile(self, log_stream=None):
        if not self._compiled:
            self._compiled = True
            RawModule.compiled += 1

    def get_function(self, name):
        self.compile()
        RawModule.lookups += 1
        entry = r'extern "C" __global__ void '
        single = re.escape(name.rsplit("_w", 1)[0]) + r"_w##N\("       # DR_SINGLE_FIELD_KERNELS
        if not re.search(entry + re.escape(name) + r"\(", self.code) \
                and not re.search(entry + single, self.code):
            raise rt.CUDARuntimeError(f"CUDA_ERROR_NOT_FOUND: named symbol not found: {name}")
        if name not in REFERENCES:
            raise NotImplementedError(f"emulation: no reference for kernel {name!r}")
        return RawKernel(self, name)

    @classmethod
    def reset_counters(cls):
        cls.compiled = cls.lookups = 0
        cls.instances = []
