"""Insertion policies: which offered samples the buffer keeps, and in which
slot. One policy per module behind a small base, and one map that picks:

- :mod:`.base`: :class:`InsertionPolicy` (slots, offers, state, the
  redistribution of a checkpoint over another number of processes) and the
  vectorised helpers the policies share;
- :mod:`.reservoir`: ``"reservoir"``, a uniform random sample of the whole
  stream (Vitter's Algorithm R);
- :mod:`.class_balanced`: ``"class_balanced"`` (default), an equal share of
  the capacity per class seen, a uniform random sample within each class;
  its per-class tables and slot lists are in :mod:`.classes`.

Both are selected by name in :class:`~dali_rehearsal.RehearsalBuffer`
(:data:`POLICIES`, :func:`make_policy`). A new policy is a subclass of
:class:`InsertionPolicy` in a module of its own, with an entry in
:data:`POLICIES`: it decides a batch (``_decide``), and overrides the state
methods and :meth:`InsertionPolicy.redistribute` if it keeps bookkeeping of
its own. No other part of the library branches on a policy's name.
"""

from __future__ import annotations

import numpy as np

from .base import InsertionPolicy
from .class_balanced import ClassBalanced
from .reservoir import Reservoir

__all__ = ["InsertionPolicy", "ClassBalanced", "Reservoir", "make_policy", "POLICIES"]

#: The policies by name.
POLICIES = {cls.name: cls for cls in (ClassBalanced, Reservoir)}


def make_policy(name: str, capacity: int, rng: np.random.Generator) -> InsertionPolicy:
    """A new policy ``name`` of ``capacity`` slots drawing from ``rng``."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None
    return cls(capacity, rng)
