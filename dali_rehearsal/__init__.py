"""dali-rehearsal: rehearsal buffers for continual learning inside NVIDIA DALI pipelines.

>>> import dali_rehearsal as dr
>>> buffer = dr.RehearsalBuffer(capacity=2000, num_representatives=7, device="cpu", seed=0)

See :class:`RehearsalBuffer` (also usable without DALI through ``buffer.mix``)
and :func:`dali_rehearsal.fn.rehearsal`, the DALI stage.
"""

import logging as _logging

from . import datasets, fn, profiling, streams
from ._backend import gpu_available
from .buffer import RehearsalBuffer
from .checkpoint import CheckpointError, ConcurrentSaveError
from .exchange import CollectiveMismatchError, MismatchError, RemoteError
from .policies import POLICIES
from .storage import FieldSpec
from .stage import LastBatchPolicy, epoch_size, steps_per_epoch
from .streams import ClassIncremental, LabelledFiles, Task

from .version import __version__

__all__ = ["RehearsalBuffer", "FieldSpec", "LastBatchPolicy", "POLICIES", "fn", "streams",
           "datasets", "profiling", "ClassIncremental", "LabelledFiles", "Task", "gpu_available",
           "steps_per_epoch", "epoch_size", "CheckpointError", "ConcurrentSaveError", "RemoteError",
           "MismatchError", "CollectiveMismatchError",
           "__version__"]

_logging.getLogger("dali_rehearsal").addHandler(_logging.NullHandler())
