"""Stand-ins for what DALI does with GPU data around the stage, on the emulation.

Three DALI behaviours meet the GPU stage; each is modelled on DALI 2.4's code:

- :class:`GpuSourcePipeline` is the user's source pipeline with GPU outputs
  (a ``nvidia.dali.Pipeline``, so ``dr.fn.rehearsal`` accepts it). It wraps a
  real CPU DALI pipeline (reading and decoding real files) and hands its
  outputs over as emulated device memory in :class:`TensorListGPU`\\ s that
  keep the CPU outputs' layouts. Like DALI, the outputs of one ``run`` are
  valid only until the next: every run overwrites the same device buffers,
  on the pipeline's own stream, and that work is *done* when ``run`` returns
  (DALI's executor runs ahead), so a consumer whose reads of the previous
  outputs are still queued reads the new batch. ``run(cuda_stream)`` makes
  ``cuda_stream`` wait for the outputs; it raises, like ``Pipeline.run`` in
  DALI 2.4 (``_require_exec_dynamic``), for a pipeline that is not on the
  dynamic executor (``exec_dynamic=False``).

- :class:`TensorListGPU` stands in for ``nvidia.dali.tensors.TensorListGPU``
  (put there by :func:`emulation.install`, or when this module is imported
  after it): built
  from an object with a CUDA array interface it shares the memory and takes
  its *order* from the interface's ``stream``, read in the constructing
  thread (``FillTensorFromCudaArray``; ``1``, or no stream, is the legacy
  default stream). It does not synchronise anything.

- :class:`ExternalSourceReader` is DALI feeding and reading an
  ``external_source(device="gpu")`` batch. Feeding happens in the thread that
  called the callback, right after it returns (``_run_input_callbacks`` then
  ``_ExternalDataBatch.feed``): ``Pipeline._feed_input`` picks the stream
  (``cuda_stream`` when given, else the batch's own: a TensorListGPU's order,
  or a CuPy array's current stream in the feeding thread), converts each
  array to a ``TensorListGPU`` (``_prep_data_for_feed_input``), and then

  * ``no_copy=False`` (``InputOperator::CopyUserData``): copies the batch into
    DALI's own memory *now*, on that stream, after waiting for the batch's
    order and DALI's buffer (``copy_impl::SyncBefore``), and records an event
    on that stream; when the iteration runs, DALI's stream waits for the
    event (``ForwardCurrentData``) and reads DALI's copy;
  * ``no_copy=True`` (``InputOperator::ShareUserData``): keeps the caller's
    arrays; when the iteration runs, ``ForwardCurrentData`` hands them to
    DALI's stream with ``set_order(stream, false)``, i.e. *without waiting*
    for anything: DALI reads whatever the memory holds at that point.

  ``read_after=0`` runs the iteration (reads the batch) at once; ``read_after=k``
  once ``k`` more batches have been fed (the prefetch queue).

:class:`ExternalSource` drives a stage the way DALI drives the callback that
``dr.fn.rehearsal`` gave to ``fn.external_source``, with the keyword arguments
it gave (recorded by :func:`recording_external_source`).
"""

from __future__ import annotations

import collections
import contextlib

import numpy as np

from . import fake_cupy as fc
from . import runtime as rt

__all__ = ["GpuSourcePipeline", "TensorListGPU", "TensorGPU", "ExternalSourceReader",
           "ExternalSource", "recording_external_source", "pending_device_work"]


def _legacy(device_id):
    return fc.Stream(_state=rt.SCHEDULER.legacy_stream(device_id))


class TensorGPU:
    """DALI's ``TensorGPU`` (dense): a version-2 CUDA array interface (no
    ``stream``: whoever wraps it does not synchronise)."""

    def __init__(self, array: fc.ndarray, owner):
        self._array, self._owner = array, owner

    @property
    def __cuda_array_interface__(self):
        desc = dict(self._array.__cuda_array_interface__)
        desc["version"] = 2
        desc.pop("stream", None)
        return desc

    def as_cpu(self):
        return self._owner.as_cpu()

    def shape(self):
        return list(self._array.shape)


class _HostTensor:
    def __init__(self, array):
        self._array = array

    def as_array(self):
        return self._array

    def as_tensor(self):
        return self


class TensorListGPU:
    """``nvidia.dali.tensors.TensorListGPU(data, layout="", device_id=-1)`` for
    dense device data (see the module docstring). ``order`` is the stream DALI
    records as the batch's order."""

    def __init__(self, data, layout=None, device_id=-1, *, order=None):
        if isinstance(data, TensorListGPU):
            self._array, self.order = data._array, data.order
            self._layout = data._layout if layout is None else layout
            return
        desc = data.__cuda_array_interface__           # read in this thread
        self._array = fc.wrap_interface(desc, data,
                                        None if device_id in (None, -1) else device_id)
        device = self._array.device.id
        if order is None:
            stream = desc.get("stream") if desc.get("version", 0) >= 3 else None
            order = fc._stream_from_ptr(stream, device)
        self.order = order
        self._layout = layout or ""

    # what DALI's Python side reads of a TensorListGPU
    @property
    def stream(self):
        return self.order

    def layout(self):
        return self._layout or None

    def as_tensor(self):
        return TensorGPU(self._array, self)

    def as_cpu(self):
        """A host copy, after the batch's order (DALI synchronises it)."""
        with fc.Device(self._array.device.id):
            return _HostTensor(self._array.get(stream=self.order))

    def shape(self):
        return [tuple(self._array.shape[1:])] * len(self)

    def __len__(self):
        return len(self._array)

    def device_id(self):
        return self._array.device.id

    @property
    def array(self) -> fc.ndarray:
        """The emulated device memory (test access only)."""
        return self._array


def _pipeline_base():
    from nvidia.dali.pipeline import Pipeline
    return Pipeline


class GpuSourcePipeline(_pipeline_base()):
    """A CPU DALI pipeline whose outputs arrive on the (emulated) GPU.

    It is a ``Pipeline`` only so that ``dr.fn.rehearsal`` accepts it; it
    answers what the stage asks of a source pipeline and builds no DALI
    pipeline of its own.
    """

    def __init__(self, pipeline, *, device_id: int = 0, exec_dynamic: bool = True):
        # Pipeline.__init__ is not called: nothing of DALI's backend is built.
        self._pipe = None                   # read by Pipeline.__del__
        self._enable_checkpointing = False
        self._checkpoint = None
        self._cpu = pipeline
        self._device = int(device_id)
        self._dynamic = bool(exec_dynamic)
        with fc.Device(self._device):
            self._stream = fc.Stream(non_blocking=True)
        self._outputs: list | None = None
        self.runs = 0

    # what the stage reads of a Pipeline
    @property
    def device_id(self):
        return self._device

    @property
    def exec_dynamic(self):
        return self._dynamic

    @property
    def max_batch_size(self):
        return self._cpu.max_batch_size

    @property
    def num_outputs(self):
        return self._cpu.num_outputs

    def output_dtype(self):
        return self._cpu.output_dtype()

    def output_ndim(self):
        return self._cpu.output_ndim()

    def build(self):
        self._cpu.build()

    def reset(self):
        self._cpu.reset()

    def reader_meta(self, name=None):
        return self._cpu.reader_meta() if name is None else self._cpu.reader_meta(name)

    def run(self, cuda_stream=None):
        if cuda_stream is not None and not self._dynamic:
            # nvidia/dali/pipeline.py, _require_exec_dynamic
            raise RuntimeError("Asynchronous outputs require legacy execution model, which "
                               "was explicitly disabled in this pipeline.")
        outputs = self._cpu.run()
        host = [np.ascontiguousarray(o.as_array()) for o in outputs]
        layouts = [o.layout() or "" for o in outputs]
        with fc.Device(self._device):
            if self._outputs is None:
                self._outputs = [fc.empty((self.max_batch_size,) + h.shape[1:], h.dtype)
                                 for h in host]
            views = []
            for buffer, h in zip(self._outputs, host):
                if buffer.shape[1:] != h.shape[1:] or buffer.dtype != h.dtype:
                    raise RuntimeError("emulation: the source's sample shape changed")
                view = buffer[: len(h)]
                view.set(h, stream=self._stream)      # overwrites the previous outputs
                views.append(view)
            self._stream.synchronize()                # DALI's own work has run ahead
            if cuda_stream is not None:
                event = fc.Event()
                event.record(self._stream)
                cuda_stream.wait_event(event)
        self.runs += 1
        return tuple(TensorListGPU(v, layout, order=self._stream)
                     for v, layout in zip(views, layouts))

    def __repr__(self):
        return f"<emulated GPU source pipeline on device {self._device}>"


class _Copied:
    __slots__ = ("array", "event")

    def __init__(self, array, event):
        self.array, self.event = array, event


class ExternalSourceReader:
    """DALI feeding and reading ``external_source(device="gpu")`` batches (see
    the module docstring). ``no_copy`` defaults to ``cuda_stream is None``."""

    def __init__(self, *, read_after: int = 0, device_id: int = 0, cuda_stream=None,
                 no_copy: bool | None = None):
        self.read_after = int(read_after)
        self.cuda_stream = cuda_stream
        self.no_copy = (cuda_stream is None) if no_copy is None else bool(no_copy)
        self.device_id = device_id
        with fc.Device(device_id):
            self._stream = fc.Stream(non_blocking=True)      # the stream DALI runs on
        self._pending: collections.deque = collections.deque()
        self.fed = 0

    def feed(self, batch) -> list[list[np.ndarray]]:
        """Feeds one callback result (in the calling thread, as DALI does);
        returns the batches whose iterations ran now (host copies)."""
        with fc.Device(self.device_id):
            self._pending.append([self._feed_one(x) for x in batch])
        self.fed += 1
        read = []
        while len(self._pending) > self.read_after:
            read.append(self._read(self._pending.popleft()))
        return read

    def drain(self) -> list[list[np.ndarray]]:
        read = [self._read(p) for p in self._pending]
        self._pending.clear()
        return read

    def _feed_one(self, data):
        stream = self.cuda_stream
        if stream is None:                            # types._get_default_stream_for_array
            stream = data.stream if isinstance(data, TensorListGPU) else \
                fc.get_current_stream(self.device_id)
        batch = data if isinstance(data, TensorListGPU) else \
            TensorListGPU(data, "", self.device_id)   # _prep_data_for_feed_input
        if self.no_copy:
            return batch                              # ShareUserData: kept as is
        # CopyUserData: SyncBefore (wait for the batch's order), the copy, an event
        if batch.order != stream:
            stream.wait_event(batch.order.record())
        with stream:
            copy = batch.array.copy()                 # DALI's own memory
        return _Copied(copy, stream.record())

    def _read(self, fed):
        with fc.Device(self.device_id):
            out = []
            for item in fed:
                if isinstance(item, _Copied):          # ForwardCurrentData: wait for the copy
                    self._stream.wait_event(item.event)
                    array = item.array
                else:                                  # set_order(stream, false): no wait
                    array = item.array
                out.append(array.get(stream=self._stream))
            return out


class _HostReader:
    """DALI reading ``external_source(device="cpu")`` batches: at once, in place."""

    def __init__(self):
        self.fed = 0

    def feed(self, batch):
        self.fed += 1
        return [[np.array(x.as_array() if hasattr(x, "as_array") else x) for x in batch]]

    def drain(self):
        return []


class ExternalSource:
    """Runs the callback given to ``fn.external_source`` as DALI does, with
    the keyword arguments it was given (``source``, ``device``, ``no_copy``,
    ``cuda_stream``); ``overrides`` replaces some of them (a consumer DALI
    could be configured as)."""

    def __init__(self, kwargs: dict, *, read_after: int = 0, device_id: int = 0,
                 **overrides):
        self.kwargs = dict(kwargs, **overrides)
        self.callback = self.kwargs["source"]
        if self.kwargs.get("device", "cpu") == "gpu":
            self.reader = ExternalSourceReader(read_after=read_after, device_id=device_id,
                                               cuda_stream=self.kwargs.get("cuda_stream"),
                                               no_copy=bool(self.kwargs.get("no_copy", False)))
        else:
            self.reader = _HostReader()

    def step(self) -> list[list[np.ndarray]]:
        """One iteration's callback and feed; the batches read now. Raises
        StopIteration at the end of an epoch."""
        return self.reader.feed(self.callback())

    def drain(self) -> list[list[np.ndarray]]:
        return self.reader.drain()


@contextlib.contextmanager
def recording_external_source():
    """Records the keyword arguments of every ``nvidia.dali.fn.external_source``
    call made inside the block (the graph is built as usual). Yields the list."""
    import nvidia.dali.fn as dali_fn
    original = dali_fn.external_source
    calls: list[dict] = []

    def external_source(*args, **kwargs):
        calls.append(dict(kwargs))
        return original(*args, **kwargs)
    dali_fn.external_source = external_source
    try:
        yield calls
    finally:
        dali_fn.external_source = original


def _patch_when_installed() -> None:
    """DALI loaded after :func:`emulation.install`: its TensorListGPU is ours now."""
    from . import _patch_dali
    _patch_dali()


_patch_when_installed()


def pending_device_work() -> int:
    """Ops queued and not yet run, on every emulated stream."""
    return sum(s.pending for s in rt.SCHEDULER.live())
