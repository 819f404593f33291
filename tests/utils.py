"""Helpers shared by the tests (KvikIO's layout: one ``tests/utils.py``).

Imported as ``from utils import ...`` by the test modules (pytest puts
``tests/`` on ``sys.path``) and by the programs of ``tests/dist_programs/``
(which put it there themselves). Importing this module is cheap: DALI is
imported only by the helpers that build pipelines, so a program started under
``mpiexec`` can use the others without it.

The one internal of the library used here, ``dali_rehearsal._backend.to_host``,
is a documented test-facing internal (docs/development.md).
"""

from __future__ import annotations

import shutil
from typing import NamedTuple

import numpy as np
import pytest

from dali_rehearsal._backend import to_host

__all__ = ["to_host", "pixel_key", "Snapshot", "snapshot", "assert_unchanged", "ident_batch",
           "require_mpiexec", "PerSample", "PerBatch", "generator_function", "source_pipeline",
           "mixing_pipeline", "run_epochs"]


# ------------------------------------------------------------------ samples
def pixel_key(image, *, strict: bool = False) -> bytes:
    """The bytes of a 28x28 MNIST image: names the sample it came from.
    ``strict``: the image must also be uint8 and hold exactly 28 * 28 values."""
    image = np.asarray(image)
    if strict:
        assert image.dtype == np.uint8 and image.size == 28 * 28
    return np.ascontiguousarray(image.reshape(28, 28)).tobytes()


def ident_batch(rank, step, b, label_dtype=np.int32):
    """A batch whose content names it: id = rank * 1e6 + step * 1000 + i;
    image rows repeat the id, label = id % 7, logits = id / 2."""
    ids = rank * 1_000_000 + step * 1000 + np.arange(b, dtype=np.int64)
    images = np.repeat(ids[:, None], 5, axis=1)
    labels = (ids % 7).astype(label_dtype)
    logits = (ids / 2.0).astype(np.float64)[:, None].repeat(2, axis=1)
    return images, labels, logits


# ------------------------------------------------------------------ buffer state
class Snapshot(NamedTuple):
    size: int
    num_seen: int
    fields: list | None        # host copies of the stored fields; None before the first batch
    counts: dict | None        # class counts, when asked for


def snapshot(buffer, *, counts: bool = False) -> Snapshot:
    """What ``buffer`` holds now (host copies), to compare with later."""
    fields = (None if buffer.spec is None
              else [np.array(to_host(f)) for f in buffer.stored()])
    return Snapshot(buffer.size, buffer.num_seen, fields,
                    buffer.class_counts() if counts else None)


def assert_unchanged(buffer, snap: Snapshot):
    """``buffer`` holds what ``snap`` recorded (class counts too when recorded)."""
    assert buffer.size == snap.size and buffer.num_seen == snap.num_seen
    if snap.counts is not None:
        assert buffer.class_counts() == snap.counts
    if snap.fields is None:
        assert buffer.spec is None
    else:
        for before, now in zip(snap.fields, buffer.stored()):
            np.testing.assert_array_equal(before, to_host(now))


# ------------------------------------------------------------------ launchers
def require_mpiexec() -> str:
    """The path of ``mpiexec``; skips the test when there is none."""
    exe = shutil.which("mpiexec")
    if exe is None:
        pytest.skip("mpiexec not found")
    return exe


# ------------------------------------------------------------------ DALI sources
class PerSample:
    """An external_source callback per sample (SampleInfo); picklable, for parallel=True."""

    def __init__(self, files, labels):
        self.files, self.labels = files, labels

    def __call__(self, info):
        if info.idx_in_epoch >= len(self.files):
            raise StopIteration
        i = info.idx_in_epoch
        return (np.fromfile(self.files[i], dtype=np.uint8),
                np.array([self.labels[i]], dtype=np.int32))


class PerBatch:
    """An external_source callback per batch (BatchInfo), batches of ``batch_size``."""

    def __init__(self, files, labels, batch_size):
        self.files, self.labels, self.batch_size = files, labels, batch_size

    def __call__(self, info):
        lo = info.iteration * self.batch_size
        if lo >= len(self.files):
            raise StopIteration
        hi = min(lo + self.batch_size, len(self.files))
        return ([np.fromfile(f, dtype=np.uint8) for f in self.files[lo:hi]],
                [np.array([label], dtype=np.int32) for label in self.labels[lo:hi]])


def generator_function(files, labels, batch_size):
    """A generator function: DALI calls it again for every epoch."""
    def batches():
        for lo in range(0, len(files), batch_size):
            yield ([np.fromfile(f, dtype=np.uint8) for f in files[lo:lo + batch_size]],
                   [np.array([label], dtype=np.int32)
                    for label in labels[lo:lo + batch_size]])
    return batches


def source_pipeline(batch_size, *, kind="reader", extras=(), task=0, decoder="cpu",
                    device_id=None, seed=1, num_threads=2, prefetch_queue_depth=2,
                    pipeline=None, **reader):
    """The user's pipeline: a source of encoded images and labels, a decoder
    (GRAY), then the ``extras`` asked for: ``"logits"`` (float32 row means of
    the image), ``"task"`` (an int32 task id, ``task``).

    ``kind``: ``"reader"`` (``fn.readers.file(**reader)``, named "Reader"
    unless ``name`` is given); over ``reader["files"]`` and ``reader["labels"]``:
    ``"two_readers"`` (readers "Main" and "Side", the second over the files in
    reverse order, its images a third output), ``"per_sample"``,
    ``"per_sample_parallel"``, ``"per_batch"`` (external_source callbacks),
    ``"generator"`` (a generator function). ``pipeline``: more ``pipeline_def``
    arguments (they override the others).
    """
    from nvidia.dali import fn, pipeline_def, types

    reader.setdefault("name", "Reader")
    files, labels = reader.get("files"), reader.get("labels")
    pipe_kwargs = {"batch_size": batch_size, "num_threads": num_threads, "device_id": device_id,
                   "seed": seed, "prefetch_queue_depth": prefetch_queue_depth, **(pipeline or {})}

    @pipeline_def(**pipe_kwargs)
    def decode():
        side = None
        if kind == "reader":
            jpegs, labels_ = fn.readers.file(**reader)
        elif kind == "two_readers":
            jpegs, labels_ = fn.readers.file(files=files, labels=labels, name="Main")
            # a second reader (here over the same files in reverse order), as in
            # pipelines that read images and side information separately
            side, _ = fn.readers.file(files=files[::-1], labels=labels[::-1], name="Side")
        elif kind == "per_sample":
            jpegs, labels_ = fn.external_source(source=PerSample(files, labels), num_outputs=2,
                                                batch=False)
        elif kind == "per_sample_parallel":
            jpegs, labels_ = fn.external_source(source=PerSample(files, labels), num_outputs=2,
                                                batch=False, parallel=True)
        elif kind == "per_batch":
            jpegs, labels_ = fn.external_source(source=PerBatch(files, labels, batch_size),
                                                num_outputs=2, batch=True, batch_info=True)
        elif kind == "generator":
            jpegs, labels_ = fn.external_source(
                source=generator_function(files, labels, batch_size), num_outputs=2,
                cycle="raise")
        else:
            raise ValueError(f"unknown source kind {kind!r}")
        images = fn.decoders.image(jpegs, device=decoder, output_type=types.GRAY)
        outs = [images, labels_]
        if side is not None:
            outs.append(fn.decoders.image(side, device=decoder, output_type=types.GRAY))
        for extra in extras:
            if extra == "logits":
                outs.append(fn.reductions.mean(fn.cast(images, dtype=types.FLOAT), axes=[1, 2]))
            elif extra == "task":
                outs.append(fn.cast(labels_ * 0 + task, dtype=types.INT32))
            else:
                raise ValueError(f"unknown extra output {extra!r}")
        return tuple(outs)

    return decode()


def mixing_pipeline(source, buffer, batch_size=None, *, device_id=None, seed=2,
                    num_threads=2, prefetch_queue_depth=2, augment=False, **stage):
    """The mixing pipeline: ``dr.fn.rehearsal(source, replay_flag=True, **stage)``,
    batches of ``batch_size`` (default: the source's plus the buffer's
    ``num_representatives``). ``augment``: a random mirror and
    crop_mirror_normalize to float CHW after the stage; the mirror flags are a
    last output."""
    from nvidia.dali import fn, pipeline_def, types

    import dali_rehearsal as dr

    if batch_size is None:
        batch_size = source.max_batch_size + buffer.num_representatives

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  seed=seed, prefetch_queue_depth=prefetch_queue_depth)
    def train(src):
        outs = dr.fn.rehearsal(src, buffer=buffer, replay_flag=True, **stage)
        images, rest = outs[0], outs[1:]
        if not augment:
            return (images, *rest)
        mirror = fn.random.coin_flip()
        images = fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.FLOAT,
                                          output_layout="CHW")
        return (images, *rest, mirror)

    return train(source)


def run_epochs(pipe, names, epochs, **iterator_kwargs):
    """Runs ``epochs`` epochs through ``DALIGenericIterator(auto_reset=True)``;
    returns, per epoch, a list of batches, each a dict of NumPy copies."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    it = DALIGenericIterator(pipe, names, auto_reset=True, **iterator_kwargs)
    return [[{k: v.cpu().numpy().copy() for k, v in batch[0].items()} for batch in it]
            for _ in range(epochs)]
