"""The DALI stage: a mixing pipeline fed by the user's own pipeline.

DALI does not let an operator change the batch size, so the stage is the
source of a second pipeline (batch ``b + r``): an ``external_source`` whose
callback, :class:`Mixer`, runs the user's pipeline for ``b`` fresh samples,
writes them and up to ``r`` representatives into one output batch, and
stores the fresh samples in the buffer. Everything after the stage (random
crops, flips, normalisation) then applies to fresh samples and
representatives alike, and any DALI framework iterator consumes the result.

One idea per module:

- :mod:`.api`: ``dr.fn.rehearsal`` (checks, the ``external_source``) and the
  questions users ask of a stage (``steps_per_epoch``, ``epoch_size``);
- :mod:`.mixer`: a step (fresh rows, representatives, epochs, static batches);
- :mod:`.source`: the user's pipeline as a stream of rows;
- :mod:`.handover`: the output ring and its hand-over to DALI (ordering, depth,
  layouts);
- :mod:`.worker`: the background thread that prepares steps ahead;
- :mod:`dali_rehearsal.epochs`: epochs and last-batch policies.
"""

from ..epochs import LastBatchPolicy
from .api import epoch_size, rehearsal, stage_of, steps_per_epoch
from .handover import FILLER, FRESH, REPLAYED, Handover
from .mixer import Mixer
from .source import SourceStream, runs_with_stream
from .worker import Worker

__all__ = ["Mixer", "LastBatchPolicy", "rehearsal", "stage_of", "steps_per_epoch",
           "epoch_size", "Handover", "SourceStream", "Worker", "runs_with_stream",
           "FRESH", "REPLAYED", "FILLER"]
