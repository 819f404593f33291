"""Every kind of DALI source behind the stage, as it behaves without it.

Real MNIST PNG files decoded by DALI CPU pipelines. Each source kind runs for
several epochs through ``DALIGenericIterator(auto_reset=True)`` once on its own
and once behind ``dr.fn.rehearsal``; the fresh samples of every epoch must be
the same, every row must carry its own label, and the stage's outputs must
keep what DALI operators downstream rely on (layouts, declared dtypes).
"""

from __future__ import annotations

import re
import shutil
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import dali_rehearsal as dr

pytest.importorskip("nvidia.dali")
pytest.importorskip("torch")
from nvidia.dali import fn, pipeline_def, types  # noqa: E402
from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: E402
from utils import mixing_pipeline, pixel_key, run_epochs, source_pipeline  # noqa: E402

B = 6


# ------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def files(mnist):
    data = dr.LabelledFiles.from_folder(mnist[0])
    keep = [i for i in range(len(data)) if i % 9 == 0]          # 20 files, all classes
    return [data.files[i] for i in keep], [data.labels[i] for i in keep]


@pytest.fixture(scope="module")
def label_of(mnist):
    """pixel bytes -> label, decoded independently with PIL."""
    table = {}
    for root in mnist:
        data = dr.LabelledFiles.from_folder(root)
        for path, label in zip(data.files, data.labels):
            table[np.asarray(Image.open(path).convert("L")).tobytes()] = label
    return table


# ------------------------------------------------------------------ source kinds
KINDS = ["reader", "two_readers", "per_sample", "per_sample_parallel", "per_batch", "generator"]


@pytest.mark.parametrize("prepare_ahead", [0, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_every_source_kind_runs_epochs_as_without_the_stage(kind, prepare_ahead, files,
                                                            label_of):
    """20 files, batches of 6: [6, 6, 6, 2] every epoch, with or without the stage
    ([6, 6, 6] for a per-sample callback: DALI drops a batch that a sample's
    StopIteration cuts short)."""
    paths, labels = files
    extra = {"py_num_workers": 2} if kind == "per_sample_parallel" else {}
    names = ["images", "labels"] + (["side"] if kind == "two_readers" else [])
    reader = {"reader": "Reader", "two_readers": "Main"}.get(kind)
    plain = run_epochs(source_pipeline(B, kind=kind, files=paths, labels=labels, seed=3,
                                       pipeline=extra), names, 3,
                       **({"reader_name": reader, "last_batch_policy": dr.LastBatchPolicy.PARTIAL}
                          if reader else {}))
    sizes = [6, 6, 6] if kind.startswith("per_sample") else [6, 6, 6, 2]
    assert [[len(b["labels"]) for b in e] for e in plain] == [sizes] * 3

    buffer = dr.RehearsalBuffer(capacity=8, num_representatives=2, device="cpu", seed=0)
    stage_kwargs = {"reader_name": "Main"} if kind == "two_readers" else {}
    pipe = mixing_pipeline(source_pipeline(B, kind=kind, files=paths, labels=labels, seed=3,
                                           pipeline=extra), buffer, seed=4,
                           prepare_ahead=prepare_ahead, **stage_kwargs)
    staged = run_epochs(pipe, names + ["flag"], 3)
    stored_before = set()
    for e, (ref, got) in enumerate(zip(plain, staged)):
        fresh_sizes = [int((b["flag"] == 0).sum()) for b in got]
        assert fresh_sizes == sizes, (e, fresh_sizes)
        fresh = []
        for batch in got:
            keys = [pixel_key(x) for x in batch["images"]]
            assert [label_of[k] for k in keys] == batch["labels"].reshape(-1).tolist()
            if "side" in batch:      # the second reader's output travels with its row
                index = {np.asarray(Image.open(p).convert("L")).tobytes(): i
                         for i, p in enumerate(paths)}
                assert [index[pixel_key(x)] for x in batch["side"]] == \
                    [len(paths) - 1 - index[k] for k in keys]
            flag = batch["flag"].reshape(-1)
            nf = int((flag == 0).sum())
            assert set(keys[nf:]) <= stored_before          # replayed: stored before
            fresh += keys[:nf]
            stored_before |= set(keys[:nf])
        expected = [pixel_key(x) for b in ref for x in b["images"]]
        if reader:
            # the same samples, once each (DALI's iterator starts each epoch of an
            # unpadded reader part way into the reader's stream: same set, rotated)
            assert Counter(fresh) == Counter(expected) and len(set(fresh)) == len(paths)
        else:
            assert fresh == expected            # the same samples, in the same order
    buffer.close()


def test_several_readers_need_a_reader_name(files):
    paths, labels = files
    buffer = dr.RehearsalBuffer(capacity=8, num_representatives=2, device="cpu", seed=0)
    with pytest.raises(ValueError, match="several readers"):
        mixing_pipeline(source_pipeline(B, kind="two_readers", files=paths, labels=labels,
                                        seed=3), buffer, seed=4)
    with pytest.raises(ValueError, match="no reader named 'Nope'"):
        mixing_pipeline(source_pipeline(B, kind="two_readers", files=paths, labels=labels,
                                        seed=3), buffer, seed=4, reader_name="Nope")


@pytest.mark.parametrize("policy", ["FILL", "DROP"])
def test_a_source_without_reader_keeps_full_batches_with_fill_and_drop(policy, files, label_of):
    """20 samples per source epoch, batches of 6: FILL takes the 4 missing
    samples of the last batch from the next source epoch, DROP carries the 2
    that do not fill a batch into the next epoch; nothing lost, nothing repeated."""
    paths, labels = files
    keys = [np.asarray(Image.open(p).convert("L")).tobytes() for p in paths]
    buffer = dr.RehearsalBuffer(capacity=8, num_representatives=2, device="cpu", seed=0)
    pipe = mixing_pipeline(source_pipeline(B, kind="per_batch", files=paths, labels=labels,
                                           seed=3), buffer, seed=4,
                           last_batch_policy=getattr(dr.LastBatchPolicy, policy))
    epochs = run_epochs(pipe, ["images", "labels", "flag"], 4)
    stream = []
    for batches in epochs:
        assert batches, "an empty epoch"
        for batch in batches:
            flag = batch["flag"].reshape(-1)
            nf = int((flag == 0).sum())
            assert nf == B
            stream += [pixel_key(x) for x in batch["images"][:nf]]
    assert stream == (keys * 5)[: len(stream)]
    sizes = [len(e) for e in epochs]
    # FILL: 24, 18 (16 left + 2), 18 (18 left), 24; DROP: 18 (+2 carried), 18, 24, 18
    assert sizes == ([4, 3, 3, 4] if policy == "FILL" else [3, 3, 4, 3])


# ------------------------------------------------------------------ metadata
def test_outputs_keep_the_source_layouts_for_conditionals(files):
    """Both branches of a DALI conditional must agree on the layout: the
    stage's images keep the decoder's "HWC" (an empty layout fails here)."""
    paths, labels = files
    buffer = dr.RehearsalBuffer(capacity=8, num_representatives=2, device="cpu", seed=0)

    @pipeline_def(batch_size=B + 2, num_threads=2, device_id=None, seed=4,
                  enable_conditionals=True)
    def train(src):
        images, labels_ = dr.fn.rehearsal(src, buffer=buffer)
        bright = fn.reductions.mean(fn.cast(images, dtype=types.FLOAT)) > 30.0
        if bright:
            out = fn.crop_mirror_normalize(images, output_layout="HWC", dtype=types.UINT8)
        else:
            out = images
        return out, labels_

    pipe = train(source_pipeline(B, kind="reader", files=paths, labels=labels, seed=3))
    pipe.build()
    for _ in range(4):                          # one epoch
        images, _ = pipe.run()
        assert images.layout() == "HWC"


def test_declared_dtypes_and_ndims_are_declared_downstream(files):
    """A source that declares its outputs' dtypes and dimensions (output_dtype=,
    output_ndim=) has them declared on the stage's outputs too, as DALI
    operators downstream see them (the external_source specs)."""
    paths, labels = files
    buffer = dr.RehearsalBuffer(capacity=8, num_representatives=2, device="cpu", seed=0)
    src = source_pipeline(B, kind="reader", files=paths, labels=labels, seed=3,
                          pipeline=dict(output_dtype=[types.UINT8, types.INT32],
                                        output_ndim=[3, 1]))
    pipe = mixing_pipeline(src, buffer, seed=4)
    pipe.build()
    specs = [str(op._spec) for op in pipe._ops if "ExternalSource" in str(op._spec)]
    declared = [(int(re.search(r"dtype: (\d+)", spec).group(1)),
                 int(re.search(r"ndim: (\d+)", spec).group(1))) for spec in specs]
    assert declared == [(int(types.UINT8), 3), (int(types.INT32), 1), (int(types.UINT8), 0)]
    images, labels_, flag = pipe.run()
    assert images.as_tensor().shape()[1:] == [28, 28, 1] and len(flag) == len(images)


# ------------------------------------------------------------------ errors
@pytest.fixture()
def corrupt_folder(mnist, tmp_path):
    """A copy of the MNIST training folder with one PNG replaced by garbage."""
    root = tmp_path / "train"
    shutil.copytree(mnist[0], root)
    data = dr.LabelledFiles.from_folder(root)
    bad = data.files[54]
    with open(bad, "wb") as f:
        f.write(b"this is not a PNG file")
    return data, 54


def _reader_source(data, b):
    @pipeline_def(batch_size=b, num_threads=2, device_id=None, seed=1)
    def decode():
        jpegs, labels = fn.readers.file(files=list(data.files), labels=list(data.labels),
                                        name="Reader")
        return fn.decoders.image(jpegs, device="cpu", output_type=types.GRAY), labels

    return decode()


def _run(pipe, steps):
    """``pipe.run()`` ``steps`` times: batches (dicts) or the exception raised."""
    out = []
    for _ in range(steps):
        try:
            images, labels, *flag = pipe.run()
            out.append({"images": images.as_array().copy(),
                        "labels": labels.as_array().reshape(-1).copy(),
                        **({"flag": flag[0].as_array().reshape(-1).copy()} if flag else {})})
        except StopIteration:
            out.append("end")
            pipe.reset()
        except Exception as e:  # noqa: BLE001 - the error under test
            out.append(e)
    return out


@pytest.mark.parametrize("prepare_ahead", [0, 2])
def test_a_corrupt_file_raises_once_and_the_stage_goes_on(corrupt_folder, label_of,
                                                          prepare_ahead):
    data, bad = corrupt_folder
    b = 16
    plain = _run(_reader_source(data, b), 14)
    errors = [x for x in plain if isinstance(x, Exception)]
    assert len(errors) == 1                     # plain DALI: once, then the next batch

    buffer = dr.RehearsalBuffer(capacity=40, num_representatives=3, device="cpu", seed=0)
    pipe = mixing_pipeline(_reader_source(data, b), buffer, seed=4, prepare_ahead=prepare_ahead)
    pipe.build()
    got = _run(pipe, 2 * 14)                    # two epochs: 12 steps, 1 error, the end
    epochs, current, errs = [], [], 0
    for x in got:
        if isinstance(x, Exception):            # DALI's own error, as plain DALI raises it
            assert type(x) is type(errors[0])
            assert "decoders" in str(x).lower() and "decoders" in str(errors[0]).lower()
            errs += 1
        elif x == "end":
            assert errs == 1                    # once per epoch (the file is read once)
            epochs.append(current)
            current, errs = [], 0
        else:
            current.append(x)
    assert len(epochs) == 2
    keys = [np.asarray(Image.open(f).convert("L")).tobytes() if i != bad else None
            for i, f in enumerate(data.files)]
    for e, batches in enumerate(epochs):
        assert len(batches) == 12               # DALI's count (180 files / 16)
        fresh = []
        for batch in batches:
            ks = [pixel_key(x) for x in batch["images"]]
            assert [label_of[k] for k in ks] == batch["labels"].tolist()   # nothing mispaired
            nf = int((batch["flag"] == 0).sum())
            fresh += ks[:nf]
        # DALI's reader streams the files cyclically in batches of 16; the batch
        # holding file 54 (of this epoch) fails and is skipped
        position = e * len(keys) + bad
        first = position // b * b - e * len(keys)
        lost = set(range(first, first + b))
        expected = [k for i, k in enumerate(keys) if i not in lost]
        assert Counter(fresh) == Counter(expected)   # all but DALI's failing batch, once
    buffer.close()


def test_a_corrupt_file_through_dali_iterator(corrupt_folder, label_of):
    """Through DALI's framework iterator the error also arrives once and the
    loop goes on; DALI's iterator discards the batch it was handing out when
    an external_source callback raises (as it does without the stage)."""
    data, bad = corrupt_folder
    b = 16
    buffer = dr.RehearsalBuffer(capacity=40, num_representatives=3, device="cpu", seed=0)
    pipe = mixing_pipeline(_reader_source(data, b), buffer, seed=4)
    it = DALIGenericIterator(pipe, ["images", "labels", "flag"], auto_reset=True)
    batches, errors = [], 0
    while True:
        try:
            batch = next(it)
        except StopIteration:
            break
        except RuntimeError as e:
            assert "decoders" in str(e).lower()
            errors += 1
            continue
        batches.append({k: v.numpy().copy() for k, v in batch[0].items()})
    assert errors == 1
    assert len(batches) == 11                   # 12 steps, one discarded by DALI's iterator
    fresh = []
    for batch in batches:
        ks = [pixel_key(x) for x in batch["images"]]
        assert [label_of[k] for k in ks] == batch["labels"].reshape(-1).tolist()
        fresh += ks[: int((batch["flag"] == 0).sum())]
    assert len(fresh) == len(set(fresh)) >= 180 - 16 - 16
    buffer.close()


# ------------------------------------------------------------------ misuse
def test_a_source_feeds_one_stage(files):
    paths, labels = files
    buffer = dr.RehearsalBuffer(capacity=8, num_representatives=2, device="cpu", seed=0)
    other = dr.RehearsalBuffer(capacity=8, num_representatives=2, device="cpu", seed=0)
    src = source_pipeline(B, kind="reader", files=paths, labels=labels, seed=3)
    first = mixing_pipeline(src, buffer, seed=4)
    with pytest.raises(ValueError, match="already feeds another rehearsal stage"):
        mixing_pipeline(src, other, seed=4)
    first.build()
    first.run()
    buffer.close()          # the first stage stops; its source is part way through
    with pytest.raises(ValueError, match="already read by an earlier rehearsal stage"):
        mixing_pipeline(src, other, seed=4)


def test_the_mixing_pipeline_must_be_on_the_buffers_device():
    """A GPU buffer (device 1 here, a backend built without a device) with mixing or
    source pipelines elsewhere."""
    from types import SimpleNamespace

    from dali_rehearsal._backend import Backend
    from dali_rehearsal.stage.api import _check_devices

    gpu1 = Backend("gpu", device_id=1)     # imports CuPy; touches no device
    buffer = SimpleNamespace(backend=gpu1)

    def pipe(device_id):
        @pipeline_def(batch_size=2, num_threads=1, device_id=device_id)
        def p():
            return fn.random.uniform(shape=[1])
        return p()

    with pytest.raises(ValueError, match=r"mixing pipeline runs on GPU 0 .* GPU 1"):
        _check_devices(pipe(0), pipe(None), buffer)
    with pytest.raises(ValueError, match="no device"):
        _check_devices(pipe(None), pipe(None), buffer)
    with pytest.raises(ValueError, match=r"source pipeline runs on GPU 0"):
        _check_devices(pipe(1), pipe(0), buffer)
    _check_devices(pipe(1), pipe(1), buffer)
    _check_devices(pipe(1), pipe(None), buffer)      # host source: uploaded


@pytest.mark.parametrize("where", ["mixing", "source", "restore"])
def test_dali_checkpointing_is_refused_with_a_pointer_to_buffer_checkpoints(files, where):
    paths, labels = files
    buffer = dr.RehearsalBuffer(capacity=8, num_representatives=2, device="cpu", seed=0)
    src_kwargs = {"enable_checkpointing": True} if where == "source" else {}
    src = source_pipeline(B, kind="reader", files=paths, labels=labels, seed=3, pipeline=src_kwargs)
    mix_kwargs = {}
    if where == "mixing":
        mix_kwargs = {"enable_checkpointing": True}
    if where == "restore":
        plain = source_pipeline(B, kind="reader", files=paths, labels=labels, seed=3,
                                pipeline=dict(enable_checkpointing=True))
        plain.build()
        plain.run()
        mix_kwargs = {"enable_checkpointing": True, "checkpoint": plain.checkpoint()}

    @pipeline_def(batch_size=B + 2, num_threads=2, device_id=None, seed=4, **mix_kwargs)
    def train(s):
        return tuple(dr.fn.rehearsal(s, buffer=buffer))

    with pytest.raises(ValueError, match=r"buffer\.save\(path\)") as info:
        train(src)
    assert "checkpoint" in str(info.value)
    assert buffer.size == 0 and buffer.spec is None


# ------------------------------------------------------------------ legacy executors
@pytest.mark.parametrize("settings", [
    {"exec_dynamic": False},
    {"exec_async": False, "exec_pipelined": False},
    {"prefetch_queue_depth": {"cpu_size": 2, "gpu_size": 2}},
])
def test_sources_on_dalis_legacy_executors_run_without_a_stream(settings, files, label_of):
    from dali_rehearsal.stage import runs_with_stream

    paths, labels = files

    @pipeline_def(batch_size=B, num_threads=1, device_id=0, **settings)
    def gpu_source():
        return fn.random.uniform(shape=[1]), fn.random.uniform(shape=[1])

    @pipeline_def(batch_size=B, num_threads=1, device_id=0)
    def dynamic_gpu_source():
        return fn.random.uniform(shape=[1]), fn.random.uniform(shape=[1])

    # which sources the stage runs on its CUDA stream (not built: no GPU here)
    assert not runs_with_stream(gpu_source())
    assert runs_with_stream(dynamic_gpu_source())
    # and such a source works behind the stage, epoch after epoch
    buffer = dr.RehearsalBuffer(capacity=8, num_representatives=2, device="cpu", seed=0)
    src = source_pipeline(B, kind="reader", files=paths, labels=labels, seed=3, pipeline=settings)
    assert not runs_with_stream(src)
    epochs = run_epochs(mixing_pipeline(src, buffer, seed=4), ["images", "labels", "flag"], 2)
    for batches in epochs:
        assert [int((b["flag"] == 0).sum()) for b in batches] == [6, 6, 6, 2]
        for batch in batches:
            assert [label_of[pixel_key(x)] for x in batch["images"]] == \
                batch["labels"].reshape(-1).tolist()
    buffer.close()
