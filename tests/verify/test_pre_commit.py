"""autosp-verify as a pre-commit hook (.pre-commit-hooks.yaml), used as a repository uses it: a
sample repository's .pre-commit-config.yaml names this repository (path and commit) and the hook
with its `args:` (the impl); `pre-commit run` fails on a broken impl and passes on an exact one.
(`pre-commit try-repo` runs a hook with the manifest's arguments only: no impl to choose.)"""
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BIN = os.path.dirname(sys.executable)


def _git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.mark.multiproc
@pytest.mark.skipif(shutil.which("pre-commit", path=BIN) is None, reason="pre-commit is not installed")
@pytest.mark.parametrize("impl, passes", [("broken_impls.py:nan_loss_on_rank1", False), ("autosp-eager", True)])
def test_the_pre_commit_hook_fails_a_broken_impl_and_passes_an_exact_one(tmp_path, impl, passes):
    sample = tmp_path / "sample"
    sample.mkdir()
    shutil.copy(os.path.join(HERE, "tiny_model.py"), sample / "tiny_sp_model.py")
    shutil.copy(os.path.join(HERE, "broken_impls.py"), sample / "broken_impls.py")
    _git(sample, "init", "-q")
    _git(sample, "add", ".")
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"], PRE_COMMIT_HOME=str(tmp_path / "cache"))
    config = sample / ".pre-commit-config.yaml"
    config.write_text(f"repos:\n- repo: {ROOT}\n  rev: {_head()}\n  hooks:\n  - id: autosp-verify\n"
                      f"    args: [--impl, {impl}, --steps, '1']\n")
    _git(sample, "add", ".")
    result = subprocess.run([os.path.join(BIN, "pre-commit"), "run", "--all-files", "--verbose"], cwd=sample, env=env,
                            capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert "verdict: " + ("pass" if passes else "fail") in out, out  # the hook ran the verifier on the file
    assert (result.returncode == 0) == passes, out


def _head():
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
