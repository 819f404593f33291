"""Feedback for other processes' samples, carried by the rounds.

With global sampling a representative may come from another process; the
value the training loop writes back for it (:meth:`RehearsalBuffer.update`)
must reach that owner. No collective is added for it: a process with
feedback waiting raises a flag in its status row (the round's first message,
sent anyway), and in that round it sends one message to each process it
draws from -- processes that already send it rows in this round, and that
know from the status table to expect the message. The owner applies what it
receives at its next step, under the buffer's lock, where the ticket's
generation is checked as for its own tickets.

A message has a fixed size, known to both sides: a count, then up to
``num_representatives`` rows of ``(rank, slot, generation, field mask)``
(int64), then the same number of rows of each feedback field. Feedback
beyond that, or for a process not drawn from in this round, waits for a
later round that draws from it. When the buffer closes, feedback still
waiting to be sent is dropped and counted (:attr:`Mail.stats`
``undelivered``), and so is feedback that arrived but was not taken yet
(``dropped``).
"""

from __future__ import annotations

import threading

import numpy as np

from .transport import Transport

__all__ = ["Mail", "ROW_WIDTH"]

#: int64 values per feedback row: rank, slot, generation, field mask.
ROW_WIDTH = 4


class Mail:
    """The out- and inboxes of one process's feedback (thread-safe)."""

    def __init__(self, specs, cap: int):
        self.specs = tuple(specs)           # the feedback fields' layouts
        self.cap = max(int(cap), 1)         # rows per message
        self._lock = threading.Lock()
        self._outbox: dict[int, list] = {}
        self._inbox: list = []
        self.stats = {"messages": 0, "received": 0, "undelivered": 0, "dropped": 0}

    @property
    def waiting(self) -> bool:
        """Whether feedback waits to be sent (the status flag)."""
        with self._lock:
            return any(self._outbox.values())

    @property
    def nbytes(self) -> int:
        """Bytes of one message."""
        return 8 + self.cap * (8 * ROW_WIDTH + sum(s.nbytes for s in self.specs))

    def post(self, owner: int, rows: np.ndarray, values: list) -> None:
        with self._lock:
            self._outbox.setdefault(int(owner), []).append((rows, values))

    def take(self) -> list:
        """What other processes sent, as ``(rows, values)`` pairs."""
        with self._lock:
            out, self._inbox = self._inbox, []
        return out

    def drop(self) -> None:
        """Forgets what waits to be sent and what arrived but was not taken
        (the buffer closes), counting both."""
        with self._lock:
            self.stats["undelivered"] += sum(len(r) for q in self._outbox.values() for r, _ in q)
            self.stats["dropped"] += sum(len(r) for r, _ in self._inbox)
            self._outbox.clear()
            self._inbox.clear()

    # -------------------------------------------------------------- messages
    def _regions(self, buf: np.ndarray):
        """Views of a message: count, rows, one array per field."""
        cap, at = self.cap, 8
        count = buf[:8].view(np.int64)
        rows = buf[at:at + cap * 8 * ROW_WIDTH].view(np.int64).reshape(cap, ROW_WIDTH)
        at += cap * 8 * ROW_WIDTH
        fields = []
        for s in self.specs:
            fields.append(buf[at:at + cap * s.nbytes].view(s.dtype).reshape((cap,) + s.shape))
            at += cap * s.nbytes
        return count, rows, fields

    def _pack(self, owner: int) -> np.ndarray:
        buf = np.zeros(self.nbytes, np.uint8)
        count, rows, fields = self._regions(buf)
        n = 0
        with self._lock:
            queue = self._outbox.get(owner, [])
            while queue and n < self.cap:
                r, v = queue[0]
                k = min(len(r), self.cap - n)
                rows[n:n + k] = r[:k]
                for dst, src in zip(fields, v):
                    dst[n:n + k] = src[:k]
                n += k
                if k == len(r):
                    queue.pop(0)
                else:
                    queue[0] = (r[k:], [a[k:] for a in v])
        count[0] = n
        return buf

    def route(self, transport: Transport, tag: int, owners, senders, what: str) -> None:
        """One round's messages: to each of ``owners`` (the processes this
        one draws from, when its flag is up) and from each of ``senders``
        (processes drawing from this one with their flag up)."""
        sends = {int(q): self._pack(int(q)) for q in owners}
        recvs = {int(p): np.empty(self.nbytes, np.uint8) for p in senders}
        if not sends and not recvs:
            return
        transport.wait(transport.iexchange(sends, recvs, tag), what, transfer=True)
        self.stats["messages"] += len(sends)
        got = []
        for buf in recvs.values():
            count, rows, fields = self._regions(buf)
            n = int(count[0])
            if n:
                got.append((rows[:n].copy(), [f[:n].copy() for f in fields]))
        if got:
            with self._lock:
                self._inbox.extend(got)
                self.stats["received"] += sum(len(r) for r, _ in got)
