"""The verifier says yes only when it should: the command's exit status comes only from a
written verdict (autosp_verify/supervise.py; the real console script, as a CI job runs it), the
reference cannot be patched by the impl, and an exact run without sequence parallelism is marked."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from autosp_verify.cli import main

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
COMMAND = shutil.which("autosp-verify", path=os.path.dirname(sys.executable)) or "autosp-verify"
LLAMA = os.path.join(ROOT, "fixtures", "hf_llama.py")


def _run(*args, **kwargs):
    return subprocess.run([COMMAND, *args], capture_output=True, text=True, cwd=ROOT, timeout=300, **kwargs)


def test_a_model_file_calling_sys_exit_at_import_is_named(tmp_path):
    path = tmp_path / "exits.py"
    path.write_text("import sys\nsys.exit(0)\n")
    assert main([str(path)]) == 2  # in process: the loader names it (usage error)


def test_a_rank_ending_the_process_is_no_verdict_and_fails(tmp_path):
    report = tmp_path / "report.json"
    result = _run(LLAMA, "--impl", f"{HERE}/verdict_impls.py:exits_on_rank1", "--json", str(report))
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "ended without a verdict (exit status 0)" in result.stderr
    recorded = json.loads(report.read_text())
    assert recorded["verdict"] == "error" and recorded["incomplete"], recorded
    # control: the same command exits 0 on an exact run (tests/verify/test_progress.py)


def _descendants(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except OSError:
                pass
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.multiproc
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_ends_every_rank_and_removes_the_temp_folder():
    proc = subprocess.Popen([COMMAND, LLAMA, "--simulator", "gloo", "--impl", f"{HERE}/verdict_impls.py:sleeps"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_descendants(proc.pid)) < 3:  # the child and its 2 ranks
        time.sleep(0.5)
    family = _descendants(proc.pid)
    assert len(family) >= 3, family
    with open(f"/proc/{family[0]}/environ", "rb") as f:
        folder = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)[b"TMPDIR"].decode()
    assert os.path.isdir(folder)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err)
    time.sleep(0.5)
    assert not [p for p in family if _alive(p)], [p for p in family if _alive(p)]
    assert not os.path.exists(folder)


def test_an_impl_patching_torch_at_import_cannot_pass():
    """The reference runs before the impl is imported and again after it ran: an impl that drops
    is_causal for the whole process (reference included) is an error, not a PASS."""
    import torch.nn.functional as F
    from autosp_verify import verify_file
    original = F.scaled_dot_product_attention
    try:
        result = verify_file(LLAMA, impl=f"{HERE}/patching_impl.py:patched", world_size=2, seq_len=13)
    finally:
        F.scaled_dot_product_attention = original
    assert result.status == "error" and "the impl changed the one-device model" in result.error, \
        (result.status, result.error)
    control = verify_file(LLAMA, impl="autosp-eager", world_size=2, seq_len=13)
    assert control.status == "pass", (control.status, control.error)


def test_a_row_without_sequence_parallelism_is_marked(capsys):
    """Every rank running the whole sequence is exact (PASS) but is not SP: the row and the
    summary say so, from the saved activations every case measures; autosp-eager is not marked."""
    assert main([os.path.join(HERE, "tiny_model.py"), "--impl", f"{HERE}/verdict_impls.py:whole_sequence_everywhere",
                 "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "PASS (NO SP: a rank saves 1.00x one device)" in out and "1 without sequence parallelism" in out, out
    assert main([os.path.join(HERE, "tiny_model.py"), "--impl", "autosp-eager", "--world-size", "2"]) == 0
    assert "NO SP" not in capsys.readouterr().out


def test_a_split_that_saves_no_memory_is_not_called_no_sp(capsys):
    """autosp-wrap with HF's activation checkpointing on a tiny Llama: the layers run Ulysses (the
    all-to-alls move chunks), but a rank saves as much as one device (the checkpointed layers keep
    only their inputs; the logits outside them stay whole). The row says that, not "NO SP"; the
    whole-sequence impl above stays NO SP (it moves no chunk)."""
    model = os.path.join(HERE, "..", "compiler", "checkpointed_llama.py")
    assert main([model, "--impl", "autosp-wrap", "--world-size", "2", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "PASS (NO MEMORY SAVED: a rank saves" in out and "1 saving no activation memory" in out, out
    assert "NO SP" not in out and "without sequence parallelism" not in out, out
