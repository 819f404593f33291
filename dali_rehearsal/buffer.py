"""The rehearsal buffer: preallocated storage of whole samples on one device."""

from __future__ import annotations


import numpy as np

from . import checkpoint
from .checks import check_int, check_seed
from .exchange import Transport
from .step import StepCore
from .storage import FieldSpec

__all__ = ["RehearsalBuffer", "FieldSpec"]


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
        task_aware: draw representatives only from samples stored before the
            current task (task-aware replay, as Avalanche's replay that updates
            its buffer after each experience): every replayed sample belongs
            to an earlier task, and the first task trains on its ``b`` fresh
            rows alone. Tell the buffer where a task ends with
            :meth:`end_task`. Default False: draws from everything stored,
            the current task's samples included (online experience replay).
        feedback: per-sample fields the training loop writes back after its
            forward pass, for Dark Experience Replay's logits: a dict ``name
            -> (shape, dtype)`` (a bare shape means float32), e.g.
            ``{"logits": ((10,), "float32")}``. Every delivered batch then
            has, after the source's fields, one field per name (the stored
            values; zeros for fresh rows and samples never written),
            ``written`` (uint8, 1 where a value was written back) and
            ``ticket`` (int64 ``(rank, slot, generation)``); pass the tickets
            and the values to :meth:`update`. See :mod:`dali_rehearsal.feedback`.

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
                 timeout: float | None = 600.0, task_aware: bool = False,
                 feedback: dict | None = None):
        self.capacity = check_int(capacity, "capacity", 1)
        self.num_representatives = check_int(num_representatives, "num_representatives", 0)
        self.label_index = check_int(label_index, "label_index", 0)
        self.seed = check_seed(seed)
        if not isinstance(task_aware, (bool, np.bool_)):
            raise TypeError(f"task_aware must be True or False, got {task_aware!r}")
        if sampling not in ("global", "local"):
            raise ValueError(f"sampling must be 'global' or 'local', got {sampling!r}")
        self.sampling = sampling
        self.comm = comm
        self._closed = False
        self._core = StepCore(capacity=self.capacity,
                              num_representatives=self.num_representatives,
                              label_index=self.label_index, seed=self.seed, policy=policy,
                              device=device, comm=comm, sampling=sampling,
                              cuda_aware=cuda_aware, timeout=timeout,
                              task_aware=task_aware, feedback=feedback)
        self.rank = self._core.rank
        self.world_size = self._core.world_size

    # ----------------------------------------------------------------- state
    @property
    def core(self) -> StepCore:
        """The step object the buffer is made of (:mod:`dali_rehearsal.step`):
        store, policy, sampler and the step sequence. For stages and tools
        built on the library; a training loop needs only the methods here."""
        return self._core

    @property
    def lock(self):
        """The re-entrant lock that serialises the buffer's operations. A
        stage holds it across each of its steps' use of the buffer. Holding
        it yourself makes a sequence of calls atomic; do not build pipelines
        or call ``close()`` while holding it (they wait for the stage's worker,
        which needs it)."""
        return self._core.lock

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
        return self._core.log_level

    @property
    def backend(self):
        """The array backend (NumPy or CuPy) the storage lives on."""
        return self._core.backend

    @property
    def sampler(self):
        """Where representatives come from (:mod:`dali_rehearsal.exchange`)."""
        return self._core.sampler

    def exchange_stats(self) -> dict:
        """What this process's global sampling has exchanged so far, as exact
        counts (a snapshot, a new dict each call): ``rounds`` served,
        ``collectives`` started (``allgathers``), point-to-point
        ``exchanges`` (one per round that moves rows), ``messages_sent``,
        ``bytes_sent`` and ``bytes_received`` to and from other processes
        (see docs/exchange.md). All zero for a buffer that samples locally.
        The round for the next step may still be running when this returns:
        its counts appear once it ends."""
        if self._core.sampler.is_global:
            return self._core.sampler.exchange_stats()
        return dict.fromkeys(("rounds",) + Transport.COUNTS, 0)

    @property
    def feedback_fields(self) -> tuple[str, ...]:
        """Names of the feedback fields (``feedback=``), in output order."""
        return self._core.feedback.names

    def feedback_stats(self) -> dict:
        """What became of the tickets given to :meth:`update` so far, as
        exact counts (a new dict each call): ``applied`` (written into the
        sample they name), ``stale`` (the slot holds another sample now:
        dropped), ``not_stored`` (a fresh row the policy did not keep),
        ``sent`` (for another process's samples, handed to the exchange),
        ``received`` (from other processes: checked on arrival like the
        others), ``undelivered`` (still waiting to be sent when the buffer
        was closed), ``dropped`` (received or written back but still
        waiting for their step when the buffer was closed) and ``waiting``
        (values waiting for their step now: see
        :mod:`dali_rehearsal.feedback`)."""
        with self.lock:
            fb = self._core.feedback
            stats = dict(fb.stats)
            stats["waiting"] = sum(len(p.tickets) for p in fb.pending)
            mail = getattr(self._core.sampler, "mail", None)
            for key in ("received", "undelivered", "dropped"):
                stats[key] += mail.stats[key] if mail is not None else 0
            return stats

    def update(self, tickets, *, stream=None, **values) -> None:
        """Writes per-sample values back into the stored samples the
        ``tickets`` name: ``buffer.update(tickets, logits=outputs)``.

        ``tickets``: the ``ticket`` rows of a delivered batch (any subset, in
        any order; NumPy, CuPy or torch). ``values``: one array per feedback
        field given (``(n, *shape)``, cast to the field's dtype; torch tensors
        are detached); fields not given keep their values. A ticket whose
        slot holds another sample by now is dropped and counted
        (:meth:`feedback_stats`), never applied to the wrong sample. With
        global sampling, tickets of other processes' samples reach their
        owners with the next rounds that draw from them, with no collective
        of their own. On the GPU the write is one kernel queued on
        ``stream`` (default: the current stream), ordered after every read
        and write of the store queued before.
        """
        stream = self._stream(stream)
        with self.lock:
            self._check_open("update()")
            self._core.update(tickets, values, stream)

    @property
    def device(self) -> str:
        return self._core.device

    @property
    def policy(self) -> str:
        return self._core.policy.name

    @property
    def size(self) -> int:
        """Samples stored in this process's shard."""
        return self._core.size

    @property
    def num_seen(self) -> int:
        """Samples offered to this process's shard so far."""
        return self._core.num_seen

    @property
    def spec(self) -> tuple[FieldSpec, ...] | None:
        """Per-field shape and dtype, fixed by the first batch (None before it)."""
        return self._core.spec

    @property
    def nbytes(self) -> int:
        """Bytes of sample storage allocated (0 before the first batch)."""
        return self._core.store.nbytes

    @property
    def last_origin(self) -> np.ndarray:
        """``(rank, slot)`` of each representative of the last step, in output
        order (an ``(r, 2)`` int64 array)."""
        reps = self._core.last_reps
        return np.empty((0, 2), dtype=np.int64) if reps is None else reps.origin

    def class_counts(self) -> dict[int, int]:
        """Samples stored per class in this process's shard."""
        with self.lock:
            return self._core.policy.class_counts()

    def stored_labels(self) -> np.ndarray:
        """Labels of the stored samples, slot by slot (host array)."""
        with self.lock:
            return self._core.policy.slot_labels[: self.size].copy()

    def stored(self, field: int | None = None):
        """The stored samples (arrays of this buffer's backend), slot by slot.

        Returns one field when ``field`` is given, else a tuple of all fields.
        On the GPU the device work that wrote them is complete on return, so
        the views can be read on any stream. They are views: the next insert
        (from any thread) overwrites them.
        """
        views = self._core.stored()
        return views if field is None else views[field]

    # ----------------------------------------------------------------- tasks
    @property
    def task_aware(self) -> bool:
        """Whether representatives come only from earlier tasks (see ``task_aware=``)."""
        return self._core.task_aware

    @property
    def task(self) -> int:
        """The current task's index: how many times :meth:`end_task` was called."""
        return self._core.task

    def end_task(self) -> None:
        """The current task (Avalanche's *experience*) ended: the samples
        stored so far become what task-aware replay draws from, until the
        next call. Call it after the task's last training step, before
        building the next task's pipelines. A DALI stage feeding the buffer
        is stopped first (build new pipelines for the next task), so the
        buffer holds exactly what it holds after any run with the same seed.
        With global sampling every process calls it after the same step.
        Without ``task_aware`` it only counts tasks."""
        self._check_open("end_task()")
        self._core.end_task()

    # -------------------------------------------------------------- the step
    def _stream(self, stream):
        if stream is None and self._core.backend.is_gpu:
            return self._core.backend.current_stream()
        return stream

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
        stream = self._stream(stream)
        with self.lock:
            self._check_open("mix()")
            return self._core.mix(fields, stream)

    def add(self, *fields, stream=None) -> None:
        """Offers a batch to the buffer without drawing representatives."""
        stream = self._stream(stream)
        with self.lock:
            self._check_open("add()")
            self._core.insert(fields, stream)

    def sample(self, num: int | None = None, *, stream=None):
        """Draws ``num`` (default ``r``) stored samples uniformly without
        replacement from this process's shard; one array per field."""
        k = self.num_representatives if num is None else check_int(num, "num", 0)
        stream = self._stream(stream)
        with self.lock:
            self._check_open("sample()")
            return self._core.draw(k, stream)

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
        with self.lock:
            return checkpoint.state_dict(self._core)

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict` into this new buffer (before its first
        step), built with the same settings on the same rank of as many
        processes; the same batches follow.

        Everything is checked first: a corrupted, inconsistent or mismatched
        state raises :class:`~dali_rehearsal.checkpoint.CheckpointError` (a
        ``ValueError``) and leaves the buffer as it was.
        """
        with self.lock:
            checkpoint.load_state_dict(self._core, state)

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
        with self.lock:
            checkpoint.save(self._core, path, allow_other_files=allow_other_files)

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
        with self.lock:
            checkpoint.load(self._core, path, resize=resize)

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
        self._core.stop_writer()    # without the lock: its worker may be finishing a step
        with self.lock:
            self._core.feedback.drop()      # values still waiting for their step
            self._core.sampler.close()

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
