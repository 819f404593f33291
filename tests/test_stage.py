"""The DALI stage ``dr.fn.rehearsal`` end to end on real MNIST PNG files.

Source pipelines read and decode the PNGs with DALI; every sample of every
mixing-pipeline batch is identified by its pixels (decoded independently with
PIL) and checked against the label of its file, and the extras (float32 row
means of the image, an int32 task id) must belong to the same sample.
CPU operators only (``device_id=None``), plus a ``gpu`` variant of the key test.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

import dali_rehearsal as dr

pytest.importorskip("nvidia.dali")
pytest.importorskip("torch")
from nvidia.dali import fn, pipeline_def, types  # noqa: E402
from utils import (assert_unchanged, mixing_pipeline, pixel_key, run_epochs,  # noqa: E402
                   snapshot, source_pipeline, to_host)

LBP = dr.LastBatchPolicy

# Batches the stage may have built beyond those consumed: DALI prefetch (2),
# prepare_ahead (2) and the step being built.
AHEAD = 5

# The extra outputs of the source pipelines: row means of the image, a task id.
EXTRAS = ("logits", "task")


# ------------------------------------------------------------------ ground truth
@pytest.fixture(scope="module")
def catalog(mnist):
    """pixel bytes -> (label, path) for every train and test PNG, decoded with PIL."""
    train_root, test_root = mnist
    table = {}
    files = 0
    for root in (train_root, test_root):
        data = dr.LabelledFiles.from_folder(root)
        for path, label in zip(data.files, data.labels):
            pixels = np.asarray(Image.open(path).convert("L"), dtype=np.uint8)
            assert pixels.shape == (28, 28)
            table[pixels.tobytes()] = (label, path)
            files += 1
    assert len(table) == files, "MNIST images must be distinct for content checks"
    return table


@pytest.fixture(scope="module")
def train_files(mnist):
    return dr.LabelledFiles.from_folder(mnist[0])


def reference_stream(steps, **source_kwargs):
    """Pixel keys of the source pipeline's own output, in order."""
    pipe = source_pipeline(**source_kwargs)
    pipe.build()
    keys = []
    for _ in range(steps):
        images, _ = pipe.run()
        keys += [pixel_key(x, strict=True) for x in images.as_array()]
    return keys


def check_batch(catalog, batch, *, task=None):
    """Every row: right label (by pixels), row means of its own image, task id,
    flags 0 then 1. Returns (fresh keys, replayed keys)."""
    images = batch["images"]
    if "mirror" in batch:
        images = np.stack([img[..., ::-1] if m else img
                           for img, m in zip(images, batch["mirror"].reshape(-1))])
        assert images.dtype == np.float32
        assert np.array_equal(images, np.round(images))
        images = images.astype(np.uint8)
    keys = [pixel_key(x, strict=True) for x in images]
    labels = batch["labels"].reshape(-1)
    assert [catalog[k][0] for k in keys] == labels.tolist(), "a sample arrived with a wrong label"
    pixels = images.reshape(len(keys), 28, 28).astype(np.float64)
    if "logits" in batch:
        np.testing.assert_allclose(batch["logits"].reshape(len(keys), 28), pixels.mean(axis=2),
                                   rtol=1e-5, atol=1e-4)
    if task is not None:
        assert batch["task"].reshape(-1).tolist() == [task(k) for k in keys]
    flag = batch["flag"].reshape(-1)
    assert flag.dtype == np.uint8
    nf = int((flag == 0).sum())
    assert flag[:nf].tolist() == [0] * nf and flag[nf:].tolist() == [1] * (len(flag) - nf)
    return keys[:nf], keys[nf:]


def _assert_stored_pairs(catalog, buffer):
    images, labels = to_host(buffer.stored(0)), to_host(buffer.stored(1)).reshape(-1)
    assert [catalog[pixel_key(x, strict=True)][0] for x in images] == labels.tolist()
    np.testing.assert_array_equal(labels, buffer.stored_labels())


# ------------------------------------------------------------------ the key test
def _stage_end_to_end(catalog, train_root, *, device_id, decoder, buffer_device):
    b, r, capacity, epochs = 16, 7, 40, 3
    n = 180
    buffer = dr.RehearsalBuffer(capacity=capacity, num_representatives=r,
                                policy="class_balanced", device=buffer_device, seed=0)
    src_kwargs = dict(batch_size=b, file_root=str(train_root), random_shuffle=True,
                      device_id=device_id, decoder=decoder)
    pipe = mixing_pipeline(source_pipeline(extras=EXTRAS, **src_kwargs), buffer, b + r,
                           device_id=device_id, augment=True)
    result = run_epochs(pipe, ["images", "labels", "logits", "task", "flag", "mirror"], epochs)
    reference = reference_stream(-(-epochs * n // b), **src_kwargs)
    train_keys = {k for k, (label, path) in catalog.items() if path.startswith(str(train_root))}
    assert len(train_keys) == n

    stored_so_far: set = set()      # everything delivered fresh in earlier batches
    fresh_stream = []
    for e, batches in enumerate(result):
        assert len(batches) == -(-n // b)                      # epoch ends with the source's
        epoch_fresh = []
        for s, batch in enumerate(batches):
            fresh, reps = check_batch(catalog, batch, task=lambda k: 0)
            assert len(fresh) == (b if s < len(batches) - 1 else n - (n // b) * b)
            assert len(reps) == (0 if (e, s) == (0, 0) else r)  # short while empty
            assert set(reps) <= stored_so_far                  # stored before this batch
            if e == 0:   # each image offered once so far: no copies of one image stored
                assert len(set(reps)) == len(reps)             # no duplicate representative
                assert not set(reps) & set(fresh)              # never from its own batch
            stored_so_far |= set(fresh)
            epoch_fresh += fresh
        assert Counter(epoch_fresh) == Counter(train_keys)     # each sample once per epoch
        fresh_stream += epoch_fresh
    assert fresh_stream == reference[: len(fresh_stream)]       # in the source's order
    # the stage runs ahead of the loop: DALI's prefetch queue (2), the steps the
    # stage prepares ahead (prepare_ahead=2) and the one it is building
    assert epochs * n <= buffer.num_seen <= epochs * n + AHEAD * b
    assert buffer.class_counts() == {c: 4 for c in range(10)}
    _assert_stored_pairs(catalog, buffer)


def test_stage_end_to_end_cpu(catalog, mnist):
    _stage_end_to_end(catalog, mnist[0], device_id=None, decoder="cpu", buffer_device="cpu")


@pytest.mark.gpu
def test_stage_end_to_end_gpu(catalog, mnist):
    _stage_end_to_end(catalog, mnist[0], device_id=0, decoder="mixed", buffer_device="gpu")


# ------------------------------------------------------------------ epochs and shards
def _every_other(train_files):
    return list(train_files.files[::2]), list(train_files.labels[::2])


def _bounds(n, shard, num_shards):
    return n * shard // num_shards, n * (shard + 1) // num_shards


@pytest.mark.parametrize("num_shards, shard_id, pad, stick, shuffle, epochs, b", [
    (4, 1, False, False, False, 4, 8),
    (4, 2, True, False, False, 4, 8),
    (3, 0, False, True, False, 3, 8),
    (3, 2, True, True, True, 3, 8),
    (2, 1, True, False, True, 4, 8),
    (3, 1, True, False, False, 3, 10),      # shards of 30: epochs end on a batch boundary
])
def test_partial_epochs_deliver_every_shard_sample_once(catalog, train_files, num_shards,
                                                        shard_id, pad, stick, shuffle, epochs, b):
    files, labels = _every_other(train_files)             # 90 files: shards of 22/23, 30, 45
    keys = [pixel_key(np.asarray(Image.open(f).convert("L")), strict=True) for f in files]
    r = 3
    buffer = dr.RehearsalBuffer(capacity=20, num_representatives=r, device="cpu", seed=1)
    src = source_pipeline(b, extras=EXTRAS, files=files, labels=labels, shard_id=shard_id,
                          num_shards=num_shards, pad_last_batch=pad, stick_to_shard=stick,
                          random_shuffle=shuffle)
    result = run_epochs(mixing_pipeline(src, buffer, b + r),
                        ["images", "labels", "logits", "task", "flag"], epochs)
    seen_before: set = set()
    offered = 0
    per_epoch = []
    for e, batches in enumerate(result):
        shard = shard_id if stick else (shard_id + e) % num_shards
        lo, hi = _bounds(len(files), shard, num_shards)
        assert len(batches) == -(-(hi - lo) // b)
        delivered = []
        for s, batch in enumerate(batches):
            fresh, reps = check_batch(catalog, batch)
            assert len(fresh) == b or s == len(batches) - 1
            assert set(reps) <= seen_before
            if len(seen_before) == offered and not set(fresh) & seen_before:
                # no image offered twice yet: no two copies of one image stored
                assert len(set(reps)) == len(reps) and not set(reps) & set(fresh)
            seen_before |= set(fresh)
            offered += len(fresh)
            delivered += fresh
        assert len(delivered) == hi - lo and len(set(delivered)) == hi - lo
        assert set(delivered) <= set(keys)
        if not shuffle:
            assert delivered == keys[lo:hi]
        per_epoch.append(delivered)
    if shuffle and stick:
        assert all(set(d) == set(per_epoch[0]) for d in per_epoch)
    if shuffle and not stick:   # the shards rotate: num_shards epochs cover the data once
        covered = [k for d in per_epoch[:num_shards] for k in d]
        assert Counter(covered) == Counter(keys)
    delivered_total = sum(len(d) for d in per_epoch)
    assert delivered_total <= buffer.num_seen <= delivered_total + AHEAD * b   # + ahead


def test_fill_unpadded_gives_full_batches_and_loses_nothing(catalog, train_files):
    files, labels = _every_other(train_files)
    keys = [pixel_key(np.asarray(Image.open(f).convert("L")), strict=True) for f in files]
    b, r, epochs = 8, 2, 3
    buffer = dr.RehearsalBuffer(capacity=20, num_representatives=r, device="cpu", seed=1)
    src = source_pipeline(b, extras=EXTRAS, files=files, labels=labels)
    result = run_epochs(mixing_pipeline(src, buffer, b + r, last_batch_policy=LBP.FILL),
                        ["images", "labels", "logits", "task", "flag"], epochs)
    stream = []
    for e, batches in enumerate(result):
        epoch = []
        for batch in batches:
            fresh, _ = check_batch(catalog, batch)
            assert len(fresh) == b                                # always full
            epoch += fresh
        assert len(epoch) >= len(files) - b                       # roughly one epoch each
        stream += epoch
    # the fill comes from the next epoch: the stream is the data, cycled, nothing lost
    assert stream == (keys * (epochs + 1))[: len(stream)]
    assert [len(batches) for batches in result] == [12, 11, 11]  # 96, 88 (84 left), 88 (86)


def test_fill_padded_fills_with_the_readers_padding(catalog, train_files):
    files, labels = _every_other(train_files)
    keys = [pixel_key(np.asarray(Image.open(f).convert("L")), strict=True) for f in files]
    b, r = 8, 2
    buffer = dr.RehearsalBuffer(capacity=20, num_representatives=r, device="cpu", seed=1)
    src = source_pipeline(b, extras=EXTRAS, files=files, labels=labels, shard_id=1, num_shards=3,
                          pad_last_batch=True, stick_to_shard=True)
    result = run_epochs(mixing_pipeline(src, buffer, b + r, last_batch_policy=LBP.FILL),
                        ["images", "labels", "logits", "task", "flag"], 3)
    for batches in result:
        epoch = []
        for batch in batches:
            fresh, _ = check_batch(catalog, batch)
            assert len(fresh) == b
            epoch += fresh
        # 30 real samples of shard 1, then the reader's padding (its last sample)
        assert epoch == keys[30:60] + [keys[59]] * 2


def test_drop_gives_full_batches_and_defers_the_remainder(catalog, train_files):
    """DROP: DALI's number of full batches per epoch; the real samples that do
    not fill a batch at an epoch's end open the next epoch (DALI's iterator
    would discard them, the same ones every epoch without shuffling)."""
    files, labels = _every_other(train_files)
    keys = [pixel_key(np.asarray(Image.open(f).convert("L")), strict=True) for f in files]
    b, r = 8, 2
    buffer = dr.RehearsalBuffer(capacity=20, num_representatives=r, device="cpu", seed=1)
    src = source_pipeline(b, extras=EXTRAS, files=files, labels=labels)
    result = run_epochs(mixing_pipeline(src, buffer, b + r, last_batch_policy=LBP.DROP),
                        ["images", "labels", "logits", "task", "flag"], 3)
    stream = []
    for batches in result:
        assert len(batches) == 90 // b
        for batch in batches:
            fresh, _ = check_batch(catalog, batch)
            assert len(fresh) == b
            stream += fresh
    # the data in order, cycled: nothing skipped, the tail (keys[88:90]) included
    assert stream == (keys * 3)[: 3 * 88]
    assert set(keys[88:]) <= set(stream)
    assert 3 * 88 <= buffer.num_seen <= 3 * 88 + AHEAD * b     # + ahead


# ------------------------------------------------------------------ tasks and seeds
def test_buffer_persists_across_tasks_and_pipelines(catalog, train_files):
    b, r = 16, 6
    buffer = dr.RehearsalBuffer(capacity=30, num_representatives=r, device="cpu", seed=0)
    task_of = {}
    for task, classes in enumerate([(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]):
        data = train_files.subset(classes)
        for f in data.files:
            task_of[pixel_key(np.asarray(Image.open(f).convert("L")), strict=True)] = task
        src = source_pipeline(b, extras=EXTRAS, task=task, files=list(data.files),
                              labels=list(data.labels), random_shuffle=True, seed=10 + task)
        result = run_epochs(mixing_pipeline(src, buffer, b + r, seed=20 + task),
                            ["images", "labels", "logits", "task", "flag"], 2)
        task_keys = [k for k in task_of if task_of[k] == task]
        replayed_labels = Counter()
        for e, batches in enumerate(result):
            delivered = []
            for s, batch in enumerate(batches):
                # replayed task-0 samples keep their own task id 0 during task 1
                fresh, reps = check_batch(catalog, batch, task=lambda k: task_of[k])
                assert len(reps) == (0 if (task, e, s) == (0, 0, 0) else r)
                delivered += fresh
                replayed_labels.update(catalog[k][0] for k in reps)
            assert Counter(delivered) == Counter(task_keys)      # the new task's files, once
        if task == 1:
            assert set(replayed_labels) == set(range(10))   # old classes are rehearsed
    assert buffer.class_counts() == {c: 3 for c in range(10)}
    _assert_stored_pairs(catalog, buffer)


def _run_twice_data(mnist, seed):
    buffer = dr.RehearsalBuffer(capacity=25, num_representatives=5, device="cpu", seed=seed)
    src = source_pipeline(12, extras=EXTRAS, file_root=str(mnist[0]), random_shuffle=True)
    pipe = mixing_pipeline(src, buffer, 17, augment=True)
    return run_epochs(pipe, ["images", "labels", "logits", "task", "flag", "mirror"], 2)


def test_same_seeds_same_batches(catalog, mnist):
    a, b, c = (_run_twice_data(mnist, seed) for seed in (0, 0, 1))
    assert [len(x) for x in a] == [len(x) for x in b] == [15, 15]
    for epoch_a, epoch_b in zip(a, b):
        for batch_a, batch_b in zip(epoch_a, epoch_b):
            assert batch_a.keys() == batch_b.keys()
            for k in batch_a:
                np.testing.assert_array_equal(batch_a[k], batch_b[k])
    # another buffer seed replays other samples (the check above can fail)
    assert any(not np.array_equal(x["labels"], y["labels"])
               for ex, ey in zip(a, c) for x, y in zip(ex, ey))


# ------------------------------------------------------------------ errors
def test_varying_shapes_in_source_raise_resize_error(mnist):
    buffer = dr.RehearsalBuffer(capacity=10, num_representatives=2, device="cpu", seed=0)

    @pipeline_def(batch_size=6, num_threads=1, device_id=None, seed=1)
    def decode():
        jpegs, labels = fn.readers.file(file_root=str(mnist[0]), name="Reader")
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.GRAY)
        images = fn.resize(images, resize_x=fn.random.uniform(values=[10, 20]), resize_y=28)
        return images, labels

    pipe = mixing_pipeline(decode(), buffer, 8)
    with pytest.raises(ValueError, match="resize"):
        pipe.build()
        pipe.run()
    assert buffer.size == 0 and buffer.num_seen == 0 and buffer.spec is None


def test_shape_change_between_tasks_raises_and_keeps_buffer(catalog, train_files):
    buffer = dr.RehearsalBuffer(capacity=10, num_representatives=2, device="cpu", seed=0)
    src = source_pipeline(8, files=list(train_files.files[:40]),
                          labels=list(train_files.labels[:40]))
    pipe = mixing_pipeline(src, buffer, 10)
    run_epochs(pipe, ["images", "labels", "flag"], 1)

    @pipeline_def(batch_size=8, num_threads=1, device_id=None, seed=1)
    def resized():
        jpegs, labels = fn.readers.file(files=list(train_files.files[40:]),
                                        labels=list(train_files.labels[40:]), name="Reader")
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.GRAY)
        return fn.resize(images, size=(20, 20)), labels

    pipe = mixing_pipeline(resized(), buffer, 10)    # the task-1 stage stops here
    snap = snapshot(buffer)
    assert snap[0] == 10
    with pytest.raises(ValueError, match="resize"):
        pipe.build()
        pipe.run()
    assert_unchanged(buffer, snap)
    _assert_stored_pairs(catalog, buffer)


@pytest.mark.parametrize("transform, error", [
    (lambda labels: fn.cast(labels, dtype=types.FLOAT), TypeError),
    (lambda labels: labels - 1, ValueError),                   # class 0 -> -1
])
def test_bad_labels_from_source_raise_before_storing(mnist, transform, error):
    buffer = dr.RehearsalBuffer(capacity=10, num_representatives=2, device="cpu", seed=0)

    @pipeline_def(batch_size=6, num_threads=1, device_id=None, seed=1)
    def decode():
        jpegs, labels = fn.readers.file(file_root=str(mnist[0]), name="Reader")
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.GRAY)
        return images, transform(labels)

    pipe = mixing_pipeline(decode(), buffer, 8)
    with pytest.raises(error, match="label"):
        pipe.build()
        pipe.run()
    assert buffer.size == 0 and buffer.num_seen == 0


def test_negative_label_mid_stream_leaves_earlier_batches_intact(catalog, train_files):
    """Files in class order, labels 2 - label: the 4th batch of 16 meets class 3 (-1)."""
    buffer = dr.RehearsalBuffer(capacity=100, num_representatives=2, device="cpu", seed=0)

    @pipeline_def(batch_size=16, num_threads=1, device_id=None, seed=1)
    def decode():
        jpegs, labels = fn.readers.file(files=list(train_files.files),
                                        labels=list(train_files.labels), name="Reader")
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.GRAY)
        return images, 2 - labels

    pipe = mixing_pipeline(decode(), buffer, 18)
    pipe.build()
    with pytest.raises(ValueError, match="non-negative"):
        for _ in range(10):
            pipe.run()
    assert buffer.num_seen == 48 and buffer.size == 48
    images, labels = to_host(buffer.stored(0)), to_host(buffer.stored(1)).reshape(-1)
    assert [2 - catalog[pixel_key(x, strict=True)][0] for x in images] == labels.tolist()
    assert labels.min() >= 0


def test_stage_configuration_errors(mnist):
    src = source_pipeline(8, file_root=str(mnist[0]))
    too_many = dr.RehearsalBuffer(capacity=20, num_representatives=12, device="cpu", seed=0)
    with pytest.raises(ValueError, match="larger than the mixing pipeline's batch size"):
        mixing_pipeline(src, too_many, 10).build()
    buffer = dr.RehearsalBuffer(capacity=10, num_representatives=3, device="cpu", seed=0)
    with pytest.raises(ValueError, match="at least the source's batch size"):
        mixing_pipeline(src, buffer, 10).build()
    with pytest.raises(ValueError, match="last_batch_policy"):
        mixing_pipeline(src, buffer, 11, last_batch_policy="SOMETIMES").build()
    with pytest.raises(RuntimeError, match="inside the definition"):
        dr.fn.rehearsal(src, buffer=buffer)
    for buf in (too_many, buffer):
        assert buf.size == 0 and buf.num_seen == 0 and buf.spec is None
    # the same buffer still works in a well-formed pipeline afterwards
    batches = run_epochs(mixing_pipeline(src, buffer, 11), ["images", "labels", "flag"], 1)[0]
    assert len(batches) == -(-180 // 8) and 180 <= buffer.num_seen <= 180 + AHEAD * 8


def _two_task_run(train_files, prepare_ahead):
    """Two tasks through the same buffer, two epochs each; all batches."""
    buffer = dr.RehearsalBuffer(capacity=24, num_representatives=5, device="cpu", seed=7)
    half = len(train_files) // 2
    runs = []
    for task, part in enumerate((slice(0, half), slice(half, None))):
        src = source_pipeline(8, extras=EXTRAS, task=task, files=list(train_files.files[part]),
                              labels=list(train_files.labels[part]), random_shuffle=True)
        pipe = mixing_pipeline(src, buffer, 13, prepare_ahead=prepare_ahead)
        runs.append(run_epochs(pipe, ["images", "labels", "logits", "task", "flag"], 2))
    return runs, buffer


def test_background_preparation_is_reproducible_and_changes_no_batch_of_a_task(train_files):
    """Preparing steps ahead in a thread (the default) gives exactly the batches
    of the synchronous stage within a task, and the same batches run after run
    across a change of task (a new stage stops the old one at a fixed step)."""
    sync, sync_buffer = _two_task_run(train_files, 0)
    ahead, ahead_buffer = _two_task_run(train_files, 2)
    again, _ = _two_task_run(train_files, 2)
    for a, b in zip(_flatten([sync[0]]), _flatten([ahead[0]])):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    for b, c in zip(_flatten(ahead), _flatten(again), strict=True):
        for key in b:
            np.testing.assert_array_equal(b[key], c[key])
    # task 2 replays task-1 samples
    assert any((batch["task"][batch["flag"] == 1] == 0).any() for batch in _flatten([ahead[1]]))
    # ahead of the loop, the old stage offered a few more task-1 samples
    assert ahead_buffer.num_seen > sync_buffer.num_seen


def _flatten(runs):
    return [batch for task in runs for epoch in task for batch in epoch]


def test_prepare_ahead_must_be_a_non_negative_integer(mnist):
    buffer = dr.RehearsalBuffer(capacity=10, num_representatives=2, device="cpu", seed=0)
    src = source_pipeline(8, file_root=str(mnist[0]))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="prepare_ahead"):
            mixing_pipeline(src, buffer, 10, prepare_ahead=bad)


def test_dali_host_outputs_are_recognised_as_host_data(mnist):
    """Labels that DALI returns on the host are read there: on a GPU buffer a
    device round trip would cost a synchronisation every step."""
    from dali_rehearsal._backend import on_device as _on_device
    pipe = source_pipeline(4, file_root=str(mnist[0]))
    pipe.build()
    images, labels = pipe.run()
    for host in (labels, labels.as_tensor(), labels.as_array(), images.as_tensor()):
        assert not _on_device(host)
