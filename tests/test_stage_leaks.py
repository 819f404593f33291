"""A new stage per task, for many tasks: nothing accumulates.

The README tells users to build new source and mixing pipelines for every task
over the same buffer. Each dropped stage must be freed at once, without the
garbage collector (tested with it switched off), its worker thread must stop,
and its source pipeline (with DALI's threads) must go with it: over 200 tasks
the process's thread count and resident memory stay flat.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
import weakref

import pytest

import dali_rehearsal as dr
from dist_programs import launching

pytest.importorskip("nvidia.dali")
from nvidia.dali import fn, pipeline_def, types  # noqa: E402


def threads() -> int:
    """Threads of this process, DALI's C++ threads included."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture(scope="module")
def files(mnist):
    data = dr.LabelledFiles.from_folder(mnist[0])
    return list(data.files[:40]), list(data.labels[:40])


def task_pipeline(files, buffer, prepare_ahead=2):
    paths, labels = files

    @pipeline_def(batch_size=8, num_threads=2, device_id=None, seed=1)
    def decode():
        jpegs, labels_ = fn.readers.file(files=paths, labels=labels, random_shuffle=True)
        return fn.decoders.image(jpegs, device="cpu", output_type=types.GRAY), labels_

    @pipeline_def(batch_size=10, num_threads=2, device_id=None, seed=2)
    def train(src):
        return tuple(dr.fn.rehearsal(src, buffer=buffer, prepare_ahead=prepare_ahead))

    return train(decode())


@pytest.fixture()
def no_gc():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_a_dropped_stage_is_freed_at_once_and_its_thread_stops(files, no_gc):
    buffer = dr.RehearsalBuffer(capacity=20, num_representatives=2, device="cpu", seed=0)
    before = threading.active_count()
    pipe = task_pipeline(files, buffer)
    pipe.build()
    for _ in range(3):
        pipe.run()
    stage = weakref.ref(dr.stage.stage_of(pipe))
    assert any(t.name == "dali-rehearsal-stage" for t in threading.enumerate())
    del pipe
    # freed without the garbage collector, as soon as the worker ends the step
    # it may be building
    deadline = time.monotonic() + 10
    while stage() is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stage() is None
    for t in threading.enumerate():
        if t.name == "dali-rehearsal-stage":
            t.join(timeout=10)
    assert threading.active_count() == before
    buffer.close()


def new_stage_per_task(files, tasks: int = 200, sample_at=(49, 199)) -> list:
    """Builds, runs and drops a new stage per task over one buffer, as users
    do, with the collector on and never called; ``(threads, resident MiB)``
    after the tasks of ``sample_at``, once the last stage's worker has ended."""
    buffer = dr.RehearsalBuffer(capacity=20, num_representatives=2, device="cpu", seed=0)
    samples = []
    for task in range(tasks):
        pipe = task_pipeline(files, buffer)
        pipe.build()
        for _ in range(3):                      # the worker starts and prepares ahead
            pipe.run()
        del pipe
        if task in sample_at:
            # the last stage goes once its worker ends the step it may be building
            for t in threading.enumerate():
                if t.name == "dali-rehearsal-stage":
                    t.join(timeout=10)
            samples.append((threads(), rss_mib()))
    assert buffer.num_seen > 0
    buffer.close()
    return samples


@pytest.mark.slow
def test_a_new_stage_per_task_for_200_tasks_keeps_threads_and_memory_flat(files, tmp_path):
    """As users run it: the collector on, never called. (With the collector off,
    DALI's own graph objects, which reference each other, stay: a few hundred KiB
    per task, with or without the stage. A stage that kept its source pipeline
    alive cost 1.5 MiB and 5 threads per task.) In a process of its own: in the
    suite's process, what earlier tests left (their threads, a heap of several
    hundred MiB) moves the resident size by several MiB either way."""
    listed = tmp_path / "files.json"
    listed.write_text(json.dumps([list(map(str, files[0])), [int(v) for v in files[1]]]))
    proc = subprocess.run([sys.executable, __file__, str(listed)], env=launching.env(),
                          cwd=launching.ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (threads_50, rss_50), (threads_200, rss_200) = json.loads(proc.stdout.splitlines()[-1])
    samples = [(threads_50, rss_50), (threads_200, rss_200)]
    # The first 50 tasks let allocators and caches reach their working size.
    assert threads_200 <= threads_50 + 1, samples
    assert rss_200 - rss_50 < 8, samples        # MiB over 150 tasks


if __name__ == "__main__":          # the 200 tasks, in a process of their own
    with open(sys.argv[1]) as f:
        paths, labels = json.load(f)
    print(json.dumps(new_stage_per_task((paths, labels))))
