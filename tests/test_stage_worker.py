"""The stage's background worker and its hand-over, as a training loop sees them.

Real MNIST PNG files decoded by DALI CPU pipelines.

- After a source batch that fails, the worker prepares nothing more until the
  loop has seen the error: what the buffer holds when the error reaches the
  loop does not depend on timing, and nothing past the failed batch is
  inserted before then. The loop can go on after it: the next batches are the
  source's next ones, the failed one is neither delivered nor stored.
- A loop that asks a stopped stage for more gets an error, not a hang.
- A source pipeline the user ran before handing it to the stage still feeds it
  (the stage runs a source with ``schedule_run()`` + ``outputs()`` unless the
  source was already driven with ``run()``).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

import dali_rehearsal as dr

pytest.importorskip("nvidia.dali")
from nvidia.dali import fn, pipeline_def, types  # noqa: E402
from utils import pixel_key  # noqa: E402

B, R = 6, 2


@pytest.fixture(scope="module")
def classes(mnist):
    """PNG files of the first two classes of the training digits, and each
    image's pixels -> label."""
    data = dr.LabelledFiles.from_folder(mnist[0])
    by_class = {}
    for path, label in zip(data.files, data.labels):
        by_class.setdefault(int(label), []).append(path)
    label_of = {np.asarray(Image.open(p).convert("L")).tobytes(): k
                for k, paths in by_class.items() for p in paths}
    return by_class, label_of


def _mixing(files, labels, buffer, prepare_ahead=2, prefetch=1):
    @pipeline_def(batch_size=B, num_threads=1, device_id=None, seed=1)
    def decode():
        jpegs, y = fn.readers.file(files=files, labels=labels, name="Reader")
        return fn.decoders.image(jpegs, device="cpu", output_type=types.GRAY), y - 1

    @pipeline_def(batch_size=B + R, num_threads=1, device_id=None, seed=2,
                  prefetch_queue_depth=prefetch)
    def train(src):
        return tuple(dr.fn.rehearsal(src, buffer=buffer, replay_flag=True,
                                     prepare_ahead=prepare_ahead))

    pipe = train(decode())
    pipe.build()
    return pipe


def test_no_look_ahead_past_a_failed_batch_until_the_loop_saw_it(classes):
    """Labels are ``label - 1``: the files of class 0 make the third source
    batch fail (a negative label), the batches around it are class 1."""
    by_class, label_of = classes
    ones = by_class[1]
    files = ones[:2 * B] + by_class[0][:B] + ones[2 * B:]
    labels = [2] * (2 * B) + [0] * B + [2] * (len(ones) - 2 * B)   # stored as 1, -1, 1
    buffer = dr.RehearsalBuffer(capacity=100, num_representatives=R, device="cpu", seed=0)
    pipe = _mixing(files, labels, buffer)
    # the first run takes step 1 (prefetch depth 1); the worker has built steps 2
    # and 3 (the failing one) by the time the loop asks again
    images, *_ = (o.as_array() for o in pipe.run())
    assert [label_of[pixel_key(x)] for x in images[:B]] == [1] * B
    deadline = time.monotonic() + 30
    while buffer.num_seen < 2 * B and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)                     # time enough to run further ahead, if it did
    assert buffer.num_seen == 2 * B     # steps 1 and 2 stored; nothing past the failure
    images, *_ = (o.as_array() for o in pipe.run())        # step 2
    assert [label_of[pixel_key(x)] for x in images[:B]] == [1] * B
    with pytest.raises(ValueError, match="non-negative"):
        pipe.run()                      # step 3: the source's third batch failed
    assert buffer.num_seen == 2 * B
    # the loop goes on: the source's fourth batch, the failed one dropped
    images, labels, flags = (o.as_array() for o in pipe.run())
    fresh = flags.reshape(-1) == dr.stage.FRESH
    assert fresh.sum() == B and (labels.reshape(-1) == 1).all()
    assert {pixel_key(x) for x in images[fresh]} == {
        pixel_key(np.asarray(Image.open(p).convert("L"))) for p in ones[2 * B:3 * B]}
    assert buffer.num_seen >= 3 * B
    assert (buffer.stored_labels() == 1).all()
    buffer.close()


def test_a_stopped_stage_raises_instead_of_hanging(classes):
    by_class, _ = classes
    files = by_class[1]
    buffer = dr.RehearsalBuffer(capacity=30, num_representatives=R, device="cpu", seed=0)
    pipe = _mixing(files, [2] * len(files), buffer)
    pipe.run()
    dr.stage.stage_of(pipe).stop()      # a newer stage took the buffer over
    with pytest.raises(RuntimeError, match="stopped"):
        for _ in range(10):             # what was prepared, then the error
            pipe.run()
    buffer.close()


def test_a_source_run_by_the_user_first_still_feeds_the_stage():
    """A reader-less source counting its samples: the stage delivers the
    batches after the one the user took with ``run()``."""
    counter = {"next": 0}

    def count():
        ids = np.arange(counter["next"], counter["next"] + B)
        counter["next"] += B
        return [np.full((2, 2), i % 256, np.uint8) for i in ids], [np.array([i]) for i in ids]

    @pipeline_def(batch_size=B, num_threads=1, device_id=None, seed=1)
    def counting():
        images, labels = fn.external_source(source=count, num_outputs=2, batch=True,
                                            dtype=[types.UINT8, types.INT64])
        return images, labels

    src = counting()
    src.build()
    first = src.run()[1].as_array().reshape(-1).tolist()        # the user's own run
    assert first == list(range(B))
    buffer = dr.RehearsalBuffer(capacity=50, num_representatives=R, device="cpu", seed=0)

    @pipeline_def(batch_size=B + R, num_threads=1, device_id=None, seed=2)
    def train(s):
        return tuple(dr.fn.rehearsal(s, buffer=buffer, prepare_ahead=0))

    pipe = train(src)
    pipe.build()
    seen = []
    for _ in range(4):
        images, labels = (o.as_array() for o in pipe.run())
        seen.extend(labels.reshape(-1)[:B].tolist())
        assert (images[:B, 0, 0] == labels.reshape(-1)[:B] % 256).all()
    # DALI's source prefetch ran ahead of the user's run; the stage takes what follows
    assert seen == sorted(seen) and len(set(seen)) == len(seen) and min(seen) >= B
    buffer.close()


def _run_task(files, labels, buffer, epochs):
    """``epochs`` epochs through DALIGenericIterator(auto_reset=False), reset by
    hand before each epoch but the first; returns the fresh labels delivered
    and the digest of every batch."""
    import hashlib

    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    pipe = _mixing(files, labels, buffer)
    it = DALIGenericIterator(pipe, ["images", "labels", "flag"])
    digest, fresh = hashlib.sha1(), 0
    for epoch in range(epochs):
        if epoch:
            it.reset()
        for batch in it:
            images, flags = batch[0]["images"].numpy(), batch[0]["flag"].numpy().reshape(-1)
            digest.update(images.tobytes())
            fresh += int((flags == dr.stage.FRESH).sum())
    return pipe, it, fresh, digest.hexdigest()


def test_nothing_is_prepared_across_an_epoch_end_until_the_next_epoch_is_asked_for(classes):
    """After a task's last epoch the stage inserts nothing more: the buffer has
    received exactly the samples trained on (given time to run ahead, it does
    not), and the next task's batches are the same run after run."""
    by_class, _ = classes
    files = by_class[1][:5 * B + 3]         # 6 steps per epoch, the last one short
    labels = [2] * len(files)
    runs = []
    for _ in range(2):
        buffer = dr.RehearsalBuffer(capacity=20, num_representatives=R, device="cpu", seed=0)
        pipe, it, fresh, first = _run_task(files, labels, buffer, epochs=2)
        assert fresh == 2 * len(files)
        time.sleep(0.5)                     # time enough to run into a third epoch, if it did
        assert buffer.num_seen == 2 * len(files)
        del pipe, it
        files2 = by_class[0][:3 * B]
        _, _, _, second = _run_task(files2, [1] * len(files2), buffer, epochs=1)
        runs.append((first, second, buffer.num_seen, buffer.class_counts()))
        buffer.close()
    assert runs[0] == runs[1]


def _events(pipe, epochs):
    """What a loop driving ``pipe.run()`` sees over ``epochs`` epochs: the
    fresh rows' labels of each batch, or the error, in order."""
    events = []
    for _ in range(epochs):
        while True:
            try:
                _, labels, flags = (o.as_array() for o in pipe.run())
            except StopIteration:
                pipe.reset()
                events.append("end")
                break
            except ValueError as e:
                events.append(f"error: {str(e)[:40]}")
                continue
            fresh = flags.reshape(-1) == dr.stage.FRESH
            events.append(sorted(labels.reshape(-1)[fresh].tolist()))
    return events


def test_a_source_error_at_an_epoch_start_keeps_its_place(classes):
    """Between epochs the worker takes the next epoch's first fresh rows ahead
    (buffer untouched); a source batch that fails then is still raised after
    the batches before it and before those after it, as without a worker."""
    by_class, _ = classes
    ones, zeros = by_class[1], by_class[0]
    files = ones[:B] + zeros[:B] + ones[B:2 * B]
    labels = [2] * B + [0] * B + [2] * B          # stored as 1, -1 (fails), 1
    seen = {}
    for ahead in (0, 2):
        buffer = dr.RehearsalBuffer(capacity=40, num_representatives=R, device="cpu", seed=0)
        seen[ahead] = (_events(_mixing(files, labels, buffer, prepare_ahead=ahead), 3),
                       buffer.num_seen)
        buffer.close()
    events, _ = seen[0]
    assert sum(e != "end" and not isinstance(e, list) for e in events) == 3   # once per epoch
    assert seen[2] == seen[0]


@pytest.mark.parametrize("prefetch, ahead, steps", [(2, 2, 3), (1, 2, 2), (3, 1, 3), (2, 0, 0)])
def test_between_epochs_the_worker_takes_what_dali_asks_for_at_reset(classes, prefetch, ahead,
                                                                    steps):
    """DALI's reset asks the stage for ``prefetch`` batches at once and the
    first ``next()`` for one more: between epochs the worker takes the fresh
    rows of that many steps (at most ``prepare_ahead + 2``, what the ring
    allows), the buffer untouched; the next epoch is the one it would be
    without a worker."""
    by_class, _ = classes
    files = by_class[1][:4 * B]
    runs = {}
    for a in (ahead, 0):
        buffer = dr.RehearsalBuffer(capacity=40, num_representatives=R, device="cpu", seed=0)
        pipe = _mixing(files, [2] * len(files), buffer, prepare_ahead=a, prefetch=prefetch)
        stage = dr.stage.stage_of(pipe)
        events = []
        for epoch in range(2):
            while True:
                try:
                    events.append([o.as_array().tobytes() for o in pipe.run()])
                except StopIteration:
                    break
            seen = buffer.num_seen
            deadline = time.monotonic() + 30
            while len(stage._filled) < (steps if a else 0) and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)                 # and no more than that
            assert len(stage._filled) == (steps if a else 0), (epoch, len(stage._filled))
            assert buffer.num_seen == seen          # the buffer untouched between epochs
            pipe.reset()
        runs[a] = (events, buffer.num_seen)
        buffer.close()
    assert runs[ahead] == runs[0]


def _static_mixing(files, labels, buffer, *, continuous, prefetch=2, ahead=2):
    @pipeline_def(batch_size=B, num_threads=1, device_id=None, seed=1)
    def decode():
        jpegs, y = fn.readers.file(files=files, labels=labels, name="Reader",
                                   random_shuffle=True, seed=3)
        return fn.decoders.image(jpegs, device="cpu", output_type=types.GRAY), y

    @pipeline_def(batch_size=B + R, num_threads=1, device_id=None, seed=2,
                  prefetch_queue_depth=prefetch)
    def train(src):
        return tuple(dr.fn.rehearsal(src, buffer=buffer, replay_flag=True, prepare_ahead=ahead,
                                     static_batch=True, last_batch_policy="DROP",
                                     continuous_epochs=continuous))

    pipe = train(decode())
    pipe.build()
    return pipe


@pytest.mark.parametrize("ahead", [0, 2])
def test_continuous_epochs_deliver_the_same_batches_counted_by_the_iterator(classes, ahead):
    """With continuous_epochs the stage never ends the mixing pipeline's
    epoch; DALI's iterator counts it (size=epoch_size(pipe)). Epoch after
    epoch it delivers exactly the batches the stage delivers when it ends
    each epoch itself, the same number of steps, and its reset does not wait
    for DALI to prepare batches again."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
    by_class, _ = classes
    files = by_class[1][:9] + by_class[0][:10]        # 19 files, batches of 6: 3 steps (DROP)
    labels = [1] * 9 + [0] * 10
    epochs = {}
    for continuous in (False, True):
        buffer = dr.RehearsalBuffer(capacity=40, num_representatives=R, device="cpu", seed=0)
        pipe = _static_mixing(files, labels, buffer, continuous=continuous, ahead=ahead)
        kwargs = {"size": dr.epoch_size(pipe)} if continuous else {}
        it = DALIGenericIterator(pipe, ["images", "labels", "flags"], auto_reset=True, **kwargs)
        seen = []
        for epoch in range(3):
            batches = [tuple(d[0][k].numpy().tobytes() for k in ("images", "labels", "flags"))
                       for d in it]
            assert len(batches) == dr.steps_per_epoch(pipe, epoch) == 3
            seen.append(batches)
        epochs[continuous] = seen
        buffer.close()
    assert epochs[True] == epochs[False]


def test_continuous_epochs_need_static_batches_and_a_bool(classes):
    by_class, _ = classes
    buffer = dr.RehearsalBuffer(capacity=40, num_representatives=R, device="cpu", seed=0)

    @pipeline_def(batch_size=B, num_threads=1, device_id=None, seed=1)
    def decode():
        jpegs, y = fn.readers.file(files=by_class[1][:12], labels=[1] * 12, name="Reader")
        return fn.decoders.image(jpegs, device="cpu", output_type=types.GRAY), y

    @pipeline_def(batch_size=B + R, num_threads=1, device_id=None)
    def dynamic(src):
        return tuple(dr.fn.rehearsal(src, buffer=buffer, continuous_epochs=True))

    @pipeline_def(batch_size=B + R, num_threads=1, device_id=None)
    def not_a_bool(src):
        return tuple(dr.fn.rehearsal(src, buffer=buffer, static_batch=True,
                                     last_batch_policy="DROP", continuous_epochs="yes"))

    with pytest.raises(ValueError, match="needs static_batch=True"):
        dynamic(decode())
    with pytest.raises(TypeError, match="continuous_epochs must be True or False"):
        not_a_bool(decode())
