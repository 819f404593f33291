"""Static shapes: ``static_batch=True`` gives ``b + r`` rows in every batch.

Real MNIST PNGs decoded by DALI CPU pipelines. Checked: every batch has
exactly ``b + r`` rows from the first step to the last, the rows the buffer
cannot fill yet are copies of the batch's own fresh rows flagged 2, the step
count is known in advance (``dr.steps_per_epoch``), DALI's iterator accepts
``size=dr.epoch_size(pipe)``, and a JAX training step compiles once.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import dali_rehearsal as dr

pytest.importorskip("nvidia.dali")
pytest.importorskip("torch")
from nvidia.dali import fn, pipeline_def, types  # noqa: E402
from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: E402
from utils import pixel_key  # noqa: E402

LBP = dr.LastBatchPolicy


@pytest.fixture(scope="module")
def data(mnist):
    files = dr.LabelledFiles.from_folder(mnist[0])
    keys = {np.asarray(Image.open(f).convert("L")).tobytes(): label
            for f, label in zip(files.files, files.labels)}
    return files, keys


def pipelines(files, buffer, b, *, n=None, **stage):
    r = buffer.num_representatives
    n = len(files.files) if n is None else n

    @pipeline_def(batch_size=b, num_threads=2, device_id=None, seed=1)
    def decode():
        jpegs, labels = fn.readers.file(files=list(files.files[:n]),
                                        labels=list(files.labels[:n]), random_shuffle=True,
                                        name="Reader")
        return fn.decoders.image(jpegs, device="cpu", output_type=types.GRAY), labels

    @pipeline_def(batch_size=b + r, num_threads=2, device_id=None, seed=2)
    def train(src):
        images, labels, flag = dr.fn.rehearsal(src, buffer=buffer, replay_flag=True,
                                               static_batch=True, **stage)
        return images, labels, flag

    return train(decode())


@pytest.mark.parametrize("policy", [LBP.FILL, LBP.DROP])
def test_every_batch_has_b_plus_r_rows_from_the_first_step(data, policy):
    files, label_of = data
    b, r = 16, 20                     # r > b: the first step's 20 filler rows repeat its 16
    buffer = dr.RehearsalBuffer(capacity=30, num_representatives=r, device="cpu", seed=0)
    pipe = pipelines(files, buffer, b, last_batch_policy=policy)
    it = DALIGenericIterator(pipe, ["images", "labels", "flag"], auto_reset=True)
    delivered: set = set()
    fillers = 0
    for epoch in range(2):
        steps = 0
        for batch in it:
            images = batch[0]["images"].numpy()
            labels = batch[0]["labels"].numpy().reshape(-1)
            flag = batch[0]["flag"].numpy().reshape(-1)
            assert len(images) == len(labels) == len(flag) == b + r
            keys = [pixel_key(x) for x in images]
            assert [label_of[k] for k in keys] == labels.tolist()
            assert flag[:b].tolist() == [0] * b                   # b fresh rows
            fresh = keys[:b]
            for k, f in zip(keys[b:], flag[b:]):
                if f == 1:
                    assert k in delivered                        # a representative
                else:
                    assert f == 2 and k in fresh                 # a copy of a fresh row
                    fillers += 1
            assert (flag[b:] == 2).sum() == max(0, r - len(delivered)) or epoch > 0
            delivered |= set(fresh)
            steps += 1
        assert steps == dr.steps_per_epoch(pipe, epoch)
    assert fillers == r + (r - b)     # step 1: 20 filler rows, step 2: 4 (16 stored)
    buffer.close()


@pytest.mark.filterwarnings("ignore:Please set `reader_name`")   # size= is the point here
def test_dali_iterator_with_size_and_len(data):
    files, _ = data
    b, r = 16, 4
    buffer = dr.RehearsalBuffer(capacity=30, num_representatives=r, device="cpu", seed=0)
    pipe = pipelines(files, buffer, b, last_batch_policy=LBP.DROP)
    size = dr.epoch_size(pipe)
    assert size == dr.steps_per_epoch(pipe) * (b + r) == (180 // 16) * 20
    it = DALIGenericIterator(pipe, ["images", "labels", "flag"], size=size, auto_reset=True)
    assert len(it) == 180 // 16
    for _ in range(3):
        batches = [batch[0]["labels"].shape[0] for batch in it]
        assert batches == [b + r] * (180 // 16)
    buffer.close()


def test_static_batch_misuse_is_explained(data):
    files, _ = data
    buffer = dr.RehearsalBuffer(capacity=30, num_representatives=4, device="cpu", seed=0)
    with pytest.raises(ValueError, match="FILL or DROP"):
        pipelines(files, buffer, 16)                       # PARTIAL
    with pytest.raises(ValueError, match="exactly b \\+ r"):
        @pipeline_def(batch_size=16, num_threads=1, device_id=None)
        def decode():
            jpegs, labels = fn.readers.file(files=list(files.files), labels=list(files.labels))
            return fn.decoders.image(jpegs, output_type=types.GRAY), labels

        @pipeline_def(batch_size=24, num_threads=1, device_id=None)
        def train(src):
            return tuple(dr.fn.rehearsal(src, buffer=buffer, static_batch=True,
                                         last_batch_policy=LBP.FILL))

        train(decode())
    # FILL over an unpadded reader: epochs of 12, 11, 11 steps (90 files, b=8)
    varying = pipelines(files, buffer, 8, n=90, last_batch_policy=LBP.FILL)
    assert [dr.steps_per_epoch(varying, e) for e in range(3)] == [12, 11, 11]
    with pytest.raises(ValueError, match="differ in length"):
        dr.epoch_size(varying)
    buffer.close()


def test_a_jax_step_compiles_once(data):
    """A jitted training step sees one shape from the first batch to the last,
    through the warm-up (filler rows) and the epoch ends."""
    import jax                      # the test extra installs it: CI runs this test
    import jax.numpy as jnp

    files, _ = data
    b, r = 16, 8
    buffer = dr.RehearsalBuffer(capacity=40, num_representatives=r, device="cpu", seed=0)
    pipe = pipelines(files, buffer, b, last_batch_policy=LBP.FILL)
    traces = []

    def loss_fn(w, x, labels, mask):
        logp = jax.nn.log_softmax(x @ w)
        return -(logp[jnp.arange(labels.shape[0]), labels] * mask).sum() / mask.sum()

    @jax.jit
    def step(w, images, labels, flag):
        traces.append(images.shape)          # runs when JAX traces (compiles) the step
        x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
        mask = (flag != 2).astype(jnp.float32)   # filler rows do not count
        loss, grad = jax.value_and_grad(loss_fn)(w, x, labels, mask)
        return w - 0.1 * grad, loss

    w = jnp.zeros((28 * 28, 10), jnp.float32)
    it = DALIGenericIterator(pipe, ["images", "labels", "flag"], auto_reset=True)
    steps = 0
    for _ in range(2):
        for batch in it:
            images, labels, flag = (batch[0][k].numpy() for k in ("images", "labels", "flag"))
            w, loss = step(w, images, labels.reshape(-1).astype(np.int32), flag.reshape(-1))
            steps += 1
    assert steps == dr.steps_per_epoch(pipe, 0) + dr.steps_per_epoch(pipe, 1)
    assert traces == [(b + r, 28, 28, 1)]        # one compilation
    assert np.isfinite(float(loss))
    buffer.close()
