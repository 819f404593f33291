"""CUDA kernels of the rehearsal buffer and their thin Python wrappers.

Installed as ``dali_rehearsal.kernels``; the ``.cu`` sources ship next to
this file and are compiled at run time with NVRTC through
:class:`cupy.RawModule` (once per module and device).  CuPy is imported only
when a kernel is actually needed, so the NumPy reference paths work without
it.
"""

import functools
import pathlib

#: C++ word type used to move rows, by word size in bytes (largest first).
WORD_TYPES = {
    16: "dr_word16",
    8: "unsigned long long",
    4: "unsigned int",
    2: "unsigned short",
    1: "unsigned char",
}

#: Template kernels defined in each ``<name>.cu`` source.
KERNELS = {
    "movement": ("copy_rows", "gather_rows", "scatter_rows"),
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


def name_expressions(name):
    """Return every ``kernel<W>`` instantiation of the source ``name``."""
    try:
        kernels = KERNELS[name]
    except KeyError:
        raise KeyError(f"unknown kernel source {name!r}; "
                       f"known: {sorted(KERNELS)}") from None
    return tuple(f"{kernel}<{ctype}>"
                 for kernel in kernels for ctype in WORD_TYPES.values())


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
        module = cupy.RawModule(code=code, options=_COMPILE_OPTIONS,
                                name_expressions=list(name_expressions(name)))
        module.compile()
    return module


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
from .movement import copy_rows, gather_rows, scatter_rows  # noqa: E402

__all__ = [
    "KERNELS",
    "WORD_TYPES",
    "copy_rows",
    "gather_rows",
    "get_module",
    "name_expressions",
    "scatter_rows",
    "source_path",
    "word_type_for",
]
