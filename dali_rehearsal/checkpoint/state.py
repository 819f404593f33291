"""A buffer's state: captured as a dict of arrays and plain values, given to
PyTorch as tensors, checked (:mod:`.validation`) and applied.

A state holds the settings (:data:`~.validation.SETTINGS`), the layout of a
sample (shape, dtype and encoding of every field), the stored samples (host
copies, ``size`` rows per field), the policy's state and the sampler's.
Applying a checked state (:func:`apply`) cannot fail on bad data: only on the
device (memory), and then the buffer is left as it was.

The buffer is seen through the step object (``core``): its settings,
``policy``, ``store``, ``sampler``, ``backend``, ``wait_for_writes()`` and
``mark_written(stream)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .files import CheckpointError
from .validation import FORMAT, SETTINGS, VERSION, check_empty, check_sampler_state, \
    check_settings, check_state, compare_settings, plain, settings_of

__all__ = ["capture", "state_dict", "load_state_dict", "Prepared", "apply"]

#: dtypes PyTorch tensors hold (native byte order); others travel as raw bytes
_TORCH_DTYPES = {"bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64",
                 "uint64", "float16", "float32", "float64", "complex64", "complex128"}


def capture(core) -> dict:
    """The buffer's state with NumPy arrays (host copies of the samples);
    written-back values still waiting for their step are written first."""
    core.apply_feedback(core.backend.current_stream())
    core.wait_for_writes()
    spec = core.spec
    policy_state = core.policy.state_dict()
    return {
        "format": FORMAT, "version": VERSION, "settings": settings_of(core),
        "layout": None if spec is None else [
            {"shape": [int(d) for d in f.shape], "dtype": np.dtype(f.dtype).str,
             "encoding": "array"} for f in spec],
        "fields": [] if not core.store.allocated else core.store.read(policy_state["size"]),
        "policy": policy_state,
        "sampler": plain(core.sampler.state_dict(), "sampler state"),
    }


def torch_module():
    try:
        import torch
    except Exception:  # not installed, or an installation that does not import
        return None
    return torch


def state_dict(core) -> dict:
    """:meth:`RehearsalBuffer.state_dict`: arrays as torch tensors when
    PyTorch can be imported, NumPy arrays otherwise."""
    state = capture(core)
    torch = torch_module()
    if torch is None:
        return state
    if state["layout"] is not None:
        for entry, field in zip(state["layout"], state["fields"]):
            if not (field.dtype.isnative and field.dtype.name in _TORCH_DTYPES):
                entry["encoding"] = "bytes"
        state["fields"] = [
            torch.from_numpy(np.ascontiguousarray(f) if e["encoding"] == "array"
                             else np.ascontiguousarray(f).view(np.uint8).reshape(len(f), -1))
            for e, f in zip(state["layout"], state["fields"])]
    state["policy"] = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                       for k, v in state["policy"].items()}
    return state


@dataclass
class Prepared:
    """Everything a load writes, checked: applying it cannot fail on bad data."""

    spec: tuple | None
    fields: list             # host arrays, ``size`` rows each
    policy_state: dict
    sampler_state: dict | None


def apply(core, prepared: Prepared) -> None:
    """Writes ``prepared`` into the buffer: the sampler's state, the samples,
    then the policy's state. On an error (device memory) the buffer is left
    as it was."""
    sampler = core.sampler
    snapshot = sampler.state_dict()
    if prepared.sampler_state is not None:
        try:
            sampler.load_state_dict(prepared.sampler_state)
        except Exception as e:
            sampler.load_state_dict(snapshot)
            raise CheckpointError(f"the sampler refused its saved state: {e}") from e
    if prepared.spec is not None:
        store = core.store
        try:
            store.allocate(prepared.spec)
            stream = core.backend.current_stream()
            store.write(prepared.fields, stream)
            core.mark_written(stream)
        except BaseException:
            sampler.load_state_dict(snapshot)
            store.reset()
            raise
    core.policy.load_state_dict(prepared.policy_state)
    if prepared.spec is not None and core.feedback.enabled:
        # every stored sample gets a new generation: no ticket handed out
        # before this load can name it
        stream = core.backend.current_stream()
        saved = prepared.fields[-1][:core.policy.size, 2]
        tickets = core.feedback.restamp(core.policy.size, int(saved.max()) if len(saved) else 0)
        if len(tickets):
            core.backend.from_host(core.store.fields[-1][:len(tickets)], tickets, stream)
            core.mark_written(stream)


def load_state_dict(core, state) -> None:
    """:meth:`RehearsalBuffer.load_state_dict`."""
    check_empty(core)
    if not isinstance(state, dict) or not isinstance(state.get("settings"), dict):
        raise CheckpointError("not a RehearsalBuffer state (no settings)")
    compare_settings(core, check_settings(state["settings"]), SETTINGS)
    checked = check_state(state, core.policy)
    sampler_state = check_sampler_state(core.sampler, checked.sampler_state)
    fields = [np.ascontiguousarray(f) for f in checked.fields]
    apply(core, Prepared(checked.spec, fields, checked.policy_state, sampler_state))
