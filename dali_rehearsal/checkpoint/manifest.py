"""The manifest of a checkpoint directory: what the checkpoint holds (its
format, save id, number of processes, and per shard its file, settings,
size and SHA-256), with the SHA-256 of its own body. Written last by a save,
it commits it; read first by a load, checked before any shard is opened."""

from __future__ import annotations

import hashlib
import json
import os

from .directory import DIR_FORMAT, MANIFEST, is_shard_name
from .files import CheckpointError, load_json
from .validation import check_settings

__all__ = ["DIR_FORMAT", "DIR_VERSION", "MANIFEST_MAX_BYTES", "manifest_bytes",
           "read_manifest", "manifest_digest"]

DIR_VERSION = 1
#: The most bytes a manifest may hold.
MANIFEST_MAX_BYTES = 64 << 20


def manifest_bytes(body: dict) -> bytes:
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return json.dumps({"body": body, "sha256": digest}, indent=1, sort_keys=True).encode()


def read_manifest(path: str) -> tuple[dict, str]:
    """The manifest's body, checked, and the SHA-256 of the manifest file."""
    file = os.path.join(path, MANIFEST)
    try:
        with open(file, "rb") as f:
            raw = f.read(MANIFEST_MAX_BYTES + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint in {path!r} ({MANIFEST} not found)") from None
    if len(raw) > MANIFEST_MAX_BYTES:
        raise CheckpointError(f"{file} holds more than {MANIFEST_MAX_BYTES} bytes: not a "
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


def manifest_digest(path: str) -> str | None:
    try:
        with open(os.path.join(path, MANIFEST), "rb") as f:
            return hashlib.sha256(f.read(MANIFEST_MAX_BYTES + 1)).hexdigest()
    except OSError:
        return None


def _compare_entry(entry: dict, world_size: int) -> None:
    settings = check_settings(entry.get("settings"))
    if settings["rank"] != entry["rank"] or settings["world_size"] != world_size:
        raise CheckpointError(f"manifest: shard {entry['rank']} has inconsistent settings")
