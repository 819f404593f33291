"""CI fails when a test that must run is skipped (tests/skip_guard.py)."""

import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent

BODY = '''
import pytest

def test_runs():
    assert 1 + 1 == 2

@pytest.mark.gpu
def test_needs_a_gpu():
    pytest.skip("no CUDA device")

@pytest.mark.xfail(strict=True, reason="a known defect")
def test_expected_failure():
    assert False
'''


def _pytest(tmp_path, body, strict):
    (tmp_path / "test_sample.py").write_text(body)
    env = dict(os.environ, PYTHONPATH=str(HERE))
    env["DALI_REHEARSAL_NO_SKIPS"] = "1" if strict else "0"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "skip_guard", "-p", "no:cacheprovider",
         "-o", "markers=gpu: needs a GPU", "--rootdir", str(tmp_path), "-q",
         str(tmp_path / "test_sample.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_gpu_skips_and_xfails_are_allowed(tmp_path):
    proc = _pytest(tmp_path, BODY, strict=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 1 skipped, 1 xfailed" in proc.stdout


@pytest.mark.parametrize("skip", ['pytest.skip("cupy missing")',
                                  'pytest.importorskip("no_such_package_here")'])
def test_any_other_skip_fails_the_run(tmp_path, skip):
    body = BODY + f"\n\ndef test_must_run():\n    {skip}\n"
    proc = _pytest(tmp_path, body, strict=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "SKIPPED (not allowed): test_sample.py::test_must_run" in proc.stdout
    relaxed = _pytest(tmp_path, body, strict=False)
    assert relaxed.returncode == 0, relaxed.stdout + relaxed.stderr


def test_a_module_skipped_at_import_fails_the_run(tmp_path):
    body = 'import pytest\npytest.importorskip("no_such_package_here")\n' + BODY
    proc = _pytest(tmp_path, body, strict=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "SKIPPED (not allowed): test_sample.py" in proc.stdout
