"""The files of a checkpoint directory, read without trusting what they
declare (the reading side;
:mod:`.atomic` and :mod:`.shards` write them).

A shard is a zip archive of ``.npy`` members, every member stored
uncompressed. Reading one costs what the file holds, whatever it declares:

- the file is opened once; its size and SHA-256 are checked against the
  manifest, then everything is parsed from that same open file;
- the zip directory is bounded (:data:`MAX_DIRECTORY_BYTES`), member names
  do not repeat, every member is stored (a compressed member is refused: no
  DEFLATE bomb), and the members lie one after another inside the file,
  without overlapping: together they hold at most the file's bytes;
- a ``.npy`` header is parsed here (bounded, literal values only), declares a
  plain numeric dtype (no objects, no records), a C-ordered shape, and
  exactly as many bytes of data as the member holds: an array is allocated
  only once the bytes that fill it are known to be there;
- JSON (the manifest, a shard's metadata) is bounded in size and nesting.

Every problem is a :class:`CheckpointError` naming the file and the member.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import struct
import zipfile

import numpy as np

__all__ = ["CheckpointError", "load_json", "check_depth", "ShardFile", "FieldReader",
           "sha256_of"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this buffer: corrupted,
    inconsistent, or saved with other settings. Nothing was changed."""


CheckpointError.__module__ = "dali_rehearsal.checkpoint"     # where users meet it

#: Bounds on what a checkpoint may declare, far above what the library writes.
MAX_JSON_DEPTH = 32                 # nesting of a manifest or a shard's metadata
MAX_META_BYTES = 16 << 20           # a shard's "meta" member
MAX_DIRECTORY_BYTES = 1 << 20       # a shard's zip directory
MAX_MEMBERS = 4096                  # members of a shard
MAX_NPY_HEADER = 1 << 16            # a .npy member's header
#: Dtype kinds a stored array may have: bool, integers, floats, complex.
ARRAY_KINDS = "biufc"
_CHUNK = 4 << 20
_READ_CHUNK = 64 << 20
_LOCAL_HEADER = struct.Struct("<4s22xHH")       # signature, ..., name length, extra length


# ====================================================================== JSON
def check_depth(value, where: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Raises CheckpointError when lists and dicts nest deeper than ``limit``
    (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > limit:
            raise CheckpointError(f"{where}: nested more than {limit} levels deep")
        stack.extend((child, depth + 1) for child in children)


def load_json(raw: bytes, where: str):
    """Parses UTF-8 JSON, bounded in nesting; CheckpointError naming ``where``."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError, MemoryError) as e:
        raise CheckpointError(f"{where}: not valid JSON ({type(e).__name__})") from None
    check_depth(value, where)
    return value


# ================================================================== reading
def sha256_of(f) -> str:
    """SHA-256 of an open binary file, read from its start in bounded chunks."""
    f.seek(0)
    digest = hashlib.sha256()
    while True:
        chunk = f.read(_CHUNK)
        if not chunk:
            return digest.hexdigest()
        digest.update(chunk)


class _Array:
    """Where a ``.npy`` member's data lies, and what it holds."""

    __slots__ = ("shape", "dtype", "offset", "nbytes")

    def __init__(self, shape, dtype, offset, nbytes):
        self.shape, self.dtype, self.offset, self.nbytes = shape, dtype, offset, nbytes


class ShardFile:
    """One shard file, checked against the manifest's size and SHA-256 and
    parsed from one open file (see the module documentation).

    Raises FileNotFoundError when the file is missing, CheckpointError for
    anything else."""

    def __init__(self, file: str, sha256: str, nbytes: int | None = None):
        self.file = file
        try:
            self._f = open(file, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint shard {file} is missing") from None
        try:
            self.size = os.fstat(self._f.fileno()).st_size
            if nbytes is not None and self.size != nbytes:
                raise CheckpointError(f"{file} is corrupted: it holds {self.size} bytes, the "
                                      f"manifest says {nbytes} (truncated or replaced)")
            if sha256_of(self._f) != sha256:
                raise CheckpointError(f"{file} is corrupted (its SHA-256 does not match the "
                                      "manifest)")
            self._members = self._directory()
            self._arrays: dict[str, _Array] = {}
        except BaseException:
            self._f.close()
            raise

    def _error(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.file}: {what}")

    def _directory(self) -> dict[str, tuple[int, int]]:
        """``{member name: (data offset, data bytes)}``, every member checked."""
        f = self._f
        try:
            end = zipfile._EndRecData(f)
        except (OSError, struct.error):
            end = None
        if not end:
            raise self._error("not a readable shard (not a zip archive)")
        if end[zipfile._ECD_SIZE] > MAX_DIRECTORY_BYTES or \
                end[zipfile._ECD_ENTRIES_TOTAL] > MAX_MEMBERS:
            raise self._error(f"its zip directory declares {end[zipfile._ECD_ENTRIES_TOTAL]} "
                              f"members in {end[zipfile._ECD_SIZE]} bytes (a shard holds at "
                              f"most {MAX_MEMBERS} members)")
        try:
            archive = zipfile.ZipFile(f)
            infos = archive.infolist()
            directory_start = archive.start_dir
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error,
                NotImplementedError) as e:
            raise self._error(f"not a readable shard ({type(e).__name__}: {e})") from None
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            raise self._error("member names repeat")
        members, spans = {}, []
        for info in infos:
            name = info.filename
            if info.flag_bits & 0x1:
                raise self._error(f"member {name} is encrypted")
            if info.compress_type != zipfile.ZIP_STORED:
                raise self._error(f"member {name} is compressed (method {info.compress_type}): "
                                  "checkpoint shards hold stored, uncompressed members only")
            if info.file_size != info.compress_size:
                raise self._error(f"member {name} declares {info.file_size} bytes but stores "
                                  f"{info.compress_size}")
            f.seek(info.header_offset)
            header = f.read(_LOCAL_HEADER.size)
            if len(header) != _LOCAL_HEADER.size or \
                    _LOCAL_HEADER.unpack(header)[0] != b"PK\x03\x04":
                raise self._error(f"member {name}: no local header at offset "
                                  f"{info.header_offset}")
            _, name_len, extra_len = _LOCAL_HEADER.unpack(header)
            start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
            spans.append((info.header_offset, start + info.compress_size, name))
            members[name] = (start, info.compress_size)
        spans.sort()
        for (_, stop, name), following in zip(spans, spans[1:] + [(directory_start, 0, "")]):
            if stop > following[0]:
                raise self._error(f"member {name} overlaps "
                                  + (f"member {following[2]}" if following[2]
                                     else "the zip directory"))
        if spans and (spans[0][0] < 0 or directory_start > self.size):
            raise self._error("its members lie outside the file")
        return members

    @property
    def names(self) -> set[str]:
        return set(self._members)

    def array(self, name: str) -> _Array:
        """What member ``name`` (``<name>.npy``) holds: checked, nothing read
        beyond its header."""
        if name in self._arrays:
            return self._arrays[name]
        member = f"{name}.npy"
        if member not in self._members:
            raise self._error(f"member {member} is missing")
        start, length = self._members[member]
        self._f.seek(start)
        head = self._f.read(min(length, 12 + MAX_NPY_HEADER))
        where = f"member {member}"
        if len(head) < 10 or head[:6] != b"\x93NUMPY":
            raise self._error(f"{where} is not a .npy array")
        major = head[6]
        if major == 1:
            header_len, header_start = struct.unpack("<H", head[8:10])[0], 10
        elif major in (2, 3) and len(head) >= 12:
            header_len, header_start = struct.unpack("<I", head[8:12])[0], 12
        else:
            raise self._error(f"{where}: unsupported .npy version {major}")
        if header_len > MAX_NPY_HEADER or header_start + header_len > len(head):
            raise self._error(f"{where}: its header ({header_len} bytes) is longer than the "
                              f"member or than {MAX_NPY_HEADER} bytes")
        text = head[header_start:header_start + header_len]
        try:
            header = ast.literal_eval(text.decode("utf-8" if major == 3 else "latin1"))
        except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError,
                UnicodeDecodeError):
            raise self._error(f"{where}: unreadable .npy header") from None
        if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
            raise self._error(f"{where}: the .npy header must hold descr, fortran_order and "
                              "shape")
        descr, shape = header["descr"], header["shape"]
        dtype = None
        if isinstance(descr, str):
            try:
                dtype = np.dtype(descr)
            except (TypeError, ValueError):
                dtype = None
        if dtype is None or dtype.kind not in ARRAY_KINDS or dtype.hasobject \
                or dtype.fields is not None or dtype.subdtype is not None:
            raise self._error(f"{where}: dtype {descr!r} is not a plain numeric dtype")
        if header["fortran_order"] is not False:
            raise self._error(f"{where}: not a C-ordered array")
        if not isinstance(shape, tuple) or len(shape) < 1 or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise self._error(f"{where}: bad shape {shape!r}")
        count = 1
        for d in shape:
            count *= d
        nbytes = count * dtype.itemsize
        held = length - header_start - header_len
        if nbytes != held:
            raise self._error(f"{where}: its header declares shape {shape} of {dtype.str} "
                              f"({nbytes} bytes) but it holds {held} bytes of data (truncated "
                              "or inconsistent)")
        array = _Array(shape, dtype, start + header_start + header_len, nbytes)
        self._arrays[name] = array
        return array

    def read(self, name: str) -> np.ndarray:
        """Member ``name`` as an array (its declared bytes, all present)."""
        a = self.array(name)
        out = np.empty(a.shape, dtype=a.dtype)
        if a.nbytes:
            self._read_into(name, a.offset, out.reshape(-1).view(np.uint8))
        return out

    def read_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (increasing) of member ``name``, streaming through it."""
        a = self.array(name)
        row_shape = tuple(a.shape[1:])
        out = np.empty((len(rows),) + row_shape, dtype=a.dtype)
        row_bytes = a.nbytes // a.shape[0] if a.shape[0] else 0
        if len(rows) == 0 or row_bytes == 0:
            return out
        per_chunk = max(1, _READ_CHUNK // row_bytes)
        done = 0
        for start in range(0, a.shape[0], per_chunk):
            stop = min(start + per_chunk, a.shape[0])
            upto = int(np.searchsorted(rows, stop))
            if upto > done:
                chunk = np.empty((stop - start,) + row_shape, dtype=a.dtype)
                self._read_into(name, a.offset + start * row_bytes,
                                chunk.reshape(-1).view(np.uint8))
                out[done:upto] = chunk[rows[done:upto] - start]
                done = upto
            if done == len(rows):
                break
        return out

    def _read_into(self, name: str, offset: int, out: np.ndarray) -> None:
        self._f.seek(offset)
        view, got = memoryview(out), 0
        while got < len(out):
            n = self._f.readinto(view[got:])
            if not n:
                raise self._error(f"member {name}.npy is truncated")
            got += n

    def close(self) -> None:
        self._f.close()


class FieldReader:
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
