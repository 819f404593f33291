"""Where a training step's time goes: an opt-in per-step breakdown.

Off by default. While off, every hook in the library is one attribute read
(``profiling.on``) and a shared do-nothing context: nothing is timed or stored.
Turned on, each phase is timed with ``time.perf_counter`` (and, with
``nvtx=True``, also marked as an NVTX range, for Nsight Systems)::

    import dali_rehearsal as dr

    dr.profiling.enable()                    # dr.profiling.enable(nvtx=True) on a GPU
    for data in dr.profiling.iterate(loader):       # times each next(loader)
        with dr.profiling.phase("train"):
            loss = step(model, data)
    print(dr.profiling.format_report())      # or dr.profiling.report(), a dict
    dr.profiling.disable()

A loop that calls ``next()`` itself marks its steps with ``profiling.step()``
and times ``next()`` with ``profiling.next_batch``::

    while True:
        with dr.profiling.step():
            try:
                data = dr.profiling.next_batch(loader)
            except StopIteration:
                break
            with dr.profiling.phase("train"):
                loss = step(model, data)

The phases, in the thread that drives the training loop ("loop"), each timed
*exclusive* of the phases inside it, so that they add up to the loop's time:

``source``      running the source pipeline for fresh samples (the stage's
                ``prepare_ahead=0``; with a worker this happens in the background)
``exchange``    waiting for the round of representatives (global sampling: the
                other ranks' samples; local sampling: the draw itself)
``stage``       the stage's other host work in the loop thread: copies of the fresh
                rows and representatives into the output batch, inserts, hand-over
``stage_wait``  waiting for the batch the stage's worker prepares (``prepare_ahead > 0``)
``mixing``      the rest of ``next(loader)``: running the mixing pipeline (or, without a
                stage, the plain pipeline) and handing its outputs to the framework
``train``       what the user marks with ``phase("train")``, the training step
``other``       the loop's remaining time (the step's own bookkeeping)

Phases of the loop's thread outside any step (the first prefetch of a DALI
iterator when it is made) are reported apart, as ``outside``. The
``background`` part of the report holds the same phases timed in the
stage's worker thread (``prepare_ahead > 0``): they overlap the loop, so they
do not add to its time unless the loop waits for them (``stage_wait``).
"""

from __future__ import annotations

import contextlib
import threading
import time

__all__ = ["enable", "disable", "reset", "is_enabled", "phase", "iterate", "step",
           "next_batch", "report", "merge", "format_report", "PHASES"]

#: The loop's phases, in the order the report lists them.
PHASES = ("source", "exchange", "stage", "stage_wait", "mixing", "train", "other")

#: The flag every hook reads; True only between enable() and disable().
on = False

_nvtx = None            # (push, pop) while NVTX ranges are on
_lock = threading.Lock()
_totals: dict = {}      # (thread kind, phase) -> seconds (exclusive)
_counts: dict = {}      # (thread kind, phase) -> entries
_steps = 0
_loop_time = 0.0        # seconds spent in the loop between the first next() and the last step
_local = threading.local()
_NULL = contextlib.nullcontext()

#: The name of the stage's worker thread (its phases are "background").
WORKER_THREAD = "dali-rehearsal-stage"


def _nvtx_functions(want):
    """(push, pop) for NVTX ranges, or None: the ``nvtx`` package, else
    ``torch.cuda.nvtx`` when torch sees a GPU. ``want=None``: when available."""
    if want is False:
        return None
    try:
        import nvtx as _mod
        return (lambda name: _mod.push_range(name, domain="dali_rehearsal")), \
            (lambda: _mod.pop_range(domain="dali_rehearsal"))
    except Exception:       # noqa: BLE001 - not installed, or no usable library
        pass
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop
    except Exception:       # noqa: BLE001
        pass
    if want:
        raise RuntimeError("profiling.enable(nvtx=True): neither the nvtx package nor "
                           "torch.cuda.nvtx (with a visible GPU) is available")
    return None


def enable(*, nvtx: bool | None = False) -> None:
    """Starts timing (and clears earlier figures). ``nvtx=True`` also marks
    every phase as an NVTX range (the ``nvtx`` package, or ``torch.cuda.nvtx``
    on a GPU); ``None``: NVTX ranges when available."""
    global on, _nvtx
    reset()
    _nvtx = _nvtx_functions(nvtx)
    on = True


def disable() -> None:
    """Stops timing; the figures stay readable with :func:`report`."""
    global on
    on = False


def is_enabled() -> bool:
    return on


def reset() -> None:
    """Clears the figures (timing stays on or off)."""
    global _steps, _loop_time
    with _lock:
        _totals.clear()
        _counts.clear()
        _steps = 0
        _loop_time = 0.0


def _kind() -> str:
    if threading.current_thread().name == WORKER_THREAD:
        return "background"
    return "loop" if getattr(_local, "in_step", False) else "outside"


class _Phase:
    """Times one phase, exclusive of the phases timed inside it (same thread)."""

    __slots__ = ("name", "start", "inner")

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        stack = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        stack.append(self)
        self.inner = 0.0
        if _nvtx is not None:
            _nvtx[0](self.name)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        elapsed = time.perf_counter() - self.start
        if _nvtx is not None:
            _nvtx[1]()
        stack = _local.stack
        stack.pop()
        if stack:
            stack[-1].inner += elapsed
        key = (_kind(), self.name)
        with _lock:
            _totals[key] = _totals.get(key, 0.0) + max(0.0, elapsed - self.inner)
            _counts[key] = _counts.get(key, 0) + 1
        return False


def phase(name: str):
    """A context that times ``name`` while profiling is on (a shared
    do-nothing context while it is off)."""
    return _Phase(name) if on else _NULL


def iterate(iterator):
    """Yields the items of ``iterator``; while profiling is on, times each
    ``next()`` (the ``mixing`` phase, less the stage's phases inside it) and
    counts a step per item, the step lasting until the next ``next()``."""
    global _steps, _loop_time
    it = iter(iterator)
    while True:
        if not on:
            try:
                item = next(it)
            except StopIteration:
                return
            yield item
            continue
        start = time.perf_counter()
        _local.in_step = True
        try:
            with _Phase("mixing"):
                item = next(it)
        except StopIteration:       # the epoch's end counts as loop time, not as a step
            _local.in_step = False
            with _lock:
                _loop_time += time.perf_counter() - start
            return
        yield item
        _local.in_step = False
        with _lock:
            _steps += 1
            _loop_time += time.perf_counter() - start


class step:
    """``with profiling.step():`` around one step of a loop that calls
    ``next()`` itself (time ``next()`` with :func:`next_batch`): the step
    counts, and its time adds to the loop's total, while profiling is on."""

    __slots__ = ("start", "counted")

    def __enter__(self):
        self.start = time.perf_counter() if on else None
        self.counted = True
        _local.in_step = on
        _local.step = self
        return self

    def not_a_step(self) -> None:
        """This pass of the loop took no step (an epoch's end): its time
        counts towards the loop's total, but not as a step."""
        self.counted = False

    def __exit__(self, kind, *exc):
        global _steps, _loop_time
        _local.in_step = False
        _local.step = None
        if self.start is not None:
            elapsed = time.perf_counter() - self.start
            with _lock:     # an epoch's end (StopIteration) is loop time, not a step
                _steps += self.counted and kind is not StopIteration
                _loop_time += elapsed
        return False


def next_batch(iterator):
    """``next(iterator)``, timed as the ``mixing`` phase while profiling is on;
    a ``StopIteration`` makes the enclosing :class:`step` no step (an epoch's end)."""
    if not on:
        return next(iterator)
    try:
        with _Phase("mixing"):
            return next(iterator)
    except StopIteration:
        current = getattr(_local, "step", None)
        if current is not None:
            current.counted = False
        raise


def report() -> dict:
    """The figures so far: ``steps``, ``loop_s`` (the loop's time over those
    steps), ``loop`` and ``background`` (seconds per phase, exclusive),
    ``outside`` (phases in the loop's thread outside any step: a pipeline's
    first prefetch when its iterator is made), ``calls`` (entries per phase) and ``per_step_ms`` (the loop's phases per
    step, ``other`` included: they add up to the loop's time per step)."""
    with _lock:
        totals, counts, steps, loop_time = dict(_totals), dict(_counts), _steps, _loop_time
    loop = {p: totals.get(("loop", p), 0.0) for p in PHASES if p != "other"}
    loop.update({p: s for (k, p), s in totals.items() if k == "loop" and p not in loop})
    loop["other"] = max(0.0, loop_time - sum(loop.values()))
    background = {p: s for (k, p), s in totals.items() if k == "background"}
    outside = {p: s for (k, p), s in totals.items() if k == "outside"}
    per_step = {p: 1e3 * s / steps for p, s in loop.items()} if steps else {}
    return {"steps": steps, "loop_s": loop_time, "loop": loop, "background": background,
            "outside": outside,
            "calls": {f"{k}:{p}": n for (k, p), n in counts.items()},
            "per_step_ms": per_step,
            "step_ms": 1e3 * loop_time / steps if steps else 0.0}


def merge(reports) -> dict:
    """Several reports (say one per task or per segment) as one: seconds and
    steps summed."""
    parts = {"loop": {}, "background": {}, "outside": {}}
    for r in reports:
        for part, into in parts.items():
            for k, v in r.get(part, {}).items():
                into[k] = into.get(k, 0.0) + v
    steps = sum(r["steps"] for r in reports)
    total = sum(r["loop_s"] for r in reports)
    return {"steps": steps, "loop_s": total, **parts,
            "per_step_ms": {k: 1e3 * v / steps for k, v in parts["loop"].items()} if steps
            else {}, "step_ms": 1e3 * total / steps if steps else 0.0}


def format_report(rep: dict | None = None) -> str:
    """The report as a small table (ms per step, share of the loop's time)."""
    rep = report() if rep is None else rep
    steps, total = rep["steps"], rep["loop_s"]
    lines = [f"per-step breakdown: {steps} steps, {rep['step_ms']:.2f} ms per step"]
    if not steps:
        return lines[0]
    for p, s in rep["loop"].items():
        lines.append(f"  {p:<11}{1e3 * s / steps:9.3f} ms  {100 * s / max(total, 1e-12):5.1f} %")
    if rep.get("outside"):
        lines.append("  outside the steps (iterator construction, resets), in total:")
        for p, s in sorted(rep["outside"].items()):
            lines.append(f"    {p:<9}{1e3 * s:9.3f} ms")
    if rep["background"]:
        lines.append("  background (the stage's worker, overlapping the loop):")
        for p, s in sorted(rep["background"].items()):
            lines.append(f"    {p:<9}{1e3 * s / steps:9.3f} ms")
    return "\n".join(lines)
