"""One buffer used from several threads at once.

The buffer serialises its public operations (one lock, re-entrant): threads
that call ``mix``, ``add``, ``sample`` and ``state_dict`` on one buffer at the
same time each get what they would get alone at some point of a serial order,
and nothing stored is lost or mispaired. Every row here encodes its label
(4 KB of the label's value), so a row that arrives with another sample's
label, or a label nobody passed, is seen at once. The thread switch interval
is made tiny so that the threads interleave inside the buffer's operations.
A DALI stage feeding the buffer (its worker thread and DALI's thread) shares
the same lock with a user's thread that calls the buffer directly.
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest

import dali_rehearsal as dr
from utils import to_host

ROW = 1024                  # int32 values per row: 4 KB, each the sample's label
THREADS = 4
CLASSES_PER_THREAD = 20
JOIN_S = 120                # threads still running after this hang


def _labels_of(thread: int, rng, n: int) -> np.ndarray:
    return thread * 1000 + rng.integers(0, CLASSES_PER_THREAD, n)


PASSED = {t * 1000 + c for t in range(THREADS) for c in range(CLASSES_PER_THREAD)}


def _batch(labels: np.ndarray):
    return np.repeat(labels.astype(np.int32)[:, None], ROW, axis=1), labels.astype(np.int64)


def _check_rows(rows, labels) -> None:
    """Every row holds its own label's value, and every label is one a caller passed."""
    rows, labels = np.asarray(to_host(rows)), np.asarray(to_host(labels)).reshape(-1)
    assert len(rows) == len(labels)
    unknown = set(labels.tolist()) - PASSED
    assert not unknown, f"labels nobody passed: {sorted(unknown)[:5]}"
    wrong = np.flatnonzero((rows != labels[:, None].astype(np.int32)).any(axis=1))
    assert len(wrong) == 0, f"rows {wrong[:5].tolist()} hold another sample than their label"


def _check_state(state, settings) -> None:
    """A state's stored rows are paired, and it loads into a new buffer."""
    images, labels = (np.asarray(f) for f in state["fields"])
    _check_rows(images, labels)
    np.testing.assert_array_equal(np.asarray(state["policy"]["slot_labels"])[: len(labels)],
                                  labels)
    fresh = dr.RehearsalBuffer(**settings)
    fresh.load_state_dict(state)
    assert fresh.size == len(labels)


@pytest.fixture(params=["cpu", pytest.param("emulated", marks=pytest.mark.gpu_emulated),
                        pytest.param("gpu", marks=pytest.mark.gpu)])
def where(request):
    """The buffer's device: the CPU, the GPU code paths on the CPU emulation
    of CUDA (device work runs only when ordered), or a real GPU."""
    if request.param == "emulated":
        request.getfixturevalue("emulated_gpu")
    return "cpu" if request.param == "cpu" else "gpu"


def _run_threads(*works, interval=1e-6):
    """Runs each ``work()`` in a thread, all at once, with a tiny thread switch
    interval; re-raises the first error; fails when threads hang."""
    errors, start = [], threading.Barrier(len(works))

    def run(work):
        try:
            start.wait()
            work()
        except BaseException as e:    # noqa: BLE001 - reported below
            errors.append(e)

    saved = sys.getswitchinterval()
    sys.setswitchinterval(interval)
    try:
        threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in works]
        for th in threads:
            th.start()
        deadline = time.monotonic() + JOIN_S
        for th in threads:
            th.join(max(0.0, deadline - time.monotonic()))
        assert not any(th.is_alive() for th in threads), f"threads hang after {JOIN_S} s"
    finally:
        sys.setswitchinterval(saved)
    if errors:
        raise errors[0]


@pytest.mark.parametrize("policy", ["class_balanced", "reservoir"])
def test_threads_calling_one_buffer_lose_and_mispair_nothing(where, policy):
    """Four threads, each on its own stream on the GPU, call mix, add, sample
    and state_dict at random on one buffer."""
    settings = dict(capacity=96, num_representatives=8, policy=policy, device=where, seed=3)
    buffer = dr.RehearsalBuffer(**settings)
    be = buffer.backend
    steps = 200
    offered = [0] * THREADS
    states = []

    def work(t):
        rng = np.random.default_rng(t)
        stream = be.new_stream()            # None on the CPU
        for step in range(steps):
            op = rng.choice(["mix", "add", "sample", "state_dict"], p=[0.5, 0.3, 0.12, 0.08])
            if op in ("sample", "state_dict") and buffer.size == 0:
                op = "add"
            if op == "mix":
                n = int(rng.integers(1, 25))
                images, labels = _batch(_labels_of(t, rng, n))
                out_images, out_labels = buffer.mix(images, labels, stream=stream)
                be.synchronize(stream)
                offered[t] += n
                assert n <= len(out_labels) <= n + 8
                np.testing.assert_array_equal(to_host(out_images[:n]), images)   # fresh first
                np.testing.assert_array_equal(to_host(out_labels[:n]), labels)
                _check_rows(out_images, out_labels)
            elif op == "add":
                n = int(rng.integers(1, 25))
                buffer.add(*_batch(_labels_of(t, rng, n)), stream=stream)
                offered[t] += n
            elif op == "sample":
                out = buffer.sample(stream=stream)
                be.synchronize(stream)
                _check_rows(*out)
            else:
                states.append(buffer.state_dict())

    _run_threads(*(lambda t=t: work(t) for t in range(THREADS)))
    assert buffer.num_seen == sum(offered)            # no sample lost
    assert buffer.size == settings["capacity"]
    _check_rows(buffer.stored(0), buffer.stored(1))
    np.testing.assert_array_equal(to_host(buffer.stored(1)), buffer.stored_labels())
    assert sum(buffer.class_counts().values()) == buffer.size
    assert len(states) > 0
    for state in states[:: max(1, len(states) // 8)] + [buffer.state_dict()]:
        _check_state(state, settings)


def test_threads_racing_for_the_first_batch_all_store_it(where):
    """The first batch fixes the storage layout: threads that offer their
    first batches at the same moment all get them stored."""
    for attempt in range(20):
        buffer = dr.RehearsalBuffer(capacity=64, num_representatives=4, device=where, seed=0)

        def work(t):
            rng = np.random.default_rng(attempt * THREADS + t)
            stream = buffer.backend.new_stream()
            for _ in range(3):
                out = buffer.mix(*_batch(_labels_of(t, rng, 4)), stream=stream)
                buffer.backend.synchronize(stream)
                _check_rows(*out)

        _run_threads(*(lambda t=t: work(t) for t in range(THREADS)))
        assert buffer.num_seen == buffer.size == THREADS * 3 * 4
        _check_rows(buffer.stored(0), buffer.stored(1))


def test_close_from_another_thread_stops_a_thread_in_mix(where):
    """``close()`` from one thread while another takes steps: the steps end
    with the closed buffer's RuntimeError; every step that returned was stored."""
    buffer = dr.RehearsalBuffer(capacity=64, num_representatives=4, device=where, seed=0)
    steps, errors = [0], []

    def mixer():
        rng = np.random.default_rng(0)
        try:
            while steps[0] < 1_000_000:
                buffer.mix(*_batch(_labels_of(0, rng, 4)))
                steps[0] += 1
        except RuntimeError as e:
            errors.append(e)

    def closer():
        while steps[0] < 50:
            time.sleep(0.001)
        buffer.close()

    _run_threads(mixer, closer)
    assert len(errors) == 1 and "mix() on a closed RehearsalBuffer" in str(errors[0])
    assert buffer.num_seen == 4 * steps[0]


# ------------------------------------------------------------ a stage and a user thread
def _mnist_catalog(mnist):
    """pixel bytes -> label for every train and test PNG, and the test digits
    as a batch of the stage's layout ((28, 28, 1) uint8 images, (1,) int32 labels)."""
    from PIL import Image
    table, test_images, test_labels = {}, [], []
    for root in mnist:
        data = dr.LabelledFiles.from_folder(root)
        for path, label in zip(data.files, data.labels):
            pixels = np.asarray(Image.open(path).convert("L"), dtype=np.uint8)
            table[pixels.tobytes()] = label
            if root == mnist[1]:
                test_images.append(pixels[..., None])
                test_labels.append([label])
    return table, np.stack(test_images), np.asarray(test_labels, dtype=np.int32)


def _check_pairs(catalog, images, labels) -> None:
    images = np.asarray(to_host(images)).reshape(-1, 28 * 28)
    labels = np.asarray(to_host(labels)).reshape(-1)
    assert [catalog.get(x.tobytes()) for x in images] == labels.tolist(), \
        "a sample arrived with a wrong label"


EPOCHS = 4
USERS = 2


@pytest.mark.parametrize("prepare_ahead", [2, 0])
def test_user_threads_and_a_stage_share_one_buffer(mnist, prepare_ahead):
    """A DALI stage feeds the buffer (in its worker thread, or in DALI's
    thread with ``prepare_ahead=0``) while the training loop runs it for a few
    epochs, and two other threads call ``mix``, ``add``, ``sample`` and
    ``state_dict`` on the same buffer all along: every row of every batch, on
    every side, and every stored row keeps its own label; nothing offered is
    lost; every state loads."""
    pytest.importorskip("nvidia.dali")
    from utils import mixing_pipeline, source_pipeline

    catalog, images, labels = _mnist_catalog(mnist)
    b, r = 8, 5
    settings = dict(capacity=60, num_representatives=r, device="cpu", seed=0)
    buffer = dr.RehearsalBuffer(**settings)
    pipe = mixing_pipeline(source_pipeline(b, file_root=str(mnist[0]), random_shuffle=True),
                           buffer, b + r, prepare_ahead=prepare_ahead)
    pipe.build()
    done = threading.Event()
    offered, states, delivered = [0] * USERS, [], []

    def user_thread(u):
        rng = np.random.default_rng(u)
        calls = 0
        while not done.is_set() or calls < 30:
            op = rng.choice(["mix", "add", "sample", "state_dict"], p=[0.5, 0.2, 0.15, 0.15])
            if op in ("mix", "add") or buffer.size == 0:
                pick = rng.choice(len(labels), int(rng.integers(1, 9)), replace=False)
                if op == "add":
                    buffer.add(images[pick], labels[pick])
                else:
                    out_images, out_labels = buffer.mix(images[pick], labels[pick])
                    np.testing.assert_array_equal(out_images[: len(pick)], images[pick])
                    np.testing.assert_array_equal(out_labels[: len(pick)], labels[pick])
                    _check_pairs(catalog, out_images, out_labels)
                offered[u] += len(pick)
            elif op == "sample":
                _check_pairs(catalog, *buffer.sample())
            else:
                state = buffer.state_dict()
                _check_pairs(catalog, *state["fields"])
                if len(states) < 6:
                    states.append(state)
            calls += 1

    def training_loop():
        try:
            for _ in range(EPOCHS):
                while True:
                    try:
                        out_images, out_labels, flags = pipe.run()
                    except StopIteration:
                        pipe.reset()
                        break
                    _check_pairs(catalog, out_images.as_array(), out_labels.as_array())
                    delivered.append(int((flags.as_array() == 0).sum()))
        finally:
            done.set()      # the users' threads end with the loop

    _run_threads(training_loop, *(lambda u=u: user_thread(u) for u in range(USERS)))
    buffer.close()
    assert sum(delivered) == EPOCHS * 180
    # the stage inserts what it delivered, and the few steps it prepared ahead
    assert sum(delivered) + sum(offered) <= buffer.num_seen
    assert buffer.num_seen <= sum(delivered) + sum(offered) + 6 * b
    _check_pairs(catalog, buffer.stored(0), buffer.stored(1))
    np.testing.assert_array_equal(to_host(buffer.stored(1)).reshape(-1), buffer.stored_labels())
    for state in states + [buffer.state_dict()]:
        fresh = dr.RehearsalBuffer(**settings)
        fresh.load_state_dict(state)
        _check_pairs(catalog, *fresh.stored())
