"""--timeout bounds the work on the calling thread too (the one-device reference, an impl's
warm-up), and a timeout says what each thread was doing: compiling, or where in the user's code."""
import os
import threading

from autosp_verify import verify_file
from autosp_verify.deadline import doing

from .conftest import TINY

HERE = os.path.dirname(os.path.abspath(__file__))


def test_a_hanging_reference_times_out_and_names_the_line():
    result = verify_file(f"{HERE}/hanging_model.py", impl="autosp-eager", world_size=2, seq_len=8, timeout=3)
    assert result.status == "error", (result.status, result.error)
    assert "in the one-device reference" in result.error and "hanging_model.py" in result.error, result.error


def test_a_hanging_warm_up_times_out():
    result = verify_file(TINY, impl=f"{HERE}/verdict_impls.py:spinning_warm_up", world_size=2, seq_len=8, timeout=3)
    assert result.status == "error" and "in the impl's warm-up" in result.error, (result.status, result.error)
    assert "verdict_impls.py" in result.error, result.error


def test_ranks_that_time_out_say_where_they_are():
    result = verify_file(TINY, impl=f"{HERE}/verdict_impls.py:sleeps", world_size=2, seq_len=8, timeout=3)
    assert result.status == "error", (result.status, result.error)
    assert "rank 0 at" in result.error and "verdict_impls.py" in result.error and "in step" in result.error, \
        result.error


def test_a_thread_inside_torch_compile_reads_as_compiling():
    """A frame from torch/_dynamo (here a code object given that file name) on the stack."""
    entered, release = threading.Event(), threading.Event()
    code = compile("entered.set()\nrelease.wait(30)\n", os.path.join("site", "torch", "_dynamo", "convert_frame.py"),
                   "exec")
    worker = threading.Thread(target=exec, args=(code, {"entered": entered, "release": release}))
    worker.start()
    entered.wait(30)
    try:
        assert doing(worker.ident).startswith("compiling"), doing(worker.ident)
        assert doing(threading.get_ident()).startswith("at ") and "test_deadline.py" in doing(threading.get_ident())
    finally:
        release.set()
        worker.join()
