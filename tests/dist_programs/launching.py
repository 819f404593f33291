"""Launching the programs of this folder on several processes, bounded.

Three launchers:

- ``mpiexec``: ``mpiexec -n N python PROGRAM ...`` (the mpi4py transport);
- ``torchrun``: ``torchrun --standalone --nproc_per_node=N PROGRAM ...`` (the
  torch.distributed transport, through PyTorch's own launcher);
- ``spawn``: N plain processes with the environment torchrun gives its
  workers (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...), without torchrun's
  agent, which stops every worker as soon as one fails: the failure tests
  need to see what the survivors do.

Every launch runs in its own session and is killed whole when it outlives
its bound: a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def env(**extra) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH")]))
    e["DALI_DISABLE_NVML"] = "1"
    e.setdefault("MPLBACKEND", "Agg")
    e.setdefault("OMP_NUM_THREADS", "1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(name, None)                 # a launcher inside a launcher: start clean
    e.update({k: str(v) for k, v in extra.items()})
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def launch(launcher: str, n: int, argv: list, *, timeout: float, extra_env=None,
           mpiexec_args=(), python_args=()) -> list[subprocess.CompletedProcess]:
    """Runs ``python [python_args] argv`` on ``n`` processes; returns the
    completed process(es). Fails the test when the launch outlives ``timeout``."""
    e = env(**(extra_env or {}))
    argv = [str(a) for a in argv]
    if launcher == "mpiexec":
        cmds = [["mpiexec", *mpiexec_args, "-n", str(n), sys.executable, *python_args, *argv]]
        envs = [e]
    elif launcher == "torchrun":
        cmds = [[sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={n}", "--monitor-interval=0.2", *argv]]
        envs = [e]
    elif launcher == "spawn":
        port = free_port()
        cmds, envs = [], []
        for rank in range(n):
            cmds.append([sys.executable, *python_args, *argv])
            envs.append(dict(e, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n),
                             LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                             MASTER_PORT=str(port)))
    else:
        raise ValueError(launcher)
    procs = [subprocess.Popen(c, env=v, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for c, v in zip(cmds, envs)]
    done = []
    try:
        for p, c in zip(procs, cmds):
            out, _ = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(c, p.returncode, out, ""))
    except subprocess.TimeoutExpired:
        _kill(procs)
        outs = []
        for p in procs:
            try:
                outs.append(p.communicate(timeout=10)[0] or "")
            except subprocess.TimeoutExpired:
                outs.append("")
        pytest.fail(f"{launcher} -n {n} {' '.join(argv[-2:])} hung (> {timeout} s):\n"
                    + "\n".join(o[-3000:] for o in outs))
    finally:
        _kill(procs)
    return done


def output(done) -> str:
    return "\n".join((p.stdout or "")[-4000:] for p in done)


def read_results(out_dir, scenario: str, n: int) -> dict[int, dict]:
    """``{rank: result}`` for the ranks that wrote one."""
    results = {}
    for rank in range(n):
        path = Path(out_dir) / f"{scenario}-{rank}.json"
        if path.exists():
            results[rank] = json.loads(path.read_text())
            path.unlink()
    return results
