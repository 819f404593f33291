"""Stand-ins for the two DALI behaviours the GPU stage meets, on the emulation.

:class:`GpuSourcePipeline` is the user's source pipeline with GPU outputs. It
wraps a real CPU DALI pipeline (reading and decoding real files) and hands
its outputs over as emulated device memory, as DALI's ``TensorListGPU`` does:
``as_tensor()`` gives an object with a version-2 ``__cuda_array_interface__``
(no ``stream``: whoever wraps it does not synchronise), ``as_cpu()`` a host
copy. Like DALI, the outputs of one ``run`` are valid only until the next:
every run overwrites the same device buffers, on the pipeline's own stream,
and that work is *done* when ``run`` returns (DALI's executor runs ahead), so
a consumer whose reads of the previous outputs are still queued reads the
new batch. ``run(cuda_stream)`` makes ``cuda_stream`` wait for the outputs;
it raises, like ``Pipeline.run`` in DALI 2.4, for a pipeline that is not on
the dynamic executor (``exec_dynamic=False``).

:class:`ExternalSourceReader` reads what an ``external_source(device="gpu",
no_copy=True)`` callback returned the way DALI does
(``InputOperator::ShareUserData``): it keeps the arrays, takes each array's
order from its CUDA array interface ``stream`` read *in the feeding thread*
(normally the legacy default stream), and reads the batch on its own
non-blocking stream ordered after that stream only. ``read_after=0`` reads
each batch at once (DALI may run the iteration as soon as the callback
returns); ``read_after=k`` reads it once ``k`` more batches have been fed
(the prefetch queue: the arrays must stay untouched until then). With
``cuda_stream=`` it reads as ``external_source(no_copy=False, cuda_stream=)``
does instead (``CopyUserData``): ordered after the work queued on that stream
when the batch was fed.
"""

from __future__ import annotations

import collections

import numpy as np

from . import fake_cupy as fc
from . import runtime as rt

__all__ = ["GpuSourcePipeline", "ExternalSourceReader"]


class TensorGPU:
    """DALI's ``TensorGPU`` (dense): a version-2 CUDA array interface."""

    def __init__(self, array: fc.ndarray, pipeline):
        self._array, self._pipeline = array, pipeline

    @property
    def __cuda_array_interface__(self):
        desc = dict(self._array.__cuda_array_interface__)
        desc["version"] = 2
        desc.pop("stream", None)
        return desc

    def as_cpu(self):
        return _HostTensor(self._pipeline._to_host(self._array))

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
    """DALI's ``TensorListGPU``: ``as_tensor()``, ``as_cpu()``; no ``as_array``."""

    def __init__(self, array: fc.ndarray, pipeline):
        self._array, self._pipeline = array, pipeline

    def as_tensor(self):
        return TensorGPU(self._array, self._pipeline)

    def as_cpu(self):
        return _HostTensor(self._pipeline._to_host(self._array))

    def __len__(self):
        return len(self._array)

    def device_id(self):
        return self._array.device.id


class GpuSourcePipeline:
    """A CPU DALI pipeline whose outputs arrive on the (emulated) GPU."""

    def __init__(self, pipeline, *, device_id: int = 0, exec_dynamic: bool = True):
        self._pipe = pipeline
        self.device_id = device_id
        self.exec_dynamic = exec_dynamic
        with fc.Device(device_id):
            self._stream = fc.Stream(non_blocking=True)
        self._outputs: list | None = None
        self.runs = 0

    # what the stage reads of a Pipeline
    @property
    def max_batch_size(self):
        return self._pipe.max_batch_size

    @property
    def num_outputs(self):
        return self._pipe.num_outputs

    def build(self):
        self._pipe.build()

    def reader_meta(self, name=None):
        return self._pipe.reader_meta() if name is None else self._pipe.reader_meta(name)

    def run(self, cuda_stream=None):
        if cuda_stream is not None and not self.exec_dynamic:
            # nvidia/dali/pipeline.py, _require_exec_dynamic
            raise RuntimeError("Asynchronous outputs require legacy execution model, which "
                               "was explicitly disabled in this pipeline.")
        host = [np.ascontiguousarray(o.as_array()) for o in self._pipe.run()]
        with fc.Device(self.device_id):
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
        return tuple(TensorListGPU(v, self) for v in views)

    def _to_host(self, array):
        with fc.Device(self.device_id):
            return array.get(stream=self._stream)


class ExternalSourceReader:
    """DALI reading external_source(no_copy=True) GPU batches (see module doc)."""

    def __init__(self, *, read_after: int = 0, device_id: int = 0, cuda_stream=None):
        self.read_after = int(read_after)
        self.cuda_stream = cuda_stream
        self.device_id = device_id
        with fc.Device(device_id):
            self._stream = fc.Stream(non_blocking=True)
        self._pending: collections.deque = collections.deque()

    def feed(self, batch) -> list[list[np.ndarray]]:
        """Takes one callback result; returns the batches read now (host copies)."""
        orders = []
        for array in batch:
            if self.cuda_stream is not None:              # the copy path
                stream = self.cuda_stream
            else:                                         # no_copy: the array's own order,
                cai = array.__cuda_array_interface__      # read in this (the feeding) thread
                stream = fc._stream_from_ptr(cai.get("stream"), self.device_id)
            event = fc.Event()
            event.record(stream)
            orders.append((array, event))
        self._pending.append(orders)
        read = []
        while len(self._pending) > self.read_after:
            read.append(self._read(self._pending.popleft()))
        return read

    def drain(self) -> list[list[np.ndarray]]:
        read = [self._read(p) for p in self._pending]
        self._pending.clear()
        return read

    def _read(self, orders):
        with fc.Device(self.device_id):
            out = []
            for array, event in orders:
                self._stream.wait_event(event)
                out.append(fc.asarray(array).get(stream=self._stream))
            return out


def pending_device_work() -> int:
    """Ops queued and not yet run, on every emulated stream."""
    return sum(s.pending for s in rt.SCHEDULER.live())
