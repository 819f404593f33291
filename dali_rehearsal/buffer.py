"""The rehearsal buffer: preallocated storage of whole samples on one device."""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import numpy as np

from ._backend import Backend, get_backend, to_host
from .kernels import copy_rows, scatter_rows
from .policies import make_policy
from .sampling import LocalSampler, Representatives

__all__ = ["RehearsalBuffer", "FieldSpec"]

log = logging.getLogger("dali_rehearsal")


@dataclass(frozen=True)
class FieldSpec:
    """Shape and dtype of one per-sample field (image, label, logits, ...)."""

    shape: tuple
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _on_device(x) -> bool:
    """True for CUDA arrays and DALI GPU tensor lists; False for host data
    (NumPy, DALI CPU tensors and tensor lists, which also have ``as_cpu``)."""
    return hasattr(x, "__cuda_array_interface__") or (
        hasattr(x, "as_tensor") and not hasattr(x, "as_array"))


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


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
        seed: seed of the insertion and sampling random streams; same seed and
            data give the same batches. With ``comm`` each process derives its
            own streams from ``(seed, rank)``.
        comm: an ``mpi4py`` communicator for global sampling across processes
            (see :mod:`dali_rehearsal.exchange`); ``None`` or a communicator of
            size 1 is the single-process buffer.
        sampling: ``"global"`` (default: representatives drawn from the union of
            all processes' shards) or ``"local"`` (from this process's shard only).
        cuda_aware: with ``comm`` and ``device="gpu"``: pass device buffers to MPI
            (``True``), stage them through pinned host memory (``False``) or
            detect what the MPI library supports (``None``, default).
    """

    def __init__(self, *, capacity: int, num_representatives: int,
                 policy: str = "class_balanced", device: str | None = None,
                 label_index: int = 1, seed: int | None = None, comm=None,
                 sampling: str = "global", cuda_aware: bool | None = None):
        self.capacity = _check_int("capacity", capacity, 1)
        self.num_representatives = _check_int("num_representatives", num_representatives, 0)
        self.label_index = _check_int("label_index", label_index, 0)
        if sampling not in ("global", "local"):
            raise ValueError(f"sampling must be 'global' or 'local', got {sampling!r}")
        self._backend: Backend = get_backend(device)
        self.seed = seed
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.world_size = comm.Get_size() if comm is not None else 1
        entropy = [] if seed is None else [int(seed)]
        policy_seq, sample_seq = np.random.SeedSequence(
            entropy or None, spawn_key=(self.rank,)).spawn(2)
        self._policy = make_policy(policy, self.capacity, np.random.default_rng(policy_seq))
        sample_rng = np.random.default_rng(sample_seq)
        self.sampling = sampling
        if comm is not None and self.world_size > 1 and sampling == "global":
            from .exchange import GlobalSampler
            self._sampler = GlobalSampler(self, comm, sample_rng, seed=seed,
                                          cuda_aware=cuda_aware)
        else:
            self._sampler = LocalSampler(self, sample_rng)
        self._spec: tuple[FieldSpec, ...] | None = None
        self._storage: list | None = None
        self._stage = None      # weak reference to the DALI stage feeding this buffer
        #: ``(rank, slot)`` of each representative of the last step, in output order.
        self.last_origin = np.empty((0, 2), dtype=np.int64)

    # ----------------------------------------------------------------- state
    @property
    def _log_level(self) -> int:
        """INFO on rank 0, DEBUG elsewhere: logs stay quiet except on rank 0."""
        return logging.INFO if self.rank == 0 else logging.DEBUG

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
        return self._spec

    @property
    def nbytes(self) -> int:
        """Bytes of sample storage allocated (0 before the first batch)."""
        return 0 if self._spec is None else self.capacity * sum(f.nbytes for f in self._spec)

    def class_counts(self) -> dict[int, int]:
        """Samples stored per class in this process's shard."""
        return self._policy.class_counts()

    def stored_labels(self) -> np.ndarray:
        """Labels of the stored samples, slot by slot (host array)."""
        return self._policy.slot_labels[: self.size].copy()

    def stored(self, field: int | None = None):
        """The stored samples (arrays of this buffer's backend), slot by slot.

        Returns one field when ``field`` is given, else a tuple of all fields.
        """
        if self._storage is None:
            raise RuntimeError("the buffer is empty: nothing has been inserted yet")
        views = tuple(s[: self.size] for s in self._storage)
        return views if field is None else views[field]

    # ------------------------------------------------------------ validation
    def _prepare(self, fields, stream=None) -> tuple[list, np.ndarray]:
        """Converts and checks a batch; raises before anything changes."""
        if len(fields) < 2:
            raise ValueError("a batch needs at least two fields: the samples and their labels")
        if self.label_index >= len(fields):
            raise ValueError(f"label_index={self.label_index} but the batch has only "
                             f"{len(fields)} fields")
        if self._spec is not None and len(fields) != len(self._spec):
            raise ValueError(f"the buffer holds {len(self._spec)} fields per sample, "
                             f"this batch has {len(fields)}")
        label_field = fields[self.label_index]
        host_labels = None if _on_device(label_field) else to_host(label_field)
        arrays = [self._backend.asarray(f, stream) for f in fields]
        sizes = {a.shape[0] if a.ndim else None for a in arrays}
        if len(sizes) != 1 or None in sizes:
            raise ValueError("every field must be an array with the batch on its first axis and "
                             f"the same batch size; got shapes {[a.shape for a in arrays]}")
        (b,) = sizes
        if b == 0:
            raise ValueError("empty batch")
        if self._spec is not None:
            for i, (a, spec) in enumerate(zip(arrays, self._spec)):
                if a.shape[1:] != spec.shape or a.dtype != spec.dtype:
                    raise ValueError(
                        f"field {i}: samples of shape {a.shape[1:]} and dtype {a.dtype} do not "
                        f"match the buffer ({spec.shape}, {spec.dtype}), fixed by the first "
                        "batch. Samples must have one fixed shape and dtype: resize (and cast) "
                        "them in the source pipeline")
        labels = arrays[self.label_index]
        if labels.dtype.kind not in "iu":
            raise TypeError(f"labels (field {self.label_index}) must be integers, "
                            f"got dtype {labels.dtype}")
        if labels.size != b:
            raise ValueError(f"labels (field {self.label_index}) must hold one value per sample, "
                             f"got shape {labels.shape}")
        if host_labels is None:
            host_labels = to_host(labels)
        host_labels = host_labels.reshape(b).astype(np.int64)
        if (host_labels < 0).any():
            raise ValueError(f"labels must be non-negative, got {host_labels[host_labels < 0][:5]}")
        return arrays, host_labels

    def _allocate(self, arrays) -> None:
        self._spec = tuple(FieldSpec(tuple(a.shape[1:]), np.dtype(a.dtype)) for a in arrays)
        self._storage = [self._backend.empty((self.capacity,) + s.shape, s.dtype)
                         for s in self._spec]
        log.log(self._log_level, "rehearsal buffer: %d samples x %s on %s (%.1f MiB)",
                self.capacity, [(s.shape, str(s.dtype)) for s in self._spec], self.device,
                self.nbytes / 2**20)

    # ------------------------------------------------------------- the step
    def _insert(self, rows, n: int, labels: np.ndarray, stream=None) -> None:
        """Offers rows ``0..n-1`` of ``rows`` (one array per field) to the policy."""
        batch_index, slots = self._policy.offer(labels[:n])
        if len(slots) == 0:
            return
        src_index = self._backend.asarray(batch_index, stream)
        dst_index = self._backend.asarray(slots, stream)
        for src, dst in zip(rows, self._storage):
            scatter_rows(src, src_index, dst, dst_index, stream=stream)

    def _next_representatives(self, *, active: bool = True) -> Representatives | None:
        if not self._sampler.started:
            self._sampler.start(active=active)
        return self._sampler.finish()

    def _compose(self, out, fresh_count: int, labels: np.ndarray, reps: Representatives,
                 stream=None, *, next_active: bool = True) -> int:
        """Writes ``reps`` after the ``fresh_count`` fresh rows already in ``out``,
        inserts the fresh rows and, for global sampling, opens the next step's
        round at once so that it overlaps with training; returns the row count.

        ``next_active`` says whether this process has a next step in its epoch.
        """
        reps.write_into(self, out, fresh_count, stream)
        self.last_origin = reps.origin
        self._insert(out, fresh_count, labels, stream)
        if self._sampler.is_global:
            self._sampler.start(active=next_active)
        return fresh_count + reps.count

    def mix(self, *fields, stream=None):
        """Returns the batch's ``b`` fresh samples followed by up to ``r``
        representatives, one array per field, then stores the fresh samples.

        ``fields`` are arrays with the batch on the first axis (NumPy, CuPy, or
        anything exposing the array interfaces): ``mix(images, labels, *extras)``.
        The result is on the buffer's device. While the buffer holds fewer than
        ``r`` samples the result has fewer than ``b + r`` rows.
        With ``comm`` and global sampling this is a collective call: every
        process must call it once per step.
        """
        try:
            arrays, labels = self._prepare(fields, stream)
        except Exception:
            self._sampler.abort()     # other processes raise instead of waiting for this one
            raise
        if self._spec is None:
            self._allocate(arrays)
        b = arrays[0].shape[0]
        reps = self._next_representatives()
        out = [self._backend.empty((b + reps.count,) + s.shape, s.dtype) for s in self._spec]
        for src, dst in zip(arrays, out):
            copy_rows(src, dst, stream=stream)
        self._compose(out, b, labels, reps, stream)
        return tuple(out)

    def add(self, *fields, stream=None) -> None:
        """Offers a batch to the buffer without drawing representatives."""
        arrays, labels = self._prepare(fields, stream)
        if self._spec is None:
            self._allocate(arrays)
        self._insert(arrays, arrays[0].shape[0], labels, stream)

    def sample(self, num: int | None = None, *, stream=None):
        """Draws ``num`` (default ``r``) stored samples uniformly without
        replacement from this process's shard; one array per field."""
        if self._storage is None:
            raise RuntimeError("the buffer is empty: nothing has been inserted yet")
        k = self.num_representatives if num is None else _check_int("num", num, 0)
        k = min(k, self.size)
        rng = self._sampler._rng
        slots = np.sort(rng.choice(self.size, size=k, replace=False)).astype(np.int64)
        reps = Representatives(k, slots=slots)
        out = [self._backend.empty((k,) + s.shape, s.dtype) for s in self._spec]
        reps.write_into(self, out, 0, stream)
        return tuple(out)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything needed to resume this buffer: the stored samples (host
        copies), the policy's bookkeeping and the random streams.

        Plain Python and NumPy objects: save it with ``torch.save`` or
        ``pickle`` next to the model. With ``comm`` each process saves its own
        shard. Take it between tasks, when no stage is preparing batches.
        """
        state = {
            "format": 1, "capacity": self.capacity,
            "num_representatives": self.num_representatives, "policy": self.policy,
            "label_index": self.label_index, "rank": self.rank, "world_size": self.world_size,
            "spec": None if self._spec is None else [(f.shape, f.dtype.str) for f in self._spec],
            "fields": None if self._storage is None else
            [np.array(to_host(s[: self.size])) for s in self._storage],
            "policy_state": self._policy.state_dict(),
            "sampler_rng": self._sampler._rng.bit_generator.state,
        }
        if self._sampler.is_global:
            state["exchange"] = {"seed": self._sampler._seed,
                                 "round": self._sampler.resume_round}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict` into this (new, empty) buffer."""
        if self._storage is not None:
            raise RuntimeError("load_state_dict() needs a buffer that has not stored anything")
        if state.get("format") != 1:
            raise ValueError("not a RehearsalBuffer state (unknown format)")
        for key in ("capacity", "policy", "label_index", "rank", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the saved buffer has {key}={state[key]!r}, this one "
                                 f"{getattr(self, key)!r}")
        if self._sampler.is_global != ("exchange" in state):
            raise ValueError("the saved buffer and this one differ in global sampling")
        self.num_representatives = int(state["num_representatives"])
        if state["spec"] is not None:
            spec = tuple(FieldSpec(tuple(shape), np.dtype(dtype)) for shape, dtype in state["spec"])
            self._spec = spec
            self._storage = [self._backend.empty((self.capacity,) + f.shape, f.dtype)
                             for f in spec]
            size = int(state["policy_state"]["size"])
            for store, saved in zip(self._storage, state["fields"]):
                if saved.shape != (size,) + store.shape[1:]:
                    raise ValueError("the saved samples do not match the saved layout")
                if size:
                    copy_rows(self._backend.asarray(saved), store)
        self._policy.load_state_dict(state["policy_state"])
        self._sampler._rng.bit_generator.state = state["sampler_rng"]
        if self._sampler.is_global:
            self._sampler._seed = int(state["exchange"]["seed"])
            self._sampler._next_round = int(state["exchange"]["round"])

    def _attach_stage(self, stage) -> None:
        """A new DALI stage feeds this buffer: the previous one stops preparing
        batches, so that only one stage at a time writes into the buffer."""
        previous = self._stage() if self._stage is not None else None
        if previous is not None and previous is not stage:
            previous.stop()
        if self._sampler.started:
            # The previous stage opened the round for its next step, with its own
            # epoch's state; every process discards it at this same point.
            self._sampler.finish()
        self._stage = weakref.ref(stage)

    def close(self) -> None:
        """Stops the stage's worker and the background exchange; idempotent.

        With ``comm``, every process must close its buffer (as it must run the
        same steps): the stage's worker stops at the same step on every rank.
        """
        stage = self._stage() if self._stage is not None else None
        if stage is not None:
            stage.stop()
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
