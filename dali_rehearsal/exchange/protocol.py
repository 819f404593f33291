"""The vocabulary of the round protocol: the status row every process sends
first in every exchange, and the shared-seed draws.

A status row is ``COLUMNS`` int64 values: what the process is doing
(:data:`KIND`: a step, an ended epoch, a failure, closing, building a buffer,
``save()``, ``load()``), its shard size, a hash of its settings and one of
its sample layout, the round number, its step count, its seed, and whether it
has a note (the reason it stops) to send.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from ..representatives import draw_distinct

__all__ = ["ACTIVE", "IDLE", "FAILED", "CLOSED", "HELLO", "SAVE", "LOAD", "STOPPING",
           "CALL_OF", "KIND", "SIZE", "SETTINGS", "LAYOUT", "ROUND", "STEPS", "SEED", "NOTE",
           "NOTE_FLAG", "FEEDBACK_FLAG",
           "COLUMNS", "NOTE_BYTES", "stable_hash", "seed_of", "draws"]

# What a process says in a round (and in the first message of other collectives).
ACTIVE, IDLE, FAILED, CLOSED, HELLO, SAVE, LOAD = 0, 1, 2, 3, 4, 5, 6
#: The kinds that end the protocol on every process.
STOPPING = (FAILED, CLOSED)
#: The collective call each kind belongs to: processes that meet in one
#: exchange must be in the same call.
CALL_OF = {ACTIVE: "step", IDLE: "step", FAILED: "step", CLOSED: "step", HELLO: "build",
           SAVE: "save", LOAD: "load"}
# Columns of the status row.
KIND, SIZE, SETTINGS, LAYOUT, ROUND, STEPS, SEED, NOTE = range(8)
#: Bits of the NOTE column: the process sends a note; it has feedback for
#: other processes' samples (:mod:`.mail`).
NOTE_FLAG, FEEDBACK_FLAG = 1, 2
COLUMNS = 8
#: Bytes of the note each process sends when a round needs notes.
NOTE_BYTES = 4096


def stable_hash(obj) -> int:
    """A stable, non-zero 63-bit hash of a JSON-able value."""
    digest = hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") & (2**63 - 1)) or 1


def seed_of(seed) -> int:
    """A 63-bit seed for the shared draws (fresh entropy for ``None``)."""
    if seed is None:
        return int(np.random.SeedSequence().entropy % 2**63)
    seed = int(seed)
    if seed < 2**63:
        return seed
    return int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0] % 2**63)


def draws(seed: int, round_no: int, world: int, total: int, k: int) -> np.ndarray:
    """Every process's draws in round ``round_no``: row ``p`` holds process
    ``p``'s ``k`` distinct global indices, uniform over ``[0, total)``, in
    increasing order (grouped by owner); rows independent. Every process
    computes the same array from (rank 0's seed, round): one generator per
    round, ``world`` rows drawn together.

    As in :func:`~dali_rehearsal.representatives.draw_distinct`: when ``k``
    is much smaller than ``total``, a row of independent uniform values is
    kept when its values are distinct and drawn again with
    ``Generator.choice(replace=False)`` otherwise; either way every
    ``k``-subset is equally likely."""
    rng = np.random.default_rng([seed, round_no])
    if k <= 0:
        return np.empty((world, 0), np.int64)
    if 4 * k > total:
        return np.stack([draw_distinct(rng, total, k) for _ in range(world)])
    picks = (rng.random((world, k)) * total).astype(np.int64)
    picks.sort(axis=1)
    for p in np.flatnonzero((picks[:, 1:] == picks[:, :-1]).any(axis=1)):
        row = rng.choice(total, size=k, replace=False).astype(np.int64)
        row.sort()
        picks[p] = row
    return picks
