"""``dr.fn.rehearsal``: the stage inside a mixing pipeline, and what users ask of it."""

from __future__ import annotations

import logging
import numbers
import weakref

from .. import profiling as _prof
from ..buffer import RehearsalBuffer
from ..checks import check_int
from ..epochs import LastBatchPolicy, policy_name
from .mixer import Mixer

__all__ = ["rehearsal", "stage_of", "steps_per_epoch", "epoch_size", "DALI_EXTRAS"]

#: How to install DALI, named in the error raised when it is missing.
DALI_EXTRAS = ('pip install "dali-rehearsal[dali]" (DALI for CUDA 12 drivers, and for '
               'machines without a GPU) or pip install "dali-rehearsal[dali-cuda13]" (DALI for '
               'CUDA 13 drivers)')

#: mixing pipeline -> its stages. This is what keeps a stage alive: the weak
#: key lets a dropped pipeline take its stages with it at once (a stage holds
#: no reference to its mixing pipeline).
_stages: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

log = logging.getLogger("dali_rehearsal")


class _Callback:
    """What DALI's ``external_source`` calls: a weak handle on the stage.

    DALI's external_source objects (operator instances and their group)
    reference each other, so they, and the callback they hold, live until
    the garbage collector runs. Holding the stage weakly there lets the stage,
    its worker thread and its source pipeline go as soon as the mixing
    pipeline is dropped.
    """

    __slots__ = ("_stage", "__weakref__")

    def __init__(self, stage: Mixer):
        self._stage = weakref.ref(stage)

    def __call__(self):
        stage = self._stage()
        if stage is None:
            raise RuntimeError("the rehearsal stage of this pipeline was freed")
        with _prof.phase("stage"):
            return stage.handover.with_layouts(stage())


_CHECKPOINT_ADVICE = (
    "The rehearsal stage does not take part in DALI's checkpointing: a restored pipeline "
    "would start its epoch and its buffer from scratch without a word. Checkpoint the buffer "
    "itself (buffer.save(path) / buffer.load(path), or buffer.state_dict() / "
    "load_state_dict()) between tasks or epochs, and build new pipelines after loading it")


def _dali():
    """DALI's ``fn``, ``types`` and ``Pipeline``; a missing DALI is an error
    that says which extra installs it."""
    try:
        from nvidia.dali import fn as dali_fn
        from nvidia.dali import types
        from nvidia.dali.pipeline import Pipeline
    except ImportError as e:
        raise ModuleNotFoundError(
            f"dr.fn.rehearsal needs NVIDIA DALI, which is not installed ({e}): {DALI_EXTRAS}. "
            "The buffer alone (RehearsalBuffer.mix) works without DALI", name="nvidia.dali"
        ) from e
    return dali_fn, types, Pipeline


def _describe(value) -> str:
    """``NoneType``, or ``function 'decode'``: what a misused argument was."""
    name = getattr(value, "__name__", None)
    if callable(value) and name is not None and not isinstance(value, type):
        return f"the function {name!r}"
    return type(value).__name__


def _check_checkpointing(pipe, what: str) -> None:
    # DALI 2.4 keeps these settings in the pipeline's attributes; there is no
    # public accessor for enable_checkpointing (is_restored_from_checkpoint is
    # set only at build). A DALI that moved them gets a warning, not silence:
    # tests/test_stage_sources.py fails then, and says where to look.
    if not (hasattr(pipe, "_enable_checkpointing") and hasattr(pipe, "_checkpoint")):
        log.warning("this DALI version does not say whether the %s has enable_checkpointing "
                    "(no Pipeline._enable_checkpointing): DALI's own checkpoints of the "
                    "rehearsal stage are not refused. %s", what, _CHECKPOINT_ADVICE)
        return
    enabled = bool(pipe._enable_checkpointing)
    restoring = pipe._checkpoint is not None
    if enabled or restoring:
        setting = "is restored from a checkpoint" if restoring else "has enable_checkpointing=True"
        raise ValueError(f"the {what} {setting}. {_CHECKPOINT_ADVICE}")


def _check_devices(pipe, source, buffer: RehearsalBuffer) -> None:
    be = buffer.backend
    if not be.is_gpu:
        return   # host outputs go into any pipeline
    if pipe.device_id is None:
        raise ValueError(
            f"the buffer is on GPU {be.device_id} but the mixing pipeline has no device "
            f"(device_id=None): give it device_id={be.device_id}, or use a buffer with "
            "device='cpu'")
    if pipe.device_id != be.device_id:
        raise ValueError(
            f"the mixing pipeline runs on GPU {pipe.device_id} but the buffer's storage is on "
            f"GPU {be.device_id}: build the buffer while GPU {pipe.device_id} is current "
            f"(cupy.cuda.Device({pipe.device_id}).use()), or give the mixing pipeline "
            f"device_id={be.device_id}")
    if source.device_id is not None and source.device_id != be.device_id:
        raise ValueError(
            f"the source pipeline runs on GPU {source.device_id} but the buffer's storage is on "
            f"GPU {be.device_id}: give the source pipeline device_id={be.device_id}")


def rehearsal(source, *, buffer: RehearsalBuffer, reader_name: str | None = None,
              last_batch_policy=LastBatchPolicy.PARTIAL, replay_flag: bool = False,
              prepare_ahead: int = 2, static_batch: bool = False,
              continuous_epochs: bool = False):
    """Mixes representatives into the batches of ``source``, inside a pipeline.

    Call it in the definition of the *mixing* pipeline, whose batch size must
    be at least ``source``'s batch size plus ``buffer.num_representatives``::

        @pipeline_def(batch_size=56 + 7, num_threads=4, device_id=0)
        def train(source):
            images, labels = dr.fn.rehearsal(source, buffer=buffer)
            ...

    Args:
        source: the user's pipeline (not built, or built), used by this stage
            only; every output must have a fixed sample shape. One output is
            the label (``buffer.label_index``, the second by default); all
            outputs go through the buffer together.
        buffer: the :class:`RehearsalBuffer`. It outlives the pipelines: give
            the same buffer to the next task's pipelines.
        reader_name: the reader of ``source`` that sets the epoch; needed only
            when ``source`` has several readers. A source without a reader
            ends its epoch when it raises ``StopIteration``.
        last_batch_policy: DALI's ``LastBatchPolicy``; ``PARTIAL`` (default)
            delivers every fresh sample exactly once per epoch.
        replay_flag: add one more output, a uint8 per row: 0 for a fresh
            sample, 1 for a representative, 2 for a filler row (``static_batch``).
        prepare_ahead: steps the stage prepares ahead in a background thread
            (running the source pipeline, the exchange, the copies and the
            inserts while the training step runs). ``0`` does the work in the
            thread that drives the mixing pipeline, when DALI asks for it.
        static_batch: every batch has exactly ``b + r`` rows, from the first
            step to the last (needs ``FILL`` or ``DROP``, and a mixing
            pipeline of batch size ``b + r``). While the buffer holds fewer
            than ``r`` samples, the missing representatives are copies of the
            batch's own fresh rows, flagged 2.
        continuous_epochs: the stage does not end the mixing pipeline's
            epochs: it goes on into the next epoch, and the DALI iterator
            counts the steps (``DALIGenericIterator(pipe, ...,
            size=dr.epoch_size(pipe))``). DALI then keeps preparing batches
            across an epoch's end, as it does for a pipeline with a reader,
            instead of asking for its prefetch depth at once after the reset:
            an epoch starts as fast as any step. Needs ``static_batch=True``,
            a source with a reader, and, with global sampling, the same steps
            per epoch on every process. The buffer then also receives, when
            the loop stops after an epoch, the first steps of the next epoch
            it prepared (``prefetch_queue_depth + prepare_ahead + 1`` at
            most, the same in every run).

    Returns:
        The outputs of ``source``, then, for a buffer with ``feedback=``, one
        output per feedback field, ``written`` and ``ticket`` (see
        :class:`~dali_rehearsal.RehearsalBuffer`; filler rows carry their
        fresh row's ticket), then the flag: ``b`` fresh samples then up
        to ``r`` representatives, on the buffer's device, with the source's
        layouts.
    """
    dali_fn, types, Pipeline = _dali()
    pipe = Pipeline.current()
    if pipe is None:
        raise RuntimeError("dali_rehearsal.fn.rehearsal must be called inside the definition "
                           "of the mixing pipeline (a @pipeline_def function)")
    if not isinstance(source, Pipeline):
        hint = (": call the @pipeline_def function to make the pipeline, e.g. "
                "train(decode()) rather than train(decode)"
                if callable(source) and not isinstance(source, type) else "")
        raise TypeError(f"source must be a DALI Pipeline (your own pipeline, batch b), got "
                        f"{_describe(source)}{hint}")
    if not isinstance(buffer, RehearsalBuffer):
        raise TypeError(f"buffer must be a dali_rehearsal.RehearsalBuffer, got "
                        f"{_describe(buffer)}")
    prepare_ahead = check_int(prepare_ahead, "prepare_ahead", 0, error=ValueError)
    policy = policy_name(last_batch_policy)
    _check_checkpointing(pipe, "mixing pipeline")
    _check_checkpointing(source, "source pipeline")
    _check_devices(pipe, source, buffer)
    r, b = buffer.num_representatives, source.max_batch_size
    if r > pipe.max_batch_size:
        raise ValueError(f"num_representatives={r} is larger than the mixing pipeline's "
                         f"batch size {pipe.max_batch_size}")
    if pipe.max_batch_size - b < r:
        raise ValueError(
            f"the mixing pipeline's batch size ({pipe.max_batch_size}) must be at least the "
            f"source's batch size ({b}) + num_representatives ({r}) = {b + r}")
    if not isinstance(continuous_epochs, bool):
        raise TypeError(f"continuous_epochs must be True or False, got {continuous_epochs!r}")
    if continuous_epochs and not static_batch:
        raise ValueError("continuous_epochs=True needs static_batch=True: the DALI iterator "
                         "counts the epoch's samples (size=dr.epoch_size(pipe)), which needs "
                         "full batches")
    if static_batch:
        if policy == "PARTIAL":
            raise ValueError("static_batch=True needs last_batch_policy=FILL or DROP (PARTIAL "
                             "ends an epoch with a shorter batch)")
        if pipe.max_batch_size != b + r:
            raise ValueError(f"static_batch=True needs the mixing pipeline's batch size to be "
                             f"exactly b + r = {b} + {r} = {b + r}, got {pipe.max_batch_size}")
    num_outputs = source.num_outputs
    if num_outputs is None or num_outputs < 2:
        raise ValueError("the source pipeline must return at least two outputs: the samples "
                         "and their labels")
    if buffer.label_index >= num_outputs:
        raise ValueError(f"buffer.label_index={buffer.label_index} but the source pipeline "
                         f"has {num_outputs} outputs")
    depth = pipe.prefetch_queue_depth
    if isinstance(depth, dict):
        depth = depth["cpu_size"] * depth["gpu_size"]
    if buffer.closed:
        raise RuntimeError("a new rehearsal stage on a closed RehearsalBuffer: close() ended "
                           "its use (build a new buffer, or load a checkpoint into one)")
    mixer = Mixer(source, buffer.core, out_batch_size=pipe.max_batch_size, reader_name=reader_name,
                  last_batch_policy=policy, replay_flag=replay_flag,
                  ring_depth=int(depth) + 2, prepare_ahead=prepare_ahead,
                  static_batch=static_batch, continuous_epochs=bool(continuous_epochs))
    _stages.setdefault(pipe, []).append(mixer)
    # What the source declares about its outputs, declared again downstream.
    dtypes = [types.NO_TYPE if t is None else t for t in source.output_dtype()]
    ndims = list(source.output_ndim())
    # the feedback fields, their written flags and the tickets (dali_rehearsal.feedback)
    extra = buffer.core.feedback.extra_spec
    dtypes += [types.to_dali_type(f.dtype) for f in extra]
    ndims += [len(f.shape) for f in extra]
    if replay_flag:
        dtypes.append(types.UINT8)
        ndims.append(0)         # one scalar per row
    kwargs = dict(source=_Callback(mixer), num_outputs=num_outputs + len(extra) + int(replay_flag),
                  batch=True,
                  device=buffer.device)
    if any(t != types.NO_TYPE for t in dtypes):
        kwargs["dtype"] = dtypes
    if any(n is not None for n in ndims):
        kwargs["ndim"] = ndims
    if mixer.stream is None:
        kwargs["no_copy"] = True    # host arrays, read by DALI in place (see handover.py)
    else:
        # DALI copies each batch into its own memory on the stage's stream
        kwargs.update(no_copy=False, cuda_stream=mixer.stream)
    return list(dali_fn.external_source(**kwargs))


def _check_pipeline(pipe, what: str) -> None:
    try:
        from nvidia.dali.pipeline import Pipeline
    except ImportError:
        Pipeline = None
    if Pipeline is None or not isinstance(pipe, Pipeline):
        raise TypeError(
            f"{what} takes the mixing pipeline (a DALI Pipeline whose definition calls "
            f"dr.fn.rehearsal), got {_describe(pipe)}"
            + ("" if Pipeline is not None else f"; DALI is not installed: {DALI_EXTRAS}"))


def stage_of(pipe) -> Mixer:
    """The rehearsal stage of a mixing pipeline."""
    _check_pipeline(pipe, "stage_of()")
    return _stage(pipe)


def _stage(pipe) -> Mixer:
    stages = _stages.get(pipe, [])
    if len(stages) != 1:
        raise ValueError("this pipeline has no rehearsal stage (dr.fn.rehearsal)" if not stages
                         else "this pipeline has several rehearsal stages")
    return stages[0]


def steps_per_epoch(pipe, epoch: int = 0) -> int:
    """Batches the mixing pipeline ``pipe`` delivers in epoch ``epoch`` (0-based).

    The same count DALI's own iterator (``DALIGenericIterator(...,
    reader_name=...)``) gives over the source pipeline, for progress bars and
    step schedules. Epochs can differ in length (``FILL`` on an unpadded
    reader, shards of different sizes without ``stick_to_shard``).
    """
    _check_pipeline(pipe, "steps_per_epoch()")
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral):
        raise TypeError(f"epoch must be an integer >= 0 (0 for the first epoch), got "
                        f"{_describe(epoch)} {epoch!r}")
    epoch = int(epoch)
    stage = _stage(pipe)
    if stage.plan is None:
        raise ValueError("the source pipeline has no reader: its epoch ends when it raises "
                         "StopIteration, so the number of steps is not known in advance")
    if epoch < 0:
        raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
    return stage.plan.steps(epoch)


def epoch_size(pipe) -> int:
    """Samples per epoch of a mixing pipeline built with ``static_batch=True``:
    ``steps x (b + r)``, for ``DALIGenericIterator(pipe, ..., size=epoch_size(pipe))``
    (so that ``len(iterator)`` is the number of steps)."""
    _check_pipeline(pipe, "epoch_size()")
    stage = _stage(pipe)
    if not stage.static_batch:
        raise ValueError("epoch_size() needs a stage built with static_batch=True: DALI "
                         "iterators given size= require full batches")
    first = steps_per_epoch(pipe, 0)
    plan = stage.plan
    horizon = 2 * plan.reader.num_shards * plan.batch_size + 2
    lengths = {plan.steps(e) for e in range(horizon)}
    if len(lengths) > 1:
        raise ValueError(
            f"the epochs of this pipeline differ in length ({sorted(lengths)} steps): FILL on "
            "an unpadded reader carries samples across epochs. DALI iterators given size= need "
            "one length: use DROP or pad_last_batch=True in the reader, or count each epoch "
            "with steps_per_epoch(pipe, epoch)")
    return first * stage.out_batch_size
