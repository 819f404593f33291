"""A stand-in for the CuPy subset the library uses, over :mod:`.runtime`.

``cupy``: ``ndarray`` (basic slicing, ``reshape``, ``view``, ``set``,
``get``, ``copy``, ``fill``, item assignment, ``__cuda_array_interface__``
v3), ``asarray``, ``ascontiguousarray``, ``asnumpy``, ``empty``, ``zeros``,
``full``, ``arange``, ``empty_like``, ``zeros_like``, ``RawModule``,
``memoize`` (``for_each_device=``: keyed on the current emulated device),
``clear_memo`` (each built module has its own memos);
``cupy.cuda``: ``Stream`` (``non_blocking=``, context manager, ``use``,
``synchronize``, ``wait_event``, ``record``, ``ptr``, ``device_id``,
``is_capturing``), ``get_current_stream``, ``Event``, ``Device``,
``runtime``; ``cupyx.empty_pinned``.

Semantics follow CuPy and CUDA where the library depends on them:

- the current stream is per thread and per device, the legacy default
  stream unless a ``with stream:`` block (or ``use()``) says otherwise;
- ``__cuda_array_interface__`` reports the reading thread's current stream
  (``1`` for the legacy default stream); ``asarray`` of an object whose
  interface names a stream synchronises that stream first, as CuPy does;
- host-to-device copies from pageable memory take a snapshot of the host
  data at the call and write the device late; from pinned memory they read
  the host data when they run. Device-to-host copies into pinned memory run
  late (``blocking=False``); into pageable memory they complete before the
  call returns; ``blocking=True`` waits for the stream;
- implicit conversion of a device array to NumPy raises, as in CuPy;
- a kernel or copy queued on a stream of another device than the current
  one, or touching memory of another device, raises.
"""

from __future__ import annotations

import functools
import math
import types

import numpy as np

from . import runtime as rt
from .kernels import RawModule

# ------------------------------------------------------------------ devices

_device_count = 1


class Device:
    def __init__(self, device=None):
        self.id = rt.THREAD.device if device is None else int(device)
        if not 0 <= self.id < _device_count:
            raise rt.CUDARuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {self.id}")
        self._saved = []

    def __enter__(self):
        self._saved.append(rt.THREAD.device)
        rt.THREAD.device = self.id
        return self

    def __exit__(self, *exc):
        rt.THREAD.device = self._saved.pop()
        return False

    def use(self):
        rt.THREAD.device = self.id

    def synchronize(self):
        rt.SCHEDULER.synchronize_device(self.id)

    @property
    def compute_capability(self):
        return "90"

    def __int__(self):
        return self.id

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id} (emulated)>"


# ------------------------------------------------------------------ streams

class Stream:
    """An emulated CUDA stream (see runtime.StreamState)."""

    def __init__(self, null=False, non_blocking=False, ptds=False, *, _state=None):
        if _state is None:
            device = rt.THREAD.device
            _state = (rt.SCHEDULER.legacy_stream(device) if null
                      else rt.StreamState(device, non_blocking=bool(non_blocking)))
        self._state = _state
        self._saved = []

    @property
    def ptr(self):
        return self._state.ptr

    @property
    def device_id(self):
        return self._state.device_id

    @property
    def non_blocking(self):
        return self._state.non_blocking

    def _check_device(self):
        if self.device_id != rt.THREAD.device:
            raise RuntimeError(f"the stream belongs to device {self.device_id}, the current "
                               f"device is {rt.THREAD.device}")

    def __enter__(self):
        self._check_device()
        current = rt.THREAD.current
        self._saved.append(current.get(self.device_id))
        current[self.device_id] = self
        return self

    def __exit__(self, *exc):
        previous = self._saved.pop()
        if previous is None:
            rt.THREAD.current.pop(self.device_id, None)
        else:
            rt.THREAD.current[self.device_id] = previous
        return False

    def use(self):
        self._check_device()
        rt.THREAD.current[self.device_id] = self
        return self

    def synchronize(self):
        self._state.synchronize()

    def wait_event(self, event):
        if event._state.stream is None:
            return
        self._state.enqueue(lambda: None, "wait_event",
                            deps=[(event._state.stream, event._state.position)])

    def record(self, event=None):
        event = Event() if event is None else event
        event.record(self)
        return event

    def is_capturing(self):
        return self._state.captured is not None

    def begin_capture(self, mode=None):
        if self._state.legacy:
            raise rt.CUDARuntimeError("cudaErrorStreamCaptureUnsupported: legacy stream")
        self._state.captured = []

    def end_capture(self):
        ops, self._state.captured = self._state.captured, None
        return Graph(ops)

    @property
    def done(self):
        return self._state.pending == 0

    def enqueue(self, fn, label="op"):
        self._check_device()
        return self._state.enqueue(fn, label)

    def __eq__(self, other):
        return isinstance(other, Stream) and other._state is self._state

    def __hash__(self):
        return id(self._state)

    def __repr__(self):
        kind = "legacy" if self._state.legacy else (
            "non-blocking" if self.non_blocking else "blocking")
        return f"<emulated {kind} Stream {self.ptr:#x} on device {self.device_id}>"


class Graph:
    """A captured sequence of device work, replayed as one op per launch."""

    def __init__(self, ops):
        self._ops = list(ops)

    def launch(self, stream=None):
        stream = get_current_stream() if stream is None else stream
        ops = self._ops

        def run():
            for op in ops:
                op()
        stream.enqueue(run, "graph")

    def upload(self, stream=None):
        pass


def get_current_stream(device_id=None):
    device = rt.THREAD.device if device_id is None else int(device_id)
    stream = rt.THREAD.current.get(device)
    if stream is None:
        stream = Stream(_state=rt.SCHEDULER.legacy_stream(device))
    return stream


def _stream_from_ptr(ptr, device):
    """The stream a CUDA array interface ``stream`` value names."""
    if ptr in (None, 0, 1, 2):
        return Stream(_state=rt.SCHEDULER.legacy_stream(device))
    for state in rt.SCHEDULER.live():
        if state.ptr == ptr:
            return Stream(_state=state)
    raise rt.CUDARuntimeError(f"cudaErrorInvalidResourceHandle: no stream {ptr:#x}")


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self._state = rt.EventState()

    def record(self, stream=None):
        stream = get_current_stream() if stream is None else stream
        stream._check_device()
        self._state.record(stream._state)

    def synchronize(self):
        self._state.synchronize()

    @property
    def done(self):
        return self._state.done


def get_elapsed_time(start, end):
    return 0.0


# ------------------------------------------------------------------- arrays

class _Flags:
    def __init__(self, view):
        self.c_contiguous = bool(view.flags.c_contiguous)
        self.f_contiguous = bool(view.flags.f_contiguous)
        self.owndata = False


class _MemoryPointer:
    def __init__(self, ptr, device_id):
        self.ptr = int(ptr)
        self.device_id = device_id


class ndarray:
    """An emulated device array: a NumPy view of device memory that only
    queued device work reads or writes."""

    __array_priority__ = 100

    def __init__(self, shape, dtype=float, *, _view=None, _owner=None, _device=None):
        if _view is None:
            dtype = np.dtype(dtype)
            shape = tuple(int(d) for d in (shape if isinstance(shape, tuple) else
                                           (shape,) if np.isscalar(shape) else shape))
            _device = rt.THREAD.device
            block = rt.Allocation(math.prod(shape) * dtype.itemsize, _device)
            _owner = block
            _view = block.buffer[: math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)
        self._view = _view
        self._owner = _owner
        self._device_id = _device

    # metadata (no device access)
    shape = property(lambda self: self._view.shape)
    dtype = property(lambda self: self._view.dtype)
    ndim = property(lambda self: self._view.ndim)
    size = property(lambda self: self._view.size)
    itemsize = property(lambda self: self._view.itemsize)
    nbytes = property(lambda self: self._view.nbytes)
    strides = property(lambda self: self._view.strides)
    flags = property(lambda self: _Flags(self._view))
    device = property(lambda self: Device(self._device_id))
    data = property(lambda self: _MemoryPointer(self._view.ctypes.data, self._device_id))

    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    def _wrap(self, view):
        return ndarray(None, _view=view, _owner=self._owner, _device=self._device_id)

    def __getitem__(self, key):
        _check_basic_index(key)
        return self._wrap(self._view[key])

    def reshape(self, *shape, order="C"):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        if not self._view.flags.c_contiguous:
            raise NotImplementedError("emulation: reshape of a non-contiguous array")
        return self._wrap(self._view.reshape(shape))

    def view(self, dtype=None):
        return self._wrap(self._view.view(dtype))

    @property
    def T(self):
        return self._wrap(self._view.T)

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use "
                        "`.get()` to construct a NumPy array explicitly.")

    def __iter__(self):
        raise NotImplementedError("emulation: iterating over a device array")

    def __bool__(self):
        raise NotImplementedError("emulation: truth value of a device array")

    def __repr__(self):
        return f"<emulated cupy.ndarray shape={self.shape} dtype={self.dtype} " \
               f"device={self._device_id}>"

    # device work, queued on the current stream
    def __setitem__(self, key, value):
        _check_basic_index(key)
        target = self._view[key]
        stream = _stream_for(self)
        if isinstance(value, ndarray):
            _check_devices(stream, value)
            src = value._view

            def run(target=target, src=src):
                target[...] = src
        elif isinstance(value, np.ndarray):
            raise TypeError("emulation: assigning a NumPy array to a device array "
                            "(CuPy needs CUPY_EXPERIMENTAL_SLICE_COPY)")
        else:
            def run(target=target, value=value):
                target[...] = value
        stream.enqueue(run, "setitem")

    def fill(self, value):
        self[...] = value

    def copy(self, order="C"):
        out = ndarray(self.shape, self.dtype)
        out[...] = self
        return out

    def astype(self, dtype, copy=True):
        dtype = np.dtype(dtype)
        if dtype == self.dtype and not copy:
            return self
        out = ndarray(self.shape, dtype)
        src, dst = self._view, out._view

        def run():
            dst[...] = src.astype(dtype)
        _stream_for(self).enqueue(run, "astype")
        return out

    def set(self, arr, stream=None):
        """Host-to-device copy of ``arr`` (same shape and dtype) on ``stream``."""
        arr = np.asarray(arr)
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError(f"set: shape/dtype mismatch ({arr.shape}, {arr.dtype}) vs "
                             f"({self.shape}, {self.dtype})")
        if not self._view.flags.c_contiguous:
            raise RuntimeError("set: the destination must be contiguous")
        stream = _stream_for(self, stream)
        _upload(self._view, arr, stream)

    def get(self, stream=None, order="C", out=None, blocking=True):
        """Device-to-host copy ordered after the work queued on ``stream``."""
        stream = _stream_for(self, stream)
        if out is None:
            out = np.empty(self.shape, self.dtype)
        elif out.shape != self.shape or out.dtype != self.dtype:
            raise ValueError("get: out does not match the array")
        src = self._view

        def run():
            out[...] = src
        position = stream.enqueue(run, "device-to-host")
        if blocking or not rt.MEMORY.is_pinned(out):
            if blocking:
                stream.synchronize()
            else:
                stream._state.run_until(position)
        return out

    @property
    def __cuda_array_interface__(self):
        view = self._view
        stream = get_current_stream(self._device_id)
        return {
            "shape": view.shape,
            "typestr": view.dtype.str,
            "descr": [("", view.dtype.str)],
            "data": (int(view.ctypes.data) if view.size else 0, False),
            "strides": None if view.flags.c_contiguous else view.strides,
            "version": 3,
            "stream": stream.ptr if stream.ptr != 0 else 1,
        }


def _check_basic_index(key):
    keys = key if isinstance(key, tuple) else (key,)
    for k in keys:
        if not (k is Ellipsis or k is None or isinstance(k, (slice, int, np.integer))):
            raise NotImplementedError("emulation: only basic indexing of device arrays "
                                      f"(got {type(k).__name__})")


def _stream_for(array, stream=None):
    stream = get_current_stream() if stream is None else stream
    _check_devices(stream, array)
    return stream


def _check_devices(stream, *arrays):
    stream._check_device()
    for a in arrays:
        if isinstance(a, ndarray) and a._device_id != stream.device_id:
            raise rt.CUDARuntimeError(
                f"cudaErrorIllegalAddress: an array of device {a._device_id} used on a "
                f"stream of device {stream.device_id}")


def _upload(dst_view, host, stream):
    if rt.MEMORY.is_pinned(host):
        src = host                       # read when the copy runs
    else:
        src = np.array(host, copy=True)  # staged at the call

    def run():
        dst_view[...] = src
    stream.enqueue(run, "host-to-device")


# ----------------------------------------------------------- constructors

def empty(shape, dtype=float, order="C"):
    return ndarray(shape, dtype)


def empty_like(a, dtype=None):
    return empty(a.shape, a.dtype if dtype is None else dtype)


def full(shape, fill_value, dtype=None):
    dtype = np.asarray(fill_value).dtype if dtype is None else dtype
    out = empty(shape, dtype)
    out.fill(fill_value)
    return out


def zeros(shape, dtype=float):
    return full(shape, 0, dtype)


def zeros_like(a, dtype=None):
    return zeros(a.shape, a.dtype if dtype is None else dtype)


def arange(*args, dtype=None):
    return asarray(np.arange(*args, dtype=dtype))


def _from_interface(obj):
    desc = obj.__cuda_array_interface__
    if desc.get("version", 0) >= 3 and desc.get("stream") is not None:
        # CUPY_CUDA_ARRAY_INTERFACE_SYNC=1 (default): wait for the producer's stream
        _stream_from_ptr(desc["stream"], rt.THREAD.device).synchronize()
    return wrap_interface(desc, obj)


def wrap_interface(desc, owner=None, device_id=None):
    """An array over the memory a CUDA array interface describes (on
    ``device_id``, default the current device), without any synchronisation
    (what DALI does when it wraps one)."""
    shape = tuple(desc["shape"])
    dtype = np.dtype(desc["typestr"])
    ptr = desc["data"][0]
    device = rt.THREAD.device if device_id is None else int(device_id)
    strides = desc.get("strides")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return empty(shape, dtype)
    if strides is not None:
        raise NotImplementedError("emulation: strided CUDA array interface")
    block = rt.MEMORY.find(ptr)
    if block is None or block.pinned:
        raise rt.CUDARuntimeError(f"cudaErrorInvalidValue: {ptr:#x} is not device memory")
    raw = rt.MEMORY.bytes_at(ptr, nbytes, device_id=device, what="wrap")
    view = raw.view(dtype).reshape(shape)
    return ndarray(None, _view=view, _owner=(block, owner), _device=block.device_id)


def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray):
        out = a
    elif hasattr(a, "__cuda_array_interface__"):
        out = _from_interface(a)
    else:
        host = np.asarray(a)
        out = empty(host.shape, host.dtype)
        _upload(out._view, np.ascontiguousarray(host), get_current_stream())
    if dtype is not None and np.dtype(dtype) != out.dtype:
        out = out.astype(dtype)
    return out


array = asarray


def ascontiguousarray(a, dtype=None):
    a = asarray(a, dtype)
    if a.flags.c_contiguous:
        return a
    return a.copy()


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out, blocking=blocking)
    if hasattr(a, "__cuda_array_interface__"):
        return asarray(a).get(stream=stream, out=out, blocking=blocking)
    result = np.asarray(a)
    if out is not None:
        out[...] = result
        return out
    return result


def get_array_module(*args):
    return _cupy if any(isinstance(a, ndarray) for a in args) else np


# ------------------------------------------------------------- runtime API

def _runtime_module():
    m = types.ModuleType("cupy.cuda.runtime")
    m.CUDARuntimeError = rt.CUDARuntimeError
    m.memcpyDeviceToDevice = 3
    m.memcpyHostToDevice = 1
    m.memcpyDeviceToHost = 2
    m.streamLegacy = 1
    m.is_hip = False
    m.getDeviceCount = lambda: _device_count
    m.getDevice = lambda: rt.THREAD.device

    def setDevice(device):
        Device(device).use()

    def streamSynchronize(ptr):
        _stream_from_ptr(ptr, rt.THREAD.device).synchronize()

    def deviceSynchronize():
        rt.SCHEDULER.synchronize_device(rt.THREAD.device)

    def memcpyAsync(dst, src, size, kind, stream_ptr):
        if kind != 3:
            raise NotImplementedError("emulation: memcpyAsync device-to-device only")
        dst_bytes = rt.MEMORY.bytes_at(dst, size, what="memcpy write")
        src_bytes = rt.MEMORY.bytes_at(src, size, what="memcpy read")

        def run():
            dst_bytes[...] = src_bytes
        _stream_from_ptr(stream_ptr, rt.THREAD.device).enqueue(run, "memcpyAsync")

    def getDeviceProperties(device):
        return {"name": b"emulated CUDA device", "major": 9, "minor": 0}

    m.setDevice = setDevice
    m.streamSynchronize = streamSynchronize
    m.deviceSynchronize = deviceSynchronize
    m.memcpyAsync = memcpyAsync
    m.getDeviceProperties = getDeviceProperties
    return m


def empty_pinned(shape, dtype=float, order="C"):
    """cupyx.empty_pinned: page-locked host memory (registered as pinned)."""
    dtype = np.dtype(dtype)
    shape = (shape,) if np.isscalar(shape) else tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    block = rt.Allocation(nbytes, None, pinned=True)
    return block.buffer[:nbytes].view(dtype).reshape(shape)


def _memo_functions():
    """``memoize`` and ``clear_memo`` as CuPy's ``cupy/_util.pyx`` defines them
    (the key: the arguments, and the current device with
    ``for_each_device=True``), over memos of their own."""
    memos = []

    def memoize(for_each_device=False):
        def decorator(f):
            memo = {}
            memos.append(memo)

            @functools.wraps(f)
            def ret(*args, **kwargs):
                device = rt.THREAD.device if for_each_device else -1
                key = (device, args, frozenset(kwargs.items())) if kwargs else (device, args)
                result = memo.get(key, memo)
                if result is memo:
                    result = memo[key] = f(*args, **kwargs)
                return result
            return ret
        return decorator

    def clear_memo():
        for memo in memos:
            memo.clear()

    return memoize, clear_memo


class _MemoryPool:
    def free_all_blocks(self):
        rt.MEMORY.collect(force=True)

    def used_bytes(self):
        return 0


_cupy = None


def build_modules(device_count: int = 1) -> dict:
    """The module objects to put in ``sys.modules``."""
    global _device_count, _cupy
    _device_count = int(device_count)
    cupy = types.ModuleType("cupy")
    cupy.__version__ = "14.0.0+emulated"
    cupy.__emulated__ = True
    cupy.memoize, cupy.clear_memo = _memo_functions()
    cuda = types.ModuleType("cupy.cuda")
    runtime_module = _runtime_module()
    for name, value in dict(Stream=Stream, Event=Event, Device=Device,
                            get_current_stream=get_current_stream,
                            get_elapsed_time=get_elapsed_time, runtime=runtime_module,
                            ExternalStream=None).items():
        setattr(cuda, name, value)
    for name, value in dict(ndarray=ndarray, asarray=asarray, array=array,
                            ascontiguousarray=ascontiguousarray, asnumpy=asnumpy,
                            empty=empty, empty_like=empty_like, zeros=zeros,
                            zeros_like=zeros_like, full=full, arange=arange,
                            get_array_module=get_array_module, RawModule=RawModule,
                            cuda=cuda, get_default_memory_pool=lambda: _MemoryPool(),
                            uint8=np.uint8, int64=np.int64, int32=np.int32,
                            float32=np.float32, float64=np.float64).items():
        setattr(cupy, name, value)
    cupyx = types.ModuleType("cupyx")
    cupyx.empty_pinned = empty_pinned
    cupyx.__emulated__ = True
    _cupy = cupy
    return {"cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.runtime": runtime_module,
            "cupyx": cupyx}

