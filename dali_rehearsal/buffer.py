"""The rehearsal buffer: preallocated storage of whole samples on one device."""

from __future__ import annotations

import logging
import threading
import weakref

import numpy as np

from . import checkpoint
from ._backend import Backend, get_backend, on_device, to_host
from .checks import check_int, check_seed
from .exchange import Transport, make_sampler, world_of
from .policies import make_policy
from .representatives import Representatives, StoreView
from .storage import FieldSpec, SampleStore, spec_of

__all__ = ["RehearsalBuffer", "FieldSpec"]

log = logging.getLogger("dali_rehearsal")

#: dtype kinds a stored field may have: bool, integers, floats, complex.
_STORABLE_KINDS = "biufc"
_INT64_MAX = np.iinfo(np.int64).max


class RehearsalBuffer:
    """A bounded buffer of past samples that mixes representatives into batches.

    Every call to :meth:`mix` (or every step of :func:`dali_rehearsal.fn.rehearsal`)
    returns the ``b`` fresh samples followed by up to ``num_representatives``
    samples drawn uniformly without replacement from what the buffer held
    before that batch, then offers the fresh samples to the insertion policy.

    Args:
        capacity: samples kept by this process (Avalanche ``mem_size``, Mammoth
            ``buffer_size``). With ``comm`` it is the capacity of each process's
            shard; the global buffer holds ``capacity * comm.size`` samples.
        num_representatives: ``r``, samples replayed per step (Avalanche
            ``batch_size_mem``, Mammoth ``minibatch_size``).
        policy: ``"class_balanced"`` (default) or ``"reservoir"``; see
            :mod:`dali_rehearsal.policies`.
        device: ``"gpu"`` (CuPy storage, CUDA kernels), ``"cpu"`` (NumPy), or
            ``None`` for the GPU when one is visible, else the CPU.
        label_index: which of the per-sample fields is the class label
            (default 1: ``(image, label, *extras)``).
        seed: seed of the insertion and sampling random streams (a
            non-negative integer); same seed and data give the same batches.
            With ``comm`` each process derives its own streams from
            ``(seed, rank)``; the draws of global sampling use rank 0's seed, so
            a seed that differs per rank is safe.
        comm: a communicator for global sampling across processes (see
            :mod:`dali_rehearsal.exchange`); ``None`` or a communicator of
            size 1 is the single-process buffer.
        sampling: ``"global"`` (default: representatives drawn from the union of
            all processes' shards) or ``"local"`` (from this process's shard only).
        cuda_aware: with ``comm`` and ``device="gpu"``: pass device buffers to the
            transport (``True``), stage them through pinned host memory
            (``False``) or detect what the library supports (``None``, default:
            CUDA-aware MPI, or an NCCL process group).
        timeout: with ``comm``: seconds a process waits for the others in any
            collective step of the exchange (construction, each step's round,
            ``close``) before raising ``RemoteError`` (default 600; ``None``
            waits forever). It bounds the wait for a process that stopped
            answering without a word (killed, hung); failures a process can
            report reach the others at once.

    Threads: one buffer may be used from several threads. Its operations
    (``mix``, ``add``, ``sample``, ``state_dict``, ``load_state_dict``,
    ``save``, ``load``, ``stored``, ``stored_labels``, ``class_counts``,
    ``close``, and the steps of a DALI stage feeding it) are serialised by one
    re-entrant lock (:attr:`lock`): each runs as if alone, in some order. With
    ``comm``, a thread waiting in a collective step holds the lock until the
    step ends (at most ``timeout``). ``stored()`` returns views, which later
    inserts overwrite: take ``state_dict()`` for a snapshot. After
    :meth:`close`, ``mix``, ``add`` and ``sample`` raise ``RuntimeError``.
    """

    def __init__(self, *, capacity: int, num_representatives: int,
                 policy: str = "class_balanced", device: str | None = None,
                 label_index: int = 1, seed: int | None = None, comm=None,
                 sampling: str = "global", cuda_aware: bool | None = None,
                 timeout: float | None = 600.0):
        self.capacity = check_int(capacity, "capacity", 1)
        self.num_representatives = check_int(num_representatives, "num_representatives", 0)
        self.label_index = check_int(label_index, "label_index", 0)
        self.seed = check_seed(seed)
        # Serialises every operation on the buffer (see the class docstring).
        # The exchange's progress thread never takes it: it reads only what
        # does not need it (size, spec, store, settings), and a thread that
        # holds the lock while it waits for a round must not wait for itself.
        self._lock = threading.RLock()
        self._closed = False
        if sampling not in ("global", "local"):
            raise ValueError(f"sampling must be 'global' or 'local', got {sampling!r}")
        self._backend: Backend = get_backend(device)
        self.store = SampleStore(self._backend, self.capacity)
        self.comm = comm
        rank, world_size = world_of(comm)
        reachable = self.capacity * (world_size if sampling == "global" else 1)
        if self.num_representatives > reachable:
            raise ValueError(
                f"num_representatives={self.num_representatives} is more than the buffer can "
                f"ever hold ({reachable} samples: capacity={self.capacity}"
                + (f" x {world_size} processes" if reachable != self.capacity else "")
                + "); every batch would stay short of b + r")
        entropy = [] if self.seed is None else [self.seed]
        policy_seq, sample_seq = np.random.SeedSequence(
            entropy or None, spawn_key=(rank,)).spawn(2)
        self._policy = make_policy(policy, self.capacity, np.random.default_rng(policy_seq))
        self.sampling = sampling
        self._view = StoreView(self.store, self._policy, self.num_representatives)
        self._sampler = make_sampler(self._view, comm=comm, sampling=sampling, seed=self.seed,
                                     rng=np.random.default_rng(sample_seq),
                                     settings={"policy": self.policy,
                                               "label_index": self.label_index},
                                     cuda_aware=cuda_aware, timeout=timeout)
        self.rank = self._sampler.rank
        self.world_size = self._sampler.world_size
        self._stage = None          # weak reference to the DALI stage feeding this buffer
        # The last write into the store: (stream, event). Host reads and work on
        # other streams are ordered after it.
        self._last_write = (None, None)
        self._last_reps: Representatives | None = None

    # ----------------------------------------------------------------- state
    @property
    def lock(self) -> threading.RLock:
        """The re-entrant lock that serialises the buffer's operations. A
        stage holds it across each of its steps' use of the buffer. Holding
        it yourself makes a sequence of calls atomic; do not build pipelines
        or call ``close()`` while holding it (they wait for the stage's worker,
        which needs it)."""
        return self._lock

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"{what} on a closed RehearsalBuffer: close() ended its use "
                               "(build a new buffer, or load a checkpoint into one)")

    @property
    def log_level(self) -> int:
        """INFO on rank 0, DEBUG elsewhere: logs stay quiet except on rank 0."""
        return logging.INFO if self.rank == 0 else logging.DEBUG

    @property
    def backend(self) -> Backend:
        """The array backend (NumPy or CuPy) the storage lives on."""
        return self._backend

    @property
    def sampler(self):
        """Where representatives come from (:mod:`dali_rehearsal.exchange`)."""
        return self._sampler

    def exchange_stats(self) -> dict:
        """What this process's global sampling has exchanged so far, as exact
        counts (a snapshot, a new dict each call): ``rounds`` served,
        ``collectives`` started (``allgathers``), point-to-point
        ``exchanges`` (one per round that moves rows), ``messages_sent``,
        ``bytes_sent`` and ``bytes_received`` to and from other processes
        (see docs/exchange.md). All zero for a buffer that samples locally.
        The round for the next step may still be running when this returns:
        its counts appear once it ends."""
        if getattr(self._sampler, "is_global", False):
            return self._sampler.exchange_stats()
        return dict.fromkeys(("rounds",) + Transport.COUNTS, 0)

    @property
    def device(self) -> str:
        return self._backend.device

    @property
    def policy(self) -> str:
        return self._policy.name

    @property
    def size(self) -> int:
        """Samples stored in this process's shard."""
        return self._policy.size

    @property
    def num_seen(self) -> int:
        """Samples offered to this process's shard so far."""
        return self._policy.num_seen

    @property
    def spec(self) -> tuple[FieldSpec, ...] | None:
        """Per-field shape and dtype, fixed by the first batch (None before it)."""
        return self.store.spec

    @property
    def nbytes(self) -> int:
        """Bytes of sample storage allocated (0 before the first batch)."""
        return self.store.nbytes

    @property
    def last_origin(self) -> np.ndarray:
        """``(rank, slot)`` of each representative of the last step, in output
        order (an ``(r, 2)`` int64 array)."""
        if self._last_reps is None:
            return np.empty((0, 2), dtype=np.int64)
        return self._last_reps.origin

    def class_counts(self) -> dict[int, int]:
        """Samples stored per class in this process's shard."""
        with self._lock:
            return self._policy.class_counts()

    def stored_labels(self) -> np.ndarray:
        """Labels of the stored samples, slot by slot (host array)."""
        with self._lock:
            return self._policy.slot_labels[: self.size].copy()

    def stored(self, field: int | None = None):
        """The stored samples (arrays of this buffer's backend), slot by slot.

        Returns one field when ``field`` is given, else a tuple of all fields.
        On the GPU the device work that wrote them is complete on return, so
        the views can be read on any stream. They are views: the next insert
        (from any thread) overwrites them.
        """
        with self._lock:
            if not self.store.allocated:
                raise RuntimeError("the buffer is empty: nothing has been inserted yet")
            self.wait_for_writes()
            views = tuple(s[: self.size] for s in self.store.fields)
            return views if field is None else views[field]

    # -------------------------------------------------------------- ordering
    def wait_for_writes(self, stream=None) -> None:
        """Orders later work after every write queued into the store so far:
        work on ``stream`` when one is given, the host otherwise."""
        last_stream, event = self._last_write
        if event is None:
            return
        if stream is None:
            event.synchronize()
        elif stream is not last_stream:
            self._backend.wait_event(stream, event)

    def _wrote(self, stream) -> None:
        """Remembers that the store was accessed (written, or read by a
        gather) on ``stream`` (the GPU only): later writes on other streams
        are ordered after it."""
        if self._backend.is_gpu:
            self._last_write = (stream, self._backend.record_event(stream))

    # ------------------------------------------------------------ validation
    def check_batch(self, fields, stream=None) -> tuple[list, np.ndarray]:
        """Converts and checks a batch, one array per field, batch first.

        Returns the arrays (on this buffer's device, uploaded on ``stream``)
        and the labels as a host int64 array. Raises before anything changes.
        Hold :attr:`lock` across this and :meth:`ensure_storage`: the first
        batch of another thread may fix the layout in between.
        """
        n_fields, li = len(fields), self.label_index
        if n_fields < 2:
            raise ValueError("a batch needs at least two fields: the samples and their labels")
        if li >= n_fields:
            raise ValueError(f"label_index={li} but the batch has only {n_fields} fields")
        spec = self.store.spec
        if spec is not None and n_fields != len(spec):
            raise ValueError(f"the buffer holds {len(spec)} fields per sample, "
                             f"this batch has {n_fields}")
        label_field = fields[li]
        host_labels = None if on_device(label_field) else to_host(label_field)
        asarray = self._backend.asarray
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
        if spec is None:
            for i, a in enumerate(arrays):
                if a.dtype.kind not in _STORABLE_KINDS:
                    raise TypeError(f"field {i} has dtype {a.dtype}; stored fields must be "
                                    "numeric (bool, integer, float or complex)")
        else:
            for i, (a, s) in enumerate(zip(arrays, spec)):
                if a.shape[1:] != s.shape or a.dtype != s.dtype:
                    if a.dtype.kind not in _STORABLE_KINDS:
                        raise TypeError(f"field {i} has dtype {a.dtype}; stored fields must be "
                                        "numeric (bool, integer, float or complex)")
                    raise ValueError(
                        f"field {i}: samples of shape {a.shape[1:]} and dtype {a.dtype} do not "
                        f"match the buffer ({s.shape}, {s.dtype}), fixed by the first "
                        "batch. Samples must have one fixed shape and dtype: resize (and cast) "
                        "them in the source pipeline")
        if host_labels is None:
            host_labels = self._backend.to_host(labels, stream)
        host_labels = np.asarray(host_labels).reshape(b)
        kind = host_labels.dtype.kind
        if kind == "u":
            if host_labels.dtype.itemsize == 8 and host_labels.max() > _INT64_MAX:
                big = host_labels[host_labels > _INT64_MAX][:5]
                raise ValueError(f"labels must be < 2**63, got {big.tolist()}")
        elif host_labels.min() < 0:
            raise ValueError("labels must be non-negative, got "
                             f"{host_labels[host_labels < 0][:5].tolist()}")
        return arrays, host_labels.astype(np.int64)

    def ensure_storage(self, arrays) -> None:
        """Allocates the storage from the first batch's layout."""
        with self._lock:
            if self.store.allocated:
                return
            self.store.allocate(spec_of(arrays))
        log.log(self.log_level, "rehearsal buffer: %d samples x %s on %s (%.1f MiB)",
                self.capacity, [f.describe() for f in self.spec], self.device,
                self.nbytes / 2**20)

    # -------------------------------------------------------------- the step
    # The interface a stage uses (dali_rehearsal.stage): check_batch,
    # ensure_storage, begin_step, end_step, fail_step and attach_stage; the
    # stage holds ``lock`` from begin_step to end_step, so that no other
    # thread uses the buffer between a step's representatives and its insert.
    def begin_step(self, *, active: bool = True) -> Representatives | None:
        """The representatives of the next step (None: the epoch ends here on
        every process). ``active`` says whether this process has a step."""
        with self._lock:
            if not self._sampler.started:
                self._sampler.start(active=active, event=self._last_write[1])
            return self._sampler.finish()

    def open_step(self, *, active: bool = True) -> None:
        """Opens the round for the next step now, when none is open (global
        sampling; nothing otherwise): a stage calls it at a point every
        process reaches at the same step, so that the round overlaps with what
        comes before that step. :meth:`begin_step` then waits for it."""
        with self._lock:
            if self._sampler.is_global and not self._sampler.started:
                self._sampler.start(active=active, event=self._last_write[1])

    def end_step(self, out, fresh_count: int, labels: np.ndarray, reps: Representatives,
                 *, stream=None, next_active: bool | None = True) -> int:
        """Writes ``reps`` after the ``fresh_count`` fresh rows already in
        ``out``, inserts the fresh rows and, for global sampling, opens the next
        step's round at once so that it overlaps with training. Every device
        operation is queued on ``stream``. Returns the row count.

        ``next_active`` says whether this process has a next step in its epoch;
        ``None`` (a stage that learns it only when it builds that step) leaves
        the round closed: :meth:`begin_step` opens it with what it knows then.
        """
        with self._lock:
            self.wait_for_writes(stream)
            reps.write_into(self._view, out, fresh_count, stream)
            self._last_reps = reps
            batch_index, slots = self._policy.offer(labels[:fresh_count])
            self.store.scatter(out, batch_index, slots, stream)
            self._wrote(stream)
            if self._sampler.is_global and next_active is not None:
                self._sampler.start(active=next_active, event=self._last_write[1])
            return fresh_count + reps.count

    def fail_step(self) -> None:
        """A step failed on this process: other processes raise instead of
        waiting for it."""
        with self._lock:
            self._sampler.abort()

    def mix(self, *fields, stream=None):
        """Returns the batch's ``b`` fresh samples followed by up to ``r``
        representatives, one array per field, then stores the fresh samples.

        ``fields`` are arrays with the batch on the first axis (NumPy, CuPy, or
        anything exposing the array interfaces): ``mix(images, labels, *extras)``.
        The result is on the buffer's device. While the buffer holds fewer than
        ``r`` samples the result has fewer than ``b + r`` rows. On the GPU every
        operation is queued on ``stream`` (default: the current stream).
        With ``comm`` and global sampling this is a collective call: every
        process must call it once per step.
        """
        if stream is None and self._backend.is_gpu:
            stream = self._backend.current_stream()
        with self._lock:
            self._check_open("mix()")
            try:
                arrays, labels = self.check_batch(fields, stream)
                self.ensure_storage(arrays)
                b = arrays[0].shape[0]
                reps = self.begin_step()
            except Exception:
                self.fail_step()     # other processes raise instead of waiting for this one
                raise
            out = self.store.empty_rows(b + reps.count)
            self.store.copy(arrays, out, 0, stream)
            self.end_step(out, b, labels, reps, stream=stream)
            return tuple(out)

    def add(self, *fields, stream=None) -> None:
        """Offers a batch to the buffer without drawing representatives."""
        if stream is None and self._backend.is_gpu:
            stream = self._backend.current_stream()
        with self._lock:
            self._check_open("add()")
            arrays, labels = self.check_batch(fields, stream)
            self.ensure_storage(arrays)
            self.wait_for_writes(stream)
            # With global sampling the round for the next step may still be
            # reading the store in the background: let it finish first.
            self._sampler.settle()
            batch_index, slots = self._policy.offer(labels)
            self.store.scatter(arrays, batch_index, slots, stream)
            self._wrote(stream)

    def sample(self, num: int | None = None, *, stream=None):
        """Draws ``num`` (default ``r``) stored samples uniformly without
        replacement from this process's shard; one array per field."""
        k = self.num_representatives if num is None else check_int(num, "num", 0)
        if stream is None and self._backend.is_gpu:
            stream = self._backend.current_stream()
        with self._lock:
            self._check_open("sample()")
            if not self.store.allocated:
                raise RuntimeError("the buffer is empty: nothing has been inserted yet")
            k = min(k, self.size)
            slots = np.sort(self._sampler.rng.choice(self.size, size=k, replace=False))
            out = self.store.empty_rows(k)
            self.wait_for_writes(stream)
            self.store.gather(slots.astype(np.int64), out, 0, stream)
            self._wrote(stream)     # a later write on another stream waits for this read
            return tuple(out)

    # ------------------------------------------------------------ checkpoints
    # The formats, checks and collectives live in dali_rehearsal.checkpoint.
    def state_dict(self) -> dict:
        """This process's shard as a dict of arrays and plain values: the
        stored samples (host copies), the policy's bookkeeping, the random
        streams and the settings.

        The arrays are CPU ``torch`` tensors when PyTorch can be imported
        (``torch.save`` then ``torch.load(..., weights_only=True)`` round-trips
        the dict), NumPy arrays otherwise. It is a consistent snapshot from
        any thread at any time; while a stage runs it also holds the steps the
        stage prepared ahead of training, so take it between tasks for the
        state that matches what training consumed. See
        :mod:`dali_rehearsal.checkpoint`.
        """
        with self._lock:
            return checkpoint.state_dict(self, self._policy)

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict` into this new buffer (before its first
        step), built with the same settings on the same rank of as many
        processes; the same batches follow.

        Everything is checked first: a corrupted, inconsistent or mismatched
        state raises :class:`~dali_rehearsal.checkpoint.CheckpointError` (a
        ``ValueError``) and leaves the buffer as it was.
        """
        with self._lock:
            checkpoint.load_state_dict(self, self._policy, self._wrote, state)

    def save(self, path, *, allow_other_files: bool = False) -> None:
        """Writes a checkpoint directory at ``path`` (NumPy files and JSON, no
        pickle, no PyTorch): atomically, with checksums. With ``comm`` this is
        a collective call: every process writes its shard into the same
        directory (a filesystem every process can reach).

        The directory is the checkpoint's own: ``save`` refuses one that holds
        files it did not write (``FileExistsError``), unless
        ``allow_other_files=True`` (the checkpoint is then written next to
        them, and they are left untouched), and never deletes or replaces a
        file it did not write. One save at a time per directory: a concurrent
        ``save`` into it raises
        :class:`~dali_rehearsal.checkpoint.ConcurrentSaveError`; the previous
        checkpoint or one complete new one always loads."""
        with self._lock:
            checkpoint.save(self, self._policy, path, allow_other_files=allow_other_files)

    def load(self, path, *, resize: bool = False) -> None:
        """Restores a checkpoint directory written by :meth:`save` into this new
        buffer (collective with ``comm``).

        On as many processes with the same capacities, each process resumes
        its own shard exactly. On another number of processes the samples are
        redistributed: all of them when they fit, else a uniform subsample
        (per class for ``"class_balanced"``). ``resize=True`` also allows
        buffers of another capacity. Checked first: a bad checkpoint raises on
        every process and changes nothing.
        """
        with self._lock:
            checkpoint.load(self, self._policy, self._wrote, path, resize=resize)

    def attach_stage(self, stage) -> None:
        """A new DALI stage feeds this buffer: the previous one stops preparing
        batches, so that only one stage at a time writes into the buffer."""
        self._check_open("a new rehearsal stage")
        previous = self._stage() if self._stage is not None else None
        if previous is not None and previous is not stage:
            previous.stop()     # without the lock: its worker may be finishing a step
        with self._lock:
            if self._sampler.started:
                # The previous stage opened the round for its next step, with its own
                # epoch's state; every process discards it at this same point.
                self._sampler.finish()
            self._stage = weakref.ref(stage)

    def close(self) -> None:
        """Stops the stage's worker and the background exchange; idempotent.

        With ``comm``, every process closes its buffer after the same steps:
        the stage's worker stops at the same step on every rank. A process
        that closes while the others still exchange makes them raise
        ``RemoteError``; when the others stopped first (one of them closed
        after fewer steps, or failed in a step this process never used), this
        raises that ``RemoteError`` (it is logged instead when ``close`` runs
        while an exception is being handled). Each of its waits for the others
        is bounded by the buffer's ``timeout``.

        From another thread: ``mix``, ``add`` and ``sample`` refuse at once;
        an operation under way ends first (with ``comm``, a step waiting for
        the other processes ends within the timeout).
        """
        self._closed = True
        stage = self._stage() if self._stage is not None else None
        if stage is not None:
            stage.stop()        # without the lock: its worker may be finishing a step
        with self._lock:
            self._sampler.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self) -> str:
        return (f"RehearsalBuffer(capacity={self.capacity}, num_representatives="
                f"{self.num_representatives}, policy={self.policy!r}, device={self.device!r}, "
                f"size={self.size}, rank={self.rank}/{self.world_size}, "
                f"sampling={self.sampling!r})")
