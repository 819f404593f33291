"""Checkpoints of a :class:`~dali_rehearsal.RehearsalBuffer`: state dicts and
checkpoint directories.

Two ways to checkpoint a buffer, both validated completely before anything
changes (a bad checkpoint raises :class:`CheckpointError`, a ``ValueError``,
and leaves the buffer exactly as it was):

**State dicts** (:func:`state_dict`, :func:`load_state_dict`): one process's
shard as a dict of arrays and plain values (``str``, ``int``, ``float``,
``bool``, ``None``, lists and dicts with string keys). The arrays are PyTorch
CPU tensors when PyTorch can be imported, NumPy arrays otherwise; either kind
loads. With tensors, ``torch.save`` then ``torch.load(..., weights_only=True)``
round-trips the dict with no allow-listing. A state dict restores the same
shard (same rank and number of processes) and resumes with exactly the same
batches.

**Checkpoint directories** (:func:`save`, :func:`load`): no PyTorch and no
pickle. Every process writes its shard into the directory and the first one
writes a manifest last::

    path/manifest.json                       what the checkpoint holds, with
                                             the SHA-256 of every shard file
    path/shard-<id>-<rank>-of-<N>.npz        one shard: stored .npy members
                                             and a "meta" member (UTF-8 JSON)
    path/.dali-rehearsal.lock                the writers' lock

Writing is atomic, the directory is the library's own (one writer at a time;
a concurrent ``save`` raises :class:`ConcurrentSaveError`), loading costs
what the files hold whatever they declare, and a directory written by ``N``
processes loads on ``M`` processes (docs/checkpoints.md).

The entry points take the buffer's step object
(:class:`~dali_rehearsal.step.StepCore`, ``core``: its settings, ``store``,
``policy``, ``sampler``, ``backend``, ``wait_for_writes`` and
``mark_written``). The modules, one job each, from the top down:

- :mod:`.saving`, :mod:`.loading`: the collective calls ``save`` and
  ``load``, in steps that fail together on every process (:mod:`.calls`:
  over the buffer's exchange, or :class:`~dali_rehearsal.exchange.alone.AloneTransport` for one
  process: one code path);
- :mod:`.elastic`: a checkpoint loaded on another number of processes; the
  policy chooses which samples each process keeps
  (:meth:`~dali_rehearsal.policies.InsertionPolicy.redistribute`);
- :mod:`.state`: capture, PyTorch tensors, ``state_dict`` and
  ``load_state_dict``, applying a checked state;
- :mod:`.validation`: every check of a state against the loading buffer;
- :mod:`.manifest`, :mod:`.shards`: the directory's format (the manifest;
  the shard files, written and read back as states);
- :mod:`.directory`: what a directory holds that the library owns, and its
  one writer at a time (``flock``);
- :mod:`.atomic`: files written atomically and hashed;
- :mod:`.files`: reading a shard file without trusting what it declares,
  and :class:`CheckpointError`.
"""

from .directory import ConcurrentSaveError
from .files import CheckpointError
from .loading import load
from .saving import save
from .state import load_state_dict, state_dict

__all__ = ["CheckpointError", "ConcurrentSaveError", "state_dict", "load_state_dict", "save",
           "load"]
