"""Checkpoints of a :class:`~dali_rehearsal.RehearsalBuffer`: state dicts and
checkpoint directories.

Two ways to checkpoint a buffer, both validated completely before anything
changes (a bad checkpoint raises :class:`CheckpointError`, a ``ValueError``,
and leaves the buffer exactly as it was):

**State dicts** (:func:`state_dict`, :func:`load_state_dict`): one process's
shard as a dict of arrays and plain values (``str``, ``int``, ``float``,
``bool``, ``None``, lists and dicts with string keys). The arrays are PyTorch
CPU tensors when PyTorch can be imported, NumPy arrays otherwise; either kind
loads. With tensors, ``torch.save`` then ``torch.load(..., weights_only=True)``
round-trips the dict with no allow-listing. A state dict restores the same
shard (same rank and number of processes) and resumes with exactly the same
batches.

**Checkpoint directories** (:func:`save`, :func:`load`): no PyTorch and no
pickle. Every process writes its shard into the directory and the first one
writes a manifest last::

    path/manifest.json                       what the checkpoint holds, with
                                             the SHA-256 of every shard file
    path/shard-<id>-<rank>-of-<N>.npz        one shard: stored .npy members
                                             and a "meta" member (UTF-8 JSON)
    path/.dali-rehearsal.lock                the writers' lock (see below)

Writing is atomic: each file is written under a temporary name, flushed to
disk (fsync) and renamed; shard names are new for every save and the
manifest is replaced last, so a crash at any point leaves the previous
checkpoint loadable (files of an unfinished save are removed by the next
successful one). The directory is the library's own: ``save`` refuses a
directory holding files it did not write (unless ``allow_other_files=True``,
which leaves them untouched) and never deletes or replaces such a file; one
writer at a time holds the directory's lock, a concurrent ``save`` raises
:class:`ConcurrentSaveError` (:mod:`dali_rehearsal.checkpoint_directory`).

Loading costs what the files hold: the manifest's own checksum and each
shard file's size and SHA-256 are verified, then every size a file declares
is checked against the bytes it holds before anything is allocated
(compressed members, overlapping members, object dtypes, deep JSON are
refused), and the layout's storage against the machine's memory: a hostile
or damaged checkpoint is a :class:`CheckpointError` naming the file and the
member (:mod:`dali_rehearsal.checkpoint_files`). Counters and seeds are
range-checked like the buffer's own arguments.

A directory written by ``N`` processes loads on ``M`` processes (elastic
restore; every process must be able to read every shard file, e.g. a shared
filesystem). With ``M == N`` and the same capacities each process restores
its own shard exactly (the same batches follow). Otherwise the samples are
redistributed: all of them when they fit in the new buffers, else a uniform
random subsample (per class for ``"class_balanced"``, equal shares per class),
spread evenly over the processes; the number of samples offered so far is
shared out with them, so insertion continues as if one buffer had seen the
whole stream. The random streams are the new buffers' own (their seeds): they
cannot continue those of another number of processes.

Collective calls (``save`` and ``load`` with a communicator) run over the
buffer's exchange (:func:`dali_rehearsal.exchange.open_channel`):
every process must call them at the same point, each wait is bounded by the
buffer's ``timeout``, a failure on one process raises on every process, and
processes that are in another call (a step, ``close``, the other checkpoint
call, building a buffer) raise
:class:`~dali_rehearsal.exchange.CollectiveMismatchError` saying what each was
doing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass

import numpy as np

from .checkpoint_directory import MANIFEST, ConcurrentSaveError, DirectoryWriter, \
    is_shard_name, shard_name, shard_temporary
from .checkpoint_files import MAX_META_BYTES, CheckpointError, HashingWriter, ShardFile, \
    check_depth, load_json, write_atomically, write_shard
from .checks import check_rng_state
from .exchange import LOAD, SAVE, open_channel
from .policies import make_policy
from .storage import FieldSpec

__all__ = ["CheckpointError", "ConcurrentSaveError", "state_dict", "load_state_dict", "save",
           "load"]

log = logging.getLogger("dali_rehearsal")

FORMAT = "dali_rehearsal.RehearsalBuffer"
VERSION = 2
DIR_FORMAT = "dali_rehearsal.checkpoint"
DIR_VERSION = 1

#: settings a checkpoint must share with the buffer that loads it
_SETTINGS = ("capacity", "num_representatives", "policy", "label_index", "sampling", "rank",
             "world_size")
#: dtypes PyTorch tensors hold (native byte order); others travel as raw bytes
_TORCH_DTYPES = {"bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64",
                 "uint64", "float16", "float32", "float64", "complex64", "complex128"}
#: Counters (offers, rounds) read from a checkpoint stay below this, so that
#: they can go on counting in int64.
_COUNTER_MAX = 2**62
#: Bytes a sample may declare (a sane bound; storage is checked against memory).
_SAMPLE_MAX_BYTES = 2**40
#: The most bytes a manifest may hold.
_MANIFEST_MAX_BYTES = 64 << 20

# Shard files are written by checkpoint_files (these names are kept for tests).
_HashingWriter, _write_shard = HashingWriter, write_shard


# ====================================================================== state
def _settings(buffer) -> dict:
    return {"capacity": int(buffer.capacity),
            "num_representatives": int(buffer.num_representatives),
            "policy": buffer.policy, "label_index": int(buffer.label_index),
            "sampling": buffer.sampling, "rank": int(buffer.rank),
            "world_size": int(buffer.world_size)}


def _plain(value, where: str):
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
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a string")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    raise TypeError(f"{where}: {type(value).__name__} is not a plain value")


def capture(buffer, policy) -> dict:
    """The buffer's state with NumPy arrays (host copies of the samples)."""
    buffer.wait_for_writes()
    spec = buffer.spec
    policy_state = policy.state_dict()
    return {
        "format": FORMAT, "version": VERSION, "settings": _settings(buffer),
        "layout": None if spec is None else [
            {"shape": [int(d) for d in f.shape], "dtype": np.dtype(f.dtype).str,
             "encoding": "array"} for f in spec],
        "fields": [] if not buffer.store.allocated else buffer.store.read(policy_state["size"]),
        "policy": policy_state,
        "sampler": _plain(buffer.sampler.state_dict(), "sampler state"),
    }


def _torch():
    try:
        import torch
    except Exception:  # not installed, or an installation that does not import
        return None
    return torch


def state_dict(buffer, policy) -> dict:
    """:meth:`RehearsalBuffer.state_dict`: arrays as torch tensors when
    PyTorch can be imported, NumPy arrays otherwise."""
    state = capture(buffer, policy)
    torch = _torch()
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


def _is_tensor(value) -> bool:
    return type(value).__module__.split(".")[0] == "torch" and hasattr(value, "numpy")


def _numpy(value):
    """Torch tensors as NumPy arrays; anything else as it is."""
    return value.detach().cpu().numpy() if _is_tensor(value) else value


def _host(value, what: str):
    """A NumPy array from a NumPy array or a torch tensor (or a field reader)."""
    if isinstance(value, (np.ndarray, _FieldReader)):
        return value
    if _is_tensor(value):
        return value.detach().cpu().numpy()
    raise CheckpointError(f"{what} must be an array or a tensor, got {type(value).__name__}")


# ============================================================ validation
@dataclass
class _Checked:
    """A state whose structure and internal consistency have been checked."""

    settings: dict
    spec: tuple | None
    fields: list             # host arrays or field readers, ``size`` rows each
    policy_state: dict       # validated by the policy
    sampler_state: object    # checked against a sampler only for exact restores
    labels: np.ndarray       # labels of the stored samples (slots 0..size-1)


def _check_settings(settings) -> dict:
    if not isinstance(settings, dict) or set(settings) != set(_SETTINGS):
        raise CheckpointError(f"settings must be a dict with the keys {list(_SETTINGS)}")
    for key in _SETTINGS:
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
    return {k: (v if isinstance(v, str) else int(v)) for k, v in settings.items()}


def _count(shape) -> int:
    """The number of values of ``shape`` (Python integers: no overflow)."""
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _sample_bytes(spec) -> int:
    return sum(_count(f.shape) * np.dtype(f.dtype).itemsize for f in spec)


def _memory_limit(buffer) -> int | None:
    """Bytes of memory the buffer's storage could ever get (None: unknown)."""
    try:
        if buffer.backend.is_gpu:
            import cupy
            return int(cupy.cuda.Device().mem_info[1])
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except Exception:   # no such query here
        return None


def _check_storage(buffer, spec, where: str) -> None:
    """Refuses a layout whose storage (``capacity`` samples) cannot fit in the
    machine's memory, before anything is allocated."""
    if spec is None:
        return
    need = buffer.capacity * _sample_bytes(spec)
    limit = _memory_limit(buffer)
    if limit is not None and need > limit:
        raise CheckpointError(
            f"{where}: its layout ({', '.join(f.describe() for f in spec)}) needs {need} bytes "
            f"for capacity={buffer.capacity}, more than this machine's {buffer.device} memory "
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
    value = _host(value, f"field {i}")
    if encoding == "bytes":
        if isinstance(value, _FieldReader) or value.dtype != np.uint8 \
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


def _check_counters(policy_state: dict) -> None:
    """Counts of offers and samples must leave room to go on counting."""
    for key in ("size", "num_seen"):
        value = policy_state.get(key)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) \
                and not -1 < value < _COUNTER_MAX:
            raise CheckpointError(f"policy state: {key}={value} is out of range [0, 2**62)")
    for key in ("class_seen", "class_counts"):
        value = policy_state.get(key)
        if isinstance(value, np.ndarray) and value.dtype.kind in "iu" and value.ndim == 1:
            total = sum(value.tolist())              # Python integers: no wrap-around
            if not -1 < total < _COUNTER_MAX:
                raise CheckpointError(f"policy state: {key} sums to {total}, out of range "
                                      "[0, 2**62)")


def _check(state, policy) -> _Checked:
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
    settings = _check_settings(state["settings"])
    if settings["policy"] != policy.name or settings["capacity"] != policy.capacity:
        raise CheckpointError("internal: state checked against the wrong policy")
    policy_state = state["policy"]
    if not isinstance(policy_state, dict):
        raise CheckpointError("the policy state must be a dict")
    policy_state = {k: _numpy(v) for k, v in policy_state.items()}
    _check_counters(policy_state)
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
        return _Checked(settings, None, [], policy_state, state["sampler"],
                        np.empty(0, np.int64))
    spec, encodings = checked
    if len(fields) != len(spec):
        raise CheckpointError(f"the layout has {len(spec)} fields but the state holds "
                              f"{len(fields)} (truncated?)")
    fields = [_check_field(i, f, s, e, size)
              for i, (f, s, e) in enumerate(zip(fields, spec, encodings))]
    label_field = fields[settings["label_index"]]
    if isinstance(label_field, _FieldReader):
        label_field = label_field.read()
    labels = _int64_labels(label_field, "the stored labels")
    slot_labels = policy_state["slot_labels"][:size]
    if (labels != slot_labels).any():
        bad = np.flatnonzero(labels != slot_labels)[:5]
        raise CheckpointError(
            f"the stored label field disagrees with the policy's slot labels at slots "
            f"{bad.tolist()}: {labels[bad].tolist()} vs {slot_labels[bad].tolist()}")
    return _Checked(settings, spec, fields, policy_state, state["sampler"], labels)


def _check_sampler_state(sampler, state) -> dict:
    """Checks ``state`` against ``sampler``'s own state: the same keys, values
    of the same kinds, valid random states. Changes nothing."""
    current = sampler.state_dict()
    check_depth(state, "sampler state")
    try:
        state = _plain(state, "sampler state")
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
                                                              else _COUNTER_MAX):
                raise CheckpointError(f"{what} must be in [0, 2**{63 if key == 'seed' else 62})"
                                      f", got {value}")
        elif isinstance(ref, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise CheckpointError(f"{what} must be a number, got {value!r}")
        elif type(value) is not type(_plain(ref, what)):
            raise CheckpointError(f"{what} must be a {type(ref).__name__}, got {value!r}")
    return state


def _compare(buffer, saved: dict, keys) -> None:
    mine = _settings(buffer)
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


def _check_empty(buffer) -> None:
    if buffer.store.allocated or buffer.num_seen or buffer.sampler.started:
        raise RuntimeError("loading a checkpoint needs a buffer that has not stored anything "
                           "(a new buffer, before its first step)")


# ================================================================ applying
@dataclass
class _Prepared:
    """Everything a load writes, checked: applying it cannot fail on bad data."""

    spec: tuple | None
    fields: list             # host arrays, ``size`` rows each
    policy_state: dict
    sampler_state: dict | None


def _apply(buffer, policy, wrote, prepared: _Prepared) -> None:
    sampler = buffer.sampler
    snapshot = sampler.state_dict()
    if prepared.sampler_state is not None:
        try:
            sampler.load_state_dict(prepared.sampler_state)
        except Exception as e:
            sampler.load_state_dict(snapshot)
            raise CheckpointError(f"the sampler refused its saved state: {e}") from e
    if prepared.spec is not None:
        store = buffer.store
        try:
            store.allocate(prepared.spec)
            stream = buffer.backend.current_stream()
            store.write(prepared.fields, stream)
            wrote(stream)
        except BaseException:
            sampler.load_state_dict(snapshot)
            if not store.allocated:
                store.spec = None
            raise
    policy.load_state_dict(prepared.policy_state)


def load_state_dict(buffer, policy, wrote, state) -> None:
    """:meth:`RehearsalBuffer.load_state_dict`."""
    _check_empty(buffer)
    if not isinstance(state, dict) or not isinstance(state.get("settings"), dict):
        raise CheckpointError("not a RehearsalBuffer state (no settings)")
    _compare(buffer, _check_settings(state["settings"]), _SETTINGS)
    checked = _check(state, policy)
    sampler_state = _check_sampler_state(buffer.sampler, checked.sampler_state)
    fields = [np.ascontiguousarray(f) for f in checked.fields]
    _apply(buffer, policy, wrote,
           _Prepared(checked.spec, fields, checked.policy_state, sampler_state))


# ==================================================================== save
def _manifest_bytes(body: dict) -> bytes:
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return json.dumps({"body": body, "sha256": digest}, indent=1, sort_keys=True).encode()


def _open_channel(buffer, call: str):
    """The collective call ``call`` ("save", "load") over the buffer's exchange."""
    return open_channel(buffer, SAVE if call == "save" else LOAD, f"{call}()")


#: Errors raised again with their own type on the processes where they did not happen.
_SAVE_ERRORS = (ConcurrentSaveError, FileExistsError, FileNotFoundError, PermissionError)
_LOAD_ERRORS = (FileNotFoundError, CheckpointError, RuntimeError)


def save(buffer, policy, path, *, allow_other_files: bool = False) -> None:
    """:meth:`RehearsalBuffer.save`: every process writes its shard, rank 0
    (holding the directory's lock) commits the manifest, then removes the
    files the new checkpoint replaced."""
    path = os.fspath(path)
    with _open_channel(buffer, "save") as channel:
        captured: dict = {}

        def take_state():
            captured["state"] = capture(buffer, policy)

        channel.run("capture", take_state)
        writer = DirectoryWriter(path, allow_other_files=allow_other_files) \
            if channel.rank == 0 else None
        try:
            save_id = channel.run("begin", writer.begin if writer is not None else lambda: None,
                                  errors=_SAVE_ERRORS)[0]
            name = shard_name(save_id, buffer.rank, buffer.world_size)
            written = []

            def discard():
                """Removes what this save wrote; the previous checkpoint stays."""
                for done in written:
                    _remove(os.path.join(path, done))
                if writer is not None:
                    writer.abandon()

            def write_shard_file():
                state = captured["state"]
                if not os.path.isdir(path):
                    raise FileNotFoundError(
                        f"{path} does not exist on this process's filesystem: with several "
                        "processes the checkpoint directory must be one they all reach")
                sha, nbytes = write_atomically(
                    path, name, lambda f: write_shard(f, state), replace=False,
                    temporary=shard_temporary(save_id, buffer.rank, buffer.world_size))
                written.append(name)
                return {"rank": buffer.rank, "file": name, "sha256": sha, "bytes": nbytes,
                        "settings": state["settings"], "size": state["policy"]["size"],
                        "num_seen": state["policy"]["num_seen"]}

            try:
                entries = channel.run("shards", write_shard_file, errors=_SAVE_ERRORS)
            except BaseException:
                if channel.in_step:          # every process has stopped writing
                    discard()
                raise
            from . import __version__
            body = {"format": DIR_FORMAT, "version": DIR_VERSION, "save_id": save_id,
                    "world_size": buffer.world_size, "library_version": __version__,
                    "shards": entries}
            committed = []

            def commit():
                if writer is not None:
                    for entry in entries:
                        _check_written(path, entry)
                    writer.commit(_manifest_bytes(body))
                    committed.append(True)

            try:
                channel.run("commit", commit, errors=_SAVE_ERRORS)
            except BaseException:
                if committed:
                    writer.clean_up({e["file"] for e in entries})
                elif channel.in_step:        # nobody needs the new files
                    discard()
                raise
            # Every process returns once the directory holds the new checkpoint alone.
            channel.run("clean up", lambda: writer.clean_up({e["file"] for e in entries})
                        if writer is not None else None)
        finally:
            if writer is not None:
                writer.release()
    log.log(buffer.log_level, "rehearsal buffer: checkpoint saved in %s (%d shard%s, "
            "%d samples)", path, len(entries), "" if len(entries) == 1 else "s",
            sum(e["size"] for e in entries))


def _check_written(path: str, entry: dict) -> None:
    """Rank 0 sees every process's shard where the manifest will say it is."""
    try:
        size = os.stat(os.path.join(path, entry["file"])).st_size
    except FileNotFoundError:
        size = None
    if size != entry["bytes"]:
        raise FileNotFoundError(
            f"rank {entry['rank']}'s shard {entry['file']} is not in {path} as rank 0 sees it: "
            "every process must save into the same directory, on a filesystem they all reach")


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# --------------------------------------------------------------- reading
class _Replaced(CheckpointError):
    """A shard of the manifest being loaded is gone: a save() replaced it."""


def _read_manifest(path: str) -> tuple[dict, str]:
    """The manifest's body, checked, and the SHA-256 of the manifest file."""
    file = os.path.join(path, MANIFEST)
    try:
        with open(file, "rb") as f:
            raw = f.read(_MANIFEST_MAX_BYTES + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint in {path!r} ({MANIFEST} not found)") from None
    if len(raw) > _MANIFEST_MAX_BYTES:
        raise CheckpointError(f"{file} holds more than {_MANIFEST_MAX_BYTES} bytes: not a "
                              "checkpoint manifest")
    try:
        outer = load_json(raw, file)
    except CheckpointError as e:
        raise CheckpointError(f"{file} is corrupted ({str(e).removeprefix(file + ': ')})") \
            from None
    try:
        body = outer["body"]
        ok = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest() \
            == outer["sha256"]
    except (KeyError, TypeError):
        ok = False
    if not ok or not isinstance(body, dict):
        raise CheckpointError(f"{file} is corrupted (its checksum does not match)")
    if body.get("format") != DIR_FORMAT or body.get("version") != DIR_VERSION:
        raise CheckpointError(f"{file}: unsupported checkpoint format "
                              f"{body.get('format')!r} version {body.get('version')!r}")
    save_id = body.get("save_id")
    if not isinstance(save_id, str) or not save_id or \
            any(ch not in "0123456789abcdef" for ch in save_id):
        raise CheckpointError(f"{file}: bad save id {save_id!r}")
    shards = body.get("shards")
    n = body.get("world_size")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or not isinstance(shards, list) \
            or len(shards) != n or [s.get("rank") if isinstance(s, dict) else None
                                    for s in shards] != list(range(n)):
        raise CheckpointError(f"{file}: inconsistent shard list")
    for s in shards:
        if not is_shard_name(s.get("file")):
            raise CheckpointError(f"{file}: bad shard file name {s.get('file')!r}")
        sha = s.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef"
                                                              for c in sha):
            raise CheckpointError(f"{file}: bad checksum for shard {s['rank']}")
        nbytes = s.get("bytes")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise CheckpointError(f"{file}: bad size for shard {s['rank']}: {nbytes!r}")
        try:
            _compare_entry(s, n)
        except CheckpointError as e:
            raise CheckpointError(f"{file}: {e}") from None
    return body, hashlib.sha256(raw).hexdigest()


def _manifest_digest(path: str) -> str | None:
    try:
        with open(os.path.join(path, MANIFEST), "rb") as f:
            return hashlib.sha256(f.read(_MANIFEST_MAX_BYTES + 1)).hexdigest()
    except OSError:
        return None


def _compare_entry(entry: dict, world_size: int) -> None:
    settings = _check_settings(entry.get("settings"))
    if settings["rank"] != entry["rank"] or settings["world_size"] != world_size:
        raise CheckpointError(f"manifest: shard {entry['rank']} has inconsistent settings")


def _in_file(file: str, error: CheckpointError) -> CheckpointError:
    """``error`` naming ``file`` (once)."""
    text = str(error)
    return type(error)(text if text.startswith(file) else f"{file}: {text}")


class _FieldReader:
    """A field of a shard file, read whole or by rows (its size checked
    against the file, nothing read yet)."""

    def __init__(self, shard: ShardFile, name: str):
        self._shard, self._name = shard, name
        array = shard.array(name)
        self.shape, self.dtype = array.shape, array.dtype

    def read(self) -> np.ndarray:
        return self._shard.read(self._name)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        return self._shard.read_rows(self._name, rows)


_META_KEYS = {"format", "version", "settings", "layout", "sampler", "policy", "arrays"}


class _Shard:
    """One shard file (:class:`~.checkpoint_files.ShardFile`: size and
    checksum verified, every declared size checked against the file) and
    the state it holds: metadata and policy arrays read, fields not yet."""

    def __init__(self, path: str, entry: dict, manifest_digest: str | None = None):
        self.file = os.path.join(path, entry["file"])
        try:
            self._f = ShardFile(self.file, entry["sha256"], entry["bytes"])
        except FileNotFoundError:
            if manifest_digest is not None and _manifest_digest(path) != manifest_digest:
                raise _Replaced(f"the checkpoint in {path} was replaced while it was being "
                                "loaded (a save() into it): load it again") from None
            raise
        try:
            self.state = self._read(entry)
        except CheckpointError as e:
            self._f.close()
            raise _in_file(self.file, e) from None
        except BaseException:
            self._f.close()
            raise

    def _read(self, entry: dict) -> dict:
        f = self._f
        meta = f.array("meta")
        if meta.dtype != np.uint8 or len(meta.shape) != 1 or meta.nbytes > MAX_META_BYTES:
            raise CheckpointError(f"member meta.npy must hold at most {MAX_META_BYTES} bytes "
                                  "(uint8) of UTF-8 JSON")
        meta = load_json(f.read("meta").tobytes(), "member meta.npy")
        if not isinstance(meta, dict) or set(meta) != _META_KEYS \
                or not isinstance(meta["arrays"], list) or not isinstance(meta["policy"], dict) \
                or not all(isinstance(n, str) for n in meta["arrays"]):
            raise CheckpointError(f"member meta.npy does not describe a shard (keys "
                                  f"{sorted(_META_KEYS)})")
        if f.names != {f"{n}.npy" for n in meta["arrays"] + ["meta"]}:
            raise CheckpointError("its members do not match its metadata")
        if entry.get("settings") != meta["settings"]:
            raise CheckpointError("its settings differ from the manifest's")
        settings = _check_settings(meta["settings"])
        layout = meta["layout"]
        num_fields = len(layout) if isinstance(layout, list) else 0
        fields = [f"fields.{i}" for i in range(num_fields)]
        policy_arrays = [n for n in meta["arrays"] if n.startswith("policy.")]
        unexpected = set(meta["arrays"]) - set(fields) - set(policy_arrays)
        if unexpected:
            raise CheckpointError(f"unexpected members {sorted(unexpected)}")
        # The capacity is what the policy's slot list holds: backed by the file.
        if "policy.slot_labels" not in policy_arrays:
            raise CheckpointError("member policy.slot_labels.npy is missing")
        slots = f.array("policy.slot_labels").shape
        if slots != (settings["capacity"],):
            raise CheckpointError(f"member policy.slot_labels.npy holds shape {slots}, but the "
                                  f"capacity is {settings['capacity']}")
        policy = dict(meta["policy"])
        for n in policy_arrays:
            if n[len("policy."):] in policy:
                raise CheckpointError(f"policy value {n} appears twice")
            policy[n[len("policy."):]] = f.read(n)
        state = {k: meta[k] for k in ("format", "version", "settings", "layout", "sampler")}
        state["policy"] = policy
        state["fields"] = [_FieldReader(f, n) for n in fields if n in meta["arrays"]]
        return state

    def close(self) -> None:
        self._f.close()


# ------------------------------------------------------------------- load
def load(buffer, policy, wrote, path, *, resize: bool = False) -> None:
    """:meth:`RehearsalBuffer.load`. A single process whose checkpoint is
    replaced while it reads it (another process saving into the directory)
    reads the new one."""
    path = os.fspath(path)
    alone = buffer.comm is None or buffer.world_size == 1
    for attempt in range(3):
        try:
            return _load(buffer, policy, wrote, path, resize)
        except _Replaced:
            if not alone or attempt == 2:
                raise


def _load(buffer, policy, wrote, path, resize: bool) -> None:
    shards: list[_Shard] = []
    with _open_channel(buffer, "load") as channel:
        try:
            found: dict = {}

            def read_manifest():
                _check_empty(buffer)
                found["manifest"], digest = _read_manifest(path)
                entropy = (int(np.random.SeedSequence().entropy) if buffer.seed is None
                           else int(buffer.seed))
                return {"capacity": buffer.capacity, "entropy": entropy, "manifest": digest}

            everyone = channel.run("manifest", read_manifest, error_type=CheckpointError,
                                   errors=_LOAD_ERRORS)
            digest = everyone[0]["manifest"]
            if len({e["manifest"] for e in everyone}) > 1:
                raise CheckpointError(f"the processes read different manifests in {path}: it "
                                      "was replaced while they loaded it (a save() into it); "
                                      "load it again")
            entries = found["manifest"]["shards"]
            capacities = [e["capacity"] for e in everyone]
            exact = (len(entries) == buffer.world_size
                     and capacities == [e["settings"]["capacity"] for e in entries])
            prepared: dict = {}

            def prepare():
                if exact:
                    prepared["state"] = _prepare_exact(buffer, policy, path,
                                                       entries[buffer.rank], shards, digest)
                    return
                saved = {e["settings"]["capacity"] for e in entries}
                if not resize and saved != set(capacities):
                    raise CheckpointError(
                        f"the saved buffers have capacity={sorted(saved)}, these "
                        f"{sorted(set(capacities))}; load(path, resize=True) redistributes "
                        "the samples into buffers of another capacity")
                seed = [everyone[0]["entropy"]] + [int(e["sha256"][:16], 16) for e in entries]
                prepared["state"] = _prepare_elastic(buffer, policy, path, entries, capacities,
                                                     seed, shards, digest)

            channel.run("prepare", prepare, error_type=CheckpointError, errors=_LOAD_ERRORS)
            _apply(buffer, policy, wrote, prepared["state"])
        finally:
            for shard in shards:
                shard.close()
    log.log(buffer.log_level, "rehearsal buffer: checkpoint of %d process(es) loaded "
            "from %s%s", len(entries), path,
            "" if exact else f" and redistributed over {buffer.world_size}")


def _prepare_exact(buffer, policy, path, entry, shards, digest=None) -> _Prepared:
    shard = _Shard(path, entry, digest)
    shards.append(shard)
    try:
        _compare(buffer, _check_settings(shard.state["settings"]), _SETTINGS)
        checked = _check(shard.state, policy)
        sampler_state = _check_sampler_state(buffer.sampler, checked.sampler_state)
        _check_storage(buffer, checked.spec, shard.file)
    except CheckpointError as e:
        raise _in_file(shard.file, e) from None
    fields = [f.read() if isinstance(f, _FieldReader) else f for f in checked.fields]
    return _Prepared(checked.spec, fields, checked.policy_state, sampler_state)


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers summing to ``total``, proportional to ``weights`` (largest
    remainders, the first index first among equals)."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.sum() <= 0:
        weights = np.ones(len(weights))
    exact = total * weights / weights.sum()
    out = np.floor(exact).astype(np.int64)
    short = int(total - out.sum())
    if short > 0:
        out[np.argsort(-(exact - out), kind="stable")[:short]] += 1
    return out


def _stripes(counts: np.ndarray) -> np.ndarray:
    """A sequence holding ``j`` exactly ``counts[j]`` times, each ``j``
    spread evenly over it."""
    owner = np.repeat(np.arange(len(counts)), counts)
    position = (np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts) + 0.5) \
        / np.repeat(np.maximum(counts, 1), counts)
    return owner[np.lexsort((owner, position))]


def _equal_shares(total: int, available: np.ndarray) -> np.ndarray:
    """Class-balanced targets: ``total`` slots in equal shares (the remainder
    to the first classes), a class with fewer samples keeping all of them."""
    target = np.zeros(len(available), dtype=np.int64)
    open_ = np.ones(len(available), dtype=bool)
    left = int(total)
    while left > 0 and open_.any():
        k = int(open_.sum())
        base, extra = divmod(left, k)
        share = np.zeros(len(available), dtype=np.int64)
        share[open_] = base + (np.arange(k) < extra)
        room = available - target
        capped = open_ & (room <= share)
        if not capped.any():
            target += share
            break
        target[capped] = available[capped]
        left -= int(room[capped].sum())
        open_ &= ~capped
    return target


def _prepare_elastic(buffer, own_policy, path, entries, capacities, seed,
                     shards, digest=None) -> _Prepared:
    """Redistributes a checkpoint of ``len(entries)`` processes over this
    buffer's processes (``capacities``): the same plan on every process."""
    states = []
    for entry in entries:
        shard = _Shard(path, entry, digest)
        shards.append(shard)
        try:
            saved = _check_settings(shard.state["settings"])
            # The sampler starts afresh: the sampling mode may differ.
            _compare(buffer, saved, ("num_representatives", "policy", "label_index"))
            # (the capacity is backed by the file: see _Shard)
            checker = make_policy(saved["policy"], saved["capacity"], np.random.default_rng(0))
            states.append(_check(shard.state, checker))
        except CheckpointError as e:
            raise _in_file(shard.file, e) from None
    layouts = {None if s.spec is None else tuple((f.shape, f.dtype.str) for f in s.spec)
               for s in states} - {None}
    if len(layouts) > 1:
        raise CheckpointError(f"{path}: the shards store samples of different layouts")
    spec = next((s.spec for s in states if s.spec is not None), None)
    _check_storage(buffer, spec, path)

    # Every stored sample: (shard, slot, label).
    sizes = np.array([len(s.labels) for s in states], dtype=np.int64)
    source = np.repeat(np.arange(len(states)), sizes)
    slot = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes])
    label = np.concatenate([s.labels for s in states])
    capacities = np.asarray(capacities, dtype=np.int64)
    total = int(min(capacities.sum(), len(label)))
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    class_balanced = buffer.policy == "class_balanced"
    if class_balanced:
        order, seen = [], {}
        for s in states:
            for c, n in zip(s.policy_state["class_labels"].tolist(),
                            s.policy_state["class_seen"].tolist()):
                if c not in seen:
                    order.append(c)
                    seen[c] = 0
                seen[c] += n
        classes = np.asarray(order, dtype=np.int64)
        seen_per_class = np.asarray([seen[c] for c in order], dtype=np.int64)
        lookup = np.argsort(classes, kind="stable")
        cls = lookup[np.searchsorted(classes[lookup], label)] if len(label) else label
        available = np.bincount(cls, minlength=len(classes)).astype(np.int64)
        target = _equal_shares(total, available)
        # A uniform random subset of each class, the classes one after another.
        kept = np.concatenate([np.empty(0, np.int64)] + [
            rng.choice(np.flatnonzero(cls == k), size=int(target[k]), replace=False)
            for k in range(len(classes))])
    else:
        kept = rng.choice(len(label), size=total, replace=False)
    per_process = _apportion(total, capacities)
    owner = _stripes(per_process)
    mine = kept[owner == buffer.rank]

    # This process's samples, slot by slot, and its share of the offers.
    fields = [] if spec is None else [np.empty((len(mine),) + f.shape, f.dtype) for f in spec]
    for k, s in enumerate(states):
        pick = np.flatnonzero(source[mine] == k)
        if len(pick) == 0:
            continue
        rows = slot[mine[pick]]
        order = np.argsort(rows, kind="stable")
        for out, field in zip(fields, s.fields):
            out[pick[order]] = field.read_rows(rows[order])
    policy = make_policy(buffer.policy, buffer.capacity, np.random.default_rng(0))
    if class_balanced:
        per_class = np.zeros((buffer.world_size, len(classes)), dtype=np.int64)
        np.add.at(per_class, (owner, cls[kept]), 1)
        class_seen = np.stack([
            _apportion(int(seen_per_class[k]), per_class[:, k] if per_class[:, k].any()
                       else capacities) for k in range(len(classes))], axis=1)[buffer.rank] \
            if len(classes) else np.empty(0, np.int64)
        state = policy.state_from_samples(label[mine], num_seen=int(class_seen.sum()),
                                          class_labels=classes, class_seen=class_seen)
    else:
        num_seen = _apportion(int(sum(int(s.policy_state["num_seen"]) for s in states)),
                              per_process if total else capacities)[buffer.rank]
        state = policy.state_from_samples(label[mine], num_seen=int(num_seen))
    # The random streams are this buffer's own: the checkpoint's belong to
    # processes of another layout.
    state["rng"] = own_policy.rng.bit_generator.state
    try:
        valid = policy.validate_state(state)
    except ValueError as e:
        raise CheckpointError(f"internal: redistributed state is inconsistent: {e}") from None
    return _Prepared(spec, fields, valid, None)

