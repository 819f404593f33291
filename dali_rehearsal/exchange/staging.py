"""Moving a round's rows between processes: gather the rows this process
serves, hand their bytes to the transport, deliver the rows it receives.

GPU rows travel as device memory when the transport takes it (CUDA-aware
MPI, NCCL), otherwise staged through pinned host memory; NumPy rows as they
are. Every device operation is queued on the exchange's stream, and the host
waits for that stream before it hands any memory to the transport (MPI and
NCCL do not order themselves after our streams). Buffers are kept between
rounds: nothing is allocated per step.
"""

from __future__ import annotations

import numpy as np

from ..representatives import StoreView
from .transport import Transport

__all__ = ["RowMover", "as_bytes"]


def as_bytes(a):
    """A flat uint8 view of a C-contiguous NumPy or CuPy array."""
    return a.reshape(-1).view(np.uint8)


class RowMover:
    """The row buffers of one sampler and the transfer of a round's rows."""

    def __init__(self, view: StoreView, transport: Transport, stream, *, staged: bool):
        self.view = view
        self.backend = view.backend
        self.transport = transport
        self.stream = stream
        self.staged = staged
        self.world_size = transport.size
        self._rows: dict = {}

    def move(self, what: str, wanted, serve_counts, request_counts, k: int):
        """Serves the ``wanted`` slots and receives ``k`` rows: all fields in
        flight at once, one all-to-all each. Returns ``(rows, ready)``."""
        view, be, t = self.view, self.backend, self.transport
        spec = view.spec
        n = len(wanted)
        r = int(view.num_representatives)
        send = self._device_rows("send", r * self.world_size)
        recv = self._device_rows("recv", r)
        view.gather(wanted, send, 0, self.stream)
        transfers = []
        for i, f in enumerate(spec):
            if self.staged:
                host_send = self._host_rows("send", i, n, f)
                if n:
                    be.to_host(send[i][:n], self.stream, out=host_send)     # blocks
                transfers.append((host_send, self._host_rows("recv", i, k, f)))
            else:
                transfers.append((send[i][:n], recv[i][:k]))
        # The transport does not order itself after our stream: everything queued
        # on it (the wait for the step's event, the gathers, the previous round's
        # uploads) completes before the transport touches this memory.
        be.synchronize(self.stream)
        handles = []
        for (s, rr), f in zip(transfers, spec):
            handles += t.ialltoallv(as_bytes(s), serve_counts * f.nbytes, as_bytes(rr),
                                    request_counts * f.nbytes)
        t.wait(handles, what, transfer=True)
        ready = None
        if self.staged:
            for (_, host_recv), dev in zip(transfers, recv):
                be.from_host(dev[:k], host_recv, self.stream)
            ready = be.record_event(self.stream)
        return [x[:k] for x in recv], ready

    def _device_rows(self, key: str, n: int) -> list:
        rows = self._rows.get(key)
        if rows is None or len(rows[0]) < n:
            rows = self.view.empty_rows(max(n, 1))
            self._rows[key] = rows
        return rows

    def _host_rows(self, key: str, i: int, n: int, spec):
        full = self._rows.get((key, i))
        cap = int(self.view.num_representatives) * (self.world_size if key == "send" else 1)
        if full is None or len(full) < max(n, cap):
            full = self.backend.empty_pinned((max(n, cap, 1),) + tuple(spec.shape), spec.dtype)
            self._rows[(key, i)] = full
        return full[:n]
