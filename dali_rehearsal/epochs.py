"""Epoch bookkeeping over a DALI reader's continuous sample stream.

A DALI reader never stops: it streams shard after shard, and when its epoch
length is not a multiple of the batch size, its last batch of one epoch runs
into the next (or, with ``pad_last_batch=True``, is padded with copies of the
shard's last sample up to a multiple of the batch size). Without
``stick_to_shard`` the reader moves on to the next shard every epoch, so the
epoch length can change from epoch to epoch.

Two things are computed here from ``reader_meta()``:

- :class:`DaliIteratorSteps`: how many batches DALI's own framework iterator
  (``DALIGenericIterator(..., reader_name=...)``) gives in each epoch for the
  same reader and ``LastBatchPolicy``. The stage gives the same number of steps
  per epoch, so that every shard (every rank) has the same epoch length, known
  in advance, as with DALI's iterator.
- :class:`EpochPlan`: the reader's stream as a queue of segments of real samples
  and padding, each tagged with the reader epoch it belongs to, which the stage
  consumes as it copies rows out of the source's batches.

What each step takes from the stream (``b`` is the source's batch size):

``PARTIAL`` (default)
    Up to ``b`` real samples of the current epoch: every real sample of the
    epoch exactly once, padding skipped, the last batch shorter. (DALI's own
    iterator, on an unpadded reader, drops the part of its last batch that
    belongs to the next epoch, so that the next epoch starts part way into
    its shard: samples are skipped. The stage does not skip any.)
``FILL``
    ``b`` positions of the stream: full batches; the last batch of an epoch is
    filled with the reader's padding or, for an unpadded reader, with the first
    samples of the next epoch, which then delivers that many fewer. This is
    exactly the sequence DALI's iterator gives.
``DROP``
    ``b`` real samples, padding skipped. Where DALI's iterator discards a whole
    reader batch at every epoch end that does not fall on a batch boundary,
    the stage drops nothing: the real samples that do not fill a batch at the
    end of an epoch open the next one. No sample is skipped, and none starves.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["LastBatchPolicy", "policy_name", "shard_bounds", "DaliIteratorSteps", "EpochPlan"]

try:
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
except ImportError:  # DALI is optional for the buffer alone
    import enum

    class LastBatchPolicy(enum.Enum):
        FILL = 0
        DROP = 1
        PARTIAL = 2


def policy_name(policy) -> str:
    """``"FILL"``, ``"DROP"`` or ``"PARTIAL"`` for a ``LastBatchPolicy`` (or its name)."""
    name = getattr(policy, "name", policy)
    if not isinstance(name, str) or name.upper() not in ("FILL", "DROP", "PARTIAL"):
        raise ValueError(f"last_batch_policy must be a LastBatchPolicy (FILL, DROP or PARTIAL), "
                         f"got {policy!r}")
    return name.upper()


def shard_bounds(size: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """The half-open range of sample indices DALI assigns to a shard."""
    return size * shard_id // num_shards, size * (shard_id + 1) // num_shards


class _Reader:
    """A reader's sharding settings, from ``reader_meta()``."""

    def __init__(self, meta: dict, batch_size: int):
        self.size = int(meta["epoch_size"])
        self.num_shards = int(meta["number_of_shards"])
        self.shard_id = int(meta["shard_id"])
        self.pad = bool(meta["pad_last_batch"])
        self.stick = bool(meta["stick_to_shard"])
        self.padded_size = int(meta["epoch_size_padded"])
        self.batch_size = int(batch_size)

    def shard_size(self, shard: int) -> int:
        lo, hi = shard_bounds(self.size, shard, self.num_shards)
        return hi - lo


class DaliIteratorSteps:
    """Batches per epoch of DALI's framework iterator with ``reader_name=``.

    A transcription of the counters of ``_DaliBaseIterator`` (DALI 2.4,
    ``nvidia/dali/plugin/base_iterator.py``) for one pipeline: ``_size``,
    ``_counter``, ``_counter_per_gpu`` and ``_shard_sizes_per_gpu``, advanced
    epoch by epoch exactly as ``__next__``/``reset`` advance them. Like DALI's
    iterator it accounts for every shard at once, so every shard gets the same
    count. Checked against DALI's own iterator by the test suite.
    """

    def __init__(self, meta: dict, batch_size: int, policy):
        r = _Reader(meta, batch_size)
        self._r = r
        self.policy = policy_name(policy)
        b, S = r.batch_size, r.num_shards
        if self.policy == "DROP":
            self._size = r.size // S
        elif r.pad:
            self._size = r.padded_size // S
        else:
            self._size = math.ceil(math.ceil(r.size / S) / b) * b
        self._counter = 0
        self._per_gpu = [0] * S
        self._shard_sizes = [r.shard_size(i) for i in range(S)]

    def next_epoch(self) -> int:
        """The number of batches of the next epoch."""
        r, b = self._r, self._r.batch_size
        drop = self.policy == "DROP"
        steps = 0
        while not (self._size > 0 and self._counter >= self._size):
            self._counter += b                      # a batch is read
            if drop and any(c + self._counter > s
                            for c, s in zip(self._per_gpu, self._shard_sizes)):
                break                               # ... and dropped
            steps += 1
        # reset()
        if drop:
            should_end = any(c + self._counter + b > s
                             for c, s in zip(self._per_gpu, self._shard_sizes))
            if should_end and not self._counter >= self._size:
                self._counter += b
        fill_unpadded = self.policy == "FILL" and not r.pad
        if fill_unpadded:
            self._counter -= min(self._per_gpu)
            self._per_gpu = [c + self._counter - s
                             for c, s in zip(self._per_gpu, self._shard_sizes)]
            self._counter = min(self._per_gpu)
            if not r.stick:
                self._shard_sizes = self._shard_sizes[-1:] + self._shard_sizes[:-1]
            left = [s - c for s, c in zip(self._shard_sizes, self._per_gpu)]
            self._size = math.ceil(max(left) / b) * b
            if self._size == 0:
                self._per_gpu = [0] * r.num_shards
                self._counter = 0
                self._shard_sizes = self._shard_sizes[-1:] + self._shard_sizes[:-1]
                self._size = math.ceil(max(self._shard_sizes) / b) * b
        else:
            self._counter = 0
        return steps


class EpochPlan:
    """The stream of one reader shard and the steps of each epoch.

    The stream is a queue of segments ``[kind, count, epoch]`` (kind
    ``"real"`` or ``"pad"``; ``epoch`` the reader epoch the positions belong
    to), appended one reader epoch at a time as the stage reaches it.
    """

    def __init__(self, meta: dict, batch_size: int, policy=LastBatchPolicy.PARTIAL):
        self.reader = _Reader(meta, batch_size)
        self.batch_size = self.reader.batch_size
        self.policy = policy_name(policy)
        self._dali = DaliIteratorSteps(meta, batch_size, self.policy)
        self._steps: list[int] = []
        self.segments: deque[list] = deque()
        self.planned = 0            # reader epochs appended so far

    # ------------------------------------------------------------ epochs
    def steps(self, epoch: int) -> int:
        """Steps of epoch ``epoch`` (0-based): what DALI's iterator gives."""
        while len(self._steps) <= epoch:
            self._steps.append(self._dali.next_epoch())
        return self._steps[epoch]

    def reader_epoch(self, index: int) -> list[list]:
        """Segments of reader epoch ``index`` (0-based)."""
        r = self.reader
        shard = r.shard_id if r.stick else (r.shard_id + index) % r.num_shards
        real = r.shard_size(shard)
        segs = [["real", real, index]]
        if r.pad:
            b = self.batch_size
            padded = -(-(r.padded_size // r.num_shards) // b) * b
            if padded > real:
                segs.append(["pad", padded - real, index])
        return segs

    def _append_next(self) -> None:
        self.segments.extend(self.reader_epoch(self.planned))
        self.planned += 1

    # ------------------------------------------------------------ the stream
    def head(self) -> list:
        """The segment at the head of the stream (more reader epochs are
        queued as needed)."""
        while not self.segments or self.segments[0][1] == 0:
            if self.segments:
                self.segments.popleft()
            else:
                self._append_next()
        return self.segments[0]

    def consume(self, n: int) -> None:
        """``n`` positions of the head segment were used or skipped."""
        seg = self.head()
        if n > seg[1]:
            raise RuntimeError("internal: consumed past a segment")
        seg[1] -= n

    def skip_positions(self, n: int) -> None:
        """``n`` positions of the stream are gone, whatever they are (a source
        batch that failed)."""
        while n > 0:
            seg = self.head()
            m = min(n, seg[1])
            seg[1] -= m
            n -= m

    def real_left(self, epoch: int) -> int:
        """Real samples still queued from reader epochs up to ``epoch``."""
        while self.planned <= epoch:
            self._append_next()
        return sum(c for kind, c, e in self.segments if kind == "real" and e <= epoch)
