"""Moving a round's rows between processes: one message per peer, every
field in it.

What each process asks of each owner is known everywhere (the shared-seed
draws), so every process knows, without a request message, which of its
rows each peer wants and how many rows each owner sends it. An owner packs
the rows a peer wants, every field, into one contiguous byte block (``n``
rows x ``row_nbytes``: field 0's ``n`` rows, then field 1's, ...), gathered
straight from the store into that block (one gather per peer); the block
goes to the peer in one point-to-point message
(:meth:`~.transport.Transport.iexchange`). A process receives one block per
owner it drew from, and unpacks the blocks, in owner order, into one array
per field of ``k`` rows: the representatives. Rows a process draws from its
own shard are gathered straight into those arrays. Nobody else takes part:
a round costs each process as many messages as it has peers with rows to
exchange, at most ``r`` received, whatever the number of processes.

GPU rows travel as device memory when the transport takes it (CUDA-aware
MPI, NCCL), otherwise through pinned host memory: the packed blocks are
copied to the host in one transfer, the received blocks uploaded field by
field into the device rows. Every device operation is queued on the
exchange's stream, and the host waits for that stream before it hands any
memory to the transport (MPI and NCCL do not order themselves after our
streams): a round's gathers never read rows still being written, and its
receives never overwrite rows still being read. The device rows carry an
event (``ready``) after which they hold the samples. Buffers are kept
between rounds: nothing is allocated per step once they have grown.
"""

from __future__ import annotations

import numpy as np

from ..representatives import StoreView
from .transport import Transport

__all__ = ["RowMover", "block_fields"]


def block_fields(block, n: int, layout) -> list:
    """The per-field arrays of a block of ``n`` packed rows (``block``: flat
    uint8, NumPy or CuPy, ``n`` rows of every field); ``layout``: ``(shape,
    dtype, bytes per row)`` of each field. Field ``f``'s rows are
    consecutive, after those of the fields before it. Views, no copy."""
    out, pos = [], 0
    for shape, dtype, nbytes in layout:
        size = n * nbytes
        out.append(block[pos:pos + size].view(dtype).reshape((n,) + shape))
        pos += size
    return out


class RowMover:
    """The row buffers of one sampler, and the transfer of a round's rows."""

    def __init__(self, view: StoreView, transport: Transport, stream, *, staged: bool):
        self.view = view
        self.backend = view.backend
        self.transport = transport
        self.stream = stream
        self.staged = staged
        self.rank = transport.rank
        self._flat: dict = {}
        self._rows = None
        self._spec = self._layout = None

    @property
    def row_nbytes(self) -> int:
        """Bytes of one row, every field."""
        return self._fields()[1]

    def _fields(self):
        """``(shape, dtype, bytes per row)`` of each field, and a row's bytes."""
        spec = self.view.spec
        if spec is not self._spec:
            self._spec = spec
            self._layout = [(tuple(f.shape), np.dtype(f.dtype), int(f.nbytes)) for f in spec]
        return self._layout, sum(nbytes for _, _, nbytes in self._layout)

    def _flat_buffer(self, key: str, nbytes: int, *, pinned: bool = False):
        """A flat uint8 buffer of at least ``nbytes`` kept between rounds."""
        buf = self._flat.get(key)
        if buf is None or len(buf) < nbytes:
            size = max(nbytes, 1)
            buf = (self.backend.empty_pinned((size,), np.uint8) if pinned
                   else self.backend.empty((size,), np.uint8))
            self._flat[key] = buf
        return buf

    def _out_rows(self, k: int) -> list:
        r = max(int(self.view.num_representatives), k)
        if self._rows is None or len(self._rows[0]) < r:
            self._rows = self.view.empty_rows(r)
        return self._rows

    def move(self, what: str, tag: int, serve: list, request: np.ndarray, own):
        """Sends each peer its rows and receives this process's.

        ``serve``: ``(peer, slots)`` for every other process that drew rows of
        this shard, in rank order; ``request[q]``: the rows drawn from process
        ``q`` (this one included); ``own``: the slots drawn from this shard.
        Returns ``(rows, ready)``: one array per field holding the
        ``request.sum()`` rows in owner order, and the event after which
        they hold them (None: they already do)."""
        view, be, t, s = self.view, self.backend, self.transport, self.stream
        layout, rb = self._fields()
        k = int(request.sum())
        rows = self._out_rows(k)
        starts = np.concatenate([[0], np.cumsum(request)[:-1]]).astype(np.int64)
        # What this process sends: one block per peer, gathered straight into it.
        served = sum(len(slots) for _, slots in serve)
        send = self._flat_buffer("send", served * rb)
        blocks, pos = [], 0
        for peer, slots in serve:
            n = len(slots)
            view.gather(slots, block_fields(send[pos:pos + n * rb], n, layout), 0, s)
            blocks.append((peer, pos, n * rb))
            pos += n * rb
        if len(own):
            view.gather(own, rows, int(starts[self.rank]), s)
        peers = [(q, int(starts[q]), int(request[q])) for q in range(len(request))
                 if q != self.rank and request[q]]
        received = sum(m for _, _, m in peers) * rb
        recv = self._flat_buffer("recv", received, pinned=self.staged)
        if self.staged:
            host_send = self._flat_buffer("send_host", served * rb, pinned=True)
            if served:
                be.to_host(send[:served * rb], s, out=host_send[:served * rb])     # blocks
            send = host_send
        # The transport does not order itself after our stream: everything queued
        # on it (the wait for the step's event, the gathers, the previous round's
        # uploads and unpacking) completes before the transport touches this memory.
        be.synchronize(s)
        sends = {peer: send[a:a + size] for peer, a, size in blocks}
        recvs, pos = {}, 0
        for q, _, m in peers:
            recvs[q] = recv[pos:pos + m * rb]
            pos += m * rb
        if sends or recvs:
            t.wait(t.iexchange(sends, recvs, tag), what, transfer=True)
        # Unpack the owners' blocks into the rows, in owner order.
        for q, start, m in peers:
            fields = block_fields(recvs[q], m, layout)
            if self.staged:
                for dev, host in zip(rows, fields):
                    be.from_host(dev[start:start + m], host, s)
            else:
                view.copy(fields, rows, start, s)
        ready = be.record_event(s)
        return [x[:k] for x in rows], ready
