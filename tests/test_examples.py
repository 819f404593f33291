"""The stage's documentation runs: every Python block of its README text.

Each block of ``docs/readme-drafts/stage.md`` is a complete program; it runs in
a subprocess on this CPU-only machine (real MNIST files, DALI CPU operators).
The first block is also ``pipelines/example_cpu.py``, which must not drift from
it.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("nvidia.dali")
pytest.importorskip("torch")

ROOT = pathlib.Path(__file__).resolve().parents[1]
DRAFT = ROOT / "docs" / "readme-drafts" / "stage.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DRAFT.read_text(), flags=re.S)


def _run(code: str, tmp_path) -> str:
    script = tmp_path / "example.py"
    script.write_text(code)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["DALI_REHEARSAL_CACHE"] = str(tmp_path / "cache")
    env["DALI_DISABLE_NVML"] = "1"
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"--- stdout\n{proc.stdout[-4000:]}\n"
                                  f"--- stderr\n{proc.stderr[-4000:]}")
    return proc.stdout


def test_the_cpu_example_is_the_script():
    assert blocks()[0] == (ROOT / "pipelines" / "example_cpu.py").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(blocks())))
def test_every_code_block_runs_on_a_cpu(index, tmp_path):
    out = _run(blocks()[index], tmp_path)
    if index == 0:
        lines = [line for line in out.splitlines() if line.startswith("task ")]
        assert len(lines) == 4          # 2 tasks x 2 epochs
        # the second task's buffer holds both tasks' classes
        assert "9:" in lines[-1] and "0:" in lines[-1]
