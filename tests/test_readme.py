"""The README and the documents in docs/ run: every Python block as a program,
every shell command checked, every link resolved.

- Each ```python block of README.md and docs/*.md is a complete program. It
  runs in a subprocess on this CPU-only machine (real MNIST files, DALI CPU
  operators); a block whose first line is ``# run: mpiexec -n N`` or ``# run:
  torchrun --nproc_per_node=N`` runs under that launcher. The README's first
  block is also ``pipelines/example_cpu.py``, which must not drift from it, and
  its ```diff block turns it into ``pipelines/example_gpu.py`` (run on a GPU).
- Each command of the ```bash blocks (README.md, docs/*.md, pipelines/README.md)
  names a script that exists, and every ``--option`` it passes is one the
  script accepts (its ``--help``, or the shell script's text); ``pip install``
  lines name extras that exist.
- Every relative link, and every ``#anchor``, of those files resolves.
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
#: the documents whose code and links are checked
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "pipelines" / "README.md"]


def blocks(kind: str, path: pathlib.Path = README) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", path.read_text(), flags=re.S)


#: every Python program of the README and of docs/: (where, code)
PROGRAMS = [(f"{path.relative_to(ROOT)}:{i}", code)
            for path in DOCUMENTS if path.parent.name != "pipelines"
            for i, code in enumerate(blocks("python", path))]


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


def _apply(diff: str, text: str) -> str:
    """The README's diff applied to ``text``: each group of ``-`` lines (a
    group ends at a blank line) occurs once and is replaced by the ``+`` lines
    that follow it."""
    for group in diff.strip().split("\n\n"):
        lines = group.splitlines()
        assert all(line[:1] in "-+" for line in lines), group
        old = "".join(line[1:] + "\n" for line in lines if line.startswith("-"))
        new = "".join(line[1:] + "\n" for line in lines if line.startswith("+"))
        assert old and text.count(old) == 1, f"not once in the CPU program:\n{old}"
        text = text.replace(old, new)
    return text


def test_the_gpu_twin_is_the_first_example_with_the_readme_diff_applied():
    (diff,) = blocks("diff")
    gpu = (ROOT / "pipelines" / "example_gpu.py").read_text()
    assert _apply(diff, blocks("python")[0]) == gpu
    assert 'device="gpu"' in gpu and "device_id=None" not in gpu and 'device="cpu"' not in gpu


@pytest.mark.gpu
def test_the_gpu_twin_runs_on_a_gpu(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "example_gpu.py")],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert len([line for line in proc.stdout.splitlines() if line.startswith("task ")]) == 4


@pytest.mark.slow
@pytest.mark.parametrize("where, code", PROGRAMS, ids=[w for w, _ in PROGRAMS])
def test_every_python_block_runs(where, code, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run(_launcher(code) + [str(script)], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, (f"{where}:\n{code[:300]}\n--- stdout\n"
                                  f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    if where == "README.md:0":
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
    """The words of every command in the bash blocks."""
    for block in (b for path in DOCUMENTS for b in blocks("bash", path)):
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


# ------------------------------------------------------------------------ links

def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation but
    ``-`` and ``_`` dropped, spaces as ``-``."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(path: pathlib.Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


LINKS = [(path, target) for path in DOCUMENTS for target in _links(path)
         if not re.match(r"[a-z]+:", target)]


def test_the_documents_have_links():
    assert len(LINKS) > 40 and any("#" in t for _, t in LINKS)


@pytest.mark.parametrize("path, target", LINKS,
                         ids=[f"{p.relative_to(ROOT)}->{t}" for p, t in LINKS])
def test_every_relative_link_and_anchor_resolves(path, target):
    file, _, anchor = target.partition("#")
    dest = (path.parent / file).resolve() if file else path
    assert dest.exists(), f"{path.relative_to(ROOT)}: {target} names no file"
    if anchor:
        assert dest.suffix == ".md", f"{target}: an anchor into a file that is not Markdown"
        assert anchor in _anchors(dest), (f"{path.relative_to(ROOT)}: #{anchor} is no heading "
                                          f"of {dest.relative_to(ROOT)}")

