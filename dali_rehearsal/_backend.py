"""Array backends: NumPy on the host, CuPy on the GPU.

:class:`Backend` is the library's one gateway to CuPy: arrays, streams,
events, pinned host memory and device-to-host copies all go through it (the
kernels in :mod:`dali_rehearsal.kernels` are the only other place that
launches device work). CuPy is imported only when the GPU backend is used.

Ordering rules every caller relies on (the CUDA execution model):

- device work is queued on a stream and runs later, in stream order;
- work on two streams is unordered unless an event orders it
  (:meth:`Backend.record_event` on the producer, :meth:`Backend.wait_event` on
  the consumer) or the host waits (:meth:`Backend.synchronize`);
- a host read of device memory (:meth:`Backend.to_host`) is ordered after
  the work queued on the stream it is given, and on nothing else.

Every method that queues work takes the stream explicitly; ``None`` means
the thread's current CuPy stream, which code on a stage or exchange stream
must never rely on.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys

import numpy as np

__all__ = ["Backend", "get_backend", "gpu_available", "to_host", "GPU_EXTRAS"]

#: How to install CuPy (with the NVRTC library the kernels compile with),
#: named in the errors raised when it is missing.
GPU_EXTRAS = ('pip install "dali-rehearsal[gpu]" (CUDA 12 drivers) or '
              'pip install "dali-rehearsal[gpu-cuda13]" (CUDA 13 drivers)')


def _cupy_installed() -> bool:
    if "cupy" in sys.modules:               # imported already (or set to None: blocked)
        return sys.modules["cupy"] is not None
    try:
        return importlib.util.find_spec("cupy") is not None
    except (ImportError, ValueError):    # a module set to None in sys.modules
        return False


def _import_cupy(why: str):
    try:
        import cupy
    except ImportError as e:
        raise ModuleNotFoundError(f"{why} needs CuPy, which is not installed ({e}): "
                                  f"{GPU_EXTRAS}", name="cupy") from e
    return cupy


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


def is_dali_gpu(x) -> bool:
    """True for DALI GPU tensors and tensor lists (they have ``as_cpu`` but,
    unlike host ones, no ``as_array``)."""
    return hasattr(x, "as_cpu") and hasattr(x, "as_tensor") and not hasattr(x, "as_array")


def on_device(x) -> bool:
    """True for CUDA arrays and DALI GPU tensor lists; False for host data."""
    return _cuda_interface(x) is not None or is_dali_gpu(x)


def to_host(x) -> np.ndarray:
    """A NumPy view or copy of ``x`` (NumPy, CuPy, DALI TensorList, torch...).

    For device data this synchronises the current stream; library code uses
    :meth:`Backend.to_host` with an explicit stream instead.
    """
    if isinstance(x, np.ndarray):
        return x
    if is_dali_gpu(x):
        x = x.as_cpu()
    if hasattr(x, "as_array"):                                # DALI TensorListCPU
        return x.as_array()
    if _cuda_interface(x) is not None:
        if hasattr(x, "detach") and not _cupy_installed():   # a CUDA torch.Tensor
            return x.detach().cpu().numpy()
        cupy = _import_cupy("reading a CUDA array on the host")
        return cupy.asnumpy(cupy.asarray(x))
    if hasattr(x, "detach"):                                  # torch.Tensor
        return x.detach().cpu().numpy()
    return np.asarray(x)


class Backend:
    """Array module plus the few operations that differ between devices.

    On the CPU every stream and event argument is ignored and every method is
    synchronous.
    """

    def __init__(self, device: str, device_id: int | None = None):
        self.device = device
        self.is_gpu = device == "gpu"     # read on every step: a plain attribute
        if device == "gpu":
            import cupy
            self.xp = cupy
            self.device_id = cupy.cuda.runtime.getDevice() if device_id is None else int(device_id)
        else:
            self.xp = np
            self.device_id = None

    # ----------------------------------------------------------------- arrays
    def asarray(self, x, stream=None):
        """``x`` as a C-contiguous array of this backend, without a copy when
        possible. A host-to-device copy is queued on ``stream``."""
        if not self.is_gpu:
            return np.ascontiguousarray(to_host(x))
        cp = self.xp
        if is_dali_gpu(x):
            x = x.as_tensor()
        elif hasattr(x, "as_array"):                          # DALI TensorListCPU
            x = x.as_array()
        with self.device_context(), self.stream_context(stream):
            return cp.ascontiguousarray(cp.asarray(x))

    def empty(self, shape, dtype):
        """Uninitialised storage on this backend's device."""
        if not self.is_gpu:
            return np.empty(shape, dtype=dtype)
        with self.device_context():
            return self.xp.empty(shape, dtype=dtype)

    def empty_pinned(self, shape, dtype) -> np.ndarray:
        """Page-locked host memory (plain NumPy on the CPU backend)."""
        if not self.is_gpu:
            return np.empty(shape, dtype=dtype)
        import cupyx
        n = int(np.prod(shape, dtype=np.int64))
        return cupyx.empty_pinned(max(n, 1), dtype=dtype)[:n].reshape(shape)

    def to_host(self, x, stream=None, *, out=None) -> np.ndarray:
        """A host copy of device array ``x`` (NumPy input is returned as is),
        ordered after the work queued on ``stream``; blocks until it is done."""
        if not self.is_gpu or isinstance(x, np.ndarray):
            host = to_host(x)
            if out is None:
                return host
            out[...] = host
            return out
        with self.device_context():
            s = self.current_stream() if stream is None else stream
            host = self.xp.asnumpy(x, stream=s, out=out)
            s.synchronize()
            return host

    def from_host(self, dst, host, stream=None) -> None:
        """Copies host array ``host`` into the device array ``dst`` (same
        shape), queued on ``stream``: no device-side temporary."""
        if not self.is_gpu:
            dst[...] = host
            return
        with self.device_context():
            dst.set(np.ascontiguousarray(host), stream=self.current_stream() if stream is None
                    else stream)

    # ---------------------------------------------------------------- streams
    def new_stream(self):
        """A non-blocking stream on this backend's device (None on the CPU)."""
        if not self.is_gpu:
            return None
        with self.device_context():
            return self.xp.cuda.Stream(non_blocking=True)

    def current_stream(self):
        return self.xp.cuda.get_current_stream() if self.is_gpu else None

    def stream_context(self, stream):
        """Makes ``stream`` current (nothing on the CPU or for ``None``)."""
        if self.is_gpu and stream is not None:
            return stream
        return contextlib.nullcontext()

    def device_context(self):
        """Makes this backend's device current in the calling thread."""
        if self.is_gpu:
            return self.xp.cuda.Device(self.device_id)
        return contextlib.nullcontext()

    def use_device(self) -> None:
        """Makes this backend's device the calling thread's current one (for
        worker threads, which start on device 0)."""
        if self.is_gpu:
            self.xp.cuda.Device(self.device_id).use()

    def record_event(self, stream):
        """An event recorded on ``stream`` (None on the CPU): work queued
        later on another stream can wait for everything queued so far."""
        if not self.is_gpu:
            return None
        with self.device_context():
            event = self.xp.cuda.Event(disable_timing=True)
            event.record(self.current_stream() if stream is None else stream)
            return event

    def wait_event(self, stream, event) -> None:
        """Work queued on ``stream`` from now on waits for ``event``."""
        if self.is_gpu and event is not None:
            (self.current_stream() if stream is None else stream).wait_event(event)

    def synchronize(self, stream=None) -> None:
        """Blocks the host until the work queued on ``stream`` is done."""
        if self.is_gpu:
            (self.current_stream() if stream is None else stream).synchronize()

    def stream_device(self, stream) -> int | None:
        """The device a CuPy stream belongs to (None on the CPU)."""
        if not self.is_gpu or stream is None:
            return self.device_id
        return int(stream.device_id) if hasattr(stream, "device_id") else self.device_id


def get_backend(device: str | None) -> Backend:
    """Resolves ``device`` ("cpu", "gpu" or None for "gpu if present, else cpu")."""
    if device is None:
        device = "gpu" if gpu_available() else "cpu"
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if device == "gpu" and not gpu_available():
        if not _cupy_installed():
            raise RuntimeError(
                f"device='gpu' needs CuPy, which is not installed: {GPU_EXTRAS}; use "
                "device='cpu' on machines without a GPU")
        raise RuntimeError(
            "device='gpu' needs a CUDA device visible to CuPy, and CuPy sees none (no GPU, "
            "no driver, or a CuPy built for another CUDA major version than the driver's: "
            f"{GPU_EXTRAS}); use device='cpu' on machines without a GPU")
    return Backend(device)
