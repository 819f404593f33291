"""The transport interface: what global sampling and collective checkpoints
need from a communication library.

A transport wraps the communicator the user passes (``comm=``: an mpi4py
communicator or a ``torch.distributed`` process group) and works on its own
private copy of it (a duplicate communicator, a new process group), so that
its messages never interleave with the training's own collectives (DDP's
all-reduce, the user's MPI calls).

It offers, written once here over three primitives of the library
(``_iallgather``, ``_isend``, ``_irecv``, plus ``test``):

- a non-blocking collective over every process of the communicator, called
  in the same order everywhere (:meth:`Transport.iallgather`), and
  non-blocking point-to-point messages with only the processes named
  (:meth:`Transport.iexchange`); both return a handle completed by polling
  :meth:`Transport.test`: the round protocol (:mod:`.rounds`) uses them
  from its progress thread;
- blocking collectives (:meth:`Transport.barrier`,
  :meth:`Transport.allgather_bytes`) for small metadata, built on the former.

Every wait is bounded by the transport's ``timeout``: when the other
processes do not answer in time, :class:`~.errors.RemoteError` is raised
instead of waiting forever. Samples travel as raw bytes (NumPy arrays, or
device arrays when :attr:`Transport.device_buffers`); nothing is pickled.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np

from .errors import RemoteError

__all__ = ["Transport", "DEFAULT_TIMEOUT", "is_torch_group", "is_mpi_comm", "check_timeout"]

#: Seconds a process waits for the others in one collective before it raises
#: :class:`RemoteError` (the same as NCCL's default in PyTorch).
DEFAULT_TIMEOUT = 600.0


def check_timeout(timeout) -> float | None:
    """Validates a ``timeout`` argument: seconds > 0, or None (no limit).

    ``float("inf")`` means no limit too (returned as None); NaN, zero and
    negative values are refused. Any finite number of seconds is accepted on
    every transport (a limit longer than a century waits as long as no limit).
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.integer,
                                                             np.floating)):
        raise TypeError(f"timeout must be None or a number of seconds > 0, got {timeout!r}")
    try:
        value = float(timeout)
    except OverflowError:       # an integer beyond any float: as good as forever
        return None
    if math.isnan(value) or not value > 0:
        raise ValueError(f"timeout must be None or a number of seconds > 0, got {timeout!r}")
    return None if math.isinf(value) else value


class Transport:
    """Collectives over a private copy of the user's communicator."""

    #: This process's rank and the number of processes.
    rank: int
    size: int
    #: Short name for logs and benchmarks: "mpi", "torch-gloo", "torch-nccl".
    name: str = "transport"
    #: Whether :meth:`iexchange` takes device (CuPy) arrays directly
    #: (CUDA-aware MPI, NCCL); otherwise GPU rows are staged through host memory.
    device_buffers: bool = False
    #: Whether collectives may be posted from a background (progress) thread.
    threaded: bool = True
    #: Seconds any wait may take (None: no limit).
    timeout: float | None = DEFAULT_TIMEOUT

    # ---------------------------------------------------- non-blocking
    def iallgather(self, send: np.ndarray, recv: np.ndarray):
        """Starts gathering every process's ``send`` (a 1-D host array, the
        same length and dtype everywhere) into the rows of ``recv`` (shape
        ``(size, len(send))``, C-contiguous). Returns a handle."""
        c = self._counts()
        peers = self.size - 1
        c["collectives"] += 1
        c["allgathers"] += 1
        c["messages_sent"] += peers
        c["bytes_sent"] += int(send.nbytes) * peers
        c["bytes_received"] += int(send.nbytes) * peers
        return self._iallgather(send, recv)

    def iexchange(self, sends: dict, recvs: dict, tag: int):
        """Starts point-to-point messages with the processes named, and no
        others: ``sends[p]`` (a flat uint8 array) goes to process ``p``,
        ``recvs[p]`` (a flat uint8 array of exactly the size ``p`` sends) is
        filled from it. Host arrays, or device arrays when
        :attr:`device_buffers`. ``tag`` tells apart the exchanges that may
        be in flight together (the round number). Returns a handle."""
        if self.rank in sends or self.rank in recvs:
            raise ValueError("internal: a process exchanges no message with itself")
        c = self._counts()
        c["exchanges"] += 1
        c["messages_sent"] += len(sends)
        c["bytes_sent"] += sum(int(b.nbytes) for b in sends.values())
        c["bytes_received"] += sum(int(b.nbytes) for b in recvs.values())
        return self._start_exchange(sends, recvs, int(tag) % self.TAGS)

    def _start_exchange(self, sends: dict, recvs: dict, tag: int) -> list:
        """Posts the receives, then the sends, one request each (subclasses
        whose library needs them started together override this)."""
        handles = []
        for p in sorted(recvs):          # receives posted first: no unexpected messages
            handles += self._irecv(recvs[p], p, tag)
        for p in sorted(sends):
            handles += self._isend(sends[p], p, tag)
        return handles

    def _iallgather(self, send, recv):
        """:meth:`iallgather` of the communication library (subclasses)."""
        raise NotImplementedError

    def _isend(self, data, peer: int, tag: int) -> list:
        """Starts sending ``data`` to ``peer`` (subclasses); returns handles."""
        raise NotImplementedError

    def _irecv(self, data, peer: int, tag: int) -> list:
        """Starts receiving into ``data`` from ``peer`` (subclasses); returns handles."""
        raise NotImplementedError

    #: Tags of :meth:`iexchange` wrap around at this value (MPI guarantees
    #: at least 32767); exchanges of one transport complete in order.
    TAGS = 32768

    # ------------------------------------------------------------ counts
    #: What :meth:`stats` counts, per process, since the transport was made.
    COUNTS = ("collectives", "allgathers", "exchanges", "messages_sent", "bytes_sent",
              "bytes_received")

    def _counts(self) -> dict:
        counts = self.__dict__.get("_stat_counts")
        if counts is None:
            counts = self._stat_counts = dict.fromkeys(self.COUNTS, 0)
        return counts

    def stats(self) -> dict:
        """Exact counts of what this process started, since the transport
        was made (a copy: a snapshot). ``collectives``: non-blocking
        collectives started (all ``allgathers``; the blocking ones are built
        on them); ``exchanges``: :meth:`iexchange` calls (point-to-point);
        ``messages_sent``: one per peer given a payload (an allgather: every
        other process; an exchange: each process it sends to); ``bytes_sent`` and
        ``bytes_received``: the payload bytes to and from other processes
        (rows a process draws from its own shard stay local and count
        nothing). The counts are logical: what the protocol asks the
        library to move, whatever the library's algorithm adds."""
        return dict(self._counts())

    def test(self, handles) -> bool:
        """True once every operation of ``handles`` (a list of handles) has
        completed; raises when one has failed."""
        raise NotImplementedError

    def agreement(self) -> dict:
        """Settings of this transport that every process must share."""
        return {}

    def open_data(self) -> None:
        """Prepares the path for sample data, once the processes have agreed
        on :meth:`agreement` (a collective call; nothing to do by default)."""

    # ---------------------------------------------------------- waiting
    #: Seconds :meth:`wait` polls without pause before it sleeps between polls.
    spin_seconds: float = 2e-4
    #: The same for a wait with ``transfer=True`` (samples moving between
    #: processes that are all there).
    transfer_spin_seconds: float = 1e-2
    #: The first pause between polls (seconds); each pause doubles, up to
    #: :attr:`short_pause` while the wait is young, up to an eighth of the time
    #: waited so far after that, and never beyond :attr:`longest_pause`.
    first_pause: float = 5e-6
    short_pause: float = 1e-4
    longest_pause: float = 1e-3

    def wait(self, handles, what: str = "a collective", *, timeout: float | None = -1.0,
             poll: bool = True, transfer: bool = False) -> None:
        """Waits for ``handles`` without holding a core for long.

        A blocking collective busy-polls for as long as it waits for slower
        processes, taking a core from decoding and training. This polls
        without pause for :attr:`spin_seconds` (a round whose processes are
        all there ends within it: non-blocking collectives of MPI progress
        only while they are tested, so a sleeping poller would delay every
        phase of the collective on every process), then sleeps between polls,
        from :attr:`first_pause` doubling up to :attr:`short_pause`, and
        longer pauses only once the wait has lasted eight times as long (a
        late process costs at most an eighth more, an idle wait a poll a
        millisecond: :attr:`longest_pause`). Raises
        :class:`RemoteError` when the collectives fail, or are not complete
        after ``timeout`` seconds (default: the transport's).

        ``transfer``: the processes are known to be there (the status of the
        round has been exchanged) and the collectives move samples. MPI moves
        a large message a piece per poll (polled without pause, a megabyte
        between two processes takes a fraction of a millisecond; with
        millisecond pauses, tens of milliseconds), so such a wait polls
        without pause for
        :attr:`transfer_spin_seconds`, then with pauses of at most
        :attr:`short_pause` however long it takes.
        """
        limit = self.timeout if timeout == -1.0 else timeout
        start = time.monotonic()
        began = time.perf_counter()
        spin_end = began + (self.transfer_spin_seconds if transfer else self.spin_seconds)
        pause = self.first_pause
        while True:
            try:
                if self.test(handles):
                    return
            except RemoteError:
                raise
            except Exception as e:   # the library reports a broken connection, a dead peer
                if (limit is not None and "time" in str(e).lower()
                        and time.monotonic() - start >= limit - 1.0):
                    # the library's own limit (gloo's group timeout is the transport's)
                    # fired with this one: one wording for one cause
                    raise RemoteError(
                        f"rank {self.rank}: no answer from the other processes within "
                        f"{limit:g} s while waiting for {what}: a process was killed, hangs, "
                        "or is far slower than this one (RehearsalBuffer(timeout=...) sets "
                        f"this limit; {self.name}: {type(e).__name__}: {e})",
                        broken=True) from e
                raise RemoteError(f"rank {self.rank}: the {self.name} transport failed while "
                                  f"waiting for {what}: {type(e).__name__}: {e}",
                                  broken=True) from e
            now = time.perf_counter()
            if now < spin_end:
                time.sleep(0)            # lets another thread take the GIL
                continue
            if limit is not None and time.monotonic() - start > limit:
                raise RemoteError(
                    f"rank {self.rank}: no answer from the other processes within {limit:g} s "
                    f"while waiting for {what}: a process was killed, hangs, or is far slower "
                    "than this one (RehearsalBuffer(timeout=...) sets this limit)", broken=True)
            time.sleep(pause)
            cap = self.short_pause if transfer else max(self.short_pause, (now - began) / 8)
            pause = min(pause * 2, cap, self.longest_pause)

    # ---------------------------------------------------------- blocking
    def barrier(self) -> None:
        """Returns once every process has called it (bounded by the timeout)."""
        token = np.zeros(1, dtype=np.int64)
        table = np.empty((self.size, 1), dtype=np.int64)
        self.wait(self.iallgather(token, table), "a barrier")

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Every process's ``data``, in rank order (small metadata only)."""
        mine = np.frombuffer(bytes(data), dtype=np.uint8)
        lengths = np.empty((self.size, 1), dtype=np.int64)
        self.wait(self.iallgather(np.array([len(mine)], dtype=np.int64), lengths),
                  "the lengths of an allgather")
        width = max(int(lengths.max()), 1)
        padded = np.zeros(width, dtype=np.uint8)
        padded[:len(mine)] = mine
        rows = np.empty((self.size, width), dtype=np.uint8)
        self.wait(self.iallgather(padded, rows), "an allgather")
        return [rows[p, :int(lengths[p, 0])].tobytes() for p in range(self.size)]

    def close(self, *, broken: bool = False) -> None:
        """Frees the private communicator; idempotent. ``broken``: a
        collective may still be pending (after a timeout), free nothing that
        could wait for it."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def is_mpi_comm(comm) -> bool:
    return hasattr(comm, "Get_rank") and hasattr(comm, "Get_size") and hasattr(comm, "Idup")


def is_torch_group(comm) -> bool:
    """True for a ``torch.distributed`` process group (``dist.group.WORLD``...)."""
    if "torch.distributed" not in sys.modules:
        return False
    import torch.distributed as dist
    return isinstance(comm, dist.ProcessGroup)
