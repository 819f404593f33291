"""Tests of the row-movement kernels and their Python wrappers.

Three layers:

* ``kernels/*.cu`` really compile with ``nvcc`` for every instantiation the
  wrappers request (skipped without ``nvcc``);
* the kernel bodies, compiled as plain C++ through ``tests/kernel_shim`` and
  run thread by thread on the CPU, match the NumPy reference path (skipped
  without ``g++``);
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
    KERNELS,
    WORD_TYPES,
    copy_rows,
    gather_rows,
    name_expressions,
    scatter_rows,
    source_path,
    word_type_for,
)
from dali_rehearsal.kernels.movement import launch_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL_SOURCES = sorted((ROOT / "kernels").glob("*.cu"))
SHIM_DIR = pathlib.Path(__file__).resolve().with_name("kernel_shim")
KERNEL_NAMES = KERNELS["movement"]
WORD_SIZES = tuple(WORD_TYPES)
BACKENDS = ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)]
COMPILE_TIMEOUT_S = 300


# --------------------------------------------------------------------------
# Sources and helpers
# --------------------------------------------------------------------------

def test_sources_are_registered():
    assert KERNEL_SOURCES, "no kernels/*.cu found"
    assert {p.stem for p in KERNEL_SOURCES} == set(KERNELS)
    for path in KERNEL_SOURCES:
        assert source_path(path.stem).read_bytes() == path.read_bytes()


def test_source_path_missing():
    with pytest.raises(FileNotFoundError, match="no_such_kernel.cu"):
        source_path("no_such_kernel")


def test_name_expressions():
    expressions = name_expressions("movement")
    assert len(expressions) == len(KERNEL_NAMES) * len(WORD_TYPES)
    assert "copy_rows<dr_word16>" in expressions
    assert "gather_rows<unsigned int>" in expressions
    assert "scatter_rows<unsigned char>" in expressions
    with pytest.raises(KeyError, match="unknown kernel source"):
        name_expressions("no_such_kernel")


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
    """The GPU backend compiles each .cu with NVRTC through cupy.RawModule and
    its name expressions. NVRTC needs no GPU, so CI checks that exact step:
    no host headers, every template instantiation found by name."""
    nvrtc = _nvrtc()
    if nvrtc is None:
        pytest.skip("NVRTC library not available (pip install nvidia-cuda-nvrtc-cu12)")
    prog = nvrtc.createProgram(source_path(name).read_text(), f"{name}.cu", [], [])
    expressions = name_expressions(name)
    for expression in expressions:
        nvrtc.addNameExpression(prog, expression)
    try:
        nvrtc.compileProgram(prog, ["-std=c++14", f"-arch={arch}"])
    except Exception as e:
        pytest.fail(f"NVRTC rejected {name}.cu: {e}\n{nvrtc.getProgramLog(prog)}")
    lowered = [nvrtc.getLoweredName(prog, expression) for expression in expressions]
    assert len(set(lowered)) == len(expressions)
    ptx = nvrtc.getPTX(prog)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    for symbol in lowered:
        assert f".entry {symbol}" in ptx


@pytest.mark.parametrize("path", KERNEL_SOURCES, ids=lambda p: p.name)
def test_cu_compiles_with_nvcc(path, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    expressions = name_expressions(path.stem)
    # Taking each kernel's address instantiates it, exactly like the NVRTC
    # name expressions that cupy.RawModule registers.
    unit = tmp_path / f"instantiate_{path.stem}.cu"
    unit.write_text(
        f'#include "{path}"\n'
        "void* dr_instantiations[] = {\n"
        + "".join(f"    (void*)&{expr},\n" for expr in expressions)
        + "};\n")
    ptx = tmp_path / f"{path.stem}.ptx"
    result = subprocess.run(
        [nvcc, "-std=c++14", "--ptx", "-arch=compute_80",
         "--Werror", "all-warnings", str(unit), "-o", str(ptx)],
        capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    entries = re.findall(r"^\.visible \.entry (\w+)\(", ptx.read_text(),
                         flags=re.MULTILINE)
    assert len(set(entries)) == len(expressions), entries


# --------------------------------------------------------------------------
# CPU emulation of the kernels through tests/kernel_shim
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    """The movement kernels compiled for the CPU, loaded with ctypes."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not on PATH")
    library = tmp_path_factory.mktemp("kernel_shim") / "movement_shim.so"
    result = subprocess.run(
        [gxx, "-O1", "-shared", "-fPIC", "-std=c++14", "-Wall", "-Werror",
         "-I", str(source_path("movement").parent),
         str(SHIM_DIR / "driver.cpp"), "-o", str(library)],
        capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    lib = ctypes.CDLL(str(library))
    dims = [ctypes.c_uint] * 3
    ptr, i64 = ctypes.c_void_p, ctypes.c_longlong
    for word in WORD_SIZES:
        getattr(lib, f"copy_rows_{word}").argtypes = dims + [
            ptr, ptr, i64, i64, i64]
        getattr(lib, f"gather_rows_{word}").argtypes = dims + [
            ptr, ptr, ptr, i64, i64, i64]
        getattr(lib, f"scatter_rows_{word}").argtypes = dims + [
            ptr, ptr, ptr, ptr, i64, i64]
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
    getattr(shim, f"{kernel}_{word}")(gx, gy, bx, *args)
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


@pytest.mark.gpu
def test_mixed_backends_rejected():
    import cupy

    with pytest.raises(TypeError, match="all numpy.ndarray or all cupy"):
        copy_rows(np.zeros((2, 3)), cupy.zeros((4, 3)))
    with pytest.raises(TypeError, match="all numpy.ndarray or all cupy"):
        gather_rows(cupy.zeros((4, 3)), np.arange(2, dtype=np.int64),
                    cupy.zeros((2, 3)))


@pytest.mark.gpu
def test_cupy_explicit_stream_and_module_cache():
    import cupy

    from dali_rehearsal.kernels import get_module

    module = get_module("movement")
    assert get_module("movement", cupy.cuda.Device().id) is module
    for expression in name_expressions("movement"):
        module.get_function(expression)
    rng = np.random.default_rng(4)
    src = _random(rng, 20, "uint8_hwc")
    dst = cupy.zeros((N_BUFFER, 28, 28, 3), dtype=np.uint8)
    stream = cupy.cuda.Stream(non_blocking=True)
    copy_rows(cupy.asarray(src), dst, dst_offset=1, stream=stream)
    stream.synchronize()
    np.testing.assert_array_equal(dst[1:21].get(), src)
