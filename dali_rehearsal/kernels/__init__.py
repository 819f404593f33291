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

Caching is CuPy's own, as in cuCIM: the getters are memoized with
``cupy.memoize(for_each_device=True)``, which keys on the arguments and the
current device. They are defined on first use, once per CuPy module (the
package imports without CuPy, and the tests put an emulated CuPy in its
place), and :func:`clear_caches` empties them with ``cupy.clear_memo()``.
Like every ``cupy.memoize`` function they take no lock: two threads that ask
for the same kernel for the very first time may both compile it (the later
result is kept; either works).
"""

import sys

from . import movement
from .compile import (COMPILE_OPTIONS, FIELD_KERNELS, KERNELS, WORD_TYPES, get_kernel,
                      get_module, kernel_name, kernel_names, source_path, word_type_for)
from .movement import (copy_fields, copy_rows, gather_fields, gather_rows, gather_rows_host,
                       scatter_fields, scatter_rows, scatter_rows_host)


def clear_caches():
    """Forgets compiled modules, kernel objects and staging buffers (for
    tests that swap the CuPy module). ``cupy.clear_memo()`` empties every
    ``cupy.memoize`` cache of the CuPy module in use, ours included."""
    cupy = sys.modules.get("cupy")      # not imported: nothing was compiled
    if cupy is not None:
        cupy.clear_memo()
    movement.clear_staging()


__all__ = [
    "FIELD_KERNELS",
    "KERNELS",
    "WORD_TYPES",
    "COMPILE_OPTIONS",
    "clear_caches",
    "copy_fields",
    "copy_rows",
    "gather_fields",
    "gather_rows",
    "gather_rows_host",
    "get_kernel",
    "get_module",
    "kernel_name",
    "kernel_names",
    "scatter_fields",
    "scatter_rows",
    "scatter_rows_host",
    "source_path",
    "word_type_for",
]
