"""The README runs: every Python block as a program, every shell command checked.

- Each ```python block of README.md is a complete program. It runs in a
  subprocess on this CPU-only machine (real MNIST files, DALI CPU operators);
  a block whose first line is ``# run: mpiexec -n N`` or ``# run: torchrun
  --nproc_per_node=N`` runs under that launcher. The first block is also
  ``pipelines/example_cpu.py``, which must not drift from it.
- Each command of the ```bash blocks names a script that exists, and every
  ``--option`` it passes is one the script accepts (its ``--help``, or the
  shell script's text); ``pip install`` lines name extras that exist.
"""

from __future__ import annotations

import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from dist_programs import launching

pytest.importorskip("nvidia.dali")
pytest.importorskip("torch")

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", README.read_text(), flags=re.S)


def _env(tmp_path) -> dict:
    """The environment of a script run: this checkout first, a fresh data cache."""
    return launching.env(DALI_REHEARSAL_CACHE=tmp_path / "cache")


def _launcher(code: str) -> list[str]:
    first = code.splitlines()[0]
    match = re.match(r"#\s*run:\s*(.+)", first)
    if not match:
        return [sys.executable]
    words = shlex.split(match.group(1))
    if words[0] == "mpiexec":
        if shutil.which("mpiexec") is None:
            pytest.fail("mpiexec not found: the mpi extra installs it")
        return words + [sys.executable]
    if words[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run"] + words[1:]
    raise AssertionError(f"unknown launcher in {first!r}")


def test_the_first_example_is_the_cpu_script():
    assert blocks("python")[0] == (ROOT / "pipelines" / "example_cpu.py").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_every_python_block_runs(index, tmp_path):
    code = blocks("python")[index]
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run(_launcher(code) + [str(script)], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, (f"block {index}:\n{code[:300]}\n--- stdout\n"
                                  f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    if index == 0:
        lines = [line for line in proc.stdout.splitlines() if line.startswith("task ")]
        assert len(lines) == 4          # 2 tasks x 2 epochs
        # after the second task the buffer holds both tasks' classes
        assert "9:" in lines[-1] and "0:" in lines[-1]
    if "torchrun" in code.splitlines()[0] or "mpiexec" in code.splitlines()[0]:
        ranks = re.findall(r"rank (\d): representatives from ranks \[([^\]]*)\]", proc.stdout)
        assert sorted(r for r, _ in ranks) == ["0", "1"], proc.stdout
        for _, seen in ranks:           # every rank replays samples of the other rank too
            assert seen.replace(" ", "") == "0,1", proc.stdout


def _commands():
    """``(block, command words)`` of every command in the bash blocks."""
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            for part in line.split("&&"):
                yield shlex.split(part)


def _options(words) -> list[str]:
    return [w.split("=", 1)[0] for w in words if w.startswith("--")]


def _script_and_options(words):
    """The script a command runs and the options given to it."""
    if words[:2] == ["python", "-m"] and words[2] == "pip":
        return None, []
    if words[0] == "mpiexec":
        words = words[words.index("python"):]
    if words[0] == "torchrun":
        words = ["python"] + [w for w in words[1:] if not w.startswith("--nproc")]
    if words[0] == "python":
        return ROOT / words[1], _options(words[2:])
    if words[0] == "bash":
        return ROOT / words[1], _options(words[2:])
    raise AssertionError(f"a README command this test does not know: {' '.join(words)}")


COMMANDS = list(_commands())


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(w)[:60] for w in COMMANDS])
def test_every_shell_command_names_what_exists(words, tmp_path):
    if words[:4] == ["python", "-m", "pip", "install"]:
        pyproject = (ROOT / "pyproject.toml").read_text()
        for spec in words[4:]:
            for extra in re.findall(r"\.\[([^\]]+)\]", spec):
                for name in extra.split(","):
                    assert re.search(rf"^{re.escape(name)} = \[", pyproject, flags=re.M), name
        return
    script, options = _script_and_options(words)
    assert script.is_file(), script
    if script.suffix == ".py":
        proc = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT,
                              env=_env(tmp_path), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        text = proc.stdout
    else:
        text = script.read_text()
    for option in options:
        assert option in text, f"{script.name} does not accept {option}"
