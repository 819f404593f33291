"""Buffer checkpoints: state dicts (torch.save with weights_only=True),
checkpoint directories (no pickle, atomic, checksummed), validation of every
field before anything changes, elastic restore on another number of processes.

Samples name themselves (see tests/dist_programs/checkpoint.py): every restored
row can be checked against the sample it claims to be, field by field.
"""

from __future__ import annotations

import fcntl
import importlib.util
import io
import itertools
import json
import os
import pickle
import random
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import chisquare

import dali_rehearsal as dr
from dali_rehearsal.checkpoint import CheckpointError, ConcurrentSaveError
from dali_rehearsal.checkpoint import state as checkpoint_state
from dali_rehearsal.checkpoint.atomic import HashingWriter
from dali_rehearsal.checkpoint.manifest import manifest_bytes
from dali_rehearsal.checkpoint.shards import write_shard
from dali_rehearsal.checkpoint.validation import check_sampler_state
from utils import snapshot, to_host

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = ROOT / "tests" / "dist_programs" / "checkpoint.py"
_spec = importlib.util.spec_from_file_location("checkpoint_program", PROGRAM)
prog = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prog)

TIMEOUT = 240
ALPHA = 1e-3


def _torch():
    return pytest.importorskip("torch")


def _buffer(policy="class_balanced", device="cpu", **kwargs):
    settings = dict(capacity=24, num_representatives=5, policy=policy, device=device, seed=8)
    settings.update(kwargs)
    return dr.RehearsalBuffer(**settings)


def _fed(policy="class_balanced", steps=12, b=7, device="cpu", **kwargs):
    """A buffer after ``steps`` steps of ``b`` samples."""
    buffer = _buffer(policy, device, **kwargs)
    prog.feed(buffer, 0, steps, b)
    return buffer


def _continue(buffer, steps=8, start=12):
    """A digest of the next ``steps`` steps (every row's fields checked)."""
    return prog.feed(buffer, 0, steps, 7, start=start)


def _plain(value):
    """A state as JSON-able values (arrays and tensors as lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "shape"):
        return _np(value).tolist()
    return value


def _fingerprint(buffer):
    """Everything a failed load must leave as it was: the whole state, the
    storage and the settings."""
    return (json.dumps(_plain(buffer.state_dict()), sort_keys=True), buffer.core.allocated,
            buffer.spec, buffer.num_representatives, buffer.sampler.started)


# ============================================================ round trips
@pytest.mark.parametrize("policy", sorted(dr.POLICIES))
@pytest.mark.parametrize("via", ["torch-weights-only", "numpy-pickle", "directory"])
def test_round_trip_resumes_with_exactly_the_same_batches(xp, device, policy, via, tmp_path,
                                                          monkeypatch):
    original = _fed(policy, device=device)
    resumed = _buffer(policy, device)
    if via == "torch-weights-only":
        torch = _torch()
        blob = io.BytesIO()
        torch.save({"model": {"w": torch.zeros(3)}, "buffer": original.state_dict()}, blob)
        blob.seek(0)
        resumed.load_state_dict(torch.load(blob, weights_only=True)["buffer"])
    elif via == "numpy-pickle":
        monkeypatch.setattr(checkpoint_state, "torch_module", lambda: None)      # no PyTorch installed
        state = original.state_dict()
        assert all(isinstance(f, np.ndarray) for f in state["fields"])
        resumed.load_state_dict(pickle.loads(pickle.dumps(state)))
    else:
        original.save(tmp_path / "ckpt")
        resumed.load(tmp_path / "ckpt")
    assert resumed.size == original.size and resumed.num_seen == original.num_seen
    assert resumed.class_counts() == original.class_counts()
    np.testing.assert_array_equal(resumed.stored_labels(), original.stored_labels())
    for a, b in zip(original.stored(), resumed.stored()):
        np.testing.assert_array_equal(to_host(a), to_host(b))
    assert _continue(original) == _continue(resumed)


def test_state_dict_holds_only_tensors_and_plain_values():
    torch = _torch()
    buffer = _fed()

    def walk(value, where):
        if isinstance(value, dict):
            for k, v in value.items():
                assert isinstance(k, str), f"{where}: key {k!r}"
                walk(v, f"{where}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")
        else:
            assert value is None or isinstance(value, (str, int, float, bool, torch.Tensor)), \
                f"{where}: {type(value).__name__}"

    state = buffer.state_dict()
    walk(state, "state")
    blob = io.BytesIO()
    torch.save(state, blob)
    blob.seek(0)
    torch.load(blob, weights_only=True)        # no allow-listing needed


def test_fields_torch_cannot_hold_travel_as_bytes():
    """Extended precision and non-native byte order (NumPy kinds f and i)."""
    torch = _torch()
    buffer = _buffer(capacity=10)
    ids = np.arange(6)
    fields = (np.stack([ids, ids], 1).astype(np.uint8), ids % 3,
              ids.astype(np.longdouble)[:, None] / 3, ids.astype(">i4"))
    buffer.add(*fields)
    state = buffer.state_dict()
    assert [e["encoding"] for e in state["layout"]] == ["array", "array", "bytes", "bytes"]
    blob = io.BytesIO()
    torch.save(state, blob)
    blob.seek(0)
    resumed = _buffer(capacity=10)
    resumed.load_state_dict(torch.load(blob, weights_only=True))
    for a, b in zip(buffer.stored(), resumed.stored()):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("how", ["state_dict", "directory"])
def test_empty_buffer_round_trip(how, tmp_path):
    empty = _buffer(seed=0)
    fresh = _buffer(seed=1)
    if how == "state_dict":
        fresh.load_state_dict(empty.state_dict())
    else:
        empty.save(tmp_path / "empty")
        fresh.load(tmp_path / "empty")
    assert fresh.size == 0 and fresh.spec is None
    # the random streams came with it: the same batches follow
    assert prog.feed(empty, 0, 5, 4) == prog.feed(fresh, 0, 5, 4)


def test_loading_into_a_used_buffer_is_refused():
    used = _fed()
    with pytest.raises(RuntimeError, match="not stored anything"):
        used.load_state_dict(_fed().state_dict())


# ============================================================ tampering
def _np(value):
    """A NumPy copy of an array or a tensor."""
    return np.array(value.numpy() if hasattr(value, "numpy") else value)


def _tamperings(policy):
    """(name, change) pairs: each makes a valid state invalid."""
    def label_field(state):
        return state["settings"]["label_index"]

    def edit_field(i, fn):
        def change(state):
            state["fields"][i] = fn(_np(state["fields"][i]))
        return change

    def edit_policy(key, fn):
        def change(state):
            state["policy"][key] = fn(_np(state["policy"][key]))
        return change

    def set_in(path, value):
        def change(state):
            target = state
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
        return change

    def at(index, value):
        def fn(a):
            a[index] = value
            return a
        return fn

    cases = {
        "truncated: last field missing": lambda s: s["fields"].pop(),
        "truncated: last row of a field missing": edit_field(2, lambda a: a[:-1]),
        "label field disagrees with slot labels": lambda s: edit_field(
            label_field(s), at(0, (int(_np(s["fields"][label_field(s)])[0]) + 1) % 4))(s),
        "negative label": lambda s: (edit_field(1, at(0, -3))(s),
                                     edit_policy("slot_labels", at(0, -3))(s)),
        "negative num_seen": set_in(("policy", "num_seen"), -1),
        "num_seen with no room left to count": set_in(("policy", "num_seen"), 2**62),
        "negative size": set_in(("policy", "size"), -2),
        "size beyond capacity": set_in(("policy", "size"), 999),
        "extra field": lambda s: s["fields"].append(_np(s["fields"][0])),
        "layout with a field less": lambda s: s["layout"].pop(),
        "wrong field shape": edit_field(0, lambda a: a.reshape(len(a), 2, 2)),
        "wrong field dtype": edit_field(2, lambda a: a.astype(np.float64)),
        "wrong layout dtype": set_in(("layout", 3, "dtype"), "<i8"),
        "fields of another type": set_in(("fields",), "not a list"),
        "malformed policy random state": set_in(("policy", "rng", "state", "state"), "x"),
        "policy random state of another generator": set_in(
            ("policy", "rng", "bit_generator"), "MT19937"),
        "malformed sampler random state": set_in(("sampler", "rng", "has_uint32"), "yes"),
        "sampler state without its random state": lambda s: s["sampler"].pop("rng"),
        "capacity mismatch": set_in(("settings", "capacity"), 30),
        "policy mismatch": set_in(("settings", "policy"),
                                  "reservoir" if policy == "class_balanced"
                                  else "class_balanced"),
        "num_representatives mismatch": set_in(("settings", "num_representatives"), 4),
        "label_index mismatch": set_in(("settings", "label_index"), 0),
        "world_size mismatch": set_in(("settings", "world_size"), 2),
        "unknown version": set_in(("version",), 99),
        "not a buffer state": set_in(("format",), "something else"),
    }
    if policy == "class_balanced":
        cases.update({
            "slot index out of range": edit_policy("class_slots", at(0, 999)),
            "slot listed twice": edit_policy("class_slots", at(1, 0)),
            "negative class count": edit_policy("class_counts", at(0, -1)),
            "negative class seen": edit_policy("class_seen", at(0, -5)),
            "class counts disagree with size": edit_policy("class_counts", at(0, 0)),
            # consistent bookkeeping, counts beyond what int64 can go on counting
            "offers per class with no room left to count": lambda s: (
                edit_policy("class_seen", lambda a: a + 2**60)(s),
                set_in(("policy", "num_seen"),
                       int(_np(s["policy"]["class_seen"]).sum()))(s)),
        })
    return cases


@pytest.mark.parametrize("policy", sorted(dr.POLICIES))
@pytest.mark.parametrize("form", ["numpy", "torch"])
def test_every_tampered_state_is_rejected_and_changes_nothing(policy, form, monkeypatch):
    """Each tampering raises a clear error, the buffer is exactly as before,
    and a retry with the good state then resumes with the same batches."""
    if form == "torch":
        _torch()
    else:
        monkeypatch.setattr(checkpoint_state, "torch_module", lambda: None)
    original = _fed(policy)
    good = original.state_dict()
    for name, change in _tamperings(policy).items():
        state = pickle.loads(pickle.dumps(good))
        change(state)
        buffer = _buffer(policy)
        before = _fingerprint(buffer)
        with pytest.raises(ValueError) as info:
            buffer.load_state_dict(state)
        assert str(info.value), name
        assert _fingerprint(buffer) == before, f"{name}: the buffer changed"
        buffer.load_state_dict(pickle.loads(pickle.dumps(good)))         # retry
        assert buffer.size == original.size, name
    assert _continue(original) == _continue(buffer)


def test_mismatch_errors_name_the_setting():
    state = _fed().state_dict()
    with pytest.raises(CheckpointError, match="num_representatives=5, this one 4"):
        _buffer(num_representatives=4).load_state_dict(state)
    with pytest.raises(CheckpointError, match="capacity=24, this one 25"):
        _buffer(capacity=25).load_state_dict(state)
    with pytest.raises(CheckpointError, match="policy='class_balanced', this one 'reservoir'"):
        _buffer("reservoir").load_state_dict(state)
    with pytest.raises(CheckpointError, match="label_index=1, this one 0"):
        _buffer(label_index=0).load_state_dict(state)


def test_a_sampler_that_refuses_its_state_changes_nothing(monkeypatch):
    """A sampler whose load_state_dict fails half-way is rolled back."""
    state = _fed().state_dict()
    buffer = _buffer()
    before = _fingerprint(buffer)
    sampler = buffer.sampler
    real = type(sampler).load_state_dict
    calls = []

    def half_way(self, s):
        calls.append(s)
        real(self, s)                   # applies the random state, then fails
        if len(calls) == 1:
            raise KeyError("something the sampler needed")

    monkeypatch.setattr(type(sampler), "load_state_dict", half_way)
    with pytest.raises(CheckpointError, match="sampler refused"):
        buffer.load_state_dict(state)
    assert _fingerprint(buffer) == before
    buffer.load_state_dict(state)
    assert buffer.size == 24


def test_global_sampler_state_is_checked_before_it_is_applied():
    """The state of a global sampler (shared seed, round number): every value
    is checked against the sampler's own state before anything is applied."""
    rng = np.random.default_rng(0)

    class GlobalShaped:                 # the keys and kinds GlobalSampler.state_dict() has
        def state_dict(self):
            return {"rng": rng.bit_generator.state, "seed": 12, "round": 40}

    good = {"rng": np.random.default_rng(1).bit_generator.state, "seed": 3, "round": 7}
    assert check_sampler_state(GlobalShaped(), good) == good
    nested = {"rng": good["rng"], "seed": 3, "round": 7}
    deep = nested
    for _ in range(5000):                       # deeper than Python recurses
        deep["x"] = {}
        deep = deep["x"]
    for bad, match in [({**good, "round": -1}, "round"), ({**good, "seed": "3"}, "seed"),
                       # seeds and counters that the exchange cannot hold in int64
                       ({**good, "seed": 2**64}, "seed"), ({**good, "seed": 2**63}, "seed"),
                       ({**good, "round": 2**62}, "round"), (nested, "nested"),
                       ({**good, "extra": 1}, "keys"), ({"rng": good["rng"]}, "keys"),
                       ({**good, "rng": {**good["rng"], "uinteger": -1}}, "random state")]:
        with pytest.raises(CheckpointError, match=match):
            check_sampler_state(GlobalShaped(), bad)


@pytest.mark.parametrize("via", ["state dict", "directory"])
def test_a_load_that_fails_writing_the_samples_leaves_the_buffer_new(via, tmp_path,
                                                                     monkeypatch):
    """The storage is allocated, then writing the samples into it fails (out
    of device memory): the buffer is left exactly as it was, storage
    included, and the same load then succeeds and resumes exactly."""
    from dali_rehearsal.storage import SampleStore
    original = _fed()
    state = original.state_dict()
    original.save(tmp_path / "c")
    buffer = _buffer()
    before = _fingerprint(buffer)

    def out_of_memory(self, host_fields, stream=None):
        raise MemoryError("out of device memory (simulated)")

    monkeypatch.setattr(SampleStore, "write", out_of_memory)
    with pytest.raises(MemoryError, match="simulated"):
        buffer.load_state_dict(state) if via == "state dict" else buffer.load(tmp_path / "c")
    assert _fingerprint(buffer) == before and buffer.nbytes == 0
    monkeypatch.undo()
    buffer.load_state_dict(state) if via == "state dict" else buffer.load(tmp_path / "c")
    assert _continue(buffer) == _continue(original)


def test_one_process_calls_run_over_a_transport_of_one():
    """The size-1 transport that carries the checkpoint calls of one process:
    the interface's blocking collectives over it; no message to itself."""
    from dali_rehearsal.exchange.alone import AloneTransport
    transport = AloneTransport()
    assert (transport.rank, transport.size) == (0, 1)
    assert transport.allgather_bytes(b"state of rank 0") == [b"state of rank 0"]
    assert transport.allgather_bytes(b"") == [b""]
    transport.barrier()
    with pytest.raises(ValueError, match="no message with itself"):
        transport.iexchange({0: np.zeros(4, np.uint8)}, {}, tag=1)


# ============================================================ directories
def _shard_files(path):
    return sorted(p for p in Path(path).iterdir() if p.name.startswith("shard-"))


def test_directory_holds_no_pickle(tmp_path):
    buffer = _fed("reservoir")
    buffer.save(tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["body"]["world_size"] == 1
    (shard,) = _shard_files(tmp_path / "c")
    with np.load(shard, allow_pickle=False) as arrays:        # plain .npy members
        meta = json.loads(arrays["meta"].tobytes())
        assert meta["settings"]["capacity"] == 24
        assert arrays["fields.0"].shape == (24, 4) and arrays["fields.2"].dtype == np.float32


@pytest.mark.parametrize("where", ["shard", "manifest"])
def test_corrupted_file_is_an_error_not_data(where, tmp_path):
    original = _fed()
    original.save(tmp_path / "good")
    original.save(tmp_path / "bad")
    target = _shard_files(tmp_path / "bad")[0] if where == "shard" \
        else tmp_path / "bad" / "manifest.json"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01                                  # one bit flipped
    target.write_bytes(bytes(data))
    buffer = _buffer()
    before = _fingerprint(buffer)
    with pytest.raises(CheckpointError, match="corrupted"):
        buffer.load(tmp_path / "bad")
    assert _fingerprint(buffer) == before
    buffer.load(tmp_path / "good")
    assert _continue(original) == _continue(buffer)


def _rewrite_shard(path, change):
    """Rewrites the single shard of ``path`` with ``change`` applied to its
    state and a matching checksum: well-formed files, inconsistent content."""
    (shard,) = _shard_files(path)
    manifest = json.loads((path / "manifest.json").read_text())["body"]
    buffer = _buffer()
    buffer.load(path)
    state = buffer.state_dict()
    state["fields"] = [_np(f) for f in state["fields"]]
    state["policy"] = {k: _np(v) if hasattr(v, "shape") else v
                       for k, v in state["policy"].items()}
    change(state)
    with open(shard, "wb") as f:
        writer = HashingWriter(f)
        write_shard(writer, state)
    manifest["shards"][0]["sha256"] = writer.sha256.hexdigest()
    manifest["shards"][0]["bytes"] = writer.nbytes
    (path / "manifest.json").write_bytes(manifest_bytes(manifest))


@pytest.mark.parametrize("name", ["label field disagrees with slot labels",
                                  "truncated: last row of a field missing",
                                  "slot index out of range", "negative num_seen",
                                  "malformed sampler random state"])
def test_inconsistent_shard_with_valid_checksum_is_rejected(name, tmp_path):
    original = _fed()
    original.save(tmp_path / "c")
    _rewrite_shard(tmp_path / "c", _tamperings("class_balanced")[name])
    buffer = _buffer()
    before = _fingerprint(buffer)
    with pytest.raises(CheckpointError):
        buffer.load(tmp_path / "c")
    assert _fingerprint(buffer) == before


def test_missing_checkpoint_and_missing_shard(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        _buffer().load(tmp_path / "nothing")
    _fed().save(tmp_path / "c")
    _shard_files(tmp_path / "c")[0].unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        _buffer().load(tmp_path / "c")


def test_directory_settings_mismatch(tmp_path):
    _fed().save(tmp_path / "c")
    with pytest.raises(CheckpointError, match="num_representatives"):
        _buffer(num_representatives=3).load(tmp_path / "c")
    with pytest.raises(CheckpointError, match="policy"):
        _buffer("reservoir").load(tmp_path / "c")
    with pytest.raises(CheckpointError, match="resize=True"):
        _buffer(capacity=12).load(tmp_path / "c")


# ============================================================ interrupted saves
def _assert_restores(path, expected, policy="class_balanced"):
    buffer = _buffer(policy)
    buffer.load(path)
    assert buffer.num_seen == expected.num_seen
    for a, b in zip(expected.fields, buffer.stored()):
        np.testing.assert_array_equal(a, to_host(b))


@pytest.mark.parametrize("fail_on", ["shard", "manifest"])
def test_failed_rename_leaves_the_previous_checkpoint(fail_on, tmp_path, monkeypatch):
    buffer = _fed()
    path = tmp_path / "c"
    buffer.save(path)
    saved = snapshot(buffer)
    _continue(buffer, steps=3)             # the buffer moves on
    real = os.replace

    def failing(src, dst):
        if os.path.basename(dst).startswith(fail_on):
            raise OSError("disk full (simulated)")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        buffer.save(path)
    monkeypatch.setattr(os, "replace", real)
    assert not [p for p in path.iterdir() if ".tmp-" in p.name]
    _assert_restores(path, saved)
    buffer.save(path)                                    # a later save works
    assert len(_shard_files(path)) == 1
    _assert_restores(path, snapshot(buffer))


_KILLED_SAVE = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    import importlib.util
    spec = importlib.util.spec_from_file_location("prog", {program!r})
    prog = importlib.util.module_from_spec(spec); spec.loader.exec_module(prog)
    import dali_rehearsal as dr
    buffer = dr.RehearsalBuffer(capacity=24, num_representatives=5, device="cpu", seed=8)
    prog.feed(buffer, 0, 12, 7)
    buffer.save({path!r})
    prog.feed(buffer, 0, 3, 7, start=12)
    real = os.replace
    def die(src, dst):
        if os.path.basename(dst).startswith({target!r}):
            os._exit(17)                # killed after the write, before the rename
        return real(src, dst)
    os.replace = die
    buffer.save({path!r})
""")


@pytest.mark.parametrize("target", ["shard", "manifest"])
def test_process_killed_mid_save_leaves_the_previous_checkpoint(target, tmp_path):
    path = tmp_path / "c"
    code = _KILLED_SAVE.format(root=str(ROOT), program=str(PROGRAM), path=str(path),
                               target=target)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert any(".tmp-" in p.name for p in path.iterdir()) or target == "manifest"
    expected = _fed()                                  # the state of the first save
    _assert_restores(path, snapshot(expected))
    expected.save(path)                                   # the next save cleans up
    assert not [p for p in path.iterdir() if ".tmp-" in p.name]
    assert len(_shard_files(path)) == 1


# ============================================================ a directory of its own
#: What a user keeps in a directory: names like shards, one exactly like the
#: library's own, none of them written by it.
USER_FILES = {"shard-000.npz": b"user data 0", "shard-train-001.npz": b"user data 1",
              "shard-0123456789abcdef-00000-of-00001.npz": b"not a checkpoint",
              "notes.txt": b"mine"}


def _contents(path):
    return {p.name: p.read_bytes() for p in Path(path).iterdir() if p.is_file()}


def _manifest_files(path):
    body = json.loads((Path(path) / "manifest.json").read_text())["body"]
    return {s["file"] for s in body["shards"]}


def test_save_refuses_a_directory_holding_files_it_did_not_write(tmp_path):
    path = tmp_path / "c"
    path.mkdir()
    for name, data in USER_FILES.items():
        (path / name).write_bytes(data)
    buffer = _fed()
    with pytest.raises(FileExistsError) as info:
        buffer.save(path)
    for name in USER_FILES:
        assert name in str(info.value)
    assert "allow_other_files=True" in str(info.value)
    assert _contents(path) == USER_FILES                  # nothing written, nothing removed
    # Told to, it writes next to them: twice, the second save replacing its own files only.
    buffer.save(path, allow_other_files=True)
    first = _manifest_files(path)
    _continue(buffer, steps=3)
    buffer.save(path, allow_other_files=True)
    after = _contents(path)
    assert {n: after[n] for n in USER_FILES} == USER_FILES
    assert not first & set(after), "the first save's shard should have been replaced"
    assert set(after) == set(USER_FILES) | _manifest_files(path) | {
        "manifest.json", ".dali-rehearsal.lock"}
    _assert_restores(path, snapshot(buffer))


def test_a_directory_holding_its_own_checkpoint_needs_no_keyword(tmp_path):
    buffer = _fed()
    buffer.save(tmp_path / "c")
    _continue(buffer, steps=2)
    buffer.save(tmp_path / "c")
    assert set(_contents(tmp_path / "c")) == _manifest_files(tmp_path / "c") | {
        "manifest.json", ".dali-rehearsal.lock"}
    _assert_restores(tmp_path / "c", snapshot(buffer))


@pytest.mark.parametrize("allow", [False, True])
def test_save_never_replaces_a_manifest_it_did_not_write(allow, tmp_path):
    path = tmp_path / "c"
    path.mkdir()
    (path / "manifest.json").write_text('{"model": "resnet50", "epochs": 90}')
    with pytest.raises(FileExistsError, match="manifest.json is not a manifest written by "
                                              "dali_rehearsal"):
        _fed().save(path, allow_other_files=allow)
    assert _contents(path) == {"manifest.json": b'{"model": "resnet50", "epochs": 90}'}


def test_a_manifest_naming_other_files_never_gets_them_deleted(tmp_path):
    """A manifest (checksum recomputed) whose shard list names the user's
    file: loading refuses it, and no save deletes that file."""
    path = tmp_path / "c"
    _fed().save(path)
    (path / "notes.txt").write_bytes(b"mine")
    body = json.loads((path / "manifest.json").read_text())["body"]
    body["shards"][0]["file"] = "notes.txt"
    (path / "manifest.json").write_bytes(manifest_bytes(body))
    with pytest.raises(CheckpointError, match="bad shard file name 'notes.txt'"):
        _buffer().load(path)
    with pytest.raises(FileExistsError, match="notes.txt"):
        _fed().save(path)
    buffer = _fed()
    buffer.save(path, allow_other_files=True)
    assert (path / "notes.txt").read_bytes() == b"mine"
    _assert_restores(path, snapshot(buffer))


# ============================================================ concurrent writers
def _writer(*args, stdout=subprocess.DEVNULL):
    """A process of its own running a scenario of the checkpoint program
    (``comm=None``)."""
    env = dict(os.environ, DR_TEST_NO_MPI="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.Popen([sys.executable, str(PROGRAM)] + [str(a) for a in args], env=env,
                            stdout=stdout, stderr=subprocess.PIPE, text=True)


def _same(a, b):
    fa, na, fb, nb = a.fields, a.num_seen, b.fields, b.num_seen
    return na == nb and len(fa) == len(fb) and all(
        x.shape == y.shape and (x == y).all() for x, y in zip(fa, fb))


def _loads_as_one_of(path, expected, capacity=24):
    buffer = dr.RehearsalBuffer(capacity=capacity, num_representatives=5, device="cpu", seed=0)
    buffer.load(path)
    got = snapshot(buffer)
    matches = [name for name, snap in expected.items() if _same(got, snap)]
    assert len(matches) == 1, f"the checkpoint holds none of {sorted(expected)}"
    return matches[0]


def test_a_second_writer_is_refused_while_another_holds_the_directory(tmp_path):
    """Whoever holds the directory's lock (another process's save, here this
    process with the lock file, as save() takes it): save() raises
    ConcurrentSaveError before writing anything; released, save() works."""
    path = tmp_path / "c"
    first = _fed()
    first.save(path)
    before = _contents(path)
    with open(path / ".dali-rehearsal.lock", "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        buffer = _fed(steps=15)
        with pytest.raises(ConcurrentSaveError, match="is saving a checkpoint into .*one "
                                                      "writer at a time.*comm="):
            buffer.save(path)
        assert _contents(path) == before
    buffer.save(path)
    _assert_restores(path, snapshot(buffer))


def test_threads_saving_into_one_directory_one_at_a_time(tmp_path):
    """Two buffers of one process saved into one directory from two threads:
    the one that comes second while the first holds the directory is refused."""
    path = tmp_path / "c"
    big = dr.RehearsalBuffer(capacity=3000, num_representatives=5, device="cpu", seed=1)
    rows = np.arange(3000)
    big.add(np.repeat(rows[:, None], 16384, axis=1).astype(np.uint8), rows % 4)   # 48 MiB
    errors = []
    saver = threading.Thread(target=lambda: big.save(path))
    saver.start()
    deadline = time.monotonic() + 60
    while not list(path.glob(".dali-rehearsal-pending-*")) and saver.is_alive():
        assert time.monotonic() < deadline
        time.sleep(0.001)
    try:
        _fed().save(path)
    except ConcurrentSaveError as e:
        errors.append(e)
    saver.join()
    assert len(errors) == 1, "the second save came while the first held the directory"
    loaded = dr.RehearsalBuffer(capacity=3000, num_representatives=5, device="cpu", seed=1)
    loaded.load(path)
    assert loaded.size == 3000


def test_two_processes_saving_into_one_directory_never_leave_it_unloadable(tmp_path):
    """Two processes (``comm=None``) save their own buffers into one directory
    as fast as they can, while this one loads it again and again: every load
    finds the previous checkpoint or one of theirs, complete; the saves that
    collide raise ConcurrentSaveError and nothing else."""
    path, go = tmp_path / "c", tmp_path / "go"
    prog.fed_buffer(1).save(path)
    expected = {seed: snapshot(prog.fed_buffer(seed)) for seed in (1, 2, 3)}
    writers = [_writer("save_loop", tmp_path, path, seed, 40, go, stdout=subprocess.PIPE)
               for seed in (2, 3)]
    found = []
    try:
        for w in writers:
            assert w.stdout.readline().strip() == "ready", w.stderr.read()[-3000:]
        go.touch()                                  # both start saving now
        while any(w.poll() is None for w in writers):
            found.append(_loads_as_one_of(path, expected))
        outputs = [w.communicate(timeout=TIMEOUT) for w in writers]
    finally:
        for w in writers:
            w.kill()
    counts = []
    for w, (out, err) in zip(writers, outputs):
        assert w.returncode == 0, err[-3000:]
        counts.append(json.loads(out.strip().splitlines()[-1]))
    for c in counts:
        assert c["other"] == [], c
        assert c["saved"] + c["busy"] == 40
    assert sum(c["busy"] for c in counts) > 0, "the writers never collided"
    assert "one writer at a time" in next(c["busy_message"] for c in counts if c["busy"])
    assert sum(c["saved"] for c in counts) > 0 and len(found) >= 3
    assert _loads_as_one_of(path, expected) in (2, 3)
    assert set(_contents(path)) == _manifest_files(path) | {"manifest.json",
                                                             ".dali-rehearsal.lock"}


def test_saves_killed_at_random_points_leave_the_old_or_the_new_checkpoint(tmp_path):
    """A process saving two buffers' states into one directory in turn is
    killed (SIGKILL) at a random time, again and again: each time the
    directory loads, complete, as the first checkpoint or one of the two
    states; the next process's saves take the directory over (lock released,
    leftovers recognised), and a last save leaves only the checkpoint."""
    path = tmp_path / "c"
    prog.fed_buffer(1, capacity=600).save(path)
    expected = {seed: snapshot(prog.fed_buffer(seed, capacity=600)) for seed in (1, 2, 3)}
    rng = random.Random(18)
    saves, seen, interrupted = 0, set(), 0
    for trial in range(12):
        proc = _writer("save_forever", tmp_path, path, 2, 3, stdout=subprocess.PIPE)
        try:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-3000:]
            time.sleep(rng.uniform(0.0, 0.3))
            proc.kill()
            out, err = proc.communicate(timeout=TIMEOUT)
        finally:
            proc.kill()
        assert proc.returncode == -9, err[-3000:]        # killed while saving, never failed
        saves += out.count("saved")
        interrupted += any(p.name.startswith(".dali-rehearsal-pending-") for p in path.iterdir())
        seen.add(_loads_as_one_of(path, expected, capacity=600))
    assert saves > 0 and seen & {2, 3}
    assert interrupted, "no kill landed inside a save"
    last = prog.fed_buffer(3, capacity=600)
    last.save(path)
    assert set(_contents(path)) == _manifest_files(path) | {"manifest.json",
                                                             ".dali-rehearsal.lock"}
    assert _loads_as_one_of(path, expected, capacity=600) == 3


# ============================================================ what load refuses
def _npy(descr, shape, data=b""):
    """A .npy member: a version 1.0 header declaring ``descr`` and ``shape``,
    then ``data`` (whatever it holds)."""
    header = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + data


def _forge(path, state, edit=None, deflate=()):
    """Rewrites checkpoint directory ``path`` (made by ``save``) to hold
    ``state`` as its one shard, its members edited by ``edit(members)`` (name
    -> bytes, or an iterable of byte chunks), those in ``deflate`` compressed,
    and a manifest whose checksums match: well-formed files that lie."""
    blob = io.BytesIO()
    write_shard(blob, state)
    with zipfile.ZipFile(blob) as z:
        members = {n: z.read(n) for n in z.namelist()}
    if edit is not None:
        edit(members)
    body = json.loads((path / "manifest.json").read_text())["body"]
    entry = body["shards"][0]
    with open(path / entry["file"], "wb") as f:
        writer = HashingWriter(f)
        with zipfile.ZipFile(writer, "w") as z:
            for name, data in members.items():
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED if name in deflate \
                    else zipfile.ZIP_STORED
                with z.open(info, "w", force_zip64=True) as member:
                    for chunk in [data] if isinstance(data, bytes) else data:
                        member.write(chunk)
    entry.update(sha256=writer.sha256.hexdigest(), bytes=writer.nbytes,
                 settings=state["settings"])
    (path / "manifest.json").write_bytes(manifest_bytes(body))


def _state_of(buffer):
    state = buffer.state_dict()
    state["fields"] = [_np(f) for f in state["fields"]]
    state["policy"] = {k: _np(v) if hasattr(v, "shape") else v
                       for k, v in state["policy"].items()}
    return state


BOMB_BYTES = 256 << 20


def _hostile_checkpoints(root):
    """Checkpoint directories (checksums recomputed) declaring far more than
    they hold, and what each error must name: the file and the member."""
    good = _fed()
    good.save(root / "good")
    cases = {}

    def case(name, change=None, edit=None, deflate=(), state=None):
        path = root / name
        good.save(path)
        state = _state_of(good) if state is None else state
        if change is not None:
            change(state)
        _forge(path, state, edit, deflate)
        cases[name] = path

    def capacity(state):
        state["settings"]["capacity"] = 10**8

    # 256 MiB of zeros, DEFLATE-compressed to a quarter of a MiB, as a policy array
    zeros = bytes(1 << 20)
    case("deflate-bomb", edit=lambda m: m.update({"policy.slot_labels.npy": itertools.chain(
        [_npy("<i8", (BOMB_BYTES // 8,))], itertools.repeat(zeros, BOMB_BYTES >> 20))}),
        deflate={"policy.slot_labels.npy"})
    case("capacity-1e8", change=capacity)
    case("declared-80-GB", edit=lambda m: m.update(
        {"policy.slot_labels.npy": _npy("<i8", (10**10,), bytes(8 * 24))}))
    case("truncated-field", edit=lambda m: m.update(
        {"fields.2.npy": m["fields.2.npy"][:-4]}))
    case("object-dtype", edit=lambda m: m.update(
        {"policy.class_counts.npy": _npy("|O", (4,), bytes(32))}))

    # a layout of 10**12 values per sample; no samples stored, so no data to check
    empty = _state_of(_buffer())
    empty["layout"] = [{"shape": [10**6, 10**6], "dtype": "|u1", "encoding": "array"},
                       {"shape": [], "dtype": "<i8", "encoding": "array"}]
    empty["fields"] = [np.empty((0, 10**6, 10**6), np.uint8), np.empty(0, np.int64)]
    case("layout-1e12", state=empty)

    nested = root / "nested-manifest"
    good.save(nested)
    (nested / "manifest.json").write_text('{"body": ' + "[" * 100_000 + "]" * 100_000
                                          + ', "sha256": "0"}')
    cases["nested-manifest"] = nested

    def shard(name):
        return str(next(p for p in _shard_files(cases[name])))

    return {
        "deflate-bomb": (shard("deflate-bomb"), "policy.slot_labels.npy", "compressed"),
        "capacity-1e8": (shard("capacity-1e8"), "policy.slot_labels.npy", "capacity"),
        "declared-80-GB": (shard("declared-80-GB"), "policy.slot_labels.npy", "holds 192 "
                                                                            "bytes"),
        "truncated-field": (shard("truncated-field"), "fields.2.npy", "truncated"),
        "object-dtype": (shard("object-dtype"), "policy.class_counts.npy", "'|O'"),
        "layout-1e12": (shard("layout-1e12"), "layout", "more than this machine's"),
        "nested-manifest": (str(nested / "manifest.json"), "nested", "corrupted"),
    }


def test_loading_costs_what_the_files_hold(tmp_path):
    """Checkpoints that declare far more than their files hold (a DEFLATE
    bomb, a capacity of 10**8, arrays of 80 GB, samples of 10**12 values),
    or hold what no array may (objects, a truncated field, JSON nested
    100,000 deep): each load raises CheckpointError naming the file and the
    member, and the peak memory of the loading process grows by less than a
    few MiB. (In a process of its own: ru_maxrss is its peak.)"""
    cases = root = tmp_path / "cases"
    root.mkdir()
    expected = _hostile_checkpoints(root)
    files = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert files < 4 << 20                           # a few MiB declaring gigabytes
    env = dict(os.environ, DR_TEST_NO_MPI="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, str(PROGRAM), "hostile_loads", tmp_path, cases],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "hostile_loads-0.json").read_text())
    for name, (file, member, detail) in expected.items():
        error = result["errors"][name]
        assert error is not None, f"{name}: loaded"
        assert error["is_checkpoint_error"], (name, error)
        assert file in error["message"] and member in error["message"], (name, error)
        assert detail in error["message"], (name, error)
    assert result["peak_growth"] < 16 << 20, result["peak_growth"]


def test_a_truncated_shard_file_is_named_before_it_is_hashed(tmp_path):
    buffer = _fed()
    buffer.save(tmp_path / "c")
    (shard,) = _shard_files(tmp_path / "c")
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{shard} is corrupted: it holds"):
        _buffer().load(tmp_path / "c")


# ============================================================ elastic restore
def run(n, scenario, out_dir, *args, timeout=TIMEOUT):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    try:
        proc = subprocess.run(["mpiexec", "-n", str(n), sys.executable, str(PROGRAM), scenario,
                               str(out_dir)] + [str(a) for a in args], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mpiexec -n {n} {scenario} hung (> {timeout} s): {e.stdout}\n{e.stderr}")
    paths = sorted(Path(out_dir).glob(f"{scenario}-*.json"))
    assert proc.returncode == 0 and len(paths) == n, (proc.returncode, proc.stdout,
                                                      proc.stderr[-3000:])
    results = [json.loads(p.read_text()) for p in paths]
    for p in paths:
        p.unlink()
    return sorted(results, key=lambda r: r["rank"])


def _save(n, path, out_dir, policy, capacity, steps=12):
    if n == 1:
        result = [prog.save(None, str(out_dir), str(path), policy, capacity, steps)]
        result[0]["rank"] = 0
        return result
    return run(n, "save", out_dir, path, policy, capacity, steps)


def _load(m, path, out_dir, policy, capacity, seed=0, resize="0"):
    if m == 1:
        result = [prog.load(None, str(out_dir), str(path), policy, capacity, seed, resize)]
        result[0]["rank"] = 0
        return result
    return run(m, "load", out_dir, path, policy, capacity, seed, resize)


def _check_elastic(saved, restored, new_capacity, policy):
    """Content: every restored sample is a saved one with its own label (its
    other fields were checked against it by the program), none twice; all of
    them when they fit, else equal class shares (class_balanced) or a full
    buffer (reservoir). Bookkeeping: consistent and the offers preserved."""
    saved_ids = [i for r in saved for i in r["ids"]]
    restored_ids = [i for r in restored for i in r["ids"]]
    labels_of = dict(zip(saved_ids, prog.label_of(saved_ids).tolist()))
    for r in saved:
        assert r["labels"] == prog.label_of(r["ids"]).tolist()
    assert len(restored_ids) == len(set(restored_ids)), "a sample restored twice"
    assert set(restored_ids) <= set(saved_ids), "a restored sample was never saved"
    for r in restored:
        assert r["labels"] == [labels_of[i] for i in r["ids"]]
        assert r["continued"]
    total = min(len(saved_ids), new_capacity * len(restored))
    assert len(restored_ids) == total
    if len(saved_ids) <= new_capacity * len(restored):
        assert set(restored_ids) == set(saved_ids)          # the union, all of it
    sizes = [r["size"] for r in restored]
    assert max(sizes) - min(sizes) <= 1 and max(sizes) <= new_capacity   # spread evenly
    assert sum(r["num_seen"] for r in restored) == sum(r["num_seen"] for r in saved)
    if policy == "class_balanced":
        saved_per_class = np.bincount([labels_of[i] for i in saved_ids], minlength=4)
        per_class = np.bincount([labels_of[i] for i in restored_ids], minlength=4)
        if total < len(saved_ids):
            # equal shares: the classes that lost samples hold shares within one
            # of each other, and a class that kept all of its samples no more
            cut = per_class < saved_per_class
            assert per_class[cut].max() - per_class[cut].min() <= 1, per_class
            assert (per_class[~cut] <= per_class[cut].max()).all(), per_class
        classes = restored[0]["policy"]["class_labels"]
        for r in restored:
            assert r["policy"]["class_labels"] == classes     # every class known everywhere
            per_shard = np.bincount(r["labels"], minlength=4)[classes]
            np.testing.assert_array_equal(r["policy"]["class_counts"], per_shard)
        seen = np.sum([r["policy"]["class_seen"] for r in restored], axis=0)
        saved_seen = {}
        for r in saved:
            for c, n in zip(r["policy"]["class_labels"], r["policy"]["class_seen"]):
                saved_seen[c] = saved_seen.get(c, 0) + n
        assert dict(zip(classes, seen.tolist())) == saved_seen


@pytest.mark.mpi
@pytest.mark.parametrize("policy", sorted(dr.POLICIES))
@pytest.mark.parametrize("n, m", [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_elastic_restore_content(n, m, policy, tmp_path):
    capacity = 30
    path = tmp_path / "ckpt"
    saved = _save(n, path, tmp_path, policy, capacity)
    assert all(r["size"] == capacity for r in saved)
    restored = _load(m, path, tmp_path, policy, capacity)
    _check_elastic(saved, restored, capacity, policy)


@pytest.mark.mpi
def test_round_trip_on_two_processes_resumes_the_same_batches(tmp_path):
    for policy in sorted(dr.POLICIES):
        results = run(2, "roundtrip", tmp_path, policy)
        for r in results:
            assert r["digests"][0] == r["digests"][1] == r["digests"][2], policy
        assert results[0]["digests"][0] != results[1]["digests"][0]


@pytest.mark.mpi
def test_corrupted_shard_on_one_rank_fails_every_rank_without_change(tmp_path):
    results = run(2, "corrupt", tmp_path, "class_balanced")
    for r in results:
        assert r["error"] is not None and "corrupted" in r["error"], r
        assert r["unchanged"] and r["same"], r


@pytest.mark.mpi
def test_a_save_that_fails_on_one_rank_fails_on_every_rank_and_leaves_nothing(tmp_path):
    """Rank 1 saves into a directory rank 0 does not see: rank 0 finds its
    shard missing before committing, and every rank raises that error at once;
    no file of the failed save is left anywhere."""
    for r in run(2, "split_paths", tmp_path):
        assert r["error"] == {"type": "FileNotFoundError", "message": r["error"]["message"]}, r
        assert "rank 1's shard" in r["error"]["message"], r
        assert "every process must save into the same directory" in r["error"]["message"], r
        assert r["elapsed"] < 60 and r["loads"] and r["shared_unchanged"], r
        assert r["other"] == [], r


@pytest.mark.mpi
def test_a_seed_beyond_int64_is_refused_at_load_on_every_rank(tmp_path):
    """The shared seed of global sampling travels as an int64: a checkpoint
    holding 2**64 there (checksums recomputed) is a CheckpointError at load,
    on every rank at once, not an OverflowError in rank 0's first step while
    rank 1 waits for the timeout."""
    for r in run(2, "forged_seed", tmp_path, 2**64):
        assert r["error"] is not None and r["error"]["is_checkpoint_error"], r
        assert "sampler state 'seed' must be in [0, 2**63), got 18446744073709551616" in \
            r["error"]["message"], r
        assert r["elapsed"] < 60 and r["unchanged"], r


@pytest.fixture(scope="module")
def two_shard_checkpoints(tmp_path_factory):
    """2-process checkpoints of both policies (capacity 20 per process)."""
    out = tmp_path_factory.mktemp("two-shards")
    made = {}
    for policy in sorted(dr.POLICIES):
        path = out / policy
        made[policy] = (path, _save(2, path, out, policy, 20, steps=10))
    return made


def _ids_of(buffer):
    return prog.ident(buffer.stored(0)).tolist()


@pytest.mark.mpi
@pytest.mark.parametrize("policy", sorted(dr.POLICIES))
def test_shrinking_restore_is_a_uniform_subsample(policy, two_shard_checkpoints):
    """2 -> 1 with the same capacity per process: half the samples go. Over
    many loads (different seeds) every saved sample is kept equally often
    (within its class for class_balanced), and each class keeps its share."""
    path, saved = two_shard_checkpoints[policy]
    saved_ids = [i for r in saved for i in r["ids"]]
    labels_of = dict(zip(saved_ids, prog.label_of(saved_ids).tolist()))
    counts = dict.fromkeys(saved_ids, 0)
    runs = 600
    for seed in range(runs):
        buffer = dr.RehearsalBuffer(capacity=20, num_representatives=3, policy=policy,
                                    device="cpu", seed=seed)
        buffer.load(path)
        if policy == "class_balanced":
            assert buffer.class_counts() == {0: 5, 1: 5, 2: 5, 3: 5}
        for i in _ids_of(buffer):
            counts[i] += 1
    groups = [saved_ids] if policy == "reservoir" else \
        [[i for i in saved_ids if labels_of[i] == c] for c in range(4)]
    for ids in groups:
        observed = np.array([counts[i] for i in ids])
        expected = np.full(len(ids), observed.sum() / len(ids))
        assert chisquare(observed, expected).pvalue > ALPHA, observed


@pytest.mark.mpi
@pytest.mark.parametrize("policy", sorted(dr.POLICIES))
def test_insertion_after_shrinking_restore_stays_uniform(policy, two_shard_checkpoints):
    """After 2 -> 1, the restored buffer holds its samples as a sample of every
    offer the two processes saw: ``m`` more samples of a class are then kept
    with probability share / (seen + m) each, and a saved sample with
    probability share / stored * seen / (seen + m), as if one buffer had seen
    the whole stream. Fails if the offers were not carried over."""
    path, saved = two_shard_checkpoints[policy]
    saved_ids = [i for r in saved for i in r["ids"]]
    labels_of = dict(zip(saved_ids, prog.label_of(saved_ids).tolist()))
    seen_total = sum(r["num_seen"] for r in saved)
    m, runs, cls = 60, 600, 2
    new_ids = 900_000 + np.arange(m)
    counts = {i: 0 for i in saved_ids + new_ids.tolist()}
    for seed in range(runs):
        buffer = dr.RehearsalBuffer(capacity=20, num_representatives=3, policy=policy,
                                    device="cpu", seed=seed)
        buffer.load(path)
        images, _, logits, task = prog.make_batch(new_ids)
        labels = np.full(m, cls, np.int64)
        for k in range(0, m, 7):
            buffer.add(images[k:k + 7], labels[k:k + 7], logits[k:k + 7], task[k:k + 7])
        for i in _ids_of(buffer):
            counts[i] += 1
    if policy == "class_balanced":
        seen = sum(n for r in saved for c, n in zip(r["policy"]["class_labels"],
                                                    r["policy"]["class_seen"]) if c == cls)
        old = [i for i in saved_ids if labels_of[i] == cls]
        share = 5
    else:
        seen, old, share = seen_total, saved_ids, 20
    expected_old = runs * share / len(old) * seen / (seen + m)
    expected_new = runs * share / (seen + m)
    observed = np.array([counts[i] for i in old] + [counts[i] for i in new_ids.tolist()])
    expected = np.array([expected_old] * len(old) + [expected_new] * m)
    expected *= observed.sum() / expected.sum()
    assert chisquare(observed, expected).pvalue > ALPHA, (observed, expected)


@pytest.mark.mpi
@pytest.mark.parametrize("policy", ["class_balanced"])
def test_four_to_two_subsample_is_uniform_per_class(policy, tmp_path):
    """4 -> 2 with the same capacity per process, many collective loads: each
    saved sample of a class is restored equally often."""
    path = tmp_path / "ckpt"
    saved = _save(4, path, tmp_path, policy, 12, steps=8)
    saved_ids = [i for r in saved for i in r["ids"]]
    labels_of = dict(zip(saved_ids, prog.label_of(saved_ids).tolist()))
    loads = 150
    (result, _) = run(2, "selection_counts", tmp_path, path, policy, 12, loads)
    counts = {int(k): v for k, v in result["counts"].items()}
    assert set(counts) <= set(saved_ids)
    assert sum(counts.values()) == loads * 24
    for c in range(4):
        ids = [i for i in saved_ids if labels_of[i] == c]
        observed = np.array([counts.get(i, 0) for i in ids])
        assert chisquare(observed, np.full(len(ids), observed.sum() / len(ids))).pvalue > ALPHA


def test_elastic_restore_with_resize(tmp_path):
    """Same number of processes, another capacity (resize=True)."""
    saved = _save(1, tmp_path / "c", tmp_path, "class_balanced", 30)
    smaller = _load(1, tmp_path / "c", tmp_path, "class_balanced", 10, resize="1")
    _check_elastic(saved, smaller, 10, "class_balanced")
    larger = _load(1, tmp_path / "c", tmp_path, "class_balanced", 50, resize="1")
    _check_elastic(saved, larger, 50, "class_balanced")
