"""Epoch bookkeeping over a DALI reader's continuous sample stream.

A DALI reader never stops: it streams shard after shard, and when its epoch
length is not a multiple of the batch size, its last batch of one epoch runs
into the next (or, with ``pad_last_batch=True``, is padded with copies of the
shard's last sample up to a multiple of the batch size). Without
``stick_to_shard`` the reader moves on to the next shard every epoch, so the
epoch length can change from epoch to epoch.

:class:`EpochPlan` turns ``reader_meta()`` into that stream's layout, as a
queue of segments of real samples and padding, and tells the mixing stage how
many fresh samples each epoch delivers under DALI's ``LastBatchPolicy``:

``PARTIAL`` (default)
    Every real sample of the epoch exactly once; the last batch is shorter.
``FILL``
    Full batches; the last one is filled with the reader's padding, or, for an
    unpadded reader, with the first samples of the next epoch (which then
    delivers that many fewer: no sample is lost or repeated in the stream).
``DROP``
    Full batches only; the samples of the last partial batch are skipped.
"""

from __future__ import annotations

from collections import deque

__all__ = ["shard_bounds", "EpochPlan"]


def shard_bounds(size: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """The half-open range of sample indices DALI assigns to a shard."""
    return size * shard_id // num_shards, size * (shard_id + 1) // num_shards


class EpochPlan:
    """The stream of one reader shard as segments ``[kind, count]``, kind in
    ``{"real", "pad"}``, appended one reader epoch at a time."""

    def __init__(self, meta: dict, batch_size: int):
        self.size = int(meta["epoch_size"])
        self.num_shards = int(meta["number_of_shards"])
        self.shard_id = int(meta["shard_id"])
        self.pad = bool(meta["pad_last_batch"])
        self.stick = bool(meta["stick_to_shard"])
        self.padded_shard = int(meta["epoch_size_padded"]) // self.num_shards
        self.batch_size = int(batch_size)
        self.segments: deque[list] = deque()
        self.planned = 0            # reader epochs appended so far

    def reader_epoch(self, index: int) -> list[list]:
        """Segments of reader epoch ``index`` (0-based)."""
        shard = self.shard_id if self.stick else (self.shard_id + index) % self.num_shards
        lo, hi = shard_bounds(self.size, shard, self.num_shards)
        real = hi - lo
        segs = [["real", real]]
        if self.pad:
            b = self.batch_size
            padded = -(-self.padded_shard // b) * b
            if padded > real:
                segs.append(["pad", padded - real])
        return segs

    def append_next(self) -> None:
        self.segments.extend(self.reader_epoch(self.planned))
        self.planned += 1

    def start_epoch(self, epoch: int) -> int:
        """Makes sure reader epoch ``epoch`` is queued; returns the real samples
        queued, which is what this epoch delivers (before the last-batch policy)."""
        while self.planned <= epoch:
            self.append_next()
        return self.real_queued()

    def real_queued(self) -> int:
        return sum(c for kind, c in self.segments if kind == "real")

    def take(self, n: int, *, padding: str) -> list[tuple[str, int]]:
        """Consumes ``n`` samples from the head of the stream; returns runs
        ``(action, count)`` with action ``"use"`` or ``"skip"``.

        ``padding="skip"``: padding is skipped and not counted in ``n`` (fresh
        samples). ``padding="use"``: padding and real samples both count (the
        fill of a ``FILL`` batch); more reader epochs are queued as needed.
        """
        runs: list[tuple[str, int]] = []
        while n > 0:
            if not self.segments:
                if padding == "skip":
                    raise RuntimeError("internal: epoch plan ran out of real samples")
                self.append_next()
                continue
            seg = self.segments[0]
            if seg[0] == "pad" and padding == "skip":
                runs.append(("skip", seg[1]))
                self.segments.popleft()
                continue
            m = min(n, seg[1])
            runs.append(("use", m))
            seg[1] -= m
            n -= m
            if seg[1] == 0:
                self.segments.popleft()
        return runs

    def drop_real(self, n: int) -> list[tuple[str, int]]:
        """Skips ``n`` real samples (and padding in between)."""
        return [("skip", c) for _, c in self.take(n, padding="skip")]
