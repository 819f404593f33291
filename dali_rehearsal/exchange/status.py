"""The first message of every exchange: the status table, and the notes
when a row asks for them.

Every process sends one status row (:mod:`.protocol`); when the rows
disagree (settings, layout, round) or one has a note (why its process
stops), every process also sends a short JSON note. From the table and the
notes every process takes the same decision: go on, or raise the same
:class:`~.errors.CollectiveMismatchError` or :class:`~.errors.MismatchError`.
Also here: the checks of buffers that do not sample globally
(:func:`handshake`, :func:`announce`).
"""

from __future__ import annotations

import json

import numpy as np

from .errors import CollectiveMismatchError, MismatchError
from .messages import calls_message, mismatch_message
from .protocol import (NOTE_FLAG, CALL_OF, COLUMNS, HELLO, KIND, LAYOUT, NOTE, NOTE_BYTES, ROUND, SETTINGS,
                       STEPS, stable_hash)
from .transport import Transport

__all__ = ["status_table", "notes_of", "check_calls", "disagree", "exchange_status",
           "handshake", "announce"]


def status_table(transport: Transport, row: np.ndarray, what: str) -> np.ndarray:
    table = np.empty((transport.size, COLUMNS), dtype=np.int64)
    transport.wait(transport.iallgather(row, table), what)
    return table


def notes_of(transport: Transport, payload: dict, what: str) -> list[dict]:
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


def check_calls(rank: int, table: np.ndarray, notes) -> None:
    """Raises :class:`CollectiveMismatchError` (the same decision on every
    process) when the rows come from different collective calls."""
    kinds = table[:, KIND].tolist()
    if len({CALL_OF.get(k, k) for k in kinds}) == 1:
        return
    mine = CALL_OF.get(kinds[rank], kinds[rank])
    others = [p for p in range(len(kinds)) if CALL_OF.get(kinds[p], kinds[p]) != mine]
    text, reasons = calls_message(rank, table, notes, others)
    raise CollectiveMismatchError(text, ranks=others, reasons=reasons)


def disagree(table: np.ndarray) -> bool:
    """Whether the rows disagree on settings, sample layout (where known) or round."""
    layouts = table[:, LAYOUT]
    known = layouts[layouts != 0]
    return bool((table[:, SETTINGS] != table[0, SETTINGS]).any()
                or (known != known[:1]).any()
                or (table[:, ROUND] != table[0, ROUND]).any())


def settings_payload(settings: dict, layout) -> dict:
    return {"settings": settings, "layout": layout}


def exchange_status(t: Transport, row: np.ndarray, *, settings: dict, layout, note,
                    what: str, notes_what: str):
    """The first message of every collective call: the status table, and the
    notes when a row asks for them or the rows disagree. Raises on every
    process alike: :class:`CollectiveMismatchError` when the processes are in
    different calls, :class:`MismatchError` when they disagree on settings,
    layout or round. Returns ``(table, notes)``."""
    table = status_table(t, row, what)
    notes = None
    mismatch = disagree(table)
    if mismatch or (table[:, NOTE] & NOTE_FLAG).any():
        payload = settings_payload(settings, layout)
        payload["note"] = note
        notes = notes_of(t, payload, notes_what)
    check_calls(t.rank, table, notes)
    if mismatch:
        raise MismatchError(mismatch_message(table, notes))
    return table, notes


def handshake(t: Transport, settings: dict) -> None:
    """Checks once, at construction, that every process of the transport
    ``t`` has the same ``settings``; used by buffers that sample locally on a
    multi-process communicator, so that a process that samples globally does
    not wait for one that never exchanges. Raises :class:`MismatchError` on
    every process."""
    row = np.zeros(COLUMNS, dtype=np.int64)
    row[KIND], row[SETTINGS] = HELLO, stable_hash(settings)
    exchange_status(t, row, settings=settings, layout=None, note=None,
                    what="the other processes to build their buffers",
                    notes_what="the settings of the others")


def announce(t: Transport, kind: int, what: str) -> None:
    """The first message of a collective call (``kind``: :data:`SAVE` or
    :data:`LOAD`) over a transport of its own (buffers that sample locally):
    raises :class:`CollectiveMismatchError` on every process when the others
    are in another call (building a buffer, another checkpoint call)."""
    settings = {"call": CALL_OF[kind]}
    row = np.zeros(COLUMNS, dtype=np.int64)
    row[KIND], row[SETTINGS], row[STEPS] = kind, stable_hash(settings), -1    # (steps unknown)
    exchange_status(t, row, settings=settings, layout=None, note=None,
                    what=f"the other processes to join {what} (every process must call it at "
                    "the same point)",
                    notes_what=f"the notes of {what}")
