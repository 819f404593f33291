"""The text of what global sampling tells the user: what each process is
doing, which settings the processes disagree on, why the protocol stopped.

Every function here builds its message from the status table and the notes
alone, so every process raises the same message.
"""

from __future__ import annotations

import json

import numpy as np

from .protocol import (ACTIVE, CLOSED, FAILED, HELLO, IDLE, KIND, LOAD, ROUND, SAVE, STEPS)

__all__ = ["describe_exception", "doing", "calls_message", "layout_text", "mismatch_message", "stop_message"]

_REASON_CHARS = 1500


def describe_exception(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS] + "..."


def doing(kind: int, steps: int, note: str | None) -> str:
    """What a process whose row says ``kind`` is doing, as in "rank 1 ..."."""
    after = "" if steps < 0 else f" after {steps} step{'s' if steps != 1 else ''}"
    return {ACTIVE: "is in a step (mix() or the DALI stage)" + after,
            IDLE: "is in a step (its epoch has ended)" + after,
            FAILED: (note or "failed") + after,
            CLOSED: (note or "closed its buffer") + after,
            HELLO: "is building a RehearsalBuffer",
            SAVE: "is in save()" + after,
            LOAD: "is in load()"}.get(kind, f"sent an unknown message (kind {kind})")


def calls_message(rank: int, table: np.ndarray, notes, others) -> tuple[str, dict]:
    """The message of processes in different collective calls (``others``:
    the ranks not in this one's call), and what each of them is doing."""
    kinds = table[:, KIND].tolist()

    def what(p):
        note = (notes[p].get("note") if notes else None)
        return doing(kinds[p], int(table[p, STEPS]), note if isinstance(note, str) else None)

    text = ", ".join(f"rank {p} {what(p)}" for p in others)
    return (f"mismatched collective calls: {text}, while this rank ({rank}) {what(rank)}. Every "
            "process must make the same collective calls in the same order (build its buffers, "
            "take its steps, save(), load(), close())"), {p: what(p) for p in others}


def layout_text(layout) -> str:
    return " + ".join(f"{tuple(shape)} {np.dtype(dtype).name}" for shape, dtype in layout)


def mismatch_message(table: np.ndarray, notes: list[dict]) -> str:
    """One message, the same on every process, naming each setting the
    processes disagree on and every process's value."""
    ranks = range(len(notes))

    def values(pick):
        return ", ".join(f"rank {p}: {pick(p)}" for p in ranks)

    parts = []
    settings = [n.get("settings") or {} for n in notes]
    keys = sorted(set().union(*settings), key=lambda k: (k != "sampling", k))
    for key in keys:
        if key != "sampling" and not all(key in s for s in settings):
            continue                      # local sampling has fewer settings
        if len({json.dumps(s.get(key)) for s in settings}) > 1:
            parts.append(f"{key} ({values(lambda p: repr(settings[p].get(key)))})")
    layouts = {p: n.get("layout") for p, n in zip(ranks, notes) if n.get("layout")}
    if len({json.dumps(v) for v in layouts.values()}) > 1:
        counts = {p: len(v) for p, v in layouts.items()}
        label = (settings[0].get("label_index") if settings else None)
        if len(set(counts.values())) > 1:
            parts.append("the number of fields per sample ("
                         + ", ".join(f"rank {p}: {c}" for p, c in counts.items()) + ")")
        else:
            for i in range(next(iter(counts.values()))):
                fields = {p: v[i] for p, v in layouts.items()}
                if len({json.dumps(f) for f in fields.values()}) > 1:
                    name = " (the labels)" if i == label else ""
                    parts.append(f"the layout of field {i}{name} (" + ", ".join(
                        f"rank {p}: {layout_text([f])}" for p, f in fields.items()) + ")")
    if len(set(table[:, ROUND].tolist())) > 1:
        parts.append("the round, i.e. the steps taken since the buffers were created or "
                     "restored from a checkpoint (" + values(lambda p: int(table[p, ROUND]))
                     + ")")
    if not parts:   # the hashes differ but the notes were cut: say what is known
        parts.append("their settings (" + values(lambda p: json.dumps(settings[p])) + ")")
    return ("global sampling: the processes disagree on " + "; ".join(parts)
            + ". Every process must build its RehearsalBuffer with the same sampling, "
            "num_representatives, policy and label_index, and feed samples of the same layout "
            "(shape and dtype of every field).")


def stop_message(rank: int, round_no: int, table: np.ndarray, notes, stopped) -> tuple:
    reasons = {}
    for p in stopped:
        note = (notes[p].get("note") if notes else None) or (
            "failed" if table[p, KIND] == FAILED else "closed its buffer")
        reasons[p] = note
    text = "; ".join(f"rank {p} {reasons[p]} (after {int(table[p, STEPS])} steps)"
                     for p in stopped)
    return (f"global sampling stopped on rank {rank} in round {round_no} (after "
            f"{int(table[rank, STEPS])} steps here): {text}"), reasons
