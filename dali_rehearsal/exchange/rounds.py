"""Global sampling across processes: the round protocol, over any transport.

Each process keeps its own shard of the buffer. In every step, each
process's representatives are drawn uniformly without replacement from the
union of all shards, whatever their fill levels, and the samples (every
field: image, label, extras) are fetched from their owners. The protocol is
written once against :class:`~.transport.Transport` and runs unchanged over
mpi4py and torch.distributed.

**Construction** is a collective call. The processes compare, once, what they
must agree on (``sampling``, ``num_representatives``, ``policy``,
``label_index``, the transport's data path) and take the seed of the shared
draws from rank 0. A disagreement raises :class:`~.errors.MismatchError` on
every process, with every process's value.

**A round** serves one step of every process:

1. An allgather of one status row per process: what it is doing (a step, an
   ended epoch, a failure, closing), its shard size, a hash of its settings
   and of its sample layout (per field shape and dtype), the round number, its
   step count, rank 0's seed, and whether it has a note (the reason it stops).
2. Only when a row asks for it (a mismatch, a note): an allgather of a short
   JSON note per process, from which every process builds the same error.
3. Each process draws ``min(r, total)`` global indices uniformly without
   replacement from ``[0, total)`` and maps them to ``(owner, slot)``. The
   draws come from a generator seeded by (rank 0's seed, round, process), so
   every owner computes what every process asks of it: no request messages.
4. Each owner gathers the requested rows of every field into a send buffer
   (the gather kernel on the GPU), and one all-to-all per field, all in flight
   together, moves the bytes: device buffers directly when the transport
   takes them (CUDA-aware MPI, NCCL), through pinned host memory otherwise;
   NumPy buffers as they are. Nothing is pickled.

Every decision after step 1 is a function of the status table alone, so
every process takes the same branch and the collectives always pair up.

**Overlap.** The buffer opens the round for step ``t + 1`` right after
inserting step ``t``'s fresh samples and waits for it only when step ``t + 1``
is built: the exchange runs in a progress thread while step ``t`` trains and
step ``t + 1`` decodes. Because a round is opened after the insert of the
previous step and awaited before the insert of the next one, an owner always
serves a consistent snapshot, with no lock.

**Stream order** (GPU). ``start(event=...)`` receives the event recorded
after the step's writes (its scatter into the store, and before it the copy
of the previous round's received rows into the output). The exchange stream
waits for it before gathering, and the host waits for the exchange stream
before it hands any memory to the transport (MPI and NCCL do not order
themselves after our streams): a round's gathers never read rows still being
written, and its receives never overwrite rows still being read. Staged rows
are uploaded on the exchange stream and the representatives carry an event
that the step's stream waits for before copying them.

**Other collectives.** ``save()`` and ``load()`` run over the same transport,
between two steps (:meth:`GlobalSampler.collective`): their first message is
a status row too, whose kind names the operation, so that processes that
are not in the same call find out at once and raise
:class:`~.errors.CollectiveMismatchError` saying what each was doing ("rank 1
is in a step ..., this rank (0) is in save()"), instead of decoding each
other's messages. Buffers that sample locally on several processes, and
buffers being built, send the same kind of row first.

**Lockstep and failures.** Every process takes part in every round. A
process whose epoch has ended says so and every process ends its epoch at
that step (the samples a longer shard has left open its next epoch: nothing
is lost). A process whose step fails, that closes its buffer, or that exits
with its buffer open (at interpreter exit, by any route Python runs
``atexit`` handlers on) says so in its next round; that round is the last one
on every process, and every other process raises
:class:`~.errors.RemoteError` naming it and its reason. A process that stops
answering without a word (killed, hung) makes every wait of the others end
after the timeout with :class:`RemoteError`.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import queue
import sys
import threading
import time
import weakref

import numpy as np

from ..sampling import Representatives, draw_distinct
from .collective import Channel
from .errors import CollectiveMismatchError, MismatchError, RemoteError
from .transport import DEFAULT_TIMEOUT, Transport, make_transport

__all__ = ["GlobalSampler", "handshake", "announce", "SAVE", "LOAD"]

log = logging.getLogger("dali_rehearsal")

# What a process says in a round (and in the first message of other collectives).
ACTIVE, IDLE, FAILED, CLOSED, HELLO, SAVE, LOAD = 0, 1, 2, 3, 4, 5, 6
_STOPPING = (FAILED, CLOSED)
#: The collective call each kind belongs to: processes that meet in one
#: exchange must be in the same call.
_CALL = {ACTIVE: "step", IDLE: "step", FAILED: "step", CLOSED: "step", HELLO: "build",
         SAVE: "save", LOAD: "load"}
# Columns of the status row.
_KIND, _SIZE, _SETTINGS, _LAYOUT, _ROUND, _STEPS, _SEED, _NOTE = range(8)
_COLUMNS = 8
#: Bytes of the note each process sends when a round needs notes.
NOTE_BYTES = 4096
_REASON_CHARS = 1500


def _hash(obj) -> int:
    """A stable, non-zero 63-bit hash of a JSON-able value."""
    digest = hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") & (2**63 - 1)) or 1


def describe_exception(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS] + "..."


def _seed_of(seed) -> int:
    """A 63-bit seed for the shared draws (fresh entropy for ``None``)."""
    if seed is None:
        return int(np.random.SeedSequence().entropy % 2**63)
    seed = int(seed)
    if seed < 2**63:
        return seed
    return int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0] % 2**63)


# ------------------------------------------------------------------ status
def _status(transport: Transport, row: np.ndarray, what: str) -> np.ndarray:
    table = np.empty((transport.size, _COLUMNS), dtype=np.int64)
    transport.wait(transport.iallgather(row, table), what)
    return table


def _notes(transport: Transport, payload: dict, what: str) -> list[dict]:
    """Every process's ``payload`` (a small JSON object), in rank order."""
    data = json.dumps(payload).encode()
    if len(data) > NOTE_BYTES:
        payload = dict(payload, note=(payload.get("note") or "")[:200] + "...")
        data = json.dumps(payload).encode()[:NOTE_BYTES]
    mine = np.zeros(NOTE_BYTES, dtype=np.uint8)
    mine[:len(data)] = np.frombuffer(data, dtype=np.uint8)
    rows = np.empty((transport.size, NOTE_BYTES), dtype=np.uint8)
    transport.wait(transport.iallgather(mine, rows), what)
    out = []
    for p in range(transport.size):
        raw = rows[p].tobytes().rstrip(b"\0")
        try:
            out.append(json.loads(raw))
        except ValueError:
            out.append({"note": raw.decode(errors="replace")})
    return out


def _doing(kind: int, steps: int, note: str | None) -> str:
    """What a process whose row says ``kind`` is doing, as in "rank 1 ..."."""
    after = "" if steps < 0 else f" after {steps} step{'s' if steps != 1 else ''}"
    return {ACTIVE: "is in a step (mix() or the DALI stage)" + after,
            IDLE: "is in a step (its epoch has ended)" + after,
            FAILED: (note or "failed") + after,
            CLOSED: (note or "closed its buffer") + after,
            HELLO: "is building a RehearsalBuffer",
            SAVE: "is in save()" + after,
            LOAD: "is in load()"}.get(kind, f"sent an unknown message (kind {kind})")


def _check_calls(rank: int, table: np.ndarray, notes) -> None:
    """Raises :class:`CollectiveMismatchError` (the same decision on every
    process) when the rows come from different collective calls."""
    kinds = table[:, _KIND].tolist()
    if len({_CALL.get(k, k) for k in kinds}) == 1:
        return
    mine = _CALL.get(kinds[rank], kinds[rank])
    others = [p for p in range(len(kinds)) if _CALL.get(kinds[p], kinds[p]) != mine]

    def doing(p):
        note = (notes[p].get("note") if notes else None)
        return _doing(kinds[p], int(table[p, _STEPS]), note if isinstance(note, str) else None)

    text = ", ".join(f"rank {p} {doing(p)}" for p in others)
    raise CollectiveMismatchError(
        f"mismatched collective calls: {text}, while this rank ({rank}) {doing(rank)}. Every "
        "process must make the same collective calls in the same order (build its buffers, "
        "take its steps, save(), load(), close())",
        ranks=others, reasons={p: doing(p) for p in others})


def _disagree(table: np.ndarray) -> bool:
    known = table[table[:, _LAYOUT] != 0, _LAYOUT]
    return (len(set(table[:, _SETTINGS].tolist())) > 1 or len(set(known.tolist())) > 1
            or len(set(table[:, _ROUND].tolist())) > 1)


def _layout_text(layout) -> str:
    return " + ".join(f"{tuple(shape)} {np.dtype(dtype).name}" for shape, dtype in layout)


def _mismatch_message(table: np.ndarray, notes: list[dict]) -> str:
    """One message, the same on every process, naming each setting the
    processes disagree on and every process's value."""
    ranks = range(len(notes))

    def values(pick):
        return ", ".join(f"rank {p}: {pick(p)}" for p in ranks)

    parts = []
    settings = [n.get("settings") or {} for n in notes]
    keys = sorted(set().union(*settings), key=lambda k: (k != "sampling", k))
    for key in keys:
        if key != "sampling" and not all(key in s for s in settings):
            continue                      # local sampling has fewer settings
        if len({json.dumps(s.get(key)) for s in settings}) > 1:
            parts.append(f"{key} ({values(lambda p: repr(settings[p].get(key)))})")
    layouts = {p: n.get("layout") for p, n in zip(ranks, notes) if n.get("layout")}
    if len({json.dumps(v) for v in layouts.values()}) > 1:
        counts = {p: len(v) for p, v in layouts.items()}
        label = (settings[0].get("label_index") if settings else None)
        if len(set(counts.values())) > 1:
            parts.append("the number of fields per sample ("
                         + ", ".join(f"rank {p}: {c}" for p, c in counts.items()) + ")")
        else:
            for i in range(next(iter(counts.values()))):
                fields = {p: v[i] for p, v in layouts.items()}
                if len({json.dumps(f) for f in fields.values()}) > 1:
                    name = " (the labels)" if i == label else ""
                    parts.append(f"the layout of field {i}{name} (" + ", ".join(
                        f"rank {p}: {_layout_text([f])}" for p, f in fields.items()) + ")")
    if len(set(table[:, _ROUND].tolist())) > 1:
        parts.append("the round, i.e. the steps taken since the buffers were created or "
                     "restored from a checkpoint (" + values(lambda p: int(table[p, _ROUND]))
                     + ")")
    if not parts:   # the hashes differ but the notes were cut: say what is known
        parts.append("their settings (" + values(lambda p: json.dumps(settings[p])) + ")")
    return ("global sampling: the processes disagree on " + "; ".join(parts)
            + ". Every process must build its RehearsalBuffer with the same sampling, "
            "num_representatives, policy and label_index, and feed samples of the same layout "
            "(shape and dtype of every field).")


def _stop_message(rank: int, round_no: int, table: np.ndarray, notes, stopped) -> tuple:
    reasons = {}
    for p in stopped:
        note = (notes[p].get("note") if notes else None) or (
            "failed" if table[p, _KIND] == FAILED else "closed its buffer")
        reasons[p] = note
    text = "; ".join(f"rank {p} {reasons[p]} (after {int(table[p, _STEPS])} steps)"
                     for p in stopped)
    return (f"global sampling stopped on rank {rank} in round {round_no} (after "
            f"{int(table[rank, _STEPS])} steps here): {text}"), reasons


def _settings_payload(settings: dict, layout) -> dict:
    return {"settings": settings, "layout": layout}


def exchange_status(t: Transport, row: np.ndarray, *, settings: dict, layout, note,
                    what: str, notes_what: str):
    """The first message of every collective call: the status table, and the
    notes when a row asks for them or the rows disagree. Raises on every
    process alike: :class:`CollectiveMismatchError` when the processes are in
    different calls, :class:`MismatchError` when they disagree on settings,
    layout or round. Returns ``(table, notes)``."""
    table = _status(t, row, what)
    notes = None
    mismatch = _disagree(table)
    if mismatch or table[:, _NOTE].any():
        payload = _settings_payload(settings, layout)
        payload["note"] = note
        notes = _notes(t, payload, notes_what)
    _check_calls(t.rank, table, notes)
    if mismatch:
        raise MismatchError(_mismatch_message(table, notes))
    return table, notes


def handshake(comm, settings: dict, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
    """Checks once, at construction, that every process of ``comm`` has the
    same ``settings``; used by buffers that sample locally on a multi-process
    communicator, so that a process that samples globally does not wait for
    one that never exchanges. Raises :class:`MismatchError` on every process."""
    with make_transport(comm, timeout=timeout, purpose="building a RehearsalBuffer") as t:
        row = np.zeros(_COLUMNS, dtype=np.int64)
        row[_KIND], row[_SETTINGS] = HELLO, _hash(settings)
        exchange_status(t, row, settings=settings, layout=None, note=None,
                        what="the other processes to build their buffers",
                        notes_what="the settings of the others")


def announce(t: Transport, kind: int, what: str) -> None:
    """The first message of a collective call (``kind``: :data:`SAVE` or
    :data:`LOAD`) over a transport of its own (buffers that sample locally):
    raises :class:`CollectiveMismatchError` on every process when the others
    are in another call (building a buffer, another checkpoint call)."""
    settings = {"call": _CALL[kind]}
    row = np.zeros(_COLUMNS, dtype=np.int64)
    row[_KIND], row[_SETTINGS], row[_STEPS] = kind, _hash(settings), -1    # (steps unknown)
    exchange_status(t, row, settings=settings, layout=None, note=None,
                    what=f"the other processes to join {what} (every process must call it at "
                    "the same point)",
                    notes_what=f"the notes of {what}")


# ------------------------------------------------------------------ rounds
class _Round:
    """One round: what this process says, and what comes back."""

    def __init__(self, kind: int, *, size: int = 0, event=None, note: str | None = None):
        self.kind = kind
        self.size = size
        self.event = event          # GPU event: the step's writes are queued before it
        self.note = note            # why this process stops (FAILED, CLOSED)
        self.number = -1            # set when submitted: the same on every process
        self.steps = 0
        self.done = threading.Event()
        self.result: Representatives | None = None
        self.exception: BaseException | None = None
        self.reported = False       # the caller has seen the result


_live: "weakref.WeakSet[GlobalSampler]" = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    """A process that exits with a buffer open tells the others, so that they
    raise instead of waiting for its next step."""
    exc = getattr(sys, "last_value", None)     # set by an uncaught exception
    reason = (f"exited with an uncaught exception ({describe_exception(exc)})" if exc
              is not None else "exited without closing its buffer")
    for sampler in list(_live):
        try:
            sampler.close(reason=reason, at_exit=True)
        except BaseException:      # never let cleanup hide the exit status
            pass


class GlobalSampler:
    """Uniform sampling from the union of every process's shard (see the
    module documentation).

    Args:
        buffer: the :class:`~dali_rehearsal.RehearsalBuffer` (its public
            state: ``size``, ``num_representatives``, ``policy``,
            ``label_index``, ``spec``, ``store``, ``backend``).
        comm: an mpi4py communicator or a torch.distributed process group.
        rng: this process's own random stream (``buffer.sample``).
        seed: this process's seed; the shared draws use rank 0's.
        cuda_aware: GPU storage only: pass device memory to the transport
            (True), stage it through pinned host memory (False), or decide
            from what the library supports (None).
        timeout: seconds any wait for the other processes may take before
            :class:`RemoteError` (None: no limit).
    """

    is_global = True

    def __init__(self, buffer, comm, rng: np.random.Generator, *, seed: int | None = None,
                 cuda_aware: bool | None = None, timeout: float | None = DEFAULT_TIMEOUT):
        self._buffer = buffer
        self.rng = rng
        backend = self._backend = buffer.backend
        wants_device = (None if cuda_aware is None else bool(cuda_aware)) if backend.is_gpu \
            else False
        self.transport = make_transport(comm, timeout=timeout, device_buffers=wants_device)
        self.timeout = self.transport.timeout
        self.rank, self.world_size = self.transport.rank, self.transport.size
        self._seed = _seed_of(seed)            # this process's proposal; rank 0's is used
        self._lock = threading.Lock()
        # Held by a collective call (save, load) from its first message to its
        # last: no round is submitted meanwhile. Taken before _lock.
        self._calls = threading.RLock()
        self._next_round = 0
        self._steps = 0
        self._pending: _Round | None = None
        self._last: _Round | None = None
        self._stopped: BaseException | None = None   # why the protocol ended (first cause)
        self._broken = False                  # a collective may still be pending
        self._aborted = False
        self._closed = False
        self._stream = backend.new_stream()
        self._rows: dict = {}
        self.stats = {"rounds": 0, "round_seconds": 0.0, "bytes_sent": 0, "bytes_received": 0}
        try:
            self._hello()
            self.transport.open_data()
        except BaseException:
            self.transport.close(broken=True)
            raise
        self.staged = backend.is_gpu and not self.transport.device_buffers
        self._threaded = self.transport.threaded
        self._queue: queue.Queue = queue.Queue()
        self._thread = None
        if self._threaded:
            self._thread = threading.Thread(target=self._serve_forever, daemon=True,
                                            name=f"dali-rehearsal-exchange-{self.rank}")
            self._thread.start()
        else:
            log.warning("MPI is not initialised with MPI_THREAD_MULTIPLE: the global exchange "
                        "runs synchronously, not overlapped with training")
        _live.add(self)
        if self.rank == 0:
            log.info("global sampling over %d processes (%s, %s transfers, %s, timeout %s)",
                     self.world_size, self.transport.name,
                     "staged host" if self.staged else
                     ("device" if backend.is_gpu else "host"),
                     "progress thread" if self._threaded else "synchronous",
                     "none" if self.timeout is None else f"{self.timeout:g} s")

    # ------------------------------------------------------------ settings
    def _settings(self) -> dict:
        b = self._buffer
        return {"sampling": "global", "num_representatives": int(b.num_representatives),
                "policy": b.policy.name, "label_index": int(b.label_index),
                **self.transport.agreement()}

    def _layout(self):
        spec = self._buffer.spec
        if spec is None:
            return None
        return [[list(f.shape), np.dtype(f.dtype).str] for f in spec]

    def _hello(self) -> None:
        rnd = _Round(HELLO)
        rnd.number = self._next_round
        table, _ = self._status_round(rnd, "the other processes to build their buffers")
        #: The seed of the shared draws: rank 0's.
        self.shared_seed = int(table[0, _SEED])

    # ------------------------------------------------------------ protocol
    @property
    def started(self) -> bool:
        return self._pending is not None

    def start(self, *, active: bool = True, event=None) -> None:
        """Opens the round for this process's next step. ``event`` marks the
        end of the step's writes into the store (GPU): the round's gathers
        and receives are ordered after it."""
        with self._calls, self._lock:
            if self._closed:
                raise RuntimeError("the buffer has been closed")
            if self._stopped is not None:
                raise self._stopped_error()
            if self._aborted:
                raise RemoteError(f"global sampling stopped on rank {self.rank}: a step of this "
                                  "process failed", ranks=[self.rank])
            if self._pending is not None:
                raise RuntimeError("internal: a round is already open")
            self._pending = self._submit(_Round(ACTIVE if active else IDLE,
                                                size=self._buffer.size, event=event))

    def finish(self) -> Representatives | None:
        """Waits for the open round; None when some process ended its epoch."""
        with self._lock:
            rnd, self._pending = self._pending, None
        if rnd is None:
            raise RuntimeError("finish() called before start()")
        self._wait(rnd)
        rnd.reported = True
        if rnd.exception is not None:
            raise rnd.exception
        self._steps += 1
        return rnd.result

    def settle(self) -> None:
        """Waits until the open round (if any) has read what it serves from
        the store, without consuming it: the store may then be written
        (``buffer.add``) while the round's rows wait for the next step."""
        with self._lock:
            rnd = self._pending
        if rnd is not None:
            self._wait(rnd)

    def abort(self) -> None:
        """This process's step failed (called while the exception is being
        handled): tell every other process in the next round."""
        exc = sys.exc_info()[1]
        with self._calls, self._lock:
            if self._closed or self._aborted:
                return
            self._aborted = True
            # An open round still runs: the others take part in it.
            self._pending = None
            if self._stopped is None:
                reason = describe_exception(exc)
                self._submit(_Round(FAILED, size=self._buffer.size,
                                    note=f"failed ({reason})" if reason else "failed"))

    def close(self, *, reason: str | None = None, at_exit: bool = False) -> None:
        """Ends this process's part in global sampling; idempotent.

        When the other processes are still exchanging, they raise
        :class:`RemoteError` naming this one. When an earlier round (one this
        process opened but never used) shows that another process stopped
        first, this raises that :class:`RemoteError`, unless an exception is
        already being handled (then it is logged). Every wait is bounded by
        the timeout.
        """
        exc = sys.exc_info()[1]
        with self._calls, self._lock:
            if self._closed:
                return
            self._closed = True
            pending, self._pending = self._pending, None
            if self._stopped is None and not self._aborted:
                if reason is None:
                    handling = describe_exception(exc)
                    reason = (f"closed its buffer while handling {handling}" if handling
                              else "closed its buffer")
                last = self._submit(_Round(CLOSED, size=self._buffer.size, note=reason))
            else:
                last = self._last            # e.g. the failure round of abort(): let it out
        _live.discard(self)
        try:
            if last is not None:
                self._wait(last)
        finally:
            self._shutdown()
        if at_exit:
            return
        for rnd in (pending, last):
            if rnd is None or rnd.reported or rnd.kind == FAILED:
                continue
            if isinstance(rnd.exception, (RemoteError, MismatchError)):
                rnd.reported = True
                if exc is None:
                    raise rnd.exception
                log.warning("rank %d: %s", self.rank, rnd.exception)
                break

    def _shutdown(self) -> None:
        alive = False
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10.0)
            alive = self._thread.is_alive()
        self.transport.close(broken=self._broken or alive)

    def _stopped_error(self) -> RemoteError:
        cause = self._stopped
        err = RemoteError(f"global sampling has stopped: {cause}",
                          ranks=getattr(cause, "ranks", ()), reasons=getattr(cause, "reasons",
                                                                             None))
        err.__cause__ = cause
        return err

    @contextlib.contextmanager
    def collective(self, kind: int, what: str):
        """Runs a collective call of the buffer (``kind``: :data:`SAVE` or
        :data:`LOAD`; ``what``: ``"save()"``) over this sampler's transport,
        between two steps; yields a :class:`~.collective.Channel`.

        The round already opened for the next step runs to its end first (its
        representatives wait for that step); no round is submitted until the
        call ends. The call's first message is a status row of kind ``kind``:
        processes in another call (a step, ``close()``, the other checkpoint
        call) raise :class:`CollectiveMismatchError` on every side at once.
        When the call fails where the processes may no longer be in step (a
        timeout, an interrupted exchange), global sampling stops: later steps
        raise instead of pairing with the wrong messages."""
        with self._calls:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the buffer has been closed")
                pending = self._pending
            if pending is not None:
                self._wait(pending)
            with self._lock:
                if self._stopped is not None:
                    raise self._stopped_error()
                if self._aborted:
                    raise RemoteError(f"global sampling stopped on rank {self.rank}: a step of "
                                      "this process failed", ranks=[self.rank])
            rnd = _Round(kind, size=self._buffer.size)
            rnd.number, rnd.steps = self.resume_round, self._steps
            channel = Channel(self.transport, what)
            try:
                self._status_round(rnd, f"the other processes to join {what} (every process "
                                        "must call it at the same point)")
            except BaseException as e:     # the processes are not in the same call
                self._stop(e)
                raise
            try:
                yield channel
            except BaseException as e:
                if not channel.in_step:
                    self._stop(e)
                raise
            if not channel.in_step:       # (a body that swallowed the exchange's error)
                self._stop(RemoteError(f"rank {self.rank}: {what} ended out of step with the "
                                       "other processes", broken=True))

    def _stop(self, error: BaseException) -> None:
        """Ends the protocol on this process after a failed collective call."""
        with self._lock:
            if self._stopped is None:
                self._stopped = error
            if not isinstance(error, (RemoteError, MismatchError)) or getattr(error, "broken",
                                                                              False):
                self._broken = True

    @property
    def resume_round(self) -> int:
        """The round the next step uses: the open one, else the next to open."""
        return self._pending.number if self._pending is not None else self._next_round

    def exchange_stats(self) -> dict:
        """Exact counts of this process's exchange so far (a snapshot): the
        rounds served, then the transport's counts
        (:meth:`~.transport.Transport.stats`). An open round may still be
        running: :meth:`settle` first for counts that include it."""
        return {"rounds": int(self.stats["rounds"]), **self.transport.stats()}

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "seed": self.shared_seed,
                "round": self.resume_round}

    def load_state_dict(self, state: dict) -> None:
        seed, round_no = int(state["seed"]), int(state["round"])
        if not (0 <= seed < 2**63 and 0 <= round_no < 2**63):
            raise ValueError(f"the seed and the round must be in [0, 2**63), got {seed} and "
                             f"{round_no}")
        self.rng.bit_generator.state = state["rng"]
        self._seed = self.shared_seed = seed
        self._next_round = round_no

    # ------------------------------------------------------------- threads
    def _submit(self, rnd: _Round) -> _Round:
        """Queues ``rnd`` (the lock is held)."""
        rnd.number, self._next_round = self._next_round, self._next_round + 1
        rnd.steps = self._steps
        self._last = rnd
        if self._threaded:
            self._queue.put(rnd)
        else:
            self._run(rnd)
        return rnd

    def _wait(self, rnd: _Round) -> None:
        # Every wait of the progress thread is bounded by the timeout, so the
        # round ends; only a dead thread could leave it pending.
        while not rnd.done.wait(0.5):
            if self._thread is not None and not self._thread.is_alive():
                raise RemoteError(f"rank {self.rank}: the exchange thread has stopped")

    def _serve_forever(self) -> None:
        self._backend.use_device()
        while True:
            rnd = self._queue.get()
            if rnd is None:
                return
            self._run(rnd)

    def _run(self, rnd: _Round) -> None:
        t0 = time.perf_counter()
        try:
            if self._stopped is not None:
                # An earlier round ended the protocol on every process: nothing
                # more is sent; a step waiting for this round raises.
                if rnd.kind in (ACTIVE, IDLE):
                    rnd.exception = self._stopped_error()
                return
            rnd.result = self._round(rnd)
        except BaseException as e:  # handed to the waiting step
            rnd.exception = e
            if self._stopped is None:
                self._stopped = e
            if not isinstance(e, (RemoteError, MismatchError)) or getattr(e, "broken", False):
                self._broken = True      # collectives of this round may still be pending
        finally:
            self.stats["rounds"] += 1
            self.stats["round_seconds"] += time.perf_counter() - t0
            rnd.done.set()

    # --------------------------------------------------------------- round
    def _status_round(self, rnd: _Round, what: str):
        """Steps 1 and 2: the status table, and the notes when needed.
        Returns ``(table, notes)``; raises on a mismatch or a stop."""
        settings, layout = self._settings(), self._layout()
        row = np.zeros(_COLUMNS, dtype=np.int64)
        row[_KIND], row[_SIZE] = rnd.kind, rnd.size
        row[_SETTINGS] = _hash(settings)
        row[_LAYOUT] = 0 if layout is None else _hash(layout)
        row[_ROUND], row[_STEPS], row[_SEED] = rnd.number, rnd.steps, self._seed
        row[_NOTE] = int(bool(rnd.note))
        return exchange_status(self.transport, row, settings=settings, layout=layout,
                               note=rnd.note, what=what,
                               notes_what=f"the notes of round {rnd.number}")

    def _round(self, rnd: _Round) -> Representatives | None:
        if rnd.event is not None:
            self._backend.wait_event(self._stream, rnd.event)
        table, notes = self._status_round(rnd, f"the status of round {rnd.number}")
        kinds = table[:, _KIND]
        stopped = [p for p in range(self.world_size) if kinds[p] in _STOPPING]
        if stopped:
            # The last round on every process.
            message, reasons = _stop_message(self.rank, rnd.number, table, notes, stopped)
            error = RemoteError(message, ranks=stopped, reasons=reasons)
            self._stopped = error
            others_failed = [p for p in stopped if p != self.rank and kinds[p] == FAILED]
            if rnd.kind == FAILED or (rnd.kind == CLOSED and not others_failed):
                return None
            raise error
        if (kinds == IDLE).any():
            return None
        return self._serve(rnd, table)

    def _serve(self, rnd: _Round, table: np.ndarray) -> Representatives:
        sizes = table[:, _SIZE]
        total = int(sizes.sum())
        k = min(int(self._buffer.num_representatives), total)
        # A process that has not seen a batch yet cannot receive rows (its
        # layout is unknown): no process draws in such a round.
        if k == 0 or not table[:, _LAYOUT].all():
            return Representatives(0, rows=None, origin=np.empty((0, 2), np.int64))
        seed = int(table[0, _SEED])
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        wanted, serve_counts = [], np.zeros(self.world_size, dtype=np.int64)
        for p in range(self.world_size):
            picks = _draw(seed, rnd.number, p, total, k)
            owners = np.searchsorted(starts, picks, side="right") - 1
            if p == self.rank:
                slots = (picks - starts[owners]).astype(np.int64)
                origin = np.stack([owners.astype(np.int64), slots], axis=1)
                request_counts = np.bincount(owners, minlength=self.world_size).astype(np.int64)
            served = picks[owners == self.rank] - starts[self.rank]
            wanted.append(served)
            serve_counts[p] = len(served)
        wanted = np.concatenate(wanted).astype(np.int64)
        rows, ready = self._move_rows(rnd, wanted, serve_counts, request_counts, k)
        return Representatives(k, rows=rows, origin=origin, ready=ready)

    def _move_rows(self, rnd, wanted, serve_counts, request_counts, k):
        """Serves the ``wanted`` slots and receives ``k`` rows: all fields in
        flight at once, one all-to-all each."""
        buffer, be, t = self._buffer, self._backend, self.transport
        spec = buffer.spec
        n = len(wanted)
        send = self._device_rows("send", int(buffer.num_representatives) * self.world_size)
        recv = self._device_rows("recv", int(buffer.num_representatives))
        buffer.store.gather(wanted, send, 0, self._stream)
        transfers = []
        for i, f in enumerate(spec):
            if self.staged:
                host_send = self._host_rows("send", i, n, f)
                if n:
                    be.to_host(send[i][:n], self._stream, out=host_send)     # blocks
                transfers.append((host_send, self._host_rows("recv", i, k, f)))
            else:
                transfers.append((send[i][:n], recv[i][:k]))
        # The transport does not order itself after our stream: everything queued
        # on it (the wait for the step's event, the gathers, the previous round's
        # uploads) completes before the transport touches this memory.
        be.synchronize(self._stream)
        handles = []
        for (s, r), f in zip(transfers, spec):
            handles += t.ialltoallv(_bytes(s), serve_counts * f.nbytes, _bytes(r),
                                    request_counts * f.nbytes)
        t.wait(handles, f"the samples of round {rnd.number}", transfer=True)
        self.stats["bytes_sent"] += int(n * buffer.store.row_nbytes)
        self.stats["bytes_received"] += int(k * buffer.store.row_nbytes)
        ready = None
        if self.staged:
            for (_, host_recv), dev in zip(transfers, recv):
                be.from_host(dev[:k], host_recv, self._stream)
            ready = be.record_event(self._stream)
        return [r[:k] for r in recv], ready

    def _device_rows(self, key: str, n: int) -> list:
        rows = self._rows.get(key)
        if rows is None or len(rows[0]) < n:
            rows = self._buffer.store.empty_rows(max(n, 1))
            self._rows[key] = rows
        return rows

    def _host_rows(self, key: str, i: int, n: int, spec):
        full = self._rows.get((key, i))
        cap = int(self._buffer.num_representatives) * (self.world_size if key == "send" else 1)
        if full is None or len(full) < max(n, cap):
            full = self._backend.empty_pinned((max(n, cap, 1),) + tuple(spec.shape), spec.dtype)
            self._rows[(key, i)] = full
        return full[:n]


def _draw(seed: int, round_no: int, rank: int, total: int, k: int) -> np.ndarray:
    """Rank ``rank``'s draws in round ``round_no``: ``k`` distinct global
    indices, uniform over ``[0, total)``, in increasing order (grouped by owner)."""
    return draw_distinct(np.random.default_rng([seed, round_no, rank]), total, k)


def _bytes(a):
    """A flat uint8 view of a C-contiguous NumPy or CuPy array."""
    return a.reshape(-1).view(np.uint8)
