"""The shard of one process in a checkpoint directory: a zip archive of
stored ``.npy`` members (the samples' fields, the policy's arrays) and a
``meta`` member (UTF-8 JSON: the format, settings, layout, the policy's plain
values, the sampler's state). :func:`write_shard` writes one from a captured
state; :class:`Shard` reads one back as a state, through the checked
:class:`~.files.ShardFile` (the fields are left in the file until read).
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from .files import MAX_META_BYTES, CheckpointError, FieldReader, ShardFile, load_json
from .manifest import manifest_digest
from .validation import check_settings

__all__ = ["write_shard", "Shard", "Replaced", "in_file"]


def write_shard(f, state: dict) -> None:
    """A shard: the state's arrays as stored ``.npy`` members, the rest as the
    ``meta`` member (UTF-8 JSON)."""
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


class Replaced(CheckpointError):
    """A shard of the manifest being loaded is gone: a save() replaced it."""


def in_file(file: str, error: CheckpointError) -> CheckpointError:
    """``error`` naming ``file`` (once)."""
    text = str(error)
    return type(error)(text if text.startswith(file) else f"{file}: {text}")


_META_KEYS = {"format", "version", "settings", "layout", "sampler", "policy", "arrays"}


class Shard:
    """One shard file (:class:`~.files.ShardFile`: size and
    checksum verified, every declared size checked against the file) and
    the state it holds: metadata and policy arrays read, fields not yet."""

    def __init__(self, path: str, entry: dict, digest: str | None = None):
        self.file = os.path.join(path, entry["file"])
        try:
            self._f = ShardFile(self.file, entry["sha256"], entry["bytes"])
        except FileNotFoundError:
            if digest is not None and manifest_digest(path) != digest:
                raise Replaced(f"the checkpoint in {path} was replaced while it was being "
                               "loaded (a save() into it): load it again") from None
            raise
        try:
            self.state = self._read(entry)
        except CheckpointError as e:
            self._f.close()
            raise in_file(self.file, e) from None
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
        settings = check_settings(meta["settings"])
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
        state["fields"] = [FieldReader(f, n) for n in fields if n in meta["arrays"]]
        return state

    def close(self) -> None:
        self._f.close()
