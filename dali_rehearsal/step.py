"""The step object: what a rehearsal buffer is made of, and one step's sequence.

:class:`StepCore` owns the four parts of a buffer -- the sample store
(:mod:`.storage`), the insertion policy (:mod:`.policies`), the sampler that
draws representatives (:mod:`.exchange`) and the last write into the store
(the CUDA ordering point) -- and offers a small interface that both drivers
of a step use, :meth:`dali_rehearsal.RehearsalBuffer.mix` and the DALI stage
(:mod:`dali_rehearsal.stage`):

- :meth:`StepCore.admit` checks and converts a batch, and fixes the storage
  layout with the first one;
- :meth:`StepCore.open` opens the round for the next step early (global
  sampling: the round then overlaps with what comes before the step);
- :meth:`StepCore.begin` returns the step's representatives (``None``: the
  epoch ends here on every process);
- :meth:`StepCore.commit` writes them after the fresh rows, offers the fresh
  rows to the policy and opens the next step's round;
- :meth:`StepCore.fail` tells the other processes that this step failed.

:meth:`StepCore.mix` is that sequence for a batch in memory. Hold
:attr:`StepCore.lock` from ``begin`` to ``commit``: no other thread may use
the buffer between a step's representatives and its insert.

The sampler sees the store through a read-only view, never this object; the
checkpoint code (:mod:`.checkpoint`) reads and restores the parts through the
public attributes listed in :class:`StepCore`.
"""

from __future__ import annotations

import logging
import threading
import weakref

import numpy as np

from ._backend import Backend, get_backend, on_device, to_host
from .checks import check_int
from .exchange import make_sampler, world_of
from .feedback import Feedback, Pending
from .policies import make_policy
from .representatives import Representatives, StoreView
from .storage import SampleStore, spec_of

__all__ = ["StepCore"]

log = logging.getLogger("dali_rehearsal")

#: dtype kinds a stored field may have: bool, integers, floats, complex.
_STORABLE_KINDS = "biufc"
_INT64_MAX = np.iinfo(np.int64).max


class StepCore:
    """The parts of a buffer and the sequence of a step (see the module docstring).

    Public attributes the checkpoint code and the stage rely on:
    ``capacity``, ``num_representatives``, ``label_index``, ``seed``,
    ``sampling``, ``device``, ``comm``, ``rank``, ``world_size``,
    ``log_level``; the parts ``store``, ``policy``, ``sampler``, ``backend``;
    the state ``size``, ``num_seen``, ``spec``; and the ordering methods
    :meth:`wait_for_writes` and :meth:`mark_written`.

    Arguments are checked by :class:`~dali_rehearsal.RehearsalBuffer`.
    """

    def __init__(self, *, capacity: int, num_representatives: int, label_index: int,
                 seed: int | None, policy: str, device: str | None, comm, sampling: str,
                 cuda_aware: bool | None, timeout: float | None, task_aware: bool = False,
                 feedback: dict | None = None):
        self.capacity = capacity
        self.num_representatives = num_representatives
        self.label_index = label_index
        self.seed = seed
        self.sampling = sampling
        self.comm = comm
        self.task_aware = bool(task_aware)
        # Serialises every operation on the buffer. The exchange's progress
        # thread never takes it: a thread that holds the lock while it waits
        # for a round must not wait for itself.
        self.lock = threading.RLock()
        self.backend: Backend = get_backend(device)
        self.device = self.backend.device
        self.store = SampleStore(self.backend, capacity)
        rank, world_size = world_of(comm)
        #: Feedback fields written back by ticket (:mod:`.feedback`), stored after
        #: the source's fields.
        self.feedback = Feedback(feedback, capacity=capacity, rank=rank)
        reachable = capacity * (world_size if sampling == "global" else 1)
        if num_representatives > reachable:
            raise ValueError(
                f"num_representatives={num_representatives} is more than the buffer can "
                f"ever hold ({reachable} samples: capacity={capacity}"
                + (f" x {world_size} processes" if reachable != capacity else "")
                + "); every batch would stay short of b + r")
        entropy = [] if seed is None else [seed]
        policy_seq, sample_seq = np.random.SeedSequence(
            entropy or None, spawn_key=(rank,)).spawn(2)
        self.policy = make_policy(policy, capacity, np.random.default_rng(policy_seq))
        # What the sampler sees of the shard: read-only, never this object.
        self.view = StoreView(self.store, self.policy, num_representatives,
                              task_aware=self.task_aware, feedback_specs=self.feedback.specs)
        self.sampler = make_sampler(self.view, comm=comm, sampling=sampling, seed=seed,
                                    rng=np.random.default_rng(sample_seq),
                                    settings={"policy": self.policy.name,
                                              "label_index": label_index},
                                    cuda_aware=cuda_aware, timeout=timeout)
        self.rank = self.sampler.rank
        self.world_size = self.sampler.world_size
        # The last access to the store on the GPU: (stream, event). Host reads
        # and work on other streams are ordered after it.
        self._last_write = (None, None)
        self.last_reps: Representatives | None = None
        self._stop_writer = None    # weak method: stops the DALI stage writing into the store

    # ------------------------------------------------------------------ state
    @property
    def size(self) -> int:
        """Samples stored in this process's shard."""
        return self.policy.size

    @property
    def num_seen(self) -> int:
        """Samples offered to this process's shard so far."""
        return self.policy.num_seen

    @property
    def spec(self):
        """Per-field shape and dtype, fixed by the first batch (None before it)."""
        return self.store.spec

    @property
    def num_source_fields(self) -> int | None:
        """Fields a batch brings (the stored fields less the feedback ones;
        None before the first batch)."""
        spec = self.store.spec
        return None if spec is None else len(spec) - self.feedback.num_extra

    @property
    def allocated(self) -> bool:
        """Whether the storage layout is fixed (a first batch was admitted)."""
        return self.store.allocated

    @property
    def task(self) -> int:
        """The current task's index (tasks ended so far)."""
        return self.policy.task

    @property
    def log_level(self) -> int:
        """INFO on rank 0, DEBUG elsewhere: logs stay quiet except on rank 0."""
        return logging.INFO if self.rank == 0 else logging.DEBUG

    def empty_rows(self, n: int) -> list:
        """``n`` uninitialised rows of every field, on the buffer's device."""
        return self.store.empty_rows(n)

    def copy_rows(self, rows, out, offset: int, stream=None) -> None:
        """Copies ``rows`` (one array per field) into ``out`` from row ``offset``."""
        self.store.copy(rows, out, offset, stream)

    # --------------------------------------------------------------- ordering
    def wait_for_writes(self, stream=None) -> None:
        """Orders later work after every access to the store queued so far:
        work on ``stream`` when one is given, the host otherwise."""
        last_stream, event = self._last_write
        if event is None:
            return
        if stream is None:
            event.synchronize()
        elif stream is not last_stream:
            self.backend.wait_event(stream, event)

    def mark_written(self, stream) -> None:
        """Records that the store was accessed (written, or read by a gather)
        on ``stream`` (the GPU only): later writes on other streams are
        ordered after it."""
        if self.backend.is_gpu:
            self._last_write = (stream, self.backend.record_event(stream))

    # ------------------------------------------------------------- the writer
    def attach_writer(self, stop) -> None:
        """A new DALI stage writes into the store: ``stop`` (a bound method)
        stops it. The previous stage's ``stop`` is called first, without the
        lock (its worker may be finishing a step), and the round it opened for
        its next step is discarded, at this same point on every process."""
        previous = self._stop_writer() if self._stop_writer is not None else None
        if previous is not None and previous != stop:
            previous()
        with self.lock:
            if self.sampler.started:
                self.sampler.finish()
            self._stop_writer = weakref.WeakMethod(stop)

    def stop_writer(self) -> None:
        """Stops the DALI stage writing into the store, if any (without the lock)."""
        stop = self._stop_writer() if self._stop_writer is not None else None
        if stop is not None:
            stop()

    # ----------------------------------------------------------------- tasks
    def end_task(self) -> None:
        """The current task ended: what is stored now becomes what task-aware
        replay draws from. Stops the DALI stage feeding the store first (its
        worker ends where it always ends: ``prepare_ahead + 1`` steps beyond
        what the loop consumed), and discards the round its last step opened,
        so that the next step's draws see the new task."""
        self.stop_writer()      # without the lock: its worker may be finishing a step
        with self.lock:
            if self.sampler.started:
                self.sampler.finish()
            if self.feedback.enabled:
                self._apply_due(self.backend.current_stream(), None)
            self.policy.end_task()

    # ------------------------------------------------------------ admission
    def admit(self, fields, stream=None) -> tuple[list, np.ndarray]:
        """Converts and checks a batch, one array per field, batch first, and
        fixes the storage layout with the first one.

        Returns the arrays (on the buffer's device, uploaded on ``stream``)
        and the labels as a host int64 array. Raises before anything changes.
        """
        with self.lock:     # another thread's first batch may fix the layout
            arrays, labels = self._check_batch(fields, stream)
            if not self.store.allocated:
                self.store.allocate(spec_of(arrays) + self.feedback.extra_spec)
                log.log(self.log_level, "rehearsal buffer: %d samples x %s on %s (%.1f MiB)",
                        self.capacity, [f.describe() for f in self.spec], self.device,
                        self.store.nbytes / 2**20)
            return arrays, labels

    def _check_batch(self, fields, stream) -> tuple[list, np.ndarray]:
        n_fields, li = len(fields), self.label_index
        if n_fields < 2:
            raise ValueError("a batch needs at least two fields: the samples and their labels")
        if li >= n_fields:
            raise ValueError(f"label_index={li} but the batch has only {n_fields} fields")
        spec = self.store.spec
        if spec is not None:
            spec = spec[:self.num_source_fields]
        if spec is not None and n_fields != len(spec):
            raise ValueError(f"the buffer holds {len(spec)} fields per sample"
                             + (f" from the source (and {self.feedback.num_extra} of feedback)"
                                if self.feedback.enabled else "")
                             + f", this batch has {n_fields}")
        label_field = fields[li]
        host_labels = None if on_device(label_field) else to_host(label_field)
        asarray = self.backend.asarray
        arrays = [asarray(f, stream) for f in fields]
        b = arrays[0].shape[0] if arrays[0].ndim else None
        if b is None or any(a.ndim == 0 or a.shape[0] != b for a in arrays):
            raise ValueError("every field must be an array with the batch on its first axis and "
                             f"the same batch size; got shapes {[a.shape for a in arrays]}")
        if b == 0:
            raise ValueError("empty batch")
        labels = arrays[li]
        if labels.dtype.kind not in "iu":
            raise TypeError(f"labels (field {li}) must be integers, got dtype {labels.dtype}")
        if labels.size != b:
            raise ValueError(f"labels (field {li}) must hold one value per sample, "
                             f"got shape {labels.shape}")
        for i, a in enumerate(arrays):
            if a.dtype.kind not in _STORABLE_KINDS:
                raise TypeError(f"field {i} has dtype {a.dtype}; stored fields must be "
                                "numeric (bool, integer, float or complex)")
            if spec is not None and (a.shape[1:] != spec[i].shape or a.dtype != spec[i].dtype):
                raise ValueError(
                    f"field {i}: samples of shape {a.shape[1:]} and dtype {a.dtype} do not "
                    f"match the buffer ({spec[i].shape}, {spec[i].dtype}), fixed by the first "
                    "batch. Samples must have one fixed shape and dtype: resize (and cast) "
                    "them in the source pipeline")
        if host_labels is None:
            host_labels = self.backend.to_host(labels, stream)
        host_labels = np.asarray(host_labels).reshape(b)
        if host_labels.dtype.kind == "u":
            if host_labels.dtype.itemsize == 8 and host_labels.max() > _INT64_MAX:
                big = host_labels[host_labels > _INT64_MAX][:5]
                raise ValueError(f"labels must be < 2**63, got {big.tolist()}")
        elif host_labels.min() < 0:
            raise ValueError("labels must be non-negative, got "
                             f"{host_labels[host_labels < 0][:5].tolist()}")
        return arrays, host_labels.astype(np.int64)

    # --------------------------------------------------------------- the step
    def open(self, *, active: bool = True) -> None:
        """Opens the round for the next step now, when none is open (global
        sampling; nothing otherwise). A stage calls it at a point every
        process reaches at the same step, so that the round overlaps with what
        comes before that step; :meth:`begin` then waits for it."""
        with self.lock:
            if self.sampler.is_global and not self.sampler.started:
                self.sampler.start(active=active, event=self._last_write[1])

    def begin(self, *, active: bool = True) -> Representatives | None:
        """The representatives of the next step (None: the epoch ends here on
        every process). ``active`` says whether this process has a step."""
        with self.lock:
            if not self.sampler.started:
                self.sampler.start(active=active, event=self._last_write[1])
            return self.sampler.finish()

    def commit(self, out, fresh_count: int, labels: np.ndarray, reps: Representatives, *,
               stream=None, next_active: bool | None = True) -> int:
        """Writes ``reps`` after the ``fresh_count`` fresh rows already in
        ``out``, offers the fresh rows to the policy (the chosen ones are
        written into the store) and, for global sampling, opens the next
        step's round at once so that it overlaps with training. Every device
        operation is queued on ``stream``. Returns the row count.

        ``next_active`` says whether this process has a next step in its epoch;
        ``None`` (a stage that learns it only when it builds that step) leaves
        the round closed: :meth:`begin` opens it with what it knows then.
        """
        with self.lock:
            self.wait_for_writes(stream)
            reps.write_into(self.view, out, fresh_count, stream)
            self.last_reps = reps
            batch_index, slots = self.policy.offer(labels[:fresh_count])
            if self.feedback.enabled:
                self._stamp(out, fresh_count, batch_index, slots, stream)
            self.store.scatter(out, batch_index, slots, stream)
            self.mark_written(stream)
            if self.feedback.enabled:
                # before the next step's round reads the store (feedback.py)
                self._apply_due(stream, self.feedback.limit)
            if self.sampler.is_global and next_active is not None:
                self.sampler.start(active=next_active, event=self._last_write[1])
            return fresh_count + reps.count

    def fail(self) -> None:
        """This process's step failed: the other processes raise instead of
        waiting for it."""
        with self.lock:
            self.sampler.abort()

    def mix(self, fields, stream=None) -> tuple:
        """One whole step for a batch in memory: admit it, draw the
        representatives, return fresh rows then representatives, insert."""
        with self.lock:
            try:
                arrays, labels = self.admit(fields, stream)
                b = arrays[0].shape[0]
                reps = self.begin()
            except Exception:
                self.fail()     # other processes raise instead of waiting for this one
                raise
            out = self.store.empty_rows(b + reps.count)
            self.store.copy(arrays, out, 0, stream)
            self.commit(out, b, labels, reps, stream=stream)
            return tuple(out)

    # --------------------------------------------------------------- feedback
    def _stamp(self, out, count: int, batch_index, slots, stream) -> None:
        """Fresh rows ``0..count-1`` of ``out``: zero feedback, flag 0, and
        their tickets (new generations for the slots they are written to)."""
        fb, be = self.feedback, self.backend
        first = len(out) - fb.num_extra
        with be.stream_context(stream):
            for field in out[first:-1]:          # the feedback fields and `written`
                field[:count].fill(0)            # on the device: no upload
        be.from_host(out[-1][:count], fb.fresh_tickets(count, np.asarray(batch_index),
                                                       np.asarray(slots)), stream)

    def _value(self, value, spec, n: int, name: str, stream):
        """A written-back value as a ``(n, *shape)`` array of the field's dtype
        on the buffer's device."""
        if hasattr(value, "detach"):          # a torch tensor, perhaps with a graph
            value = value.detach()
        a = self.backend.asarray(value, stream)
        if tuple(a.shape) != (n,) + spec.shape:
            raise ValueError(f"update(): {name} must have shape {(n,) + spec.shape} (one row "
                             f"per ticket), got {tuple(a.shape)}")
        if a.dtype.kind not in "biufc":
            raise TypeError(f"update(): {name} has dtype {a.dtype}, not a number")
        with self.backend.stream_context(stream):
            # a copy of its own: the value may wait for its step (feedback.py), and
            # the caller's memory (a torch tensor's) may change meanwhile
            return a.astype(spec.dtype, copy=True)

    def _write_back(self, pending: Pending, stream) -> None:
        """Writes the values of ``pending`` into the slots of its tickets
        still holding their sample, and sets their flags: one scatter on
        ``stream``, ordered after every access to the store and after the
        values were made."""
        fb = self.feedback
        keep, slots = fb.check(pending.tickets)
        if len(slots) == 0:
            return
        arrays, names, positions = pending.arrays, pending.names, pending.positions
        self.backend.wait_event(stream, pending.event)
        first = len(self.store.spec) - fb.num_extra
        fields = [first + fb.names.index(n) for n in names] + [len(self.store.spec) - 2]
        ones = self.backend.asarray(np.ones(len(arrays[0]), np.uint8), stream)
        self.wait_for_writes(stream)
        self.sampler.settle()        # a round reading the store in the background
        self.store.scatter(list(arrays) + [ones], positions[keep], slots, stream,
                           fields=fields)
        self.mark_written(stream)

    def _apply_due(self, stream, limit: int | None) -> None:
        """Writes back the values due by write ``limit`` (None: all), those
        other processes sent included (see :mod:`.feedback`)."""
        fb = self.feedback
        for rows, values in self.sampler.take_feedback():
            for mask in np.unique(rows[:, 3]):
                sel = np.flatnonzero(rows[:, 3] == mask)
                names = [n for i, n in enumerate(fb.names) if mask >> i & 1]
                arrays = [self.backend.asarray(values[fb.names.index(n)], stream)
                          for n in names]
                fb.pending.append(Pending(rows[sel, :3], sel, arrays, names))
        for pending in fb.due(limit):
            self._write_back(pending, stream)

    def apply_feedback(self, stream=None) -> None:
        """Writes every waiting value back now (a checkpoint, a task's end)."""
        with self.lock:
            if self.feedback.enabled:
                self._apply_due(stream, None)

    def update(self, tickets, values: dict, stream=None) -> None:
        """Writes per-sample ``values`` (feedback field name -> rows, one per
        ticket) back into the samples the ``tickets`` name (see
        :mod:`.feedback`). Tickets of other processes go to their owners with
        the next rounds of global sampling."""
        fb = self.feedback
        with self.lock:
            if not fb.enabled:
                raise RuntimeError("update() needs a buffer built with feedback fields, e.g. "
                                   "RehearsalBuffer(..., feedback={'logits': ((10,), "
                                   "'float32')})")
            if not self.store.allocated:
                raise RuntimeError("update(): the buffer has delivered no ticket yet")
            if hasattr(tickets, "detach"):
                tickets = tickets.detach()
            host = fb.check_tickets(self.backend.to_host(tickets, stream)
                                    if on_device(tickets) else to_host(tickets),
                                    self.world_size)
            n = len(host)
            names = fb.check_values(values, n)
            specs = dict(zip(fb.names, fb.specs))
            arrays = [self._value(values[name], specs[name], n, name, stream) for name in names]
            if n == 0:
                return
            mine = host[:, 0] == self.rank
            if not mine.all() and not self.sampler.is_global:
                raise ValueError("update(): tickets of other processes, but this buffer "
                                 "samples locally: its rows all come from this process")
            stored = fb.stored(host)
            if (stored & ~mine).any():
                self._post_remote(host, stored & ~mine, arrays, names, stream)
            if (stored & mine).any():
                positions = np.flatnonzero(stored & mine)
                fb.pending.append(Pending(host[positions], positions, arrays, names,
                                          self.backend.record_event(stream)))
            self._apply_due(stream, fb.limit)

    def _post_remote(self, tickets: np.ndarray, remote: np.ndarray, arrays: list,
                     names: list, stream) -> None:
        """Queues the rows of other processes' tickets for their owners."""
        fb = self.feedback
        mask = sum(1 << fb.names.index(n) for n in names)
        hosts = {n: self.backend.to_host(a, stream) for n, a in zip(names, arrays)}
        for owner in np.unique(tickets[remote, 0]):
            sel = np.flatnonzero(remote & (tickets[:, 0] == owner))
            rows = np.empty((len(sel), 4), np.int64)
            rows[:, :3] = tickets[sel]
            rows[:, 3] = mask
            values = [hosts[n][sel] if n in hosts else np.zeros((len(sel),) + s.shape, s.dtype)
                      for n, s in zip(fb.names, fb.specs)]
            self.sampler.post_feedback(int(owner), rows, values)
            fb.stats["sent"] += len(sel)

    # ------------------------------------------------ outside the step sequence
    def insert(self, fields, stream=None) -> None:
        """Offers a batch to the policy without drawing representatives."""
        with self.lock:
            arrays, labels = self.admit(fields, stream)
            self.wait_for_writes(stream)
            # With global sampling the round for the next step may still be
            # reading the store in the background: let it finish first.
            self.sampler.settle()
            batch_index, slots = self.policy.offer(labels)
            if self.feedback.enabled:
                rows = self.store.empty_rows(len(labels))
                self.store.copy(arrays, rows, 0, stream)
                self._stamp(rows, len(labels), batch_index, slots, stream)
                arrays = rows
            self.store.scatter(arrays, batch_index, slots, stream)
            self.mark_written(stream)

    def draw(self, num: int, stream=None) -> tuple:
        """``num`` stored samples drawn uniformly without replacement from this
        process's shard (this process's own random stream)."""
        with self.lock:
            if not self.store.allocated:
                raise RuntimeError("the buffer is empty: nothing has been inserted yet")
            k = min(check_int(num, "num", 0), self.size)
            slots = np.sort(self.sampler.rng.choice(self.size, size=k, replace=False))
            out = self.store.empty_rows(k)
            self.wait_for_writes(stream)
            self.store.gather(slots.astype(np.int64), out, 0, stream)
            self.mark_written(stream)     # a later write on another stream waits for this read
            return tuple(out)

    def stored(self) -> tuple:
        """Views of the stored samples, slot by slot; the device work that
        wrote them is complete on return."""
        with self.lock:
            if not self.store.allocated:
                raise RuntimeError("the buffer is empty: nothing has been inserted yet")
            self.wait_for_writes()
            return tuple(s[: self.size] for s in self.store.fields)
