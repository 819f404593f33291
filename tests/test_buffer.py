"""RehearsalBuffer.mix/add/sample on NumPy (reference) and CuPy (``gpu`` marker).

Every sample carries its identity in its pixels; labels are random (not a
function of the pixels) and the extras (float32 logits, int32 task id) are
functions of the pixels, so any mispairing of fields shows up by content.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from scipy.stats import chisquare

import dali_rehearsal as dr
from dali_rehearsal import gpu_available
from utils import assert_unchanged, snapshot, to_host

SHAPE = (6, 5, 3)
NUM_CLASSES = 5


class Stream:
    """Samples with unique ids; fields: image (uint8), label (int64), logits
    (float32, from the image), task id (int32)."""

    def __init__(self, seed=0, num_classes=NUM_CLASSES, classes=None):
        self.rng = np.random.default_rng(seed)
        self.num_classes = num_classes
        self.classes = classes
        self.next_id = 0
        self.labels = {}

    @staticmethod
    def ident(images) -> np.ndarray:
        images = np.asarray(images)
        return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 0, 1].astype(np.int64)

    @staticmethod
    def logits(images) -> np.ndarray:
        mean = np.asarray(images).reshape(len(images), -1).mean(axis=1, dtype=np.float64)
        return (mean[:, None] + np.arange(4)[None, :]).astype(np.float32)

    @staticmethod
    def task(images) -> np.ndarray:
        return (Stream.ident(images) // 40).astype(np.int32)

    def batch(self, b, labels=None):
        ids = np.arange(self.next_id, self.next_id + b)
        self.next_id += b
        images = self.rng.integers(0, 256, size=(b,) + SHAPE, dtype=np.uint8)
        images[:, 0, 0, 0] = ids % 256
        images[:, 0, 0, 1] = ids // 256
        if labels is None:
            pool = self.classes if self.classes is not None else np.arange(self.num_classes)
            labels = self.rng.choice(pool, size=b)
        labels = np.asarray(labels, dtype=np.int64)
        for i, label in zip(ids, labels):
            self.labels[int(i)] = int(label)
        return images, labels, self.logits(images), self.task(images)

    def check(self, out):
        """Every row of a mix output is one whole sample: image, label, extras."""
        images, labels, logits, task = (to_host(a) for a in out)
        assert images.dtype == np.uint8 and images.shape[1:] == SHAPE
        assert labels.dtype == np.int64 and logits.dtype == np.float32 and task.dtype == np.int32
        ids = self.ident(images)
        np.testing.assert_array_equal(labels, [self.labels[int(i)] for i in ids])
        np.testing.assert_array_equal(logits, self.logits(images))
        np.testing.assert_array_equal(task, self.task(images))
        return ids


def _stored_ids(buffer):
    return Stream.ident(to_host(buffer.stored(0)))


# ------------------------------------------------------------------ batch layout
@pytest.mark.parametrize("policy", ["class_balanced", "reservoir"])
def test_mix_layout_pairing_and_representatives_from_before(xp, device, policy):
    b, r = 8, 5
    buffer = dr.RehearsalBuffer(capacity=30, num_representatives=r, policy=policy,
                                device=device, seed=0)
    stream = Stream(seed=1)
    delivered = set()
    for step in range(40):
        batch = stream.batch(b)
        stored_before = set(_stored_ids(buffer).tolist()) if step else set()
        size_before = buffer.size
        out = buffer.mix(*(xp.asarray(f) for f in batch))
        assert all(isinstance(o, xp.ndarray) for o in out)     # on the buffer's device
        ids = stream.check(out)
        reps = ids[b:]
        # b fresh samples in input order, then min(r, stored) representatives
        assert len(ids) == b + min(r, size_before)
        np.testing.assert_array_equal(to_host(out[0][:b]), batch[0])
        np.testing.assert_array_equal(to_host(out[1][:b]), batch[1])
        assert len(set(reps.tolist())) == len(reps)             # without replacement
        assert set(reps.tolist()) <= stored_before              # stored before this batch
        assert not set(reps.tolist()) & set(ids[:b].tolist())   # never its own batch
        assert buffer.num_seen == (step + 1) * b
        delivered |= set(ids[:b].tolist())
    assert buffer.size == 30
    # stored samples carry their own label in the label field and in the policy
    stored = buffer.stored()
    stream.check(stored)
    np.testing.assert_array_equal(to_host(stored[1]), buffer.stored_labels())
    assert set(_stored_ids(buffer).tolist()) <= delivered


def test_batch_shorter_while_buffer_fills(xp, device):
    buffer = dr.RehearsalBuffer(capacity=100, num_representatives=7, device=device, seed=0)
    stream = Stream()
    rows = [len(buffer.mix(*(xp.asarray(f) for f in stream.batch(3)))[0]) for _ in range(5)]
    assert rows == [3, 3 + 3, 3 + 6, 3 + 7, 3 + 7]


def test_zero_representatives(xp, device):
    buffer = dr.RehearsalBuffer(capacity=10, num_representatives=0, device=device, seed=0)
    stream = Stream()
    for _ in range(4):
        batch = stream.batch(6)
        out = buffer.mix(*(xp.asarray(f) for f in batch))
        np.testing.assert_array_equal(to_host(out[0]), batch[0])
    assert buffer.size == 10 and buffer.num_seen == 24


def test_representatives_uniform_over_stored_slots(xp, device):
    """Each stored slot is drawn equally often (chi-square over many steps)."""
    capacity, r, steps = 20, 6, 800
    buffer = dr.RehearsalBuffer(capacity=capacity, num_representatives=r, policy="reservoir",
                                device=device, seed=3)
    stream = Stream(seed=4)
    buffer.add(*(xp.asarray(f) for f in stream.batch(capacity)))
    counts = np.zeros(capacity, dtype=np.int64)
    for _ in range(steps):
        slot_of = {int(i): s for s, i in enumerate(_stored_ids(buffer))}
        out = buffer.mix(*(xp.asarray(f) for f in stream.batch(2)))
        reps = Stream.ident(to_host(out[0][2:]))
        assert len(reps) == r and len(set(reps.tolist())) == r
        for i in reps:
            counts[slot_of[int(i)]] += 1
    assert chisquare(counts, np.full(capacity, steps * r / capacity)).pvalue > 1e-3


def test_sample_draws_stored_samples_without_replacement(xp, device):
    buffer = dr.RehearsalBuffer(capacity=12, num_representatives=4, device=device, seed=0)
    stream = Stream()
    with pytest.raises(RuntimeError, match="empty"):
        buffer.sample()
    buffer.add(*(xp.asarray(f) for f in stream.batch(9)))
    out = buffer.sample()
    ids = stream.check(out)
    assert len(ids) == 4 and len(set(ids.tolist())) == 4
    assert set(ids.tolist()) <= set(_stored_ids(buffer).tolist())
    assert len(buffer.sample(50)[0]) == 9       # at most what is stored
    assert buffer.num_seen == 9                 # sampling stores nothing


# ------------------------------------------------------------------ storage
def test_storage_lazy_fixed_layout_source_dtype(xp, device):
    buffer = dr.RehearsalBuffer(capacity=16, num_representatives=2, device=device, seed=0)
    assert buffer.spec is None and buffer.nbytes == 0 and buffer.size == 0
    with pytest.raises(RuntimeError, match="empty"):
        buffer.stored()
    stream = Stream()
    buffer.mix(*(xp.asarray(f) for f in stream.batch(4)))
    spec = buffer.spec
    assert [s.shape for s in spec] == [SHAPE, (), (4,), ()]
    assert [np.dtype(s.dtype) for s in spec] == [np.uint8, np.int64, np.float32, np.int32]
    assert buffer.nbytes == 16 * (np.prod(SHAPE) + 8 + 16 + 4)
    stored = buffer.stored()
    assert isinstance(stored[0], xp.ndarray) and stored[0].dtype == np.uint8


# ------------------------------------------------------------------ class balance
def test_class_balanced_buffer_across_tasks(xp, device):
    buffer = dr.RehearsalBuffer(capacity=24, num_representatives=4, device=device, seed=0)
    tasks = [(0, 1), (2, 3, 4), (5,)]
    stream = Stream(seed=10)
    seen = []
    for classes in tasks:
        stream.classes = np.asarray(classes)
        for _ in range(10):
            stream.check(buffer.mix(*(xp.asarray(f) for f in stream.batch(6))))
        seen += list(classes)
        counts = buffer.class_counts()
        assert sorted(counts) == sorted(seen)
        assert max(counts.values()) - min(counts.values()) <= 1
        assert sum(counts.values()) == 24
        # the label field of the stored samples agrees with the policy's bookkeeping
        np.testing.assert_array_equal(to_host(buffer.stored(1)), buffer.stored_labels())
        stream.check(buffer.stored())
    assert buffer.class_counts() == {c: 4 for c in range(6)}
    # representatives of the last task's batches come from every task
    replayed = set()
    for _ in range(30):
        out = buffer.mix(*(xp.asarray(f) for f in stream.batch(2)))
        stream.check(out)
        replayed |= set(to_host(out[1][2:]).tolist())
    assert replayed == set(range(6))


# ------------------------------------------------------------------ reproducibility
def _run(xp, device, seed, policy="class_balanced"):
    buffer = dr.RehearsalBuffer(capacity=15, num_representatives=4, policy=policy,
                                device=device, seed=seed)
    stream = Stream(seed=7)
    return [[to_host(o).copy() for o in buffer.mix(*(xp.asarray(f) for f in stream.batch(5)))]
            for _ in range(20)]


@pytest.mark.parametrize("policy", ["class_balanced", "reservoir"])
def test_same_seed_same_batches(xp, device, policy):
    a, b, c = (_run(xp, device, seed, policy) for seed in (0, 0, 1))
    for batch_a, batch_b in zip(a, b):
        for fa, fb in zip(batch_a, batch_b):
            np.testing.assert_array_equal(fa, fb)
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))


# ------------------------------------------------------------------ errors
def _filled(xp, device):
    buffer = dr.RehearsalBuffer(capacity=10, num_representatives=3, device=device, seed=0)
    stream = Stream()
    for _ in range(4):
        buffer.mix(*(xp.asarray(f) for f in stream.batch(4)))
    return buffer, stream


def _bad_batches(stream):
    images, labels, logits, task = stream.batch(4)
    yield "shape", ValueError, (images[:, :5], labels, logits, task)
    yield "image dtype", ValueError, (images.astype(np.float32), labels, logits, task)
    yield "extra dtype", ValueError, (images, labels, logits.astype(np.float64), task)
    yield "float labels", (TypeError, ValueError), (images, labels.astype(np.float32), logits, task)
    yield "negative label", ValueError, (images, np.array([1, 0, -2, 3]), logits, task)
    yield "fewer fields", ValueError, (images, labels, logits)
    yield "batch sizes differ", ValueError, (images, labels[:3], logits, task)
    yield "label shape", ValueError, (images, np.stack([labels, labels], 1), logits, task)


def test_bad_batch_raises_before_anything_changes(xp, device):
    buffer, stream = _filled(xp, device)
    snap = snapshot(buffer, counts=True)
    cases = list(_bad_batches(stream))
    for what, error, fields in cases:
        with pytest.raises(error):
            buffer.mix(*(xp.asarray(f) for f in fields))
        assert_unchanged(buffer, snap)
        with pytest.raises(error):
            buffer.add(*(xp.asarray(f) for f in fields))
        assert_unchanged(buffer, snap)
    # the buffer still works afterwards, with representatives and pairing intact
    out = buffer.mix(*(xp.asarray(f) for f in stream.batch(4)))
    assert len(stream.check(out)) == 4 + 3
    assert buffer.num_seen == snap[1] + 4


def test_mix_add_sample_after_close_raise_and_change_nothing(xp, device):
    buffer, stream = _filled(xp, device)
    buffer.close()
    snap = snapshot(buffer, counts=True)
    fields = [xp.asarray(f) for f in stream.batch(4)]
    for name, call in (("mix()", lambda: buffer.mix(*fields)),
                       ("add()", lambda: buffer.add(*fields)),
                       ("sample()", lambda: buffer.sample())):
        with pytest.raises(RuntimeError, match=re.escape(f"{name} on a closed RehearsalBuffer")):
            call()
        assert_unchanged(buffer, snap)
    buffer.close()                  # idempotent
    assert buffer.closed
    # what was stored can still be read and saved
    restored = dr.RehearsalBuffer(capacity=10, num_representatives=3, device=device, seed=0)
    restored.load_state_dict(buffer.state_dict())
    assert restored.num_seen == buffer.num_seen == 16


def test_shape_change_error_says_to_resize_in_source(xp, device):
    buffer, stream = _filled(xp, device)
    images, labels, logits, task = stream.batch(4)
    with pytest.raises(ValueError, match="resize"):
        buffer.mix(xp.asarray(np.zeros((4, 7, 5, 3), np.uint8)), xp.asarray(labels),
                   xp.asarray(logits), xp.asarray(task))


def test_label_index(xp, device):
    """label_index=0: labels first, then the samples."""
    buffer = dr.RehearsalBuffer(capacity=8, num_representatives=2, device=device,
                                label_index=0, seed=0)
    stream = Stream()
    for _ in range(5):
        images, labels, logits, task = stream.batch(3)
        out = buffer.mix(xp.asarray(labels), xp.asarray(images))
        stream.check((out[1], out[0], xp.asarray(Stream.logits(to_host(out[1]))),
                      xp.asarray(Stream.task(to_host(out[1])))))
    assert buffer.size >= 5 and buffer.num_seen == 15
    stored_labels = to_host(buffer.stored(0))
    np.testing.assert_array_equal(stored_labels, buffer.stored_labels())
    np.testing.assert_array_equal(
        stored_labels, [stream.labels[int(i)] for i in Stream.ident(to_host(buffer.stored(1)))])


@pytest.mark.parametrize("kwargs, error", [
    (dict(capacity=0, num_representatives=1), ValueError),
    (dict(capacity=-5, num_representatives=1), ValueError),
    (dict(capacity=2.5, num_representatives=1), TypeError),
    (dict(capacity=10, num_representatives=-1), ValueError),
    (dict(capacity=10, num_representatives=1, policy="fifo"), ValueError),
    (dict(capacity=10, num_representatives=1, device="tpu"), ValueError),
])
def test_constructor_errors(kwargs, error):
    with pytest.raises(error):
        dr.RehearsalBuffer(device=kwargs.pop("device", "cpu"), **kwargs)


@pytest.mark.skipif(gpu_available(), reason="a GPU is present")
def test_gpu_device_without_gpu_raises():
    with pytest.raises(RuntimeError, match="device='gpu'"):
        dr.RehearsalBuffer(capacity=10, num_representatives=1, device="gpu")
    assert dr.RehearsalBuffer(capacity=10, num_representatives=1, device=None).device == "cpu"


# Checkpoints (state dicts, directories, validation, elastic restore): tests/test_checkpoint.py
