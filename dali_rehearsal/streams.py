"""Class-incremental task sequences for DALI's file reader.

A *class-incremental* stream splits a labelled image set into a sequence of
tasks, each introducing classes never seen before.  Every :class:`Task` is a
plain list of files and labels that plugs straight into
``nvidia.dali.fn.readers.file`` through :meth:`Task.reader_kwargs`, so one
DALI pipeline per task (plus a rehearsal buffer) is all a training loop needs.

Labels are always the dataset's original class labels (the single-head
class-incremental setting): a model sees label ``7`` as ``7`` in every task.

Mapping to names users of other continual-learning libraries know:

=========================================  ====================================================
dali_rehearsal                             continuum / Avalanche
=========================================  ====================================================
``ClassIncremental(data, increment=2)``    continuum ``ClassIncremental(ds, increment=2)``;
                                           Avalanche ``nc_benchmark(..., n_experiences=N // 2,
                                           task_labels=False)``
``initial_increment=50``                   continuum ``initial_increment=50``
``increment=[4, 3, 3]``                    continuum ``increment=[4, 3, 3]``;
                                           Avalanche ``per_exp_classes={0: 4, 1: 3, 2: 3}``
``class_order=[...]``                      continuum ``class_order=[...]``;
                                           Avalanche ``fixed_class_order=[...]``
``seed=0`` (shuffled class order)          Avalanche ``nc_benchmark(..., seed=0)`` (same idea,
                                           but the shuffled orders differ)
``len(s)``, ``s[i]``, ``for task in s``    continuum ``len(scenario)``, ``scenario[i]``;
                                           Avalanche ``benchmark.train_stream``
``s.cumulative(i)``                        joint training on tasks ``0..i`` (upper bound)
=========================================  ====================================================

(``N`` is the number of classes.)

Example::

    from nvidia.dali import fn, pipeline_def, types
    from dali_rehearsal.streams import ClassIncremental, LabelledFiles

    @pipeline_def
    def task_pipeline(task, shard_id, num_shards):
        jpegs, labels = fn.readers.file(
            **task.reader_kwargs(shard_id=shard_id, num_shards=num_shards),
            random_shuffle=True, name="Reader")
        images = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB)
        return images, labels

    stream = ClassIncremental(LabelledFiles.from_folder("/data/train"), increment=2)
    for task in stream:
        pipe = task_pipeline(task, 0, 1, batch_size=64, num_threads=4, device_id=0)
        pipe.build()
        steps_per_epoch = -(-task.shard_size() // 64)
        ...
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np

from .checks import check_int

__all__ = ["LabelledFiles", "Task", "ClassIncremental"]

_DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _normalise(files, labels) -> tuple[tuple[str, ...], tuple[int, ...]]:
    files = tuple(os.fspath(f) for f in files)
    labels = tuple(check_int(label, "label") for label in labels)
    if len(files) != len(labels):
        raise ValueError(f"files and labels differ in length: {len(files)} files, {len(labels)} labels")
    return files, labels


def _check_shard(shard_id, num_shards) -> tuple[int, int]:
    shard_id = check_int(shard_id, "shard_id")
    num_shards = check_int(num_shards, "num_shards")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must satisfy 0 <= shard_id < num_shards={num_shards}, got {shard_id}")
    return shard_id, num_shards


@dataclass(frozen=True)
class LabelledFiles:
    """A labelled image set: parallel tuples of file paths and integer labels.

    Any iterables passed in are stored as tuples (paths as ``str``, labels as
    ``int``); they must have the same length.
    """

    files: tuple[str, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        files, labels = _normalise(self.files, self.labels)
        object.__setattr__(self, "files", files)
        object.__setattr__(self, "labels", labels)

    @classmethod
    def from_folder(
        cls, root: Union[str, os.PathLike], *, extensions: Sequence[str] = _DEFAULT_EXTENSIONS
    ) -> "LabelledFiles":
        """Read an image folder laid out as ``root/<class>/<file>`` (one sub-folder per class).

        Classes are the sorted sub-folder names (hidden names starting with ``.``
        are skipped).  A file's label is the index of its class folder in that
        sorted order -- the labelling ``fn.readers.file(file_root=root)`` uses --
        unless *all* class names are integers, in which case the label is
        ``int(name)``.  Files are found recursively below each class folder,
        matched case-insensitively on ``extensions`` and sorted by path, so the
        result is deterministic.
        """
        root = pathlib.Path(root)
        if not root.is_dir():
            raise NotADirectoryError(f"{root} is not a directory")
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        class_dirs = sorted(
            (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda p: p.name,
        )
        names = [p.name for p in class_dirs]
        try:
            int_labels = [int(n) for n in names]
        except ValueError:
            int_labels = None
        if int_labels is not None:
            if len(set(int_labels)) != len(int_labels):
                raise ValueError(f"class folders of {root} map to duplicate integer labels: {names}")
            order = sorted(range(len(names)), key=lambda i: int_labels[i])
            pairs = [(class_dirs[i], int_labels[i]) for i in order]
        else:
            pairs = [(d, i) for i, d in enumerate(class_dirs)]
        files: list[str] = []
        labels: list[int] = []
        for class_dir, label in pairs:
            found = sorted(
                p
                for p in class_dir.rglob("*")
                if p.suffix.lower() in exts
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
            )
            files.extend(str(p) for p in found)
            labels.extend([label] * len(found))
        return cls(tuple(files), tuple(labels))

    @property
    def classes(self) -> tuple[int, ...]:
        """The sorted distinct labels."""
        return tuple(sorted(set(self.labels)))

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, classes: Iterable[int]) -> "LabelledFiles":
        """Only the samples whose label is in ``classes``, in their original order.

        Raises ``ValueError`` if a requested class does not occur in the data.
        """
        wanted = {check_int(c, "class") for c in classes}
        missing = wanted - set(self.labels)
        if missing:
            raise ValueError(f"classes not present in the data: {sorted(missing)}")
        keep = [i for i, label in enumerate(self.labels) if label in wanted]
        return LabelledFiles(tuple(self.files[i] for i in keep), tuple(self.labels[i] for i in keep))


@dataclass(frozen=True)
class Task:
    """One task of a class-incremental stream.

    Attributes:
        index: position of the task in its stream (0-based).
        classes: the task's classes, in the stream's class order.
        files, labels: the task's samples (dataset order) with their original labels.
    """

    index: int
    classes: tuple[int, ...]
    files: tuple[str, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        files, labels = _normalise(self.files, self.labels)
        object.__setattr__(self, "index", check_int(self.index, "index"))
        object.__setattr__(self, "classes", tuple(check_int(c, "class") for c in self.classes))
        object.__setattr__(self, "files", files)
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return len(self.files)

    def reader_kwargs(self, *, shard_id: int = 0, num_shards: int = 1) -> dict:
        """Keyword arguments for ``nvidia.dali.fn.readers.file`` reading this task.

        Returns ``dict(files=[...], labels=[...], shard_id=..., num_shards=...)``;
        add reader options such as ``random_shuffle`` or ``name`` yourself.
        """
        shard_id, num_shards = _check_shard(shard_id, num_shards)
        return {
            "files": list(self.files),
            "labels": list(self.labels),
            "shard_id": shard_id,
            "num_shards": num_shards,
        }

    def shard_size(self, *, shard_id: int = 0, num_shards: int = 1) -> int:
        """Number of samples DALI's reader assigns to shard ``shard_id`` of ``num_shards``.

        DALI's shard ``s`` of ``n`` over ``N`` samples spans
        ``[floor(s*N/n), floor((s+1)*N/n))``; the sizes over all shards sum to ``len(self)``.
        """
        shard_id, num_shards = _check_shard(shard_id, num_shards)
        n = len(self)
        return (shard_id + 1) * n // num_shards - shard_id * n // num_shards


class ClassIncremental:
    """Split a :class:`LabelledFiles` set into a class-incremental sequence of :class:`Task`.

    Args:
        data: the labelled images to split (must not be empty).
        increment: classes per task, or a sequence giving each task's class count
            (which must sum to the number of classes).
        initial_increment: classes in the first task (default: ``increment``);
            only valid with an integer ``increment``.  The remaining classes must
            divide evenly into tasks of ``increment`` classes.
        class_order: order in which classes are introduced; must be a permutation
            of ``data.classes``.
        seed: if given (and ``class_order`` is not), the classes are shuffled with
            ``np.random.default_rng(seed)``; otherwise they are introduced in sorted order.

    Tasks keep the dataset's original labels and the dataset's file order.
    """

    def __init__(
        self,
        data: LabelledFiles,
        *,
        increment: Union[int, Sequence[int]],
        initial_increment: Union[int, None] = None,
        class_order: Union[Sequence[int], None] = None,
        seed: Union[int, None] = None,
    ) -> None:
        if not isinstance(data, LabelledFiles):
            data = LabelledFiles(data.files, data.labels)
        if len(data) == 0:
            raise ValueError("cannot build a class-incremental stream from empty data")
        classes = data.classes
        n_classes = len(classes)

        if class_order is not None:
            order = tuple(check_int(c, "class_order entry") for c in class_order)
            if len(set(order)) != len(order) or set(order) != set(classes):
                raise ValueError(
                    f"class_order must be a permutation of the data's classes {list(classes)}, "
                    f"got {list(order)}"
                )
        elif seed is not None:
            order = tuple(int(c) for c in np.random.default_rng(seed).permutation(np.asarray(classes)))
        else:
            order = classes

        if isinstance(increment, Iterable):
            if initial_increment is not None:
                raise ValueError("initial_increment cannot be combined with a list of increments")
            counts = tuple(check_int(c, "increment") for c in increment)
            if not counts or any(c < 1 for c in counts):
                raise ValueError(f"every increment must be >= 1, got {list(counts)}")
            if sum(counts) != n_classes:
                raise ValueError(
                    f"increments {list(counts)} sum to {sum(counts)} but the data has {n_classes} classes"
                )
        else:
            step = check_int(increment, "increment")
            if step < 1:
                raise ValueError(f"increment must be >= 1, got {step}")
            first = step if initial_increment is None else check_int(initial_increment, "initial_increment")
            if first < 1:
                raise ValueError(f"initial_increment must be >= 1, got {first}")
            if first > n_classes:
                raise ValueError(f"initial_increment={first} exceeds the number of classes ({n_classes})")
            rest = n_classes - first
            if rest % step:
                raise ValueError(
                    f"{n_classes} classes cannot be split into a first task of {first} classes "
                    f"and further tasks of {step} classes (increments would not sum to {n_classes})"
                )
            counts = (first,) + (step,) * (rest // step)

        self._data = data
        self._order = order
        self._counts = counts
        self._ends = tuple(int(e) for e in np.cumsum(counts))
        self._tasks = tuple(self._make_task(i, self._task_classes(i)) for i in range(len(counts)))

    # -- helpers -----------------------------------------------------------------------------
    def _index(self, task_index) -> int:
        i = check_int(task_index, "task index")
        n = len(self._counts)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"task index {task_index} out of range for a stream of {n} tasks")
        return i

    def _task_classes(self, i: int) -> tuple[int, ...]:
        start = self._ends[i - 1] if i else 0
        return self._order[start : self._ends[i]]

    def _make_task(self, index: int, classes: tuple[int, ...]) -> Task:
        wanted = set(classes)
        keep = [j for j, label in enumerate(self._data.labels) if label in wanted]
        return Task(
            index=index,
            classes=classes,
            files=tuple(self._data.files[j] for j in keep),
            labels=tuple(self._data.labels[j] for j in keep),
        )

    # -- public API --------------------------------------------------------------------------
    @property
    def data(self) -> LabelledFiles:
        """The labelled set the stream was built from."""
        return self._data

    @property
    def class_order(self) -> tuple[int, ...]:
        """All classes in the order tasks introduce them."""
        return self._order

    @property
    def increments(self) -> tuple[int, ...]:
        """Number of classes in each task."""
        return self._counts

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks)

    def __getitem__(self, task_index: int) -> Task:
        return self._tasks[self._index(task_index)]

    def classes_up_to(self, task_index: int) -> tuple[int, ...]:
        """All classes seen in tasks ``0..task_index`` (inclusive), in class order."""
        return self._order[: self._ends[self._index(task_index)]]

    def cumulative(self, task_index: int) -> Task:
        """The union of tasks ``0..task_index`` as one :class:`Task` (``index=task_index``).

        Useful for joint-training ("retrain from scratch") baselines; files are in dataset order.
        """
        i = self._index(task_index)
        return self._make_task(i, self.classes_up_to(i))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self._data)} samples, {len(self._order)} classes, "
            f"{len(self)} tasks, increments={list(self._counts)})"
        )
