"""Tests for dali_rehearsal.streams on real MNIST PNG files and a real (CPU) DALI pipeline."""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest

from dali_rehearsal.datasets import mnist_folders
from dali_rehearsal.streams import ClassIncremental, LabelledFiles, Task

PER_CLASS = 12


@pytest.fixture(scope="module")
def mnist_train(tmp_path_factory) -> LabelledFiles:
    train_root, _ = mnist_folders(tmp_path_factory.mktemp("streams") / "mnist", per_class=PER_CLASS)
    return LabelledFiles.from_folder(train_root)


def _toy(n_classes=10, per_class=3) -> LabelledFiles:
    files = [f"/x/{c}/{k}.png" for k in range(per_class) for c in range(n_classes)]
    labels = [c for k in range(per_class) for c in range(n_classes)]
    return LabelledFiles(files, labels)


# -- LabelledFiles ------------------------------------------------------------------------------


def test_from_folder_reads_mnist(mnist_train):
    n_train = PER_CLASS - round(0.2 * PER_CLASS)
    assert mnist_train.classes == tuple(range(10))
    assert len(mnist_train) == 10 * n_train
    assert isinstance(mnist_train.files, tuple) and isinstance(mnist_train.labels, tuple)
    for f, label in zip(mnist_train.files, mnist_train.labels):
        assert pathlib.Path(f).parent.name == str(label)
    # grouped by class, sorted within a class
    assert list(mnist_train.labels) == sorted(mnist_train.labels)
    for c in mnist_train.classes:
        in_class = [f for f, label in zip(mnist_train.files, mnist_train.labels) if label == c]
        assert in_class == sorted(in_class)


def test_from_folder_named_classes_and_extensions(tmp_path):
    for name in ["zebra", "ant", "Bee"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "b.JPG").write_bytes(b"x")
        (tmp_path / name / "a.png").write_bytes(b"x")
        (tmp_path / name / "notes.txt").write_bytes(b"x")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "a.png").write_bytes(b"x")
    data = LabelledFiles.from_folder(tmp_path)
    # sorted names: "Bee" < "ant" < "zebra" (byte order, as DALI's file_root labelling)
    assert data.labels == (0, 0, 1, 1, 2, 2)
    assert [pathlib.Path(f).relative_to(tmp_path).as_posix() for f in data.files] == [
        "Bee/a.png", "Bee/b.JPG", "ant/a.png", "ant/b.JPG", "zebra/a.png", "zebra/b.JPG",
    ]
    assert len(LabelledFiles.from_folder(tmp_path, extensions=(".png",))) == 3


def test_from_folder_integer_names(tmp_path):
    for name in ["10", "2", "7"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "0.png").write_bytes(b"x")
    data = LabelledFiles.from_folder(tmp_path)
    assert data.labels == (2, 7, 10)
    assert data.classes == (2, 7, 10)


def test_labelled_files_validation_and_subset():
    with pytest.raises(ValueError, match="length"):
        LabelledFiles(("a", "b"), (1,))
    data = LabelledFiles(["a", pathlib.Path("b"), "c", "d"], [3, np.int64(1), 3, 2])
    assert data.files == ("a", "b", "c", "d") and data.labels == (3, 1, 3, 2)
    assert type(data.labels[1]) is int
    sub = data.subset([3, 2])
    assert sub.files == ("a", "c", "d") and sub.labels == (3, 3, 2)
    with pytest.raises(ValueError, match="not present"):
        data.subset([9])


# -- ClassIncremental ---------------------------------------------------------------------------


def test_increment_two_gives_five_tasks(mnist_train):
    stream = ClassIncremental(mnist_train, increment=2)
    assert len(stream) == 5
    assert stream.increments == (2,) * 5
    assert [t.classes for t in stream] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert [t.index for t in stream] == list(range(5))
    assert stream[-1] == stream[4]
    with pytest.raises(IndexError):
        stream[5]
    with pytest.raises(IndexError):
        stream[-6]


def test_every_file_in_exactly_one_task_with_its_label(mnist_train):
    stream = ClassIncremental(mnist_train, increment=3, initial_increment=4, seed=1)
    label_of = dict(zip(mnist_train.files, mnist_train.labels))
    seen = []
    for task in stream:
        assert isinstance(task, Task)
        assert set(task.labels) == set(task.classes)
        for f, label in zip(task.files, task.labels):
            assert label_of[f] == label
        # dataset order kept within a task
        positions = [mnist_train.files.index(f) for f in task.files]
        assert positions == sorted(positions)
        seen.extend(task.files)
    assert sorted(seen) == sorted(mnist_train.files)
    assert len(seen) == len(set(seen))


def test_initial_increment_and_list_increments():
    data = _toy()
    s = ClassIncremental(data, increment=2, initial_increment=4)
    assert [t.classes for t in s] == [(0, 1, 2, 3), (4, 5), (6, 7), (8, 9)]
    s = ClassIncremental(data, increment=[5, 1, 4])
    assert [t.classes for t in s] == [(0, 1, 2, 3, 4), (5,), (6, 7, 8, 9)]
    assert [len(t) for t in s] == [15, 3, 12]
    s = ClassIncremental(data, increment=np.int64(10))
    assert len(s) == 1 and len(s[0]) == len(data)


def test_class_order_and_seed():
    data = _toy()
    order = [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]
    s = ClassIncremental(data, increment=5, class_order=order)
    assert s.class_order == tuple(order)
    assert [t.classes for t in s] == [(3, 1, 4, 0, 5), (9, 2, 6, 8, 7)]
    # labels are the original labels, files in dataset order
    assert s[0].labels[:5] == (0, 1, 3, 4, 5)

    a = ClassIncremental(data, increment=2, seed=7)
    b = ClassIncremental(data, increment=2, seed=7)
    c = ClassIncremental(data, increment=2, seed=8)
    assert a.class_order == b.class_order
    assert sorted(a.class_order) == list(range(10))
    assert a.class_order != tuple(range(10))
    assert a.class_order != c.class_order
    assert [t.classes for t in a] == [t.classes for t in b]
    assert ClassIncremental(data, increment=2).class_order == tuple(range(10))
    # an explicit class_order wins over seed
    assert ClassIncremental(data, increment=2, class_order=order, seed=7).class_order == tuple(order)


def test_classes_up_to_and_cumulative():
    data = _toy()
    s = ClassIncremental(data, increment=2, class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    assert s.classes_up_to(0) == (9, 8)
    assert s.classes_up_to(2) == (9, 8, 7, 6, 5, 4)
    assert s.classes_up_to(-1) == tuple(range(9, -1, -1))
    cum = s.cumulative(1)
    assert cum.index == 1 and cum.classes == (9, 8, 7, 6)
    assert set(cum.files) == set(s[0].files) | set(s[1].files)
    assert len(cum) == len(s[0]) + len(s[1])
    positions = [data.files.index(f) for f in cum.files]
    assert positions == sorted(positions)
    full = s.cumulative(-1)
    assert full.files == data.files and full.labels == data.labels and full.index == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(increment=0), "increment must be >= 1"),
        (dict(increment=-2), "increment must be >= 1"),
        (dict(increment=3), "cannot be split"),
        (dict(increment=2, initial_increment=3), "cannot be split"),
        (dict(increment=2, initial_increment=0), "initial_increment must be >= 1"),
        (dict(increment=2, initial_increment=11), "exceeds"),
        (dict(increment=[5, 4]), "sum to 9"),
        (dict(increment=[5, 0, 5]), ">= 1"),
        (dict(increment=[]), ">= 1"),
        (dict(increment=[5, 5], initial_increment=5), "initial_increment"),
        (dict(increment=2, class_order=[0, 1, 2]), "permutation"),
        (dict(increment=2, class_order=[0, 0, 1, 2, 3, 4, 5, 6, 7, 8]), "permutation"),
        (dict(increment=2, class_order=list(range(1, 11))), "permutation"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassIncremental(_toy(), **kwargs)


def test_empty_data_and_bad_types():
    with pytest.raises(ValueError, match="empty"):
        ClassIncremental(LabelledFiles((), ()), increment=1)
    with pytest.raises(TypeError):
        ClassIncremental(_toy(), increment=2.0)


# -- sharding -----------------------------------------------------------------------------------


def test_reader_kwargs_and_shard_size():
    task = ClassIncremental(_toy(per_class=7), increment=3, initial_increment=4)[1]
    kw = task.reader_kwargs(shard_id=1, num_shards=3)
    assert kw == {"files": list(task.files), "labels": list(task.labels), "shard_id": 1, "num_shards": 3}
    for n in range(1, 30):
        sizes = [task.shard_size(shard_id=s, num_shards=n) for s in range(n)]
        assert sum(sizes) == len(task)
        assert max(sizes) - min(sizes) <= 1
    for bad in [dict(shard_id=3, num_shards=3), dict(shard_id=-1, num_shards=2), dict(shard_id=0, num_shards=0)]:
        with pytest.raises(ValueError):
            task.reader_kwargs(**bad)
        with pytest.raises(ValueError):
            task.shard_size(**bad)


def _read_shard(task: Task, shard_id: int, num_shards: int, batch_size: int):
    """Run a real CPU DALI pipeline over one shard for one epoch; return (meta, images, labels)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, seed=0)
    def pipe_def():
        encoded, labels = fn.readers.file(
            **task.reader_kwargs(shard_id=shard_id, num_shards=num_shards),
            pad_last_batch=True,
            name="Reader",
        )
        images = fn.decoders.image(encoded, device="cpu", output_type=types.GRAY)
        return images, labels

    pipe = pipe_def()
    pipe.build()
    meta = pipe.reader_meta("Reader")
    shard = task.shard_size(shard_id=shard_id, num_shards=num_shards)
    images, labels = [], []
    for _ in range(math.ceil(shard / batch_size)):
        out_images, out_labels = pipe.run()
        images.extend(np.array(out_images.at(i)) for i in range(len(out_images)))
        labels.extend(int(np.array(out_labels.at(i)).item()) for i in range(len(out_labels)))
    del pipe
    return meta, images[:shard], labels[:shard]


@pytest.mark.parametrize("num_shards, batch_size", [(1, 8), (3, 5), (4, 7)])
def test_shard_size_matches_real_dali_reader(mnist_train, num_shards, batch_size):
    from PIL import Image

    stream = ClassIncremental(mnist_train, increment=3, initial_increment=4)
    task = stream[1]  # classes 4, 5, 6 -> 30 samples with PER_CLASS=12
    start = 0
    for shard_id in range(num_shards):
        meta, images, labels = _read_shard(task, shard_id, num_shards, batch_size)
        size = task.shard_size(shard_id=shard_id, num_shards=num_shards)
        assert meta["epoch_size"] == len(task)
        assert meta["number_of_shards"] == num_shards and meta["shard_id"] == shard_id
        # with pad_last_batch, DALI pads every shard to the largest shard's size
        largest = max(task.shard_size(shard_id=s, num_shards=num_shards) for s in range(num_shards))
        assert largest == math.ceil(len(task) / num_shards)
        assert meta["epoch_size_padded"] == num_shards * largest
        assert len(labels) == size
        expected = slice(start, start + size)
        assert labels == list(task.labels[expected])
        # label/image pairing proved by content: decoded pixels == the PNG's pixels
        for k in sorted({0, size // 2, size - 1}):
            png = np.asarray(Image.open(task.files[expected][k]))
            assert images[k].shape == (28, 28, 1)
            np.testing.assert_array_equal(images[k][:, :, 0], png)
        start += size
    assert start == len(task)


def test_cumulative_task_reads_in_dali(mnist_train):
    cum = ClassIncremental(mnist_train, increment=2).cumulative(1)
    meta, images, labels = _read_shard(cum, 0, 1, 16)
    assert meta["epoch_size"] == len(cum) == 4 * (PER_CLASS - round(0.2 * PER_CLASS))
    assert labels == list(cum.labels)
    assert sorted(set(labels)) == [0, 1, 2, 3]
