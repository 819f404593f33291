"""Checks of a buffer state before anything changes: its structure, its
settings against the loading buffer's, its layout against the machine's
memory, every field against the layout, the stored labels against the
policy's slot labels (the policy checks its own state:
:meth:`~dali_rehearsal.policies.InsertionPolicy.validate_state`), and the
sampler's state. Every problem is a :class:`~.files.CheckpointError`.

The buffer is seen through the step object (``core``): its settings,
``policy``, ``store``, ``sampler`` and ``backend``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..checks import check_rng_state
from ..policies.base import COUNTER_MAX
from ..storage import FieldSpec
from .files import CheckpointError, FieldReader, check_depth

__all__ = ["FORMAT", "VERSION", "SETTINGS", "Checked", "settings_of", "plain", "is_tensor",
           "numpy_of", "check_settings", "check_storage", "check_state", "check_sampler_state",
           "compare_settings", "check_empty"]

FORMAT = "dali_rehearsal.RehearsalBuffer"
VERSION = 2

#: settings a checkpoint must share with the buffer that loads it
SETTINGS = ("capacity", "num_representatives", "policy", "label_index", "sampling", "rank",
            "world_size")
#: Bytes a sample may declare (a sane bound; storage is checked against memory).
_SAMPLE_MAX_BYTES = 2**40


def settings_of(core) -> dict:
    settings = {"capacity": int(core.capacity),
                "num_representatives": int(core.num_representatives),
                "policy": core.policy.name, "label_index": int(core.label_index),
                "sampling": core.sampling, "rank": int(core.rank),
                "world_size": int(core.world_size)}
    if core.feedback.enabled:       # absent: no feedback fields (and older checkpoints)
        settings["feedback"] = core.feedback.declaration()
    return settings


def _check_feedback(value) -> list:
    """A saved feedback declaration: ``[[name, shape, dtype], ...]``."""
    ok = isinstance(value, list) and value and all(
        isinstance(d, list) and len(d) == 3 and isinstance(d[0], str)
        and isinstance(d[1], list) and all(isinstance(n, int) and not isinstance(n, bool)
                                           and 0 < n < 2**31 for n in d[1])
        and isinstance(d[2], str) and len(d[2]) < 16 for d in value)
    if not ok:
        raise CheckpointError(f"settings: feedback must be a list of [name, shape, dtype], "
                              f"got {str(value)[:200]}")
    return [[d[0], list(d[1]), d[2]] for d in value]


def plain(value, where: str):
    """``value`` as plain Python values (numpy scalars converted), or TypeError."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a string")
            out[k] = plain(v, f"{where}.{k}")
        return out
    raise TypeError(f"{where}: {type(value).__name__} is not a plain value")


def is_tensor(value) -> bool:
    return type(value).__module__.split(".")[0] == "torch" and hasattr(value, "numpy")


def numpy_of(value):
    """Torch tensors as NumPy arrays; anything else as it is."""
    return value.detach().cpu().numpy() if is_tensor(value) else value


def host_array(value, what: str):
    """A NumPy array from a NumPy array or a torch tensor (or a field reader)."""
    value = numpy_of(value)
    if isinstance(value, (np.ndarray, FieldReader)):
        return value
    raise CheckpointError(f"{what} must be an array or a tensor, got {type(value).__name__}")


@dataclass
class Checked:
    """A state whose structure and internal consistency have been checked."""

    settings: dict
    spec: tuple | None
    fields: list             # host arrays or field readers, ``size`` rows each
    policy_state: dict       # validated by the policy
    sampler_state: object    # checked against a sampler only for exact restores
    labels: np.ndarray       # labels of the stored samples (slots 0..size-1)


def check_settings(settings) -> dict:
    if not isinstance(settings, dict) or set(settings) - {"feedback"} != set(SETTINGS):
        raise CheckpointError(f"settings must be a dict with the keys {list(SETTINGS)} "
                              "(and feedback)")
    feedback = _check_feedback(settings["feedback"]) if "feedback" in settings else None
    for key in SETTINGS:
        value = settings[key]
        if key in ("policy", "sampling"):
            if not isinstance(value, str):
                raise CheckpointError(f"settings: {key} must be a string, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise CheckpointError(f"settings: {key} must be a non-negative integer, "
                                  f"got {value!r}")
    if settings["capacity"] < 1 or settings["world_size"] < 1 \
            or settings["rank"] >= settings["world_size"]:
        raise CheckpointError(f"settings out of range: {settings}")
    checked = {k: (v if isinstance(v, str) else int(v)) for k, v in settings.items()
               if k != "feedback"}
    if feedback is not None:
        checked["feedback"] = feedback
    return checked


def _count(shape) -> int:
    """The number of values of ``shape`` (Python integers: no overflow)."""
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _sample_bytes(spec) -> int:
    return sum(_count(f.shape) * np.dtype(f.dtype).itemsize for f in spec)


def _memory_limit(core) -> int | None:
    """Bytes of memory the buffer's storage could ever get (None: unknown)."""
    try:
        if core.backend.is_gpu:
            import cupy
            return int(cupy.cuda.Device().mem_info[1])
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except Exception:   # no such query here
        return None


def check_storage(core, spec, where: str) -> None:
    """Refuses a layout whose storage (``capacity`` samples) cannot fit in the
    machine's memory, before anything is allocated."""
    if spec is None:
        return
    need = core.capacity * _sample_bytes(spec)
    limit = _memory_limit(core)
    if limit is not None and need > limit:
        raise CheckpointError(
            f"{where}: its layout ({', '.join(f.describe() for f in spec)}) needs {need} bytes "
            f"for capacity={core.capacity}, more than this machine's {core.device} memory "
            f"({limit} bytes)")


def _check_layout(layout, label_index: int):
    if layout is None:
        return None
    if not isinstance(layout, list) or len(layout) < 2:
        raise CheckpointError("layout must be a list of at least two fields (samples, labels)")
    if label_index >= len(layout):
        raise CheckpointError(f"label_index={label_index} but the layout has {len(layout)} "
                              "fields")
    spec, encodings, per_sample = [], [], 0
    for i, entry in enumerate(layout):
        if not isinstance(entry, dict) or set(entry) != {"shape", "dtype", "encoding"}:
            raise CheckpointError(f"layout of field {i} must have shape, dtype and encoding")
        shape = entry["shape"]
        if not isinstance(shape, (list, tuple)) or not all(
                isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0
                for d in shape):
            raise CheckpointError(f"layout of field {i}: bad shape {shape!r}")
        try:
            dtype = np.dtype(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        except TypeError:
            dtype = None
        if dtype is None or dtype.kind not in "biufc" or dtype.fields is not None \
                or dtype.subdtype is not None:
            raise CheckpointError(f"layout of field {i}: bad dtype {entry['dtype']!r}")
        if entry["encoding"] not in ("array", "bytes"):
            raise CheckpointError(f"layout of field {i}: unknown encoding "
                                  f"{entry['encoding']!r}")
        per_sample += _count(shape) * dtype.itemsize
        if per_sample > _SAMPLE_MAX_BYTES:
            raise CheckpointError(f"layout of field {i}: shape {list(shape)} makes samples of "
                                  f"more than {_SAMPLE_MAX_BYTES} bytes")
        spec.append(FieldSpec(tuple(int(d) for d in shape), dtype))
        encodings.append(entry["encoding"])
    label = spec[label_index]
    if label.dtype.kind not in "iu" or _count(label.shape) != 1:
        raise CheckpointError(f"the label field {label_index} must hold one integer per "
                              f"sample, got {label.describe()}")
    return tuple(spec), encodings


def _check_field(i: int, value, spec: FieldSpec, encoding: str, size: int):
    """Field ``i`` as an array (or reader) of ``size`` rows of ``spec``."""
    value = host_array(value, f"field {i}")
    if encoding == "bytes":
        if isinstance(value, FieldReader) or value.dtype != np.uint8 \
                or value.shape != (size, spec.nbytes):
            raise CheckpointError(f"field {i}: expected {size} rows of {spec.nbytes} bytes, "
                                  f"got shape {value.shape} and dtype {value.dtype}")
        value = np.ascontiguousarray(value).view(spec.dtype).reshape((size,) + spec.shape)
    expected = (size,) + tuple(spec.shape)
    if tuple(value.shape) != expected or value.dtype != spec.dtype:
        raise CheckpointError(f"field {i}: expected shape {expected} and dtype "
                              f"{spec.dtype.str}, got shape {tuple(value.shape)} and dtype "
                              f"{value.dtype.str}")
    return value


def _int64_labels(values: np.ndarray, what: str) -> np.ndarray:
    values = np.asarray(values).reshape(len(values))
    if values.dtype == np.uint64 and (values > np.iinfo(np.int64).max).any():
        raise CheckpointError(f"{what} hold values >= 2**63")
    return values.astype(np.int64)


def check_state(state, policy) -> Checked:
    """Checks a state's structure and consistency against ``policy`` (a
    policy of the saved kind and capacity); changes nothing."""
    if not isinstance(state, dict):
        raise CheckpointError(f"a buffer state must be a dict, got {type(state).__name__}")
    if state.get("format") != FORMAT:
        raise CheckpointError("not a RehearsalBuffer state (format "
                              f"{state.get('format')!r}, expected {FORMAT!r})")
    if state.get("version") != VERSION:
        raise CheckpointError(f"unsupported RehearsalBuffer state version "
                              f"{state.get('version')!r} (this library reads {VERSION})")
    expected = {"format", "version", "settings", "layout", "fields", "policy", "sampler"}
    if set(state) != expected:
        raise CheckpointError(f"a buffer state has the keys {sorted(expected)}, got "
                              f"{sorted(state)}")
    settings = check_settings(state["settings"])
    if settings["policy"] != policy.name or settings["capacity"] != policy.capacity:
        raise CheckpointError("internal: state checked against the wrong policy")
    policy_state = state["policy"]
    if not isinstance(policy_state, dict):
        raise CheckpointError("the policy state must be a dict")
    policy_state = {k: numpy_of(v) for k, v in policy_state.items()}
    try:
        policy_state = policy.validate_state(policy_state)
    except ValueError as e:
        raise CheckpointError(f"policy state: {e}") from None
    size = policy_state["size"]
    checked = _check_layout(state["layout"], settings["label_index"])
    fields = state["fields"]
    if not isinstance(fields, (list, tuple)):
        raise CheckpointError("fields must be a list of arrays")
    if checked is None:
        if len(fields) or size:
            raise CheckpointError("the state holds samples but no layout")
        return Checked(settings, None, [], policy_state, state["sampler"],
                        np.empty(0, np.int64))
    spec, encodings = checked
    if len(fields) != len(spec):
        raise CheckpointError(f"the layout has {len(spec)} fields but the state holds "
                              f"{len(fields)} (truncated?)")
    fields = [_check_field(i, f, s, e, size)
              for i, (f, s, e) in enumerate(zip(fields, spec, encodings))]
    label_field = fields[settings["label_index"]]
    if isinstance(label_field, FieldReader):
        label_field = label_field.read()
    labels = _int64_labels(label_field, "the stored labels")
    slot_labels = policy_state["slot_labels"][:size]
    if (labels != slot_labels).any():
        bad = np.flatnonzero(labels != slot_labels)[:5]
        raise CheckpointError(
            f"the stored label field disagrees with the policy's slot labels at slots "
            f"{bad.tolist()}: {labels[bad].tolist()} vs {slot_labels[bad].tolist()}")
    return Checked(settings, spec, fields, policy_state, state["sampler"], labels)


def check_sampler_state(sampler, state) -> dict:
    """Checks ``state`` against ``sampler``'s own state: the same keys, values
    of the same kinds, valid random states. Changes nothing."""
    current = sampler.state_dict()
    check_depth(state, "sampler state")
    try:
        state = plain(state, "sampler state")
    except TypeError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(state, dict) or set(state) != set(current):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"the sampler state must have the keys {sorted(current)}, "
                              f"got {got}")
    for key, ref in current.items():
        value = state[key]
        what = f"sampler state {key!r}"
        if ref is None or value is None:
            continue            # an optional value: the sampler's own business
        if isinstance(ref, dict) and "bit_generator" in ref:
            bitgen = getattr(np.random, str(ref["bit_generator"]))
            try:
                check_rng_state(np.random.Generator(bitgen()), value, what)
            except ValueError as e:
                raise CheckpointError(str(e)) from None
        elif isinstance(ref, (bool, np.bool_)):
            if not isinstance(value, bool):
                raise CheckpointError(f"{what} must be a bool, got {value!r}")
        elif isinstance(ref, (int, np.integer)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise CheckpointError(f"{what} must be an integer, got {value!r}")
            if key in ("seed", "round") and not 0 <= value < (2**63 if key == "seed"
                                                              else COUNTER_MAX):
                raise CheckpointError(f"{what} must be in [0, 2**{63 if key == 'seed' else 62})"
                                      f", got {value}")
        elif isinstance(ref, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise CheckpointError(f"{what} must be a number, got {value!r}")
        elif type(value) is not type(plain(ref, what)):
            raise CheckpointError(f"{what} must be a {type(ref).__name__}, got {value!r}")
    return state


def compare_settings(core, saved: dict, keys) -> None:
    """Raises when ``saved`` differs from the buffer's settings in ``keys``
    or in its feedback fields (always compared: they are stored fields)."""
    mine = settings_of(core)
    if saved.get("feedback") != mine.get("feedback"):
        raise CheckpointError(
            f"the saved buffer has feedback fields {saved.get('feedback') or 'none'}, this one "
            f"{mine.get('feedback') or 'none'}: build the buffer with the saved feedback=")
    for key in keys:
        if saved[key] != mine[key]:
            hint = {"num_representatives": "; num_representatives is not overridable: build "
                                           "the buffer with the saved value",
                    "capacity": "; load(path, resize=True) redistributes the samples into "
                                "buffers of another capacity",
                    "world_size": "; load(path) from a checkpoint directory restores on "
                                  "another number of processes"}.get(key, "")
            raise CheckpointError(f"the saved buffer has {key}={saved[key]!r}, this one "
                                  f"{mine[key]!r}{hint}")


def check_empty(core) -> None:
    if core.store.allocated or core.num_seen or core.sampler.started:
        raise RuntimeError("loading a checkpoint needs a buffer that has not stored anything "
                           "(a new buffer, before its first step)")
