"""Global sampling across processes with mpi4py.

Each process keeps its own shard of the buffer. In every step, each process's
representatives are drawn uniformly without replacement from the union of all
shards, whatever their fill levels, and the samples (every field: image,
label, extras) are fetched from their owners.

Design: a progress thread and non-blocking collectives on a private
communicator, awaited by polling with short sleeps so that waiting for slower
processes does not take a core from decoding and training.
A round serves one step of every process:

1. ``Allgather`` of (shard size, active, error, sample bytes) of every process.
2. Each process draws ``min(r, total)`` global indices uniformly without
   replacement from ``[0, total)`` and maps them to ``(owner, slot)``. The
   draws come from a generator seeded by (shared seed, round, process), so
   every owner computes what every process asks of it: no request messages.
3. Each owner gathers the requested rows of every field into a send buffer
   (the gather kernel on the GPU), and one ``Alltoallv`` per field, all in
   flight together, moves the bytes: device buffers directly when the MPI
   library is CUDA-aware, through pinned host memory otherwise; NumPy buffers
   as they are. Nothing is pickled.

The buffer opens the round for step ``t + 1`` right after inserting step
``t``'s fresh samples, and waits for it only when step ``t + 1`` is built:
the exchange runs while step ``t`` trains and step ``t + 1`` decodes, and a
process's inserts never wait on other processes. Because a round is opened
after the insert of the previous step and awaited before the insert of the
next one, an owner always serves a consistent snapshot, with no lock.

Lockstep: every process takes part in every round. A process whose epoch has
ended says so in step 1 and every process ends its epoch at that step (the
samples a longer shard has left open its next epoch: nothing is lost). A
process whose step fails says so in the next round, and every process raises
instead of waiting for it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import threading
import time

import numpy as np

from ..sampling import Representatives

__all__ = ["GlobalSampler", "cuda_aware_mpi", "RemoteError"]

log = logging.getLogger("dali_rehearsal")

_ENV_CUDA_AWARE = "DALI_REHEARSAL_CUDA_AWARE"


class RemoteError(RuntimeError):
    """Another process's step failed; raised on every process."""


def cuda_aware_mpi() -> bool:
    """Whether the MPI library mpi4py uses accepts CUDA device buffers.

    ``DALI_REHEARSAL_CUDA_AWARE=1`` or ``0`` overrides the detection, which
    asks the library itself (Open MPI's ``MPIX_Query_cuda_support``, MPICH's
    ``MPIX_GPU_query_support``) and answers False when it cannot tell.
    """
    env = os.environ.get(_ENV_CUDA_AWARE)
    if env is not None:
        return env.strip().lower() in ("1", "true", "yes", "on")
    try:
        from mpi4py import MPI
        lib = ctypes.CDLL(MPI.__file__)
    except (ImportError, OSError):
        return False
    query = getattr(lib, "MPIX_Query_cuda_support", None)      # Open MPI
    if query is not None:
        query.restype = ctypes.c_int
        return bool(query())
    query = getattr(lib, "MPIX_GPU_query_support", None)       # MPICH >= 4
    if query is not None:
        supported = ctypes.c_int(0)
        if query(ctypes.c_int(0), ctypes.byref(supported)) == 0:   # MPIX_GPU_SUPPORT_CUDA
            return bool(supported.value)
    return False


class _Round:
    """One round: what this process says, and what comes back."""

    def __init__(self, size: int, active: bool, error: bool, event=None):
        self.number = -1            # set when submitted: the same on every process
        self.size = size
        self.active = active
        self.error = error
        self.event = event          # CUDA event: the previous step's work is enqueued before it
        self.done = threading.Event()
        self.result: Representatives | None = None
        self.exception: BaseException | None = None


class GlobalSampler:
    """Uniform sampling from the union of every process's shard (see module doc)."""

    is_global = True

    def __init__(self, buffer, comm, rng: np.random.Generator, *, seed: int | None = None,
                 cuda_aware: bool | None = None):
        from mpi4py import MPI
        self._MPI = MPI
        self._buffer = buffer
        self.rng = rng              # this process's own stream (buffer.sample)
        self._comm = comm.Dup()
        self.rank = self._comm.Get_rank()
        self.world_size = self._comm.Get_size()
        # The draws of every round derive from one seed shared by all processes.
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % 2**63) if self.rank == 0 else None
            seed = self._comm.bcast(seed, root=0)
        self._seed = int(seed)
        self._next_round = 0        # number of the next round to open
        backend = buffer.backend
        self.staged = backend.is_gpu and not (cuda_aware_mpi() if cuda_aware is None
                                              else bool(cuda_aware))
        self._pending: _Round | None = None
        self._failed = False        # an error round has been seen or sent
        self._closed = False
        self._threaded = MPI.Query_thread() == MPI.THREAD_MULTIPLE
        self._stream = backend.new_stream()
        self._recv: dict[tuple, object] = {}
        self._queue: queue.Queue = queue.Queue()
        self._thread = None
        if self._threaded:
            self._thread = threading.Thread(target=self._serve_forever, daemon=True,
                                            name=f"dali-rehearsal-exchange-{self.rank}")
            self._thread.start()
        else:
            log.warning("MPI is not initialised with MPI_THREAD_MULTIPLE: the global exchange "
                        "runs synchronously, not overlapped with training")
        if self.rank == 0:
            log.info("global sampling over %d processes (%s transfers, %s)", self.world_size,
                     "staged host" if self.staged else
                     ("CUDA-aware" if backend.is_gpu else "host"),
                     "progress thread" if self._threaded else "synchronous")

    # ------------------------------------------------------------ protocol
    @property
    def started(self) -> bool:
        return self._pending is not None

    def start(self, *, active: bool = True, event=None) -> None:
        """Opens the round for this process's next step. ``event`` marks the
        end of the work that wrote into the store: the round's gathers wait
        for it."""
        if self._closed:
            raise RuntimeError("the buffer has been closed")
        if self._pending is not None:
            raise RuntimeError("internal: a round is already open")
        self._pending = self._submit(_Round(self._buffer.size, active, False, event))

    def finish(self) -> Representatives | None:
        """Waits for the open round; None when some process ended its epoch."""
        rnd, self._pending = self._pending, None
        if rnd is None:
            raise RuntimeError("finish() called before start()")
        self._wait(rnd)
        if rnd.exception is not None:
            if isinstance(rnd.exception, RemoteError):
                self._failed = True
            raise rnd.exception
        return rnd.result

    def abort(self) -> None:
        """This process's step failed: tell every other process in the next round."""
        if self._failed or self._closed:
            return
        self._failed = True
        if self._pending is not None:        # others take part in the open round: finish it
            self._wait(self._pending)
            self._pending = None
        self._submit(_Round(self._buffer.size, False, True))   # others wait on it: do not

    def close(self) -> None:
        """Finishes the open round (every process opened it) and stops the thread."""
        if self._closed:
            return
        if self._pending is not None:
            self._wait(self._pending)
            self._pending = None
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        self._comm.Free()

    @property
    def resume_round(self) -> int:
        """The round the next step uses: the open one, else the next to open."""
        return self._pending.number if self._pending is not None else self._next_round

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "seed": self._seed,
                "round": self.resume_round}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self._seed = int(state["seed"])
        self._next_round = int(state["round"])

    # ------------------------------------------------------------- threads

    def _submit(self, rnd: _Round) -> _Round:
        rnd.number, self._next_round = self._next_round, self._next_round + 1
        if self._threaded:
            self._queue.put(rnd)
        else:
            self._run(rnd)
        return rnd

    def _wait(self, rnd: _Round) -> None:
        rnd.done.wait()

    def _serve_forever(self) -> None:
        self._buffer.backend.use_device()
        while True:
            rnd = self._queue.get()
            if rnd is None:
                return
            self._run(rnd)

    def _run(self, rnd: _Round) -> None:
        try:
            if self._stream is not None:
                with self._stream:
                    if rnd.event is not None:
                        self._stream.wait_event(rnd.event)
                    rnd.result = self._round(rnd)
            else:
                rnd.result = self._round(rnd)
        except BaseException as e:  # handed to the waiting step
            rnd.exception = e
        finally:
            rnd.done.set()

    # --------------------------------------------------------------- round
    def _round(self, rnd: _Round) -> Representatives | None:
        comm, MPI, buffer = self._comm, self._MPI, self._buffer
        spec = buffer.spec
        row_bytes = -1 if spec is None else sum(f.nbytes for f in spec)
        mine = np.array([rnd.size, int(rnd.active), int(rnd.error), row_bytes], dtype=np.int64)
        table = np.empty((self.world_size, 4), dtype=np.int64)
        self._complete(comm.Iallgather(mine, table))
        failed = np.flatnonzero(table[:, 2])
        if failed.size:
            raise RemoteError(f"the step failed on rank(s) {failed.tolist()}; stopping on "
                              f"rank {self.rank} too")
        if not table[:, 1].all():
            return None
        sizes = table[:, 0]
        layouts = set(table[sizes > 0, 3].tolist())
        if len(layouts) > 1 or (layouts and spec is not None and layouts != {row_bytes}):
            raise RuntimeError(f"processes store samples of different layouts "
                               f"(bytes per sample: {table[:, 3].tolist()})")
        total = int(sizes.sum())
        k = min(buffer.num_representatives, total)
        round_no = rnd.number
        if k and spec is None:
            raise RuntimeError("internal: representatives requested before the first batch")
        if k == 0:
            return Representatives(0, rows=None, origin=np.empty((0, 2), np.int64))
        # Every process's draws follow from the shared seed and the round
        # number, so each owner knows what to serve without being asked.
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        wanted, serve_counts = [], np.zeros(self.world_size, dtype=np.int64)
        for p in range(self.world_size):
            picks = self._draw(round_no, p, total, k)
            owners = np.searchsorted(starts, picks, side="right") - 1
            if p == self.rank:
                slots = (picks - starts[owners]).astype(np.int64)
                origin = np.stack([owners.astype(np.int64), slots], axis=1)
                request_counts = np.bincount(owners, minlength=self.world_size).astype(np.int64)
            served = picks[owners == self.rank] - starts[self.rank]
            wanted.append(served)
            serve_counts[p] = len(served)
        wanted = np.concatenate(wanted).astype(np.int64)
        rows = self._move_rows(wanted, serve_counts, request_counts, k)
        return Representatives(k, rows=rows, origin=origin)

    def _draw(self, round_no: int, rank: int, total: int, k: int) -> np.ndarray:
        """Rank ``rank``'s draws in round ``round_no``: ``k`` distinct global
        indices, uniform over ``[0, total)``, in increasing order (grouped by owner)."""
        rng = np.random.default_rng([self._seed, round_no, rank])
        return np.sort(rng.choice(total, size=k, replace=False))

    def _complete(self, *requests) -> None:
        """Waits for non-blocking collectives without spinning on a core.

        A blocking MPI call busy-polls while it waits for the other processes,
        taking a core from decoding and training. In the progress thread,
        polling with short sleeps costs at most a millisecond of latency. The
        synchronous fallback (no MPI_THREAD_MULTIPLE) waits plainly.
        """
        requests = list(requests)
        if not self._threaded:
            self._MPI.Request.Waitall(requests)
            return
        pause = 2e-5
        while not self._MPI.Request.Testall(requests):
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)

    def _move_rows(self, wanted, serve_counts, request_counts, k):
        """Serves the ``wanted`` slots and receives ``k`` rows: all fields in
        flight at once, one ``Alltoallv`` each."""
        buffer, MPI = self._buffer, self._MPI
        be = buffer.backend
        outgoing_rows = buffer.store.empty_rows(len(wanted))
        buffer.store.gather(wanted, outgoing_rows, 0, self._stream)
        received, transfers = [], []
        for i, (outgoing, spec) in enumerate(zip(outgoing_rows, buffer.spec)):
            incoming = self._recv_buffer(i, k, spec)
            send, recv = outgoing, incoming
            if self.staged:
                send = be.xp.asnumpy(outgoing, stream=self._stream, blocking=False,
                                     out=self._pinned(("send", i), outgoing.shape, spec.dtype))
                recv = self._pinned(("recv", i), incoming.shape, spec.dtype)
            received.append(incoming)
            transfers.append((send, recv, spec.nbytes))
        if be.is_gpu:
            self._stream.synchronize()          # gathered (and staged) rows are ready
        requests = []
        for send, recv, nbytes in transfers:
            sc, rc = serve_counts * nbytes, request_counts * nbytes
            requests.append(self._comm.Ialltoallv([_bytes(send), (sc, _displs(sc)), MPI.BYTE],
                                                  [_bytes(recv), (rc, _displs(rc)), MPI.BYTE]))
        self._complete(*requests)
        if self.staged:
            for incoming, (_, recv, _) in zip(received, transfers):
                incoming.set(recv, stream=self._stream)
        if be.is_gpu:
            self._stream.synchronize()
        return received

    def _recv_buffer(self, i, k, spec):
        key = ("dev", i)
        buf = self._recv.get(key)
        if buf is None or len(buf) < k:
            cap = max(k, self._buffer.num_representatives)
            buf = self._buffer.backend.empty((cap,) + spec.shape, spec.dtype)
            self._recv[key] = buf
        return buf[:k]

    def _pinned(self, key, shape, dtype):
        import cupyx
        n = int(np.prod(shape, dtype=np.int64))
        buf = self._recv.get(key)
        if buf is None or buf.size < n or buf.dtype != dtype:
            buf = cupyx.empty_pinned(max(n, 1), dtype=dtype)
            self._recv[key] = buf
        return buf[:n].reshape(shape)


def _displs(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def _bytes(a):
    """A flat uint8 view of a C-contiguous NumPy or CuPy array."""
    return a.reshape(-1).view(np.uint8)
