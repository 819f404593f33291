"""A CPU emulation of the part of CUDA and CuPy the library relies on.

Installed in place of CuPy (``sys.modules["cupy"]``, ``cupyx``), it lets the
library run its real GPU code paths (``device="gpu"``: the CuPy backend, the
kernels' launches, streams, events, pinned staging, the stage's hand-over,
the exchange's staged and CUDA-aware transfers) on a machine without a GPU,
with device work that runs *late*: only when the program orders it (see
:mod:`.runtime`). A missing ordering then gives stale or never-written rows
deterministically instead of a rare race on a GPU.

Modules: :mod:`.runtime` (memory, streams, events, the legacy default
stream), :mod:`.fake_cupy` (the CuPy subset), :mod:`.kernels` (RawModule
whose kernels run a NumPy reference), :mod:`.dali` (stand-ins for a DALI GPU
source pipeline, DALI's ``TensorListGPU``, and DALI feeding and reading an
``external_source`` batch), :mod:`.exchange_program` (global sampling between
emulated GPUs, run under ``mpiexec`` or with torchrun's environment).

Use :func:`emulated` (a context manager) or the ``emulated_gpu`` fixture of
tests/conftest.py; a program run under ``mpiexec`` calls :func:`install`
before importing ``dali_rehearsal``.
"""

from __future__ import annotations

import contextlib
import sys

__all__ = ["install", "uninstall", "emulated", "runtime"]

_saved: dict | None = None
_saved_dali: dict = {}
_NAMES = ("cupy", "cupyx", "cupy_backends")


def _is_ours(name: str) -> bool:
    return any(name == n or name.startswith(n + ".") for n in _NAMES)


def _clear_library_caches() -> None:
    backend = sys.modules.get("dali_rehearsal._backend")
    if backend is not None:
        backend.gpu_available.cache_clear()
    kernels = sys.modules.get("dali_rehearsal.kernels")
    if kernels is not None:
        kernels.clear_caches()


def _patch_dali() -> None:
    """DALI's ``TensorListGPU`` needs a CUDA driver to wrap device memory; where
    DALI is loaded, the library's wrapping (the stage hands its outputs over
    with layouts) uses :class:`.dali.TensorListGPU` instead."""
    tensors = sys.modules.get("nvidia.dali.tensors")
    if tensors is None or _saved is None:
        return          # DALI not loaded yet (emulation.dali patches it on import)
    from .dali import TensorListGPU     # (its first import calls this function too)
    if "TensorListGPU" in _saved_dali:
        return
    _saved_dali["TensorListGPU"] = tensors.TensorListGPU
    tensors.TensorListGPU = TensorListGPU


def _unpatch_dali() -> None:
    tensors = sys.modules.get("nvidia.dali.tensors")
    if tensors is not None and "TensorListGPU" in _saved_dali:
        tensors.TensorListGPU = _saved_dali["TensorListGPU"]
    _saved_dali.clear()


def install(device_count: int = 1) -> dict:
    """Puts the emulated ``cupy``/``cupyx`` in ``sys.modules`` (and, when DALI
    is loaded, the emulated ``TensorListGPU`` in ``nvidia.dali.tensors``);
    returns the modules."""
    global _saved
    from . import fake_cupy, runtime
    from .kernels import RawModule
    if _saved is not None:
        raise RuntimeError("the CUDA emulation is already installed")
    _saved = {name: mod for name, mod in sys.modules.items() if _is_ours(name)}
    for name in _saved:
        del sys.modules[name]
    modules = fake_cupy.build_modules(device_count)
    sys.modules.update(modules)
    runtime.THREAD.device = 0
    runtime.THREAD.current.clear()
    RawModule.reset_counters()
    _clear_library_caches()
    _patch_dali()
    return modules


def uninstall() -> None:
    """Restores whatever ``cupy`` modules were there before :func:`install`."""
    global _saved
    if _saved is None:
        return
    from . import runtime
    _unpatch_dali()
    for name in [n for n in sys.modules if _is_ours(n)]:
        del sys.modules[name]
    sys.modules.update(_saved)
    _saved = None
    runtime.THREAD.current.clear()
    _clear_library_caches()


@contextlib.contextmanager
def emulated(device_count: int = 1):
    modules = install(device_count)
    try:
        yield modules["cupy"]
    finally:
        uninstall()


from . import runtime  # noqa: E402
