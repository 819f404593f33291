"""Compiling the ``.cu`` sources shipped with :mod:`dali_rehearsal.kernels`
and finding their kernels: one memoized getter per device (cuCIM's
``cupy.memoize(for_each_device=True)``), see the package docstring. The
wrappers (:mod:`.movement`) import from here; nothing here imports them.
"""

import pathlib
import weakref

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

COMPILE_OPTIONS = ("-std=c++14",)


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


def _compile(name):
    import cupy                         # the module the getters belong to

    code = source_path(name).read_text()
    # No name_expressions: see the module docstring (on-disk cache).
    module = cupy.RawModule(code=code, options=COMPILE_OPTIONS)
    module.compile()
    return module


def _define_getters(cupy):
    """The memoized getters of one CuPy module, by name (``module``,
    ``kernel``), each keyed on its arguments and the current device. (They do not hold
    ``cupy``: a value of :data:`_getters` that did would keep its key alive.)"""

    @cupy.memoize(for_each_device=True)
    def module(name):
        return _compile(name)

    @cupy.memoize(for_each_device=True)
    def kernel(name, entry):
        return module(name).get_function(entry)

    return {"module": module, "kernel": kernel}


#: CuPy module -> its getters (weak: an emulated CuPy dropped by the tests
#: takes its getters and their memos with it).
_getters = weakref.WeakKeyDictionary()


def _on_device(getter, device_id, *args):
    """Getter ``getter`` called on ``args`` with ``device_id`` current (``None``: the current
    device); switches devices only when it is another one."""
    import cupy

    getters = _getters.get(cupy)
    if getters is None:
        getters = _getters.setdefault(cupy, _define_getters(cupy))
    function = getters[getter]
    if device_id is None or int(device_id) == cupy.cuda.runtime.getDevice():
        return function(*args)
    with cupy.cuda.Device(int(device_id)):
        return function(*args)


def get_module(name, device_id=None):
    """Return the compiled :class:`cupy.RawModule` of ``<name>.cu``.

    Compiled once per device and memoized; ``device_id=None`` means CuPy's
    current device.
    """
    return _on_device("module", device_id, name)


def get_kernel(name, kernel, device_id=None):
    """The kernel object of entry point ``kernel`` of ``<name>.cu`` on
    ``device_id`` (``None``: the current device), looked up once per device
    and memoized."""
    return _on_device("kernel", device_id, name, kernel)


def word_type_for(nbytes_per_row, *pointers):
    """Return the largest word size that divides the row size and pointers.

    The result is one of the keys of :data:`WORD_TYPES` (16, 8, 4, 2 or 1):
    the widest word with which rows of ``nbytes_per_row`` bytes at the given
    addresses can be moved with aligned accesses.
    """
    return next(size for size in WORD_TYPES
                if nbytes_per_row % size == 0
                and all(p % size == 0 for p in pointers))
