"""Model feedback into the buffer: per-sample fields written back by ticket.

Dark Experience Replay (DER, DER++) keeps, with each stored sample, the
model's logits from when it was trained on; replays then match them. The
source pipeline runs before the model has seen its batch, so such a field
cannot come out of it: the training loop writes it back after the forward
pass. A buffer built with ``feedback={"logits": ((10,), "float32")}``
stores, after the source's own fields:

- each declared feedback field (zeros until written);
- ``written``: uint8, 1 once a value was written back for the sample;
- ``ticket``: int64 ``(rank, slot, generation)``, where the sample lives.

Every row the buffer delivers (``mix``, the DALI stage) carries these three
kinds of field, after the source's: a representative brings its stored
values, its flag and its ticket; a fresh row zeros, flag 0, and the ticket of
the slot it was just written to (slot -1 when the policy did not keep it).

A ticket names a sample, not a slot: the generation is a number this process
gives each write into a slot, never twice (a load or an elastic restore gives
every slot a new one, above every generation saved). :meth:`Feedback.check` keeps a ticket only while its
slot still holds that generation; the others (the slot was overwritten since:
the stage works ahead, another process replaced it) are dropped and counted,
never applied to another sample.

**When a value becomes visible.** A generation also says at which write of
the store (a step's insert, an ``add``) its ticket was issued: its high bits
(``generation >> GEN_SHIFT``). The DALI stage builds steps ahead of the
training loop (DALI's prefetch depth ``d``, the stage's ``prepare_ahead``
``p``), so when the loop writes back the values of step ``u`` the buffer may
already have built steps up to ``u + d + p + 1``, and whether their
representatives saw the values would depend on timing. The values therefore
wait (:attr:`Feedback.pending`) and are written into the store at the end of
step ``u + H``, with ``H = d + p + 2`` (:attr:`Feedback.horizon`, set by the
stage; 0 with ``mix``), a step that can only be built after the loop has asked
for step ``u + 1``: representatives drawn for steps ``u + H + 1`` on see them,
earlier ones never, whatever the timing, as long as the loop writes a step's
values back before it asks for the next batch. Values for older tickets (a
representative's) are written at once, and values from other processes when
they arrive: which later steps see those depends on timing.

This module holds the bookkeeping (declarations, generations, counts); the
step object (:mod:`.step`) moves the rows, and the exchange
(:mod:`.exchange.rounds`) carries other processes' tickets to their owners.
"""

from __future__ import annotations

import keyword
import numbers

import numpy as np

from .storage import FieldSpec

__all__ = ["Feedback", "Pending", "parse_feedback", "WRITTEN", "TICKET", "TICKET_WIDTH",
           "GEN_SHIFT"]

#: Names of the two fields that follow the feedback fields.
WRITTEN, TICKET = "written", "ticket"
#: Values per ticket: rank, slot, generation.
TICKET_WIDTH = 3
#: ``generation >> GEN_SHIFT`` is the write of the store that issued the ticket.
GEN_SHIFT = 20
_RESERVED = {WRITTEN, TICKET, "tickets", "stream"}
_VALUE_KINDS = "biufc"


def _shape_of(value, name: str) -> tuple:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (int(value),)
    if not isinstance(value, (tuple, list)) or not all(
            isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1
            for d in value):
        raise ValueError(f"feedback[{name!r}]: the shape must be a tuple of positive integers "
                         f"(e.g. (10,) for 10 logits), got {value!r}")
    return tuple(int(d) for d in value)


def parse_feedback(declared) -> tuple[tuple[str, ...], tuple[FieldSpec, ...]]:
    """Names and layouts of the declared feedback fields.

    ``declared``: ``None`` (none), or a dict ``name -> (shape, dtype)``; a
    bare shape (``(10,)`` or ``10``) means float32.
    """
    if declared is None:
        return (), ()
    if not isinstance(declared, dict):
        raise TypeError("feedback must be a dict name -> (shape, dtype), e.g. "
                        f"{{'logits': ((10,), 'float32')}}, got {type(declared).__name__}")
    names, specs = [], []
    for name, value in declared.items():
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"feedback field names must be Python identifiers (they are "
                             f"keywords of update()), got {name!r}")
        if name in _RESERVED:
            raise ValueError(f"feedback field name {name!r} is reserved "
                             f"({', '.join(sorted(_RESERVED))})")
        if isinstance(value, tuple) and len(value) == 2 and not isinstance(value[1],
                                                                           numbers.Integral):
            shape, dtype = value
        else:
            shape, dtype = value, np.float32
        shape = _shape_of(shape, name)
        try:
            dtype = np.dtype(dtype)
        except TypeError as e:
            raise TypeError(f"feedback[{name!r}]: not a dtype: {dtype!r}") from e
        if dtype.kind not in _VALUE_KINDS:
            raise TypeError(f"feedback[{name!r}]: dtype {dtype} is not numeric")
        names.append(name)
        specs.append(FieldSpec(shape, dtype))
    if not names:
        raise ValueError("feedback={} declares no field: pass None for a buffer without "
                         "feedback")
    return tuple(names), tuple(specs)


class Pending:
    """Written-back values waiting for their step: rows ``positions`` of
    ``arrays`` (one per field of ``names``, on the buffer's device, ready after
    ``event``) for ``tickets``, issued at the writes ``issue``."""

    __slots__ = ("issue", "tickets", "positions", "arrays", "names", "event")

    def __init__(self, tickets, positions, arrays, names, event=None):
        self.tickets, self.positions = tickets, positions
        self.issue = tickets[:, 2] >> GEN_SHIFT
        self.arrays, self.names, self.event = arrays, names, event

    def split(self, limit: int | None):
        """(rows due by write ``limit`` (None: all), the rest or None)."""
        if limit is None:
            return self, None
        due = self.issue <= limit
        if due.all():
            return self, None
        if not due.any():
            return None, self
        return (Pending(self.tickets[due], self.positions[due], self.arrays, self.names,
                        self.event),
                Pending(self.tickets[~due], self.positions[~due], self.arrays, self.names,
                        self.event))


class Feedback:
    """The feedback fields of one shard and the generation of each slot.

    ``names``/``specs``: the declared fields (empty: the buffer has none and
    every method here is unused). :attr:`extra_spec` is what the store holds
    after the source's fields.
    """

    def __init__(self, declared, *, capacity: int, rank: int):
        self.names, self.specs = parse_feedback(declared)
        self.enabled = bool(self.names)
        self.capacity = int(capacity)
        self.rank = int(rank)
        #: Generation of each slot's sample (0: never written).
        self.generation = np.zeros(self.capacity, np.int64)
        #: The writes of the store so far (the issue of the last tickets).
        self.step = 0
        #: Writes a written-back value waits before it is applied (module doc).
        self.horizon = 0
        #: Values waiting for their write (:class:`Pending`).
        self.pending: list[Pending] = []
        #: What became of the tickets given to :meth:`check` and of remote ones.
        self.stats = {"applied": 0, "stale": 0, "not_stored": 0, "sent": 0, "received": 0,
                      "undelivered": 0, "dropped": 0}

    @property
    def extra_spec(self) -> tuple[FieldSpec, ...]:
        """The feedback fields, ``written`` and ``ticket`` (empty when disabled)."""
        if not self.enabled:
            return ()
        return self.specs + (FieldSpec((), np.dtype(np.uint8)),
                             FieldSpec((TICKET_WIDTH,), np.dtype(np.int64)))

    @property
    def num_extra(self) -> int:
        return len(self.extra_spec)

    def declaration(self) -> list:
        """The declaration as plain values (checkpoint settings)."""
        return [[n, list(s.shape), s.dtype.str] for n, s in zip(self.names, self.specs)]

    # ------------------------------------------------------------- stamping
    def fresh_tickets(self, count: int, batch_index: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Tickets of ``count`` fresh rows of which rows ``batch_index`` were
        written to ``slots``: each of those slots gets a new generation."""
        tickets = np.empty((count, TICKET_WIDTH), np.int64)
        tickets[:, 0] = self.rank
        tickets[:, 1] = -1
        tickets[:, 2] = 0
        n = len(slots)
        self.step += 1
        if n:
            gens = (self.step << GEN_SHIFT) + np.arange(n, dtype=np.int64)
            self.step = int(gens[-1] >> GEN_SHIFT)      # a batch of over 2**20 rows
            self.generation[slots] = gens
            tickets[batch_index, 1] = slots
            tickets[batch_index, 2] = gens
        return tickets

    def restamp(self, size: int, after: int = 0) -> np.ndarray:
        """New generations for slots ``0..size-1`` (after a load), above
        ``after`` (the highest saved: the last one the saved buffer gave, so
        none of its tickets names a loaded sample): the tickets of every
        stored sample; every slot beyond is forgotten."""
        self.generation[:] = 0
        self.step = max(self.step, int(after) >> GEN_SHIFT)
        self.pending = []
        return self.fresh_tickets(size, np.arange(size, dtype=np.int64),
                                  np.arange(size, dtype=np.int64))

    # ------------------------------------------------------------- checking
    def check_tickets(self, tickets, world_size: int) -> np.ndarray:
        """``tickets`` as a host int64 (n, 3) array; raises on a malformed one."""
        t = np.asarray(tickets)
        if t.ndim != 2 or t.shape[1] != TICKET_WIDTH or t.dtype.kind not in "iu":
            raise ValueError(f"tickets must be the (n, {TICKET_WIDTH}) integer array the buffer "
                             f"delivered (its '{TICKET}' output), got shape {t.shape} and "
                             f"dtype {t.dtype}")
        t = np.ascontiguousarray(t, dtype=np.int64)
        bad = (t[:, 0] < 0) | (t[:, 0] >= world_size) | (t[:, 1] >= self.capacity)
        if bad.any():
            raise ValueError(f"tickets name ranks or slots this buffer does not have "
                             f"(world size {world_size}, capacity {self.capacity}): "
                             f"{t[bad][:3].tolist()}")
        return t

    def check(self, tickets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Of this process's ``tickets`` (rows of (rank, slot, generation)),
        the rows whose slot still holds the ticket's sample, and their slots
        (one row per slot: the last one given wins, the others count as
        applied and overwritten). Counts them all."""
        slots = tickets[:, 1]
        current = self.generation[slots] == tickets[:, 2]
        self.stats["stale"] += int((~current).sum())
        rows = np.flatnonzero(current)
        self.stats["applied"] += len(rows)
        # one write per slot, the last row wins (a FILL copy repeats a ticket; a
        # sample drawn in two rounds comes back twice)
        _, last = np.unique(slots[rows][::-1], return_index=True)
        rows = np.sort(rows[::-1][last])
        return rows, slots[rows]

    def stored(self, tickets: np.ndarray) -> np.ndarray:
        """Which ``tickets`` name a stored sample (a fresh row the policy did
        not keep has slot -1); counts the others."""
        stored = (tickets[:, 1] >= 0) & (tickets[:, 2] > 0)
        self.stats["not_stored"] += int((~stored).sum())
        return stored

    def due(self, limit: int | None) -> list[Pending]:
        """Takes the waiting values due by write ``limit`` (None: all)."""
        due, keep = [], []
        for p in self.pending:
            now, later = p.split(limit)
            if now is not None:
                due.append(now)
            if later is not None:
                keep.append(later)
        self.pending = keep
        return due

    def drop(self) -> None:
        """Forgets the waiting values (the buffer closes), counting them."""
        self.stats["dropped"] += sum(len(p.tickets) for p in self.pending)
        self.pending = []

    @property
    def limit(self) -> int:
        """The last write whose tickets' values are due now."""
        return self.step - self.horizon

    def check_values(self, values: dict, n: int) -> list[str]:
        """The names given, in declaration order; raises on an unknown name."""
        unknown = set(values) - set(self.names)
        if unknown:
            raise ValueError(f"update() got values for {sorted(unknown)}, but the buffer's "
                             f"feedback fields are {list(self.names)}")
        if not values:
            raise ValueError(f"update() needs at least one feedback field "
                             f"({', '.join(self.names)})")
        return [name for name in self.names if name in values]
