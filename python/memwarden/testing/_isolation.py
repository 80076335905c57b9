"""run_isolated(): call a function in a fresh interpreter (spawned, not forked).

The child gets the parent's ``sys.path`` and working directory, runs the call with
``faulthandler`` on, and writes its result (or exception and traceback) to a file. Its
stdout/stderr, C-level output included, go to files that the parent replays on its own
streams (so pytest captures them). A child that dies without a result -- ``os._exit``, a
segfault, a timeout -- raises :class:`IsolatedProcessError` in the parent.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

__all__ = ["run_isolated", "IsolatedProcessError", "RemoteTraceback"]

_BOOT = ("import sys,pickle;f=open(sys.argv[1],'rb');sys.path[:]=pickle.load(f);"
         "from memwarden.testing._isolation import _child_main;_child_main(f,sys.argv[2])")


class IsolatedProcessError(RuntimeError):
    """The isolated process ended without reporting a result (crash, exit, timeout)."""

    def __init__(self, message: str, returncode: int | None, stdout: str, stderr: str):
        super().__init__(message)
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


class RemoteTraceback(Exception):
    """Stands for a child exception that could not be pickled."""


class _ModuleFunction:
    """A picklable reference to a function by file path, for test modules that are not
    importable by name in the child (pytest's importlib mode, rootdir-relative names)."""

    def __init__(self, module: str, path: str | None, qualname: str):
        self.module, self.path, self.qualname = module, path, qualname

    def resolve(self) -> Callable:
        mod = None
        try:
            mod = importlib.import_module(self.module)
            if self.path and os.path.abspath(getattr(mod, "__file__", "") or "") != os.path.abspath(self.path):
                mod = None
        except Exception:
            mod = None
        if mod is None:
            if not self.path:
                raise ImportError(f"cannot import {self.module!r} in the isolated process")
            spec = importlib.util.spec_from_file_location(self.module, self.path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[self.module] = mod
            spec.loader.exec_module(mod)
        obj: Any = mod
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return obj

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def run_isolated(fn: Callable, *args: Any, timeout: float | None = None,
                 env: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` in a fresh Python process and return its result.

    ``fn``, the arguments and the result must be picklable (module-level functions are
    pickled by reference). An exception in the child is re-raised here with the child's
    traceback attached as a note; a crash or a ``timeout`` raises
    :class:`IsolatedProcessError` with the exit code or signal and the child's output.
    """
    if getattr(fn, "__module__", None) in ("__main__", "__mp_main__") or "<locals>" in getattr(fn, "__qualname__", ""):
        if "<locals>" in getattr(fn, "__qualname__", ""):
            raise ValueError(f"run_isolated needs a module-level function, got {fn.__qualname__!r}")
        fn = _ModuleFunction(fn.__module__, getattr(sys.modules.get(fn.__module__), "__file__", None),
                             fn.__qualname__)
    with tempfile.TemporaryDirectory(prefix="memwarden-iso-") as d:
        d = Path(d)
        payload, result, out, err = d / "call.pkl", d / "result.pkl", d / "stdout", d / "stderr"
        with payload.open("wb") as f:
            pickle.dump([p for p in sys.path if isinstance(p, str)], f)
            try:
                pickle.dump((fn, args, kwargs), f)
            except Exception as e:
                raise TypeError(f"run_isolated: the function and its arguments must be picklable: {e}") from e
        child_env = dict(os.environ if env is None else env)
        child_env.setdefault("PYTHONFAULTHANDLER", "1")
        with out.open("wb") as fo, err.open("wb") as fe:
            proc = subprocess.Popen([sys.executable, "-c", _BOOT, str(payload), str(result)],
                                    stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=child_env,
                                    cwd=os.getcwd())
            try:
                rc = proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
                timed_out = True
        so = out.read_text(errors="replace")
        se = err.read_text(errors="replace")
        if so:
            sys.stdout.write(so)
            sys.stdout.flush()
        if se:
            sys.stderr.write(se)
            sys.stderr.flush()
        status = None
        if result.exists() and not timed_out:
            try:
                with result.open("rb") as f:
                    status = pickle.load(f)
            except Exception as e:  # noqa: BLE001
                status = ("error", RemoteTraceback(f"cannot unpickle the child's result: {e}"), "")
        if status is None:
            if timed_out:
                why = f"timed out after {timeout} s and was killed"
            elif rc is not None and rc < 0:
                why = f"was killed by {_signal_name(rc)}"
            else:
                why = f"exited with code {rc}"
            tail = "\n".join(se.strip().splitlines()[-30:])
            raise IsolatedProcessError(
                f"isolated process for {getattr(fn, 'qualname', None) or getattr(fn, '__qualname__', fn)!s} {why} without reporting a result"
                + (f"\n--- its stderr (last lines) ---\n{tail}" if tail else ""), rc, so, se)
        kind, value, tb = status
        if kind == "ok":
            return value
        if tb and hasattr(value, "add_note"):
            value.add_note(f"--- traceback in the isolated process ---\n{tb.rstrip()}")
        raise value


def _child_main(f, result_path: str) -> None:
    import faulthandler
    faulthandler.enable()
    try:
        fn, args, kwargs = pickle.load(f)
        f.close()
        if isinstance(fn, _ModuleFunction):
            fn = fn.resolve()
        status = ("ok", fn(*args, **kwargs), "")
    except BaseException as e:  # noqa: BLE001 - report everything, SystemExit included
        tb = traceback.format_exc()
        try:
            pickle.dumps(e)
            status = ("error", e, tb)
        except Exception:
            status = ("error", RemoteTraceback(f"{type(e).__name__}: {e}"), tb)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        data = pickle.dumps(status)
    except Exception as e:  # unpicklable return value
        data = pickle.dumps(("error", RemoteTraceback(f"cannot pickle the result: {e}"), ""))
    tmp = result_path + ".tmp"
    with open(tmp, "wb") as out:
        out.write(data)
    os.replace(tmp, result_path)
