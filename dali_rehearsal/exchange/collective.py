"""The buffer's collective calls other than steps (``save``, ``load``): a
channel of tagged exchanges that fail together.

A call opens a :class:`Channel` with
:func:`~dali_rehearsal.exchange.open_channel`, whose first message (a status
row naming the call, see :mod:`.status`) makes processes
that are in another call raise :class:`~.errors.CollectiveMismatchError` at
once, each saying what the others were doing. The call then proceeds in
steps (:meth:`Channel.run`): every process does its part of a step, then
every process learns how the step went everywhere; a failure on one process
raises on every process at that same step. Every message carries the call's
name and the step's, checked before anything else is read from it. Every
wait is bounded by the buffer's ``timeout``.
"""

from __future__ import annotations

import json

from .errors import CollectiveMismatchError

__all__ = ["Channel"]

_REASON_CHARS = 1500


def _describe(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS] + "..."


class Channel:
    """The exchanges of one collective call (``what``, e.g. ``"save()"``)
    over ``transport``, once every process is known to be in that call.

    ``in_step`` is False while an exchange is under way and after one that
    did not complete: the processes may then no longer be in step.
    """

    def __init__(self, transport, what: str):
        self.transport = transport
        self.what = what
        self.rank, self.size = int(transport.rank), int(transport.size)
        self.in_step = True

    def run(self, step: str, part, *, error_type=RuntimeError, errors=()) -> list:
        """Runs ``part()`` (this process's part of ``step``), then exchanges
        how it went. Returns every process's result (JSON values), in rank
        order. When ``part`` raised, re-raises it here; when it raised on
        another process, raises an error naming the ranks and their errors
        (of the class they raised when it is one of ``errors``, else
        ``error_type``): every process raises at the same step."""
        try:
            value, error = part(), None
        except BaseException as e:  # told to every process, then raised here
            value, error = None, e
        replies = self._exchange(step, value, error)
        if error is not None:
            raise error
        failed = {p: r for p, r in enumerate(replies) if r["error"] is not None}
        if failed:
            kinds = {r["error_type"] for r in failed.values()}
            cls = next((c for c in errors if kinds == {c.__name__}), error_type)
            raise cls(f"{self.what} failed on "
                      + "; ".join(f"rank {p}: {r['error']}" for p, r in failed.items()))
        return [r["value"] for r in replies]

    def _exchange(self, step: str, value, error) -> list[dict]:
        message = {"call": self.what, "step": step, "error": _describe(error),
                   "error_type": None if error is None else type(error).__name__,
                   "value": value}
        self.in_step = False
        raw = self.transport.allgather_bytes(json.dumps(message).encode())
        replies = []
        for p, data in enumerate(raw):
            try:
                reply = json.loads(data.decode())
            except (ValueError, UnicodeDecodeError, RecursionError):
                reply = None
            if not isinstance(reply, dict) or reply.get("call") != self.what \
                    or reply.get("step") != step or set(reply) != set(message):
                seen = (f"{reply.get('call')} at step {reply.get('step')!r}"
                        if isinstance(reply, dict) else "a message that is not a step's")
                raise CollectiveMismatchError(
                    f"rank {self.rank}: {self.what} at step {step!r} received from rank {p} "
                    f"{seen}: the processes are not in the same call", ranks=[p], broken=True)
            replies.append(reply)
        self.in_step = True
        return replies
