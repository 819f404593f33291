"""The errors global sampling raises on every process."""

from __future__ import annotations

__all__ = ["RemoteError", "MismatchError", "CollectiveMismatchError"]


class RemoteError(RuntimeError):
    """Another process stopped taking part in global sampling: its step
    failed, it closed its buffer or exited early, it was killed, or it stopped
    answering within the buffer's ``timeout``. Raised on every other process.

    Attributes:
        ranks: the ranks that stopped (empty when unknown, as after a timeout).
        reasons: ``{rank: reason}`` as the failing processes reported them
            (the exception for a failed step), where known.
        broken: True when the transport itself failed or gave up waiting (a
            collective may still be pending); the exchange cannot be used again.
    """

    def __init__(self, message: str, *, ranks=(), reasons=None, broken: bool = False):
        super().__init__(message)
        self.ranks = list(ranks)
        self.reasons = dict(reasons or {})
        self.broken = bool(broken)


class MismatchError(ValueError):
    """The processes disagree on a setting that global sampling needs them to
    share (``num_representatives``, ``policy``, ``label_index``,
    ``sampling``, the sample layout...). Raised with the same message on every
    process; the message names each setting and every process's value."""


class CollectiveMismatchError(RemoteError):
    """The processes called different collective operations at the same
    point: one ``save()`` while another is in a step (``mix()``, the DALI
    stage), ``load()``, ``close()`` or building a buffer. Raised on every
    process that took part, each message saying what every process was
    doing; the exchange cannot be used again (``broken``)."""
