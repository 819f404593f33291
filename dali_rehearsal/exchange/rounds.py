"""Global sampling across processes: the round state machine, over any transport.

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
3. Every process computes every process's draws: ``min(r, total)`` global
   indices each, uniform without replacement over ``[0, total)``, from one
   generator seeded by (rank 0's seed, round) (:func:`.protocol.draws`), and
   maps them to ``(owner, slot)``. So every owner knows what every process
   asks of it, and every process what it gets from each owner: no request
   messages, no counts exchanged.
4. Each owner sends each process that drew some of its rows one message
   holding those rows, every field, packed; each process receives one
   message from each owner it drew from, and nobody else takes part
   (:mod:`.staging`: point-to-point messages, device buffers directly when
   the transport takes them, pinned host memory otherwise). Nothing is
   pickled.

Every decision after step 1 is a function of the status table alone, so
every process takes the same branch and the messages always pair up.

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
written, and its receives never overwrite rows still being read. Received
rows are unpacked (staged: uploaded) on the exchange stream and the
representatives carry an event that the step's stream waits for before
copying them.

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

import contextlib
import logging
import sys
import threading
import time

import numpy as np

from ..representatives import Representatives, StoreView
from .collective import Channel
from .errors import MismatchError, RemoteError
from .mail import Mail
from .messages import describe_exception, stop_message
from .progress import Progress, Round, register, unregister
from .protocol import (ACTIVE, CLOSED, COLUMNS, FAILED, FEEDBACK_FLAG, HELLO, IDLE, KIND, LAYOUT,
                       NOTE, NOTE_FLAG, ROUND, SEED, SETTINGS, SIZE, STEPS, STOPPING, draws,
                       seed_of, stable_hash)
from .staging import RowMover
from .status import exchange_status
from .transport import Transport

__all__ = ["GlobalSampler"]

log = logging.getLogger("dali_rehearsal")


class GlobalSampler:
    """Uniform sampling from the union of every process's shard (see the
    module documentation).

    Args:
        view: the shard this process serves
            (:class:`~dali_rehearsal.representatives.StoreView`).
        transport: the :class:`~.transport.Transport` over the processes
            (made by :func:`~dali_rehearsal.exchange.make_sampler`; the
            sampler owns it from now on and closes it).
        rng: this process's own random stream (``buffer.sample``).
        seed: this process's seed; the shared draws use rank 0's.
        settings: the buffer's settings every process must share besides
            the sampler's own (``policy``, ``label_index``).
    """

    is_global = True

    def __init__(self, view: StoreView, transport: Transport, rng: np.random.Generator, *,
                 seed: int | None = None, settings: dict | None = None):
        self._view = view
        self.rng = rng
        backend = self._backend = view.backend
        self._shared_settings = dict(settings or {})
        self._ident = None
        self.transport = transport
        self.timeout = self.transport.timeout
        self.rank, self.world_size = self.transport.rank, self.transport.size
        self._seed = seed_of(seed)            # this process's proposal; rank 0's is used
        self._lock = threading.Lock()
        # Held by a collective call (save, load) from its first message to its
        # last: no round is submitted meanwhile. Taken before _lock.
        self._calls = threading.RLock()
        self._next_round = 0
        self._steps = 0
        self._pending: Round | None = None
        self._last: Round | None = None
        self._stopped: BaseException | None = None   # why the protocol ended (first cause)
        self._broken = False                  # a collective may still be pending
        self._aborted = False
        self._closed = False
        self._stream = backend.new_stream()
        self.stats = {"rounds": 0, "round_seconds": 0.0, "bytes_sent": 0, "bytes_received": 0}
        try:
            self._hello()
            self.transport.open_data()
        except BaseException:
            self.transport.close(broken=True)
            raise
        self.staged = backend.is_gpu and not self.transport.device_buffers
        self._mover = RowMover(view, self.transport, self._stream, staged=self.staged)
        #: Feedback for other processes' samples (see :mod:`.mail`).
        self.mail = Mail(view.feedback_specs, view.num_representatives)
        self._progress = Progress(self._run, threaded=self.transport.threaded,
                                  name=f"dali-rehearsal-exchange-{self.rank}",
                                  setup=backend.use_device, rank=self.rank)
        if not self._progress.threaded:
            log.warning("MPI is not initialised with MPI_THREAD_MULTIPLE: the global exchange "
                        "runs synchronously, not overlapped with training")
        register(self)
        if self.rank == 0:
            log.info("global sampling over %d processes (%s, %s transfers, %s, timeout %s)",
                     self.world_size, self.transport.name,
                     "staged host" if self.staged else
                     ("device" if backend.is_gpu else "host"),
                     "progress thread" if self._progress.threaded else "synchronous",
                     "none" if self.timeout is None else f"{self.timeout:g} s")

    # ------------------------------------------------------------ settings
    def _settings(self) -> dict:
        return {"sampling": "global",
                "num_representatives": int(self._view.num_representatives),
                **self._shared_settings, **self.transport.agreement()}

    def _layout(self):
        spec = self._view.spec
        if spec is None:
            return None
        return [[list(f.shape), np.dtype(f.dtype).str] for f in spec]

    def _identity(self) -> tuple:
        """``(settings, layout, their hashes)``, computed again only when the
        sample layout changes (the settings never do)."""
        spec = self._view.spec
        if self._ident is None or self._ident[0] is not spec:
            settings, layout = self._settings(), self._layout()
            self._ident = (spec, settings, layout, stable_hash(settings),
                           0 if layout is None else stable_hash(layout))
        return self._ident[1:]

    def _hello(self) -> None:
        rnd = Round(HELLO)
        rnd.number = self._next_round
        table, _ = self._status_round(rnd, "the other processes to build their buffers")
        #: The seed of the shared draws: rank 0's.
        self.shared_seed = int(table[0, SEED])

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
            # What this process offers to the round's draws, as of now: nothing
            # is inserted until the round ends (finish, settle).
            slots = self._view.replayable_slots()
            size = self._view.size if slots is None else len(slots)
            self._pending = self._submit(Round(ACTIVE if active else IDLE, size=size,
                                               event=event, slots=slots,
                                               feedback=self.mail.waiting))

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

    def post_feedback(self, owner: int, rows: np.ndarray, values: list) -> None:
        """Queues feedback for ``owner``'s samples: it leaves with the next
        round that draws from ``owner`` (see :mod:`.mail`)."""
        self.mail.post(owner, rows, values)

    def take_feedback(self) -> list:
        """Feedback other processes sent for this shard's samples."""
        return self.mail.take()

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
                self._submit(Round(FAILED, size=self._view.size,
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
                last = self._submit(Round(CLOSED, size=self._view.size, note=reason))
            else:
                last = self._last            # e.g. the failure round of abort(): let it out
        unregister(self)
        try:
            if last is not None:
                self._wait(last)
        finally:
            self._shutdown()
            self.mail.drop()
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
        alive = self._progress.stop()
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
            rnd = Round(kind, size=self._view.size)
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
    def _submit(self, rnd: Round) -> Round:
        """Queues ``rnd`` (the lock is held)."""
        rnd.number, self._next_round = self._next_round, self._next_round + 1
        rnd.steps = self._steps
        self._last = rnd
        self._progress.submit(rnd)
        return rnd

    def _wait(self, rnd: Round) -> None:
        self._progress.wait(rnd)

    def _run(self, rnd: Round) -> None:
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
    def _status_round(self, rnd: Round, what: str):
        """Steps 1 and 2: the status table, and the notes when needed.
        Returns ``(table, notes)``; raises on a mismatch or a stop."""
        settings, layout, settings_hash, layout_hash = self._identity()
        row = np.zeros(COLUMNS, dtype=np.int64)
        row[KIND], row[SIZE] = rnd.kind, rnd.size
        row[SETTINGS], row[LAYOUT] = settings_hash, layout_hash
        row[ROUND], row[STEPS], row[SEED] = rnd.number, rnd.steps, self._seed
        row[NOTE] = (NOTE_FLAG if rnd.note else 0) | (FEEDBACK_FLAG if rnd.feedback else 0)
        return exchange_status(self.transport, row, settings=settings, layout=layout,
                               note=rnd.note, what=what,
                               notes_what=f"the notes of round {rnd.number}")

    def _round(self, rnd: Round) -> Representatives | None:
        if rnd.event is not None:
            self._backend.wait_event(self._stream, rnd.event)
        table, notes = self._status_round(rnd, f"the status of round {rnd.number}")
        kinds = table[:, KIND]
        stopped = [p for p in range(self.world_size) if kinds[p] in STOPPING]
        if stopped:
            # The last round on every process.
            message, reasons = stop_message(self.rank, rnd.number, table, notes, stopped)
            error = RemoteError(message, ranks=stopped, reasons=reasons)
            self._stopped = error
            others_failed = [p for p in stopped if p != self.rank and kinds[p] == FAILED]
            if rnd.kind == FAILED or (rnd.kind == CLOSED and not others_failed):
                return None
            raise error
        if (kinds == IDLE).any():
            return None
        return self._serve(rnd, table)

    def _serve(self, rnd: Round, table: np.ndarray) -> Representatives:
        sizes = table[:, SIZE]
        total = int(sizes.sum())
        k = min(int(self._view.num_representatives), total)
        # A process that has not seen a batch yet cannot receive rows (its
        # layout is unknown): no process draws in such a round.
        if k == 0 or not table[:, LAYOUT].all():
            return Representatives(0, rows=None, origin=np.empty((0, 2), np.int64))
        me = self.rank
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        # Every process's draws (the same everywhere): which of them are mine to serve.
        picks = draws(int(table[0, SEED]), rnd.number, self.world_size, total, k)
        mine = picks[me]
        owners = np.searchsorted(starts, mine, side="right") - 1
        slots = mine - starts[owners]
        origin = np.stack([owners, slots], axis=1)
        request = np.bincount(owners, minlength=self.world_size)
        lo, hi = starts[me], starts[me] + sizes[me]
        hits = (picks >= lo) & (picks < hi)
        hits[me] = False
        serve = [(int(p), picks[p][hits[p]] - lo) for p in np.flatnonzero(hits.any(axis=1))]
        own = slots[owners == me]
        offered = rnd.slots                 # task-aware replay: the slots offered, else None
        if offered is not None:             # the draws index what each owner offered
            serve = [(p, offered[i]) for p, i in serve]
            own = offered[own]
        rows, ready = self._mover.move(f"the samples of round {rnd.number}", rnd.number, serve,
                                       request, own)
        row_nbytes = self._mover.row_nbytes
        self.stats["bytes_sent"] += int(hits.sum()) * row_nbytes
        self.stats["bytes_received"] += int(k - request[me]) * row_nbytes
        if offered is not None:
            origin[:, 1] = self._slots_of(rnd, serve, owners, own)
        flags = table[:, NOTE] & FEEDBACK_FLAG
        self.mail.route(self.transport, rnd.number,
                        owners=[q for q in np.flatnonzero(request) if q != me] if flags[me] else [],
                        senders=[p for p, _ in serve if flags[p]],
                        what=f"the feedback of round {rnd.number}")
        return Representatives(k, rows=rows, origin=origin, ready=ready)

    def _slots_of(self, rnd: Round, serve: list, owners: np.ndarray, own: np.ndarray):
        """Task-aware replay: the slots of this process's representatives, in
        output order, from their owners (one message of int64 slots per peer,
        after the round's rows, with the round's tag)."""
        me, t = self.rank, self.transport
        out = np.empty(len(owners), np.int64)
        out[owners == me] = own
        sends = {p: np.ascontiguousarray(idx, np.int64).view(np.uint8) for p, idx in serve}
        recvs = {int(p): np.empty(int((owners == p).sum()), np.int64)
                 for p in np.unique(owners) if p != me}
        if sends or recvs:
            t.wait(t.iexchange(sends, {p: r.view(np.uint8) for p, r in recvs.items()},
                               rnd.number), f"the slots of round {rnd.number}", transfer=True)
        for p, r in recvs.items():
            out[owners == p] = r
        return out
