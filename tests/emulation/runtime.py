"""The part of CUDA's execution model the library relies on, on the CPU.

- **Device memory** is host memory (NumPy buffers) at real addresses, so that
  pointers in kernel arguments, descriptor tables and the CUDA array
  interface mean what they mean on a GPU. Every access by emulated device
  work is bounds-checked against the live allocations (an out-of-range index
  is an illegal-address error, as under compute-sanitizer). New allocations
  are filled with the byte ``0xCD``, so reading rows nobody wrote shows.
- **Streams** queue device work; nothing runs when it is queued. Work runs
  only when something forces it: the host waiting on a stream or an event,
  a blocking copy to the host, or work that depends on it being forced. It
  then runs in stream order, after what it waits for (events, and the
  legacy default stream's implicit ordering). Missing orderings therefore
  show deterministically as stale or never-written rows.
- **The legacy default stream** (pointer 0; ``1`` in the CUDA array
  interface) waits for all earlier work of the *blocking* streams of its
  device, and they wait for it; streams created with ``non_blocking=True``
  are not ordered with it at all.
- **Events** mark a position in a stream; ``synchronize`` runs the stream up
  to it, ``Stream.wait_event`` makes later work on another stream depend on
  it.
- Memory the program drops is released only once no queued work is left
  (CuPy's pool reuses memory in stream order; memory is never reused while
  work that may touch it is queued).

Limits: no memory reuse (so no use-after-free across streams is detected),
no partial execution of a kernel (rows are stale or complete), one process.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import sys
import threading

import numpy as np

POISON = 0xCD
ALIGN = 256

LOCK = threading.RLock()


class CUDARuntimeError(RuntimeError):
    """Raised like cupy_backends.cuda.api.runtime.CUDARuntimeError."""


# ------------------------------------------------------------------- memory

class Allocation:
    """One block of emulated device (or pinned host) memory."""

    __slots__ = ("raw", "buffer", "ptr", "nbytes", "device_id", "pinned")

    #: allocations made so far (device and pinned), for tests of per-step allocations
    count = 0

    def __init__(self, nbytes: int, device_id: int | None, *, pinned: bool = False):
        Allocation.count += 1
        nbytes = max(int(nbytes), 1)
        self.raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
        start = (-self.raw.ctypes.data) % ALIGN
        self.buffer = self.raw[start:start + nbytes]
        self.buffer.fill(POISON)
        self.ptr = int(self.buffer.ctypes.data)
        self.nbytes = nbytes
        self.device_id = device_id
        self.pinned = pinned
        MEMORY.register(self)

    def in_use(self) -> bool:
        # Every array over this block is a NumPy view whose base is ``raw``:
        # beyond our own two references (``raw`` and ``buffer.base``) and the
        # call's, any reference is an array still in use.
        return sys.getrefcount(self.raw) > 3


class Memory:
    """Live allocations by address.

    A block is forgotten (and its memory returned to Python) only when no
    array over it is left *and* no device work is queued, as CuPy's pool
    reuses memory in stream order. Work that keeps a bare pointer to a
    forgotten block (a stale descriptor table) fails with an illegal address.
    """

    def __init__(self):
        self._starts: list[int] = []
        self._blocks: dict[int, Allocation] = {}
        self._lock = threading.Lock()
        self._kept = 0

    def register(self, block: Allocation) -> None:
        with self._lock:
            bisect.insort(self._starts, block.ptr)
            self._blocks[block.ptr] = block

    def collect(self, force: bool = False) -> None:
        """Forgets unused blocks (called when no work is queued)."""
        with self._lock:
            if not force and len(self._blocks) < 2 * self._kept + 64:
                return
            dead = [ptr for ptr, block in self._blocks.items() if not block.in_use()]
            for ptr in dead:
                del self._blocks[ptr]
            if dead:
                self._starts = sorted(self._blocks)
            self._kept = len(self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)

    def find(self, ptr: int) -> Allocation | None:
        with self._lock:
            i = bisect.bisect_right(self._starts, ptr) - 1
            if i < 0:
                return None
            block = self._blocks[self._starts[i]]
        return block if ptr < block.ptr + block.nbytes else None

    def bytes_at(self, ptr: int, nbytes: int, *, device_id: int | None = None,
                 what: str = "access") -> np.ndarray:
        """A uint8 view of ``nbytes`` of emulated memory at ``ptr`` (checked)."""
        ptr, nbytes = int(ptr), int(nbytes)
        if nbytes == 0:
            return np.empty(0, dtype=np.uint8)
        block = self.find(ptr)
        if block is None or ptr + nbytes > block.ptr + block.nbytes:
            raise CUDARuntimeError(
                f"cudaErrorIllegalAddress: {what} of {nbytes} bytes at {ptr:#x} is outside "
                "every live allocation")
        if device_id is not None and block.device_id not in (None, device_id):
            raise CUDARuntimeError(
                f"cudaErrorIllegalAddress: {what} on device {device_id} of memory allocated "
                f"on device {block.device_id}")
        offset = ptr - block.ptr
        return block.buffer[offset:offset + nbytes]

    def is_pinned(self, array: np.ndarray) -> bool:
        if not isinstance(array, np.ndarray) or array.size == 0:
            return False
        block = self.find(array.ctypes.data)
        return block is not None and block.pinned


MEMORY = Memory()


# ------------------------------------------------------------- the scheduler

class Op:
    __slots__ = ("fn", "deps", "label")

    def __init__(self, fn, deps, label):
        self.fn, self.deps, self.label = fn, deps, label


_stream_ptrs = itertools.count(0x5000, 0x10)


class StreamState:
    """The queue of one emulated stream."""

    def __init__(self, device_id: int, *, non_blocking: bool, legacy: bool = False):
        self.device_id = device_id
        self.non_blocking = non_blocking
        self.legacy = legacy
        self.ptr = 0 if legacy else next(_stream_ptrs)
        self.queue: collections.deque[Op] = collections.deque()
        self.submitted = 0        # ops ever queued
        self.executed = 0         # ops run
        self.captured: list | None = None   # ops recorded by a graph capture
        SCHEDULER.add(self)

    def enqueue(self, fn, label: str = "op", deps=()) -> int:
        """Queues ``fn``; returns its position (1-based count of ops). During a
        graph capture ``fn`` is recorded instead (cross-stream waits are not
        captured by this emulation)."""
        with LOCK:
            if self.captured is not None:
                self.captured.append(fn)
                return self.submitted
            deps = list(deps)
            for other in SCHEDULER.implicit_deps(self):
                deps.append((other, other.submitted))
            self.queue.append(Op(fn, deps, label))
            self.submitted += 1
            return self.submitted

    def run_until(self, position: int) -> None:
        with LOCK:
            if self.captured is not None:
                raise CUDARuntimeError("cudaErrorStreamCaptureUnsupported: a wait on a "
                                       "stream that is being captured")
            while self.executed < position:
                op = self.queue[0]
                for stream, pos in op.deps:
                    stream.run_until(pos)
                self.queue.popleft()
                self.executed += 1
                op.fn()
            if SCHEDULER.idle():
                MEMORY.collect()

    def synchronize(self) -> None:
        self.run_until(self.submitted)

    @property
    def pending(self) -> int:
        return self.submitted - self.executed


class Scheduler:
    def __init__(self):
        self.streams: list = []
        self.legacy: dict[int, StreamState] = {}

    def add(self, stream: StreamState) -> None:
        import weakref
        with LOCK:
            self.streams = [s for s in self.streams if s() is not None]
            self.streams.append(weakref.ref(stream))

    def live(self):
        return [s for s in (r() for r in self.streams) if s is not None]

    def legacy_stream(self, device_id: int) -> StreamState:
        with LOCK:
            s = self.legacy.get(device_id)
            if s is None:
                s = self.legacy[device_id] = StreamState(device_id, non_blocking=False,
                                                         legacy=True)
            return s

    def implicit_deps(self, stream: StreamState):
        """The legacy default stream's implicit ordering with blocking streams."""
        if stream.non_blocking:
            return []
        if stream.legacy:
            return [s for s in self.live() if s is not stream and not s.non_blocking
                    and s.device_id == stream.device_id and s.pending]
        legacy = self.legacy_stream(stream.device_id)
        return [legacy] if legacy.pending else []

    def idle(self) -> bool:
        return all(s.pending == 0 for s in self.live())

    def synchronize_device(self, device_id: int) -> None:
        with LOCK:
            for s in self.live():
                if s.device_id == device_id:
                    s.synchronize()


SCHEDULER = Scheduler()


class EventState:
    """A position in a stream."""

    def __init__(self):
        self.stream: StreamState | None = None
        self.position = 0

    def record(self, stream: StreamState) -> None:
        with LOCK:
            self.stream, self.position = stream, stream.submitted

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.run_until(self.position)

    @property
    def done(self) -> bool:
        return self.stream is None or self.stream.executed >= self.position


# ------------------------------------------------------------------ threads

class ThreadState(threading.local):
    def __init__(self):
        self.device = 0
        self.current: dict[int, object] = {}    # device -> the thread's current Stream


THREAD = ThreadState()
