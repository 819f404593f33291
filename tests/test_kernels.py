"""Tests of the row-movement kernels and their Python wrappers.

Three layers:

* ``dali_rehearsal/kernels/*.cu`` really compile, with NVRTC exactly as CuPy loads them
  (no name expressions: plain ``extern "C"`` entry points) and with ``nvcc``,
  every entry point present (``tests/run.sh`` fails the run if these skip);
* the kernel bodies, compiled as plain C++ through ``tests/kernel_shim`` and
  run thread by thread on the CPU, match the NumPy reference path byte for
  byte, single-field and multi-field kernels alike;
* the wrappers, one test body per backend with NumPy as the reference
  (the CuPy parameter is marked ``gpu``).
"""

import ctypes
import math
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest

from dali_rehearsal.kernels import (
    FIELD_KERNELS,
    KERNELS,
    WORD_TYPES,
    copy_fields,
    copy_rows,
    gather_fields,
    gather_rows,
    gather_rows_host,
    kernel_name,
    kernel_names,
    scatter_fields,
    scatter_rows,
    scatter_rows_host,
    source_path,
    word_type_for,
)
from dali_rehearsal.kernels.movement import FIELD_DTYPE, fields_launch_config, launch_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL_SOURCES = sorted((ROOT / "dali_rehearsal" / "kernels").glob("*.cu"))
SHIM_DIR = pathlib.Path(__file__).resolve().with_name("kernel_shim")
KERNEL_NAMES = KERNELS["movement"]
WORD_SIZES = tuple(WORD_TYPES)
BACKENDS = ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)]
COMPILE_TIMEOUT_S = 300


# --------------------------------------------------------------------------
# Sources and helpers
# --------------------------------------------------------------------------

def test_sources_are_registered():
    assert KERNEL_SOURCES, "no dali_rehearsal/kernels/*.cu found"
    assert {p.stem for p in KERNEL_SOURCES} == set(KERNELS)
    for path in KERNEL_SOURCES:
        assert source_path(path.stem).read_bytes() == path.read_bytes()


def test_source_path_missing():
    with pytest.raises(FileNotFoundError, match="no_such_kernel.cu"):
        source_path("no_such_kernel")


def test_kernel_names():
    names = kernel_names("movement")
    assert len(names) == len(KERNEL_NAMES) * len(WORD_TYPES) + len(FIELD_KERNELS["movement"])
    assert len(set(names)) == len(names)
    assert "copy_rows_w16" in names and kernel_name("copy_rows", 16) == "copy_rows_w16"
    assert "gather_rows_w4" in names
    assert "scatter_rows_w1" in names
    assert {"copy_fields", "gather_fields", "scatter_fields"} <= set(names)
    with pytest.raises(KeyError, match="unknown kernel source"):
        kernel_names("no_such_kernel")
    with pytest.raises(ValueError, match="word size"):
        kernel_name("copy_rows", 3)


@pytest.mark.parametrize("path", KERNEL_SOURCES, ids=lambda p: p.name)
def test_every_entry_point_is_extern_c(path):
    """Plain symbol names: the module compiles without NVRTC name expressions,
    so CuPy's on-disk kernel cache serves later processes (issue: CuPy before
    v14 skips that cache when name expressions are given)."""
    text = path.read_text()
    assert "template <typename W>\n__global__" not in text
    globals_ = re.findall(r"__global__ void (\w+)\(", text)
    assert globals_ == [] or all(
        re.search(r'extern "C" __global__ void ' + name + r"\(", text) for name in globals_)


@pytest.mark.parametrize("path", KERNEL_SOURCES, ids=lambda p: p.name)
def test_cu_is_nvrtc_compatible(path):
    """NVRTC sources may not include headers."""
    includes = [line for line in path.read_text().splitlines()
                if re.match(r"\s*#\s*include\b", line)]
    assert not includes, f"{path.name} must not #include: {includes}"


@pytest.mark.parametrize(
    ("nbytes", "pointers", "expected"),
    [
        (16, (), 16),
        (0, (), 16),
        (32, (0, 4096), 16),
        (24, (0,), 8),
        (48, (8,), 8),
        (12, (0, 16), 4),
        (16, (4, 16), 4),
        (6, (0,), 2),
        (16, (2,), 2),
        (15, (0,), 1),
        (2352, (16, 33), 1),
    ],
)
def test_word_type_for(nbytes, pointers, expected):
    assert word_type_for(nbytes, *pointers) == expected


@pytest.mark.parametrize(
    ("row_words", "n_rows"), [(1, 1), (5, 7), (256, 3), (257, 70000),
                              (10 ** 7, 2)])
def test_launch_config(row_words, n_rows):
    (gx, gy, gz), (bx, by, bz) = launch_config(row_words, n_rows)
    assert (gz, by, bz) == (1, 1, 1)
    assert 32 <= bx <= 256 and bx % 32 == 0
    assert 1 <= gx <= 1024 and 1 <= gy <= 65535
    assert gy == min(n_rows, 65535)
    assert gx * bx >= min(row_words, 1024 * 256)


# --------------------------------------------------------------------------
# nvcc: every instantiation compiles to PTX
# --------------------------------------------------------------------------

def _nvrtc():
    """CuPy's NVRTC bindings, when the NVRTC library loads (no driver needed)."""
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
        return nvrtc
    except Exception:
        return None


@pytest.mark.parametrize("arch", ["compute_70", "compute_80", "compute_90"])
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernels_compile_with_nvrtc_as_cupy_loads_them(name, arch):
    """The GPU backend compiles each .cu with NVRTC through cupy.RawModule,
    without name expressions. NVRTC needs no GPU, so CI checks that exact
    step: no host headers, every entry point present under its own name.
    CuPy and the NVRTC library come with the `test` extra: this must not skip."""
    nvrtc = _nvrtc()
    if nvrtc is None:
        pytest.fail("NVRTC not available through CuPy: install the `test` extra "
                    "(cupy-cuda12x and nvidia-cuda-nvrtc-cu12)")
    from dali_rehearsal.kernels import COMPILE_OPTIONS as _COMPILE_OPTIONS
    prog = nvrtc.createProgram(source_path(name).read_text(), f"{name}.cu", [], [])
    try:
        nvrtc.compileProgram(prog, [*_COMPILE_OPTIONS, f"-arch={arch}"])
    except Exception as e:
        pytest.fail(f"NVRTC rejected {name}.cu: {e}\n{nvrtc.getProgramLog(prog)}")
    ptx = nvrtc.getPTX(prog)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    entries = re.findall(r"^\.visible \.entry (\w+)\(", ptx, flags=re.MULTILINE)
    assert sorted(entries) == sorted(kernel_names(name))


@pytest.mark.parametrize("path", KERNEL_SOURCES, ids=lambda p: p.name)
def test_cu_compiles_with_nvcc(path, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.fail("nvcc is not on PATH (the development and CI machines have CUDA 13's)")
    ptx = tmp_path / f"{path.stem}.ptx"
    result = subprocess.run(
        [nvcc, "-std=c++14", "--ptx", "-arch=compute_80",
         "--Werror", "all-warnings", str(path), "-o", str(ptx)],
        capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    entries = re.findall(r"^\.visible \.entry (\w+)\(", ptx.read_text(),
                         flags=re.MULTILINE)
    assert sorted(entries) == sorted(kernel_names(path.stem))


# --------------------------------------------------------------------------
# CPU emulation of the kernels through tests/kernel_shim
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    """The movement kernels compiled for the CPU, loaded with ctypes."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.fail("g++ is not on PATH (the development and CI machines have it)")
    library = tmp_path_factory.mktemp("kernel_shim") / "movement_shim.so"
    result = subprocess.run(
        [gxx, "-O1", "-shared", "-fPIC", "-std=c++14", "-Wall", "-Werror",
         "-I", str(source_path("movement").parent),
         str(SHIM_DIR / "driver.cpp"), "-o", str(library)],
        capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    lib = ctypes.CDLL(str(library))
    dims = [ctypes.c_uint] * 4
    ptr, i64 = ctypes.c_void_p, ctypes.c_longlong
    for word in WORD_SIZES:
        getattr(lib, f"shim_copy_rows_w{word}").argtypes = dims + [
            ptr, ptr, i64, i64, i64]
        getattr(lib, f"shim_gather_rows_w{word}").argtypes = dims + [
            ptr, ptr, ptr, i64, i64, i64]
        getattr(lib, f"shim_scatter_rows_w{word}").argtypes = dims + [
            ptr, ptr, ptr, ptr, i64, i64]
    lib.shim_copy_fields.argtypes = dims + [ptr, i64, i64]
    lib.shim_gather_fields.argtypes = dims + [ptr, ptr, i64, i64]
    lib.shim_scatter_fields.argtypes = dims + [ptr, ptr, ptr, i64]
    return lib


def _guarded(rng, shape, dtype=np.uint8, misalign=0):
    """Random array inside a larger random buffer (the guard bytes).

    The array starts ``misalign`` bytes after a 64-byte boundary.  Returns
    ``(buffer, array)``; ``array`` is a view of ``buffer``.
    """
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    buffer = rng.integers(0, 256, nbytes + 256, dtype=np.uint8)
    start = 64 - buffer.ctypes.data % 64 + misalign
    array = buffer[start:start + nbytes].view(dtype).reshape(shape)
    return buffer, array


def _run(shim, kernel, src, dst, *, index=None, src_index=None,
         dst_index=None, dst_offset=0, word=None, config=None):
    """Emulate one kernel launch on the CPU; returns the word size used."""
    row_bytes = src.itemsize * math.prod(src.shape[1:])
    best = word_type_for(row_bytes, src.ctypes.data, dst.ctypes.data)
    word = best if word is None else word
    assert best % word == 0, "forced word size must fit the data"
    row_words = row_bytes // word
    if kernel == "copy_rows":
        n_rows = len(src)
        args = (src.ctypes.data, dst.ctypes.data, n_rows, row_words,
                dst_offset)
    elif kernel == "gather_rows":
        n_rows = len(index)
        args = (src.ctypes.data, index.ctypes.data, dst.ctypes.data, n_rows,
                row_words, dst_offset)
    else:
        n_rows = len(src_index)
        args = (src.ctypes.data, src_index.ctypes.data, dst.ctypes.data,
                dst_index.ctypes.data, n_rows, row_words)
    if config is None:
        (gx, gy, _), (bx, _, _) = launch_config(row_words, n_rows)
    else:
        gx, gy, bx = config
    getattr(shim, f"shim_{kernel_name(kernel, word)}")(gx, gy, 1, bx, *args)
    return word


# Emulated scenarios: 7 rows moved into an 11-row destination.
N_DST = 11
SRC_INDEX = np.array([5, 0, 5, 2, 2, 1, 3], dtype=np.int64)  # repeats
DST_INDEX = np.array([9, 0, 4, 10, 2, 7, 5], dtype=np.int64)  # unique
CONFIGS = {
    "tiny": (1, 2, 3),   # both grid-stride loops iterate
    "wide": (3, 4, 64),  # more threads than words
    "auto": None,        # what the CuPy wrapper launches
}


def _scenario(kernel, rng, row_shape, dtype=np.uint8, misalign=0):
    """Build ``(src, dst, kwargs, written_rows, guard_buffers)``."""
    n_src = 7 if kernel == "copy_rows" else 6
    src_buf, src = _guarded(rng, (n_src, *row_shape), dtype, misalign)
    dst_buf, dst = _guarded(rng, (N_DST, *row_shape), dtype, misalign)
    if kernel == "copy_rows":
        kwargs, written = {"dst_offset": 3}, np.arange(3, 3 + n_src)
    elif kernel == "gather_rows":
        kwargs = {"index": SRC_INDEX, "dst_offset": 2}
        written = np.arange(2, 2 + len(SRC_INDEX))
    else:
        kwargs = {"src_index": SRC_INDEX, "dst_index": DST_INDEX}
        written = DST_INDEX
    return src, dst, kwargs, written, (src_buf, dst_buf)


def _reference(kernel, src, dst, kwargs):
    """Result of the NumPy wrapper applied to a copy of ``dst``."""
    expected = dst.copy()
    if kernel == "copy_rows":
        copy_rows(src, expected, **kwargs)
    elif kernel == "gather_rows":
        gather_rows(src, kwargs["index"], expected,
                    dst_offset=kwargs["dst_offset"])
    else:
        scatter_rows(src, kwargs["src_index"], expected, kwargs["dst_index"])
    return expected


def _check_emulation(shim, kernel, rng, row_shape, dtype=np.uint8,
                     misalign=0, word=None, config=None):
    """Emulate ``kernel`` and compare with the NumPy wrapper, byte for byte.

    Also checks that the unwritten dst rows and every byte around src and dst
    are untouched.  Returns the word size used.
    """
    src, dst, kwargs, written, buffers = _scenario(
        kernel, rng, row_shape, dtype, misalign)
    src_buf, dst_buf = buffers
    saved_src_buf, saved_dst_buf, original = (
        src_buf.copy(), dst_buf.copy(), dst.copy())
    expected = _reference(kernel, src, dst, kwargs)
    used = _run(shim, kernel, src, dst, word=word, config=config, **kwargs)
    np.testing.assert_array_equal(dst.view(np.uint8), expected.view(np.uint8))
    untouched = np.setdiff1d(np.arange(N_DST), written)
    np.testing.assert_array_equal(dst[untouched], original[untouched])
    np.testing.assert_array_equal(src_buf, saved_src_buf)
    outside = np.ones(len(dst_buf), dtype=bool)
    start = dst.ctypes.data - dst_buf.ctypes.data
    outside[start:start + dst.nbytes] = False
    np.testing.assert_array_equal(dst_buf[outside], saved_dst_buf[outside])
    return used


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("row_words", [1, 5, 37])
@pytest.mark.parametrize("word", WORD_SIZES)
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_emulated_kernel_per_word_type(shim, kernel, word, row_words,
                                       config):
    rng = np.random.default_rng([word, row_words])
    used = _check_emulation(shim, kernel, rng, (row_words * word,),
                            word=word, config=CONFIGS[config])
    assert used == word


@pytest.mark.parametrize(
    ("dtype", "row_shape", "misalign", "word"),
    [
        (np.uint8, (28, 28, 3), 0, 16),
        (np.uint8, (5, 3), 1, 1),       # 15-byte rows
        (np.uint16, (3,), 0, 2),        # 6-byte rows
        (np.float32, (3,), 4, 4),       # 12-byte rows, 4-byte aligned
        (np.int64, (), 8, 8),           # scalar rows, 8-byte aligned
        (np.int32, (), 0, 4),
        (np.float64, (7, 2), 0, 16),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_emulated_kernel_picks_word_type(shim, kernel, dtype, row_shape,
                                         misalign, word):
    rng = np.random.default_rng(len(row_shape) + misalign)
    used = _check_emulation(shim, kernel, rng, row_shape, dtype, misalign)
    assert used == word


# Multi-field kernels: every field of a step in one launch, through a
# descriptor table (FIELD_DTYPE rows, the layout of struct dr_field).
FIELD_LAYOUTS = {
    "image_label_logits_task": [((28, 28, 3), np.uint8, 0), ((), np.int64, 0),
                                ((28,), np.float32, 0), ((), np.int32, 0)],
    "odd_rows_misaligned": [((5, 3), np.uint8, 1), ((3,), np.uint16, 2),
                            ((7, 2), np.float64, 8), ((), np.uint8, 3)],
    "one_field": [((37,), np.uint8, 0)],
}
FIELD_KERNEL_NAMES = FIELD_KERNELS["movement"]


def _fields_scenario(kernel, rng, layout):
    """Fields of one layout: ``(srcs, dsts, kwargs, written rows, guard buffers)``."""
    n_src = 7 if kernel == "copy_fields" else 6
    srcs, dsts, guards = [], [], []
    for row_shape, dtype, misalign in FIELD_LAYOUTS[layout]:
        src_buf, src = _guarded(rng, (n_src, *row_shape), dtype, misalign)
        dst_buf, dst = _guarded(rng, (N_DST, *row_shape), dtype, misalign)
        srcs.append(src)
        dsts.append(dst)
        guards.append((src_buf, dst_buf, dst))
    if kernel == "copy_fields":
        kwargs, written = {"dst_offset": 3}, np.arange(3, 3 + n_src)
    elif kernel == "gather_fields":
        kwargs, written = {"index": SRC_INDEX, "dst_offset": 2}, np.arange(2, 2 + len(SRC_INDEX))
    else:
        kwargs, written = {"src_index": SRC_INDEX, "dst_index": DST_INDEX}, DST_INDEX
    return srcs, dsts, kwargs, written, guards


def _fields_table(srcs, dsts):
    """The descriptor table the CuPy wrapper uploads, over host pointers."""
    records = []
    for s, d in zip(srcs, dsts):
        row_bytes = s.itemsize * math.prod(s.shape[1:])
        word = word_type_for(row_bytes, s.ctypes.data, d.ctypes.data)
        records.append((s.ctypes.data, d.ctypes.data, row_bytes // word, word))
    return np.array(records, dtype=FIELD_DTYPE)


def _run_fields(shim, kernel, srcs, dsts, kwargs, config=None):
    table = _fields_table(srcs, dsts)
    if kernel == "copy_fields":
        n_rows = len(srcs[0])
        args = (kwargs["dst_offset"],)
    elif kernel == "gather_fields":
        n_rows = len(kwargs["index"])
        args = (kwargs["index"].ctypes.data, n_rows, kwargs["dst_offset"])
    else:
        n_rows = len(kwargs["src_index"])
        args = (kwargs["src_index"].ctypes.data, kwargs["dst_index"].ctypes.data, n_rows)
    if kernel == "copy_fields":
        args = (n_rows,) + args
    if config is None:
        (gx, gy, gz), (bx, _, _) = fields_launch_config(int(table["row_words"].max()), n_rows,
                                                       len(table))
    else:
        (gx, gy, bx), gz = config, len(table)
    getattr(shim, f"shim_{kernel}")(gx, gy, gz, bx, table.ctypes.data, *args)
    return table


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("layout", list(FIELD_LAYOUTS))
@pytest.mark.parametrize("kernel", FIELD_KERNEL_NAMES)
def test_emulated_field_kernels_match_numpy(shim, kernel, layout, config):
    """One launch moves every field, each with its own row size and word
    size, byte for byte like the NumPy path; nothing else is touched."""
    rng = np.random.default_rng(len(layout) + len(config))
    srcs, dsts, kwargs, written, guards = _fields_scenario(kernel, rng, layout)
    saved = [(sb.copy(), db.copy(), d.copy()) for sb, db, d in guards]
    expected = [d.copy() for d in dsts]
    reference = {"copy_fields": copy_fields, "gather_fields": gather_fields,
                 "scatter_fields": scatter_fields}[kernel]
    if kernel == "scatter_fields":
        reference(srcs, kwargs["src_index"], expected, kwargs["dst_index"])
    elif kernel == "gather_fields":
        reference(srcs, kwargs["index"], expected, dst_offset=kwargs["dst_offset"])
    else:
        reference(srcs, expected, **kwargs)
    table = _run_fields(shim, kernel, srcs, dsts, kwargs, CONFIGS[config])
    if layout == "image_label_logits_task":
        assert table["word_bytes"].tolist() == [16, 8, 16, 4]     # a word size per field
    untouched = np.setdiff1d(np.arange(N_DST), written)
    for d, e, (sb, db, dst), (saved_sb, saved_db, original) in zip(dsts, expected, guards, saved):
        np.testing.assert_array_equal(d.view(np.uint8), e.view(np.uint8))
        np.testing.assert_array_equal(d[untouched], original[untouched])
        np.testing.assert_array_equal(sb, saved_sb)
        outside = np.ones(len(db), dtype=bool)
        start = dst.ctypes.data - db.ctypes.data
        outside[start:start + dst.nbytes] = False
        np.testing.assert_array_equal(db[outside], saved_db[outside])


def test_fields_launch_config_puts_fields_on_z():
    (gx, gy, gz), (bx, by, bz) = fields_launch_config(147, 56, 4)
    assert (gz, by, bz) == (4, 1, 1)
    assert ((gx, gy, 1), (bx, 1, 1)) == launch_config(147, 56)


# --------------------------------------------------------------------------
# Python wrappers, NumPy as the reference for every backend
# --------------------------------------------------------------------------

N_BUFFER = 56
SAMPLES = {
    "uint8_hwc": (np.uint8, (28, 28, 3)),
    "float32_logits": (np.float32, (10,)),
    "int64_labels": (np.int64, ()),
    "int32_scalars": (np.int32, ()),
}


@pytest.fixture(params=BACKENDS)
def xp(request):
    """The array module under test (CuPy imported only when selected)."""
    if request.param == "numpy":
        return np
    import cupy
    return cupy


def _host(array):
    """A NumPy copy of a NumPy or CuPy array."""
    return array.copy() if isinstance(array, np.ndarray) else array.get()


def _random(rng, n_rows, sample):
    dtype, row_shape = SAMPLES[sample]
    shape = (n_rows, *row_shape)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, 100, shape).astype(dtype)


def _synchronize(xp):
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


@pytest.mark.parametrize("sample", SAMPLES)
def test_copy_rows(xp, sample):
    rng = np.random.default_rng(0)
    src, dst = _random(rng, 20, sample), _random(rng, N_BUFFER, sample)
    expected = dst.copy()
    expected[30:50] = src
    out = xp.asarray(dst)
    copy_rows(xp.asarray(src), out, dst_offset=30)
    _synchronize(xp)
    np.testing.assert_array_equal(_host(out), expected)


@pytest.mark.parametrize("sample", SAMPLES)
def test_gather_rows(xp, sample):
    rng = np.random.default_rng(1)
    src, dst = _random(rng, N_BUFFER, sample), _random(rng, 40, sample)
    index = rng.integers(0, N_BUFFER, 32).astype(np.int64)  # with repeats
    expected = dst.copy()
    expected[5:37] = src[index]
    out = xp.asarray(dst)
    gather_rows(xp.asarray(src), xp.asarray(index), out, dst_offset=5)
    _synchronize(xp)
    np.testing.assert_array_equal(_host(out), expected)


@pytest.mark.parametrize("sample", SAMPLES)
def test_scatter_rows(xp, sample):
    rng = np.random.default_rng(2)
    src, dst = _random(rng, 24, sample), _random(rng, N_BUFFER, sample)
    src_index = rng.integers(0, 24, 16).astype(np.int64)
    dst_index = rng.permutation(N_BUFFER)[:16].astype(np.int64)
    expected = dst.copy()
    expected[dst_index] = src[src_index]
    out = xp.asarray(dst)
    scatter_rows(xp.asarray(src), xp.asarray(src_index), out,
                 xp.asarray(dst_index))
    _synchronize(xp)
    np.testing.assert_array_equal(_host(out), expected)


def test_empty_moves_are_noops(xp):
    rng = np.random.default_rng(3)
    dst = _random(rng, 8, "uint8_hwc")
    out = xp.asarray(dst)
    empty_rows = xp.asarray(dst[:0])
    empty_index = xp.zeros(0, dtype=np.int64)
    copy_rows(empty_rows, out, dst_offset=8)
    gather_rows(xp.asarray(dst), empty_index, out, dst_offset=8)
    scatter_rows(xp.asarray(dst), empty_index, out, empty_index)
    zero_width = xp.zeros((4, 0), dtype=np.uint8)
    copy_rows(zero_width, xp.zeros((4, 0), dtype=np.uint8))
    _synchronize(xp)
    np.testing.assert_array_equal(_host(out), dst)


def test_validation_errors(xp):
    rows = xp.zeros((4, 3), dtype=np.float32)
    buffer = xp.zeros((8, 3), dtype=np.float32)
    index = xp.arange(4, dtype=np.int64)
    with pytest.raises(TypeError, match="dtype mismatch"):
        copy_rows(rows.astype(np.float64), buffer)
    with pytest.raises(ValueError, match="row shape mismatch"):
        copy_rows(xp.zeros((4, 2), dtype=np.float32), buffer)
    with pytest.raises(ValueError, match="out of bounds"):
        copy_rows(rows, buffer, dst_offset=5)
    with pytest.raises(ValueError, match="out of bounds"):
        copy_rows(rows, buffer, dst_offset=-1)
    with pytest.raises(ValueError, match="out of bounds"):
        gather_rows(buffer, xp.arange(8, dtype=np.int64), rows, dst_offset=1)
    with pytest.raises(ValueError, match="C-contiguous"):
        copy_rows(xp.zeros((4, 6), dtype=np.float32)[:, ::2], buffer)
    with pytest.raises(ValueError, match="C-contiguous"):
        copy_rows(rows, xp.zeros((8, 6), dtype=np.float32)[:, :3])
    with pytest.raises(TypeError, match="index must be int64"):
        gather_rows(buffer, index.astype(np.int32), rows)
    with pytest.raises(ValueError, match="index must be 1-D"):
        gather_rows(buffer, index.reshape(2, 2), rows)
    with pytest.raises(ValueError, match="lengths differ"):
        scatter_rows(rows, index, buffer, index[:3])
    with pytest.raises(ValueError, match="at least one"):
        copy_rows(xp.zeros((), dtype=np.float32), buffer)
    with pytest.raises(TypeError, match="all numpy.ndarray or all cupy"):
        copy_rows(rows, [[0.0] * 3] * 8)


def test_numpy_index_values_checked():
    buffer, rows = np.zeros((8, 3)), np.zeros((4, 3))
    with pytest.raises(IndexError, match=r"index values must lie in \[0, 8\)"):
        gather_rows(buffer, np.array([0, 8, 1, 2]), rows)
    with pytest.raises(IndexError, match="src_index values"):
        scatter_rows(rows, np.array([-1]), buffer, np.array([0]))
    with pytest.raises(IndexError, match="dst_index values"):
        scatter_rows(rows, np.array([0]), buffer, np.array([8]))



@pytest.mark.parametrize("n_rows", [8, 1100])             # up to 1024 rows: a per-row loop
@pytest.mark.parametrize("row_shape", [(3,), (32, 32)])    # from 4096-byte rows: a per-row loop
def test_host_row_path(row_shape, n_rows):
    """The unchecked NumPy row path shared by the wrappers and the CPU
    SampleStore, on each side of the per-row loop's thresholds."""
    rng = np.random.default_rng(5)
    src = rng.standard_normal((n_rows + 3, *row_shape)).astype(np.float32)
    dst = rng.standard_normal((n_rows + 10, *row_shape)).astype(np.float32)
    src_index = rng.integers(0, len(src), n_rows).astype(np.int64)
    dst_index = rng.permutation(len(dst))[:n_rows].astype(np.int64)
    expected = dst.copy()
    expected[dst_index] = src[src_index]
    scattered = dst.copy()
    scatter_rows_host(src, src_index, scattered, dst_index)
    np.testing.assert_array_equal(scattered, expected)
    expected = dst.copy()
    expected[4:4 + n_rows] = src[src_index]
    gathered = dst.copy()
    gather_rows_host(src, src_index, gathered, 4)
    np.testing.assert_array_equal(gathered, expected)

@pytest.mark.gpu
def test_mixed_backends_rejected():
    import cupy

    with pytest.raises(TypeError, match="all numpy.ndarray or all cupy"):
        copy_rows(np.zeros((2, 3)), cupy.zeros((4, 3)))
    with pytest.raises(TypeError, match="all numpy.ndarray or all cupy"):
        gather_rows(cupy.zeros((4, 3)), np.arange(2, dtype=np.int64),
                    cupy.zeros((2, 3)))


@pytest.mark.gpu
def test_cupy_explicit_stream_and_kernel_cache():
    import cupy

    from dali_rehearsal.kernels import get_kernel, get_module

    module = get_module("movement")
    assert get_module("movement", cupy.cuda.Device().id) is module
    device = cupy.cuda.Device().id
    for name in kernel_names("movement"):
        assert get_kernel("movement", name, device) is get_kernel("movement", name, device)
    rng = np.random.default_rng(4)
    src = _random(rng, 20, "uint8_hwc")
    dst = cupy.zeros((N_BUFFER, 28, 28, 3), dtype=np.uint8)
    stream = cupy.cuda.Stream(non_blocking=True)
    copy_rows(cupy.asarray(src), dst, dst_offset=1, stream=stream)
    stream.synchronize()
    np.testing.assert_array_equal(dst[1:21].get(), src)


# --------------------------------------------------------------------------
# Multi-field wrappers, NumPy as the reference for every backend
# --------------------------------------------------------------------------

def _field_arrays(rng, n_rows):
    return [_random(rng, n_rows, sample) for sample in SAMPLES]


@pytest.mark.parametrize("kernel", FIELD_KERNEL_NAMES)
def test_field_wrappers(xp, kernel):
    rng = np.random.default_rng(5)
    srcs = _field_arrays(rng, 24)
    storage = _field_arrays(rng, N_BUFFER)
    index = rng.integers(0, 24, 16).astype(np.int64)
    slots = rng.permutation(N_BUFFER)[:16].astype(np.int64)
    expected = [d.copy() for d in storage]
    out = [xp.asarray(d) for d in storage]
    if kernel == "copy_fields":
        for e, s in zip(expected, srcs):
            e[30:54] = s
        copy_fields([xp.asarray(s) for s in srcs], out, dst_offset=30)
    elif kernel == "gather_fields":
        for e, s in zip(expected, srcs):
            e[3:19] = s[index]
        gather_fields([xp.asarray(s) for s in srcs], index, out, dst_offset=3)
    else:
        for e, s in zip(expected, srcs):
            e[slots] = s[index]
        scatter_fields([xp.asarray(s) for s in srcs], index, out, slots)
    _synchronize(xp)
    for o, e in zip(out, expected):
        np.testing.assert_array_equal(_host(o), e)


def test_field_wrapper_errors(xp):
    rows = [xp.zeros((4, 3), dtype=np.float32), xp.zeros(4, dtype=np.int64)]
    buffer = [xp.zeros((8, 3), dtype=np.float32), xp.zeros(8, dtype=np.int64)]
    with pytest.raises(ValueError, match="2 source fields but 1 destination"):
        copy_fields(rows, buffer[:1])
    with pytest.raises(ValueError, match="same number of rows"):
        copy_fields([rows[0], buffer[1]], buffer)
    with pytest.raises(ValueError, match="out of bounds"):
        copy_fields(rows, buffer, dst_offset=5)
    with pytest.raises(TypeError, match="dtype mismatch"):
        copy_fields(rows, buffer[::-1])
    with pytest.raises(IndexError, match=r"index values must lie in \[0, 8\)"):
        gather_fields(buffer, [0, 8], rows)
    with pytest.raises(IndexError, match="dst_index values"):
        scatter_fields(rows, [0], buffer, [8])
    with pytest.raises(ValueError, match="lengths differ"):
        scatter_fields(rows, [0, 1], buffer, [0])
    with pytest.raises(TypeError, match="int64"):
        gather_fields(buffer, np.array([0.5]), rows)
    copy_fields([], [])                                  # nothing to move
    gather_fields(buffer, np.zeros(0, np.int64), rows)
