"""Array backends: NumPy on the host, CuPy on the GPU.

Everything the buffer touches goes through :class:`Backend`, so the same code
path serves both devices. CuPy is imported only when the GPU backend is used.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["Backend", "get_backend", "gpu_available", "to_host"]


@functools.lru_cache(maxsize=None)
def gpu_available() -> bool:
    """True when CuPy is installed and sees at least one CUDA device."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device
        return False


def _cuda_interface(x):
    return getattr(x, "__cuda_array_interface__", None)


def to_host(x) -> np.ndarray:
    """A NumPy view or copy of ``x`` (NumPy, CuPy, DALI TensorList, torch...)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "as_cpu") and hasattr(x, "as_tensor"):      # DALI TensorListGPU
        x = x.as_cpu()
    if hasattr(x, "as_array"):                                # DALI TensorListCPU
        return x.as_array()
    if _cuda_interface(x) is not None:
        import cupy
        return cupy.asnumpy(cupy.asarray(x))
    if hasattr(x, "detach"):                                  # torch.Tensor
        return x.detach().cpu().numpy()
    return np.asarray(x)


class Backend:
    """Array module plus the few operations that differ between devices."""

    def __init__(self, device: str, device_id: int | None = None):
        self.device = device
        if device == "gpu":
            import cupy
            self.xp = cupy
            self.device_id = cupy.cuda.runtime.getDevice() if device_id is None else int(device_id)
        else:
            self.xp = np
            self.device_id = None

    @property
    def is_gpu(self) -> bool:
        return self.device == "gpu"

    def asarray(self, x, stream=None):
        """``x`` as a C-contiguous array of this backend, without a copy when possible."""
        if not self.is_gpu:
            return np.ascontiguousarray(to_host(x))
        cp = self.xp
        if hasattr(x, "as_tensor") and hasattr(x, "as_cpu"):  # DALI TensorListGPU
            x = x.as_tensor()
        elif hasattr(x, "as_array"):                          # DALI TensorListCPU
            x = x.as_array()
        with self.stream_context(stream):
            return cp.ascontiguousarray(cp.asarray(x))

    def empty(self, shape, dtype):
        return self.xp.empty(shape, dtype=dtype)

    def stream_context(self, stream):
        if self.is_gpu and stream is not None:
            return stream
        return _NullContext()

    def synchronize(self, stream=None) -> None:
        if self.is_gpu:
            (stream or self.xp.cuda.get_current_stream()).synchronize()


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def get_backend(device: str | None) -> Backend:
    """Resolves ``device`` ("cpu", "gpu" or None for "gpu if present, else cpu")."""
    if device is None:
        device = "gpu" if gpu_available() else "cpu"
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if device == "gpu" and not gpu_available():
        raise RuntimeError(
            "device='gpu' needs CuPy (pip install 'dali-rehearsal[gpu]') and a visible CUDA "
            "device, and none was found; use device='cpu' on machines without a GPU")
    return Backend(device)
