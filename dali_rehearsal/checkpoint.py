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
    path/shard-<id>-<rank>-of-<N>.npz        one shard: NumPy .npy members
                                             (read with allow_pickle=False)
                                             and a "meta" member (UTF-8 JSON)

Writing is atomic: each file is written under a temporary name, flushed to
disk (fsync) and renamed; shard names are new for every save and the
manifest is replaced last, so a crash at any point leaves the previous
checkpoint loadable (files of an unfinished save are removed by the next
successful one). Loading verifies the manifest's own checksum and each shard
file's SHA-256 before reading it.

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

Collective calls (``save`` and ``load`` with a communicator) use
:func:`dali_rehearsal.exchange.make_transport`: every process must call them,
and a failure on one process raises on every process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import zipfile
from dataclasses import dataclass

import numpy as np

from .policies import check_rng_state, make_policy
from .storage import FieldSpec

__all__ = ["CheckpointError", "state_dict", "load_state_dict", "save", "load"]

log = logging.getLogger("dali_rehearsal")

FORMAT = "dali_rehearsal.RehearsalBuffer"
VERSION = 2
DIR_FORMAT = "dali_rehearsal.checkpoint"
DIR_VERSION = 1
MANIFEST = "manifest.json"

#: settings a checkpoint must share with the buffer that loads it
_SETTINGS = ("capacity", "num_representatives", "policy", "label_index", "sampling", "rank",
             "world_size")
#: dtypes PyTorch tensors hold (native byte order); others travel as raw bytes
_TORCH_DTYPES = {"bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64",
                 "uint64", "float16", "float32", "float64", "complex64", "complex128"}
_READ_CHUNK = 64 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this buffer: corrupted,
    inconsistent, or saved with other settings. Nothing was changed."""


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


def _check_layout(layout, label_index: int):
    if layout is None:
        return None
    if not isinstance(layout, list) or len(layout) < 2:
        raise CheckpointError("layout must be a list of at least two fields (samples, labels)")
    if label_index >= len(layout):
        raise CheckpointError(f"label_index={label_index} but the layout has {len(layout)} "
                              "fields")
    spec, encodings = [], []
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
        spec.append(FieldSpec(tuple(int(d) for d in shape), dtype))
        encodings.append(entry["encoding"])
    label = spec[label_index]
    if label.dtype.kind not in "iu" or int(np.prod(label.shape, dtype=np.int64)) != 1:
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
            if key in ("seed", "round") and value < 0:
                raise CheckpointError(f"{what} must be >= 0, got {value}")
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


# ================================================================ transport
class _Alone:
    """The transport of a single process."""

    rank, size = 0, 1

    def barrier(self) -> None:
        pass

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        return [bytes(data)]

    def close(self) -> None:
        pass


def _transport(buffer):
    if buffer.world_size == 1 or buffer.comm is None:
        return _Alone()
    from .exchange import make_transport
    return make_transport(buffer.comm)


def _gather(transport, value) -> list:
    """Every process's JSON-able ``value``, in rank order."""
    return [json.loads(b.decode()) for b in transport.allgather_bytes(json.dumps(value).encode())]


def _agree(transport, error: BaseException | None) -> None:
    """Raises on every process when ``error`` is set on any of them."""
    messages = _gather(transport, None if error is None
                       else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = {rank: m for rank, m in enumerate(messages) if m is not None}
    if failed:
        raise CheckpointError("the checkpoint operation failed on "
                              + "; ".join(f"rank {r}: {m}" for r, m in failed.items()))


# ==================================================================== files
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _HashingWriter:
    """A write-only file that hashes what goes through it (no seek: zipfile
    then streams with data descriptors)."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.nbytes = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.nbytes += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def _write_atomically(directory: str, name: str, write) -> tuple[str, int]:
    """Writes ``name`` in ``directory`` through ``write(file)`` under a temporary
    name, fsyncs and renames it. Returns (sha256, bytes)."""
    tmp = os.path.join(directory, f".{name}.tmp-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)
    return writer.sha256.hexdigest(), writer.nbytes


def _write_shard(f, state: dict) -> None:
    arrays = {f"fields.{i}": a for i, a in enumerate(state["fields"])}
    policy_meta = {}
    for key, value in state["policy"].items():
        if isinstance(value, np.ndarray):
            arrays[f"policy.{key}"] = value
        else:
            policy_meta[key] = value
    meta = {k: state[k] for k in ("format", "version", "settings", "layout", "sampler")}
    meta["policy"] = policy_meta
    meta["arrays"] = sorted(arrays)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            # (a fixed date: the same buffer state gives the same bytes)
            with z.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array),
                                          allow_pickle=False)


def _shard_name(save_id: str, rank: int, world_size: int) -> str:
    return f"shard-{save_id}-{rank:05d}-of-{world_size:05d}.npz"


def _manifest_bytes(body: dict) -> bytes:
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return json.dumps({"body": body, "sha256": digest}, indent=1, sort_keys=True).encode()


def save(buffer, policy, path) -> None:
    """:meth:`RehearsalBuffer.save`."""
    path = os.fspath(path)
    transport = _transport(buffer)
    try:
        error, state = None, None
        try:
            state = capture(buffer, policy)
        except Exception as e:  # reported to every process
            error = e
        save_id = _gather(transport, secrets.token_hex(8))[0]
        _agree(transport, error)

        name = _shard_name(save_id, buffer.rank, buffer.world_size)
        entry, error = None, None
        try:
            os.makedirs(path, exist_ok=True)
            sha, nbytes = _write_atomically(path, name, lambda f: _write_shard(f, state))
            entry = {"rank": buffer.rank, "file": name, "sha256": sha, "bytes": nbytes,
                     "settings": state["settings"], "size": state["policy"]["size"],
                     "num_seen": state["policy"]["num_seen"]}
        except Exception as e:
            error = e
        entries = _gather(transport, entry)
        try:
            _agree(transport, error)
        except BaseException:
            _remove(os.path.join(path, name))
            raise

        # The manifest, replaced last, commits the save.
        error = None
        if transport.rank == 0:
            try:
                from . import __version__
                body = {"format": DIR_FORMAT, "version": DIR_VERSION, "save_id": save_id,
                        "world_size": buffer.world_size, "library_version": __version__,
                        "shards": entries}
                _write_atomically(path, MANIFEST, lambda f: f.write(_manifest_bytes(body)))
            except Exception as e:
                error = e
        try:
            _agree(transport, error)
        except BaseException:
            _remove(os.path.join(path, name))
            raise
        if transport.rank == 0:
            _remove_stale(path, {e["file"] for e in entries})
        log.log(buffer.log_level, "rehearsal buffer: checkpoint saved in %s (%d shard%s, "
                "%d samples)", path, len(entries), "" if len(entries) == 1 else "s",
                sum(e["size"] for e in entries))
    finally:
        transport.close()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _remove_stale(path: str, keep: set) -> None:
    """Removes shards of earlier (or unfinished) saves and temporary files."""
    try:
        names = os.listdir(path)
    except OSError as e:
        log.warning("rehearsal buffer: could not list %s to remove old shards: %s", path, e)
        return
    for name in names:
        shard = name.startswith("shard-") and name.endswith(".npz")
        temporary = name.startswith((".shard-", f".{MANIFEST}")) and ".tmp-" in name
        if (shard and name not in keep) or temporary:
            _remove(os.path.join(path, name))


# --------------------------------------------------------------- reading
def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 22)
            if not chunk:
                return digest.hexdigest()
            digest.update(chunk)


def _read_manifest(path: str) -> dict:
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no checkpoint in {path!r} ({MANIFEST} not found)")
    with open(file, "rb") as f:
        raw = f.read()
    try:
        outer = json.loads(raw.decode())
        body = outer["body"]
        ok = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest() \
            == outer["sha256"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        ok = False
    if not ok:
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
    if not isinstance(n, int) or n < 1 or not isinstance(shards, list) or len(shards) != n \
            or [s.get("rank") if isinstance(s, dict) else None for s in shards] != list(range(n)):
        raise CheckpointError(f"{file}: inconsistent shard list")
    for s in shards:
        if not isinstance(s.get("file"), str) or os.path.basename(s["file"]) != s["file"]:
            raise CheckpointError(f"{file}: bad shard file name {s.get('file')!r}")
        sha = s.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef"
                                                              for c in sha):
            raise CheckpointError(f"{file}: bad checksum for shard {s['rank']}")
        _compare_entry(s, n)
    return body


def _compare_entry(entry: dict, world_size: int) -> None:
    settings = _check_settings(entry.get("settings"))
    if settings["rank"] != entry["rank"] or settings["world_size"] != world_size:
        raise CheckpointError(f"manifest: shard {entry['rank']} has inconsistent settings")


class _FieldReader:
    """A field of a shard file, read whole or by rows."""

    def __init__(self, shard: "_Shard", name: str):
        self._shard, self._name = shard, name
        with shard.open(name) as f:
            self.shape, self.dtype = _npy_header(f, name)

    def read(self) -> np.ndarray:
        with self._shard.open(self._name) as f:
            return np.lib.format.read_array(f, allow_pickle=False)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (increasing), streaming through the member."""
        row_shape = tuple(self.shape[1:])
        out = np.empty((len(rows),) + row_shape, dtype=self.dtype)
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
        if len(rows) == 0 or row_bytes == 0:
            return out
        per_chunk = max(1, _READ_CHUNK // row_bytes)
        with self._shard.open(self._name) as f:
            _npy_header(f, self._name)
            done = 0
            for start in range(0, int(self.shape[0]), per_chunk):
                stop = min(start + per_chunk, int(self.shape[0]))
                data = f.read((stop - start) * row_bytes)
                if len(data) != (stop - start) * row_bytes:
                    raise CheckpointError(f"{self._shard.file}: {self._name} is truncated")
                chunk = np.frombuffer(data, dtype=self.dtype).reshape((stop - start,) + row_shape)
                upto = np.searchsorted(rows, stop)
                out[done:upto] = chunk[rows[done:upto] - start]
                done = upto
            f.read()        # to the end: zipfile checks the member's CRC
        return out


def _npy_header(f, name: str):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise CheckpointError(f"{name}: unsupported .npy version {version}")
    if fortran or dtype.hasobject or len(shape) < 1:
        raise CheckpointError(f"{name}: not a C-ordered array of samples")
    return tuple(shape), dtype


class _Shard:
    """One shard file, checksum verified before anything is parsed."""

    def __init__(self, path: str, entry: dict):
        self.file = os.path.join(path, entry["file"])
        if not os.path.isfile(self.file):
            raise FileNotFoundError(f"checkpoint shard {self.file} is missing")
        if _sha256_file(self.file) != entry.get("sha256"):
            raise CheckpointError(f"{self.file} is corrupted (its SHA-256 does not match the "
                                  "manifest)")
        try:
            self._zip = zipfile.ZipFile(self.file)
            names = set(self._zip.namelist())
            meta = json.loads(self.read_array("meta").tobytes().decode())
        except (zipfile.BadZipFile, ValueError, KeyError, OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.file} is not a readable shard: {e}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("arrays"), list) \
                or not isinstance(meta.get("policy"), dict) \
                or names != {f"{n}.npy" for n in meta["arrays"] + ["meta"]}:
            raise CheckpointError(f"{self.file}: its members do not match its metadata")
        layout = meta.get("layout")
        num_fields = 0 if layout is None else len(layout) if isinstance(layout, list) else -1
        policy = dict(meta["policy"])
        for n in meta["arrays"]:
            if isinstance(n, str) and n.startswith("policy."):
                policy[n[len("policy."):]] = self.read_array(n)
        field_names = [f"fields.{i}" for i in range(max(num_fields, 0))]
        self.state = {k: meta.get(k) for k in ("format", "version", "settings", "layout",
                                                "sampler")}
        self.state["policy"] = policy
        self.state["fields"] = [_FieldReader(self, n) for n in field_names
                                if n in meta["arrays"]]
        if entry.get("settings") != meta.get("settings"):
            raise CheckpointError(f"{self.file}: its settings differ from the manifest's")

    def open(self, name: str):
        return self._zip.open(name + ".npy")

    def read_array(self, name: str) -> np.ndarray:
        with self.open(name) as f:
            return np.lib.format.read_array(f, allow_pickle=False)

    def close(self) -> None:
        self._zip.close()


# ------------------------------------------------------------------- load
def load(buffer, policy, wrote, path, *, resize: bool = False) -> None:
    """:meth:`RehearsalBuffer.load`."""
    path = os.fspath(path)
    transport = _transport(buffer)
    shards: list[_Shard] = []
    try:
        mine = {"capacity": buffer.capacity,
                "entropy": (int(np.random.SeedSequence().entropy) if buffer.seed is None
                            else int(buffer.seed))}
        everyone = _gather(transport, mine)
        prepared, error = None, None
        try:
            _check_empty(buffer)
            manifest = _read_manifest(path)
            entries = manifest["shards"]
            capacities = [e["capacity"] for e in everyone]
            exact = (manifest["world_size"] == buffer.world_size
                     and capacities == [e["settings"]["capacity"] for e in entries])
            if exact:
                prepared = _prepare_exact(buffer, policy, path, entries[buffer.rank], shards)
            else:
                saved = {e["settings"]["capacity"] for e in entries}
                if not resize and saved != set(capacities):
                    raise CheckpointError(
                        f"the saved buffers have capacity={sorted(saved)}, these "
                        f"{sorted(set(capacities))}; load(path, resize=True) redistributes "
                        "the samples into buffers of another capacity")
                seed = [everyone[0]["entropy"]] + [int(e["sha256"][:16], 16) for e in entries]
                prepared = _prepare_elastic(buffer, policy, path, entries, capacities, seed,
                                            shards)
        except Exception as e:  # reported to every process
            error = e
        _agree(transport, error)
        _apply(buffer, policy, wrote, prepared)
        log.log(buffer.log_level, "rehearsal buffer: checkpoint of %d process(es) loaded "
                "from %s%s", len(entries), path,
                "" if exact else f" and redistributed over {buffer.world_size}")
    finally:
        for shard in shards:
            shard.close()
        transport.close()


def _prepare_exact(buffer, policy, path, entry, shards) -> _Prepared:
    shard = _Shard(path, entry)
    shards.append(shard)
    _compare(buffer, _check_settings(shard.state["settings"]), _SETTINGS)
    checked = _check(shard.state, policy)
    sampler_state = _check_sampler_state(buffer.sampler, checked.sampler_state)
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
                     shards) -> _Prepared:
    """Redistributes a checkpoint of ``len(entries)`` processes over this
    buffer's processes (``capacities``): the same plan on every process."""
    states = []
    for entry in entries:
        shard = _Shard(path, entry)
        shards.append(shard)
        saved = _check_settings(shard.state["settings"])
        # The sampler starts afresh: the sampling mode may differ.
        _compare(buffer, saved, ("num_representatives", "policy", "label_index"))
        checker = make_policy(saved["policy"], saved["capacity"], np.random.default_rng(0))
        states.append(_check(shard.state, checker))
    layouts = {None if s.spec is None else tuple((f.shape, f.dtype.str) for f in s.spec)
               for s in states} - {None}
    if len(layouts) > 1:
        raise CheckpointError("the shards store samples of different layouts")
    spec = next((s.spec for s in states if s.spec is not None), None)

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

