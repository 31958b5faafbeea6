"""Load a model file: a Python file defining ``model_fn()`` and ``inputs_fn(batch, seq_len, generator)``.

``model_fn()`` returns a fresh, randomly initialised ``nn.Module`` (the verifier calls it under
``torch.manual_seed(seed)``); ``inputs_fn`` returns a dict of keyword arguments for the model.
Every problem comes back as a :class:`ModelFileError` with a one-line message naming the file.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Callable


# What user code (model files, impls) may raise that must become a named error, not end the run:
# SystemExit included (``sys.exit()`` at import, argparse in a model file). KeyboardInterrupt is not.
USER_CODE_ERRORS = (Exception, SystemExit)


class ModelFileError(Exception):
    """The model file cannot be used: missing, broken, or its model fails on one device."""


@dataclass(frozen=True)
class ModelFile:
    path: str
    model_fn: Callable
    inputs_fn: Callable


def _module_name(path: str) -> str:
    # Stable per path, so a spawned child loading the same file gets the same class names.
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"autosp_verify_model_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"


@contextlib.contextmanager
def _as_a_script(path: str):
    """Import ``path`` as ``python path`` would: its folder on sys.path (it may import a module
    beside it, now or when model_fn runs: the folder stays), and a sys.argv of its own (a file
    that parses arguments at import must not read the verifier's)."""
    folder, saved_argv = os.path.dirname(path), sys.argv
    if folder not in sys.path:
        sys.path.append(folder)
    sys.argv = [path]
    try:
        yield
    finally:
        sys.argv = saved_argv


def load_model_file(path: str) -> ModelFile:
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such file")
    if not path.endswith(".py"):
        raise ModelFileError(f"{path}: not a .py file (a model file defines model_fn and inputs_fn in Python)")
    name = _module_name(path)
    if name in sys.modules:
        module = sys.modules[name]
    else:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look classes up here
        try:
            with _as_a_script(path):
                spec.loader.exec_module(module)
        except SyntaxError as exc:
            del sys.modules[name]
            raise ModelFileError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from None
        except USER_CODE_ERRORS as exc:
            del sys.modules[name]
            raise ModelFileError(f"{path}: failed to import: {type(exc).__name__}: {exc}") from None
    fns = {}
    for fn in ("model_fn", "inputs_fn"):
        fns[fn] = getattr(module, fn, None)
        if not callable(fns[fn]):
            raise ModelFileError(f"{path}: does not define {fn}()")
    return ModelFile(path, fns["model_fn"], fns["inputs_fn"])
