"""CUDA kernels of the rehearsal buffer and their thin Python wrappers.

Installed as ``dali_rehearsal.kernels``; the ``.cu`` sources ship next to
this file and are compiled at run time with NVRTC through
:class:`cupy.RawModule`. CuPy is imported only when a kernel is actually
needed, so the NumPy reference paths work without it.

Compile and launch costs:

* every kernel is an ``extern "C"`` entry point, so modules are compiled
  without NVRTC name expressions. CuPy (before v14) bypasses its on-disk
  kernel cache (``~/.cupy/kernel_cache``, ``CUPY_CACHE_DIR``) whenever name
  expressions are given; without them every process after the first loads
  the cached binary instead of recompiling;
* the module is compiled once per process and device, and each kernel object
  is looked up once per (device, kernel): :func:`get_kernel`. (CuPy's
  ``RawModule.get_function`` builds a new kernel object on every call.)
"""

import functools
import pathlib
import threading

#: C++ word type used to move rows, by word size in bytes (largest first).
WORD_TYPES = {
    16: "dr_word16",
    8: "unsigned long long",
    4: "unsigned int",
    2: "unsigned short",
    1: "unsigned char",
}

#: Single-field kernels (one entry point per word size: ``<kernel>_w<N>``) and
#: multi-field kernels (one entry point each) defined in each ``<name>.cu``.
KERNELS = {
    "movement": ("copy_rows", "gather_rows", "scatter_rows"),
}
FIELD_KERNELS = {
    "movement": ("copy_fields", "gather_fields", "scatter_fields"),
}

_COMPILE_OPTIONS = ("-std=c++14",)


def source_path(name):
    """Return the path of the CUDA source ``<name>.cu`` shipped here."""
    path = pathlib.Path(__file__).with_name(f"{name}.cu")
    if not path.is_file():
        raise FileNotFoundError(
            f"CUDA source {path.name!r} not found in {path.parent} "
            "(is the package installed with its .cu files?)")
    return path


def kernel_name(kernel, word):
    """The entry point of single-field ``kernel`` for ``word``-byte words."""
    if word not in WORD_TYPES:
        raise ValueError(f"word size must be one of {sorted(WORD_TYPES)}, got {word!r}")
    return f"{kernel}_w{word}"


def kernel_names(name):
    """Every ``extern "C"`` entry point of the source ``name``."""
    try:
        kernels = KERNELS[name]
    except KeyError:
        raise KeyError(f"unknown kernel source {name!r}; "
                       f"known: {sorted(KERNELS)}") from None
    return (tuple(kernel_name(k, w) for k in kernels for w in WORD_TYPES)
            + FIELD_KERNELS.get(name, ()))


def get_module(name, device_id=None):
    """Return the compiled :class:`cupy.RawModule` of ``<name>.cu``.

    The module is compiled once per device and memoized; ``device_id=None``
    means CuPy's current device.
    """
    import cupy

    if device_id is None:
        device_id = cupy.cuda.Device().id
    return _compiled_module(name, int(device_id))


@functools.lru_cache(maxsize=None)
def _compiled_module(name, device_id):
    import cupy

    code = source_path(name).read_text()
    with cupy.cuda.Device(device_id):
        # No name_expressions: see the module docstring (on-disk cache).
        module = cupy.RawModule(code=code, options=_COMPILE_OPTIONS)
        module.compile()
    return module


_kernels: dict = {}
_kernels_lock = threading.Lock()


def get_kernel(name, kernel, device_id):
    """The kernel object of entry point ``kernel`` of ``<name>.cu`` on
    ``device_id``, looked up once and cached."""
    key = (name, kernel, int(device_id))
    function = _kernels.get(key)
    if function is None:
        with _kernels_lock:
            function = _kernels.get(key)
            if function is None:
                function = get_module(name, device_id).get_function(kernel)
                _kernels[key] = function
    return function


def clear_caches():
    """Forgets compiled modules, kernel objects and staging buffers (for
    tests that swap the CuPy module)."""
    _compiled_module.cache_clear()
    with _kernels_lock:
        _kernels.clear()
    from . import movement
    movement.clear_staging()


def word_type_for(nbytes_per_row, *pointers):
    """Return the largest word size that divides the row size and pointers.

    The result is one of the keys of :data:`WORD_TYPES` (16, 8, 4, 2 or 1):
    the widest word with which rows of ``nbytes_per_row`` bytes at the given
    addresses can be moved with aligned accesses.
    """
    return next(size for size in WORD_TYPES
                if nbytes_per_row % size == 0
                and all(p % size == 0 for p in pointers))


# Imported last: the wrappers use the helpers defined above.
from .movement import (copy_fields, copy_rows, gather_fields, gather_rows,  # noqa: E402
                       scatter_fields, scatter_rows)

__all__ = [
    "FIELD_KERNELS",
    "KERNELS",
    "WORD_TYPES",
    "clear_caches",
    "copy_fields",
    "copy_rows",
    "gather_fields",
    "gather_rows",
    "get_kernel",
    "get_module",
    "kernel_name",
    "kernel_names",
    "scatter_fields",
    "scatter_rows",
    "source_path",
    "word_type_for",
]
