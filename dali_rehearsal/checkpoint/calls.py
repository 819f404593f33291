"""The collective calls of checkpoints (``save``, ``load``) over one code path
for one and for several processes: a :class:`~dali_rehearsal.exchange.collective.Channel`
from :func:`dali_rehearsal.exchange.open_channel` (every process does its part
of a step, then learns how it went everywhere), over the buffer's exchange,
or over :class:`~dali_rehearsal.exchange.alone.AloneTransport` for one
process, so the checkpoint code does not tell the two apart.
"""

from __future__ import annotations

import contextlib

from ..exchange import LOAD, SAVE, open_channel

__all__ = ["open_call"]


@contextlib.contextmanager
def open_call(core, call: str):
    """The channel of the collective call ``call`` (``"save"`` or ``"load"``)
    of the buffer whose step object is ``core``."""
    with open_channel(core, SAVE if call == "save" else LOAD, f"{call}()") as channel:
        yield channel
