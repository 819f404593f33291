"""Checks of user input and of restored state, written once.

A leaf module: every other part of the package may import it, it imports
nothing of the package.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["check_int", "check_seed", "check_rng_state"]


def check_int(value, what: str, minimum: int | None = None, *,
              error: type[Exception] = TypeError) -> int:
    """``value`` as a Python int: integers and NumPy integers are accepted,
    bools and everything else raise ``error`` (``TypeError`` for a setting a
    user passes; ``ValueError`` for restored state, where every problem is a
    ``ValueError``). Below ``minimum`` raises ``ValueError``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise error(f"{what} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return int(value)


def check_seed(seed) -> int | None:
    """A seed: ``None`` or a non-negative integer."""
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be None or a non-negative integer, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be None or a non-negative integer, got {seed}")
    return int(seed)


def check_rng_state(rng: np.random.Generator, state, what: str) -> dict:
    """Checks that ``state`` is a valid state of ``rng``'s bit generator,
    without touching ``rng``; returns it. Raises ValueError naming ``what``."""
    bitgen = rng.bit_generator
    if not isinstance(state, dict) or state.get("bit_generator") != type(bitgen).__name__:
        name = state.get("bit_generator") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{what}: not a {type(bitgen).__name__} random state (got {name!r})")
    scratch = type(bitgen)()
    try:
        scratch.state = state
    except Exception as e:  # the bit generator's own checks: types, ranges, keys
        raise ValueError(f"{what}: malformed random state ({type(e).__name__}: {e})") from None
    if scratch.state != state:
        raise ValueError(f"{what}: malformed random state (values out of range)")
    return state
