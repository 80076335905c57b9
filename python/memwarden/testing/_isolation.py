"""run_isolated(): call a function in a fresh interpreter (spawned, not forked).

The child gets the parent's ``sys.path`` and working directory, runs the call with
``faulthandler`` on, and writes its result (or exception and traceback) to a file. Its
stdout/stderr, C-level output included, go to files that the parent replays on its own
streams (so pytest captures them). A child that dies without a result -- ``os._exit``, a
segfault, a timeout -- raises :class:`IsolatedProcessError` in the parent.

:func:`spawn` is the same call returning the outcome instead of raising; its ``render``
formats a failure in the child, where its frames still exist (the pytest plugin passes a
:class:`PytestFailure`, so that an isolated test's report reads like an in-process one).
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

__all__ = ["run_isolated", "spawn", "with_child_traceback", "IsolatedProcessError", "RemoteTraceback",
           "PytestFailure"]

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
    importable by name in the child (pytest's importlib mode, rootdir-relative names).
    With ``rewrite_asserts`` the module is loaded with pytest's assertion rewriting, so that
    a failing ``assert`` explains itself as it does in the pytest process."""

    def __init__(self, module: str, path: str | None, qualname: str, rewrite_asserts: bool = False):
        self.module, self.path, self.qualname = module, path, qualname
        self.rewrite_asserts = rewrite_asserts

    def _loaded(self) -> Any:
        mod = sys.modules.get(self.module)
        if mod is None and not self.rewrite_asserts:
            try:
                mod = importlib.import_module(self.module)
            except Exception:
                mod = None
        if mod is not None and self.path and \
                os.path.abspath(getattr(mod, "__file__", "") or "") != os.path.abspath(self.path):
            mod = None
        return mod

    def resolve(self) -> Callable:
        mod = self._loaded()
        if mod is None:
            if not self.path:
                raise ImportError(f"cannot import {self.module!r} in the isolated process")
            spec = importlib.util.spec_from_file_location(self.module, self.path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[self.module] = mod
            code = _rewritten(self.path) if self.rewrite_asserts else None
            if code is None:
                spec.loader.exec_module(mod)
            else:
                exec(code, mod.__dict__)
        obj: Any = mod
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return obj

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)


def _rewritten(path: str) -> Any:
    """The module's code with pytest's assertion rewriting (None without pytest)."""
    try:
        import ast
        from _pytest.assertion.rewrite import rewrite_asserts
    except ImportError:  # pragma: no cover - the plugin runs under pytest
        return None
    source = Path(path).read_bytes()
    tree = ast.parse(source, filename=path)
    rewrite_asserts(tree, source, path)
    return compile(tree, path, "exec", dont_inherit=True)


class PytestFailure:
    """Formats, in the child, a test's exception as pytest formats a failure in-process
    (``Function.repr_failure``): the traceback starts at the test function (``path``,
    ``firstlineno`` as pytest's ``Code`` counts it), hidden and memwarden.testing frames are
    dropped, and the parent run's style and options apply. Returns pytest's picklable repr."""

    def __init__(self, path: str, firstlineno: int, *, style: str = "auto", showlocals: bool = False,
                 verbosity: int = 0, abspath: bool = False):
        self.path, self.firstlineno, self.style = path, firstlineno, style
        self.showlocals, self.verbosity, self.abspath = showlocals, verbosity, abspath

    def _filter(self, excinfo: Any) -> Any:
        from _pytest._code.code import Traceback
        full = excinfo.traceback.filter(lambda e: not str(e.path).startswith(_HERE))
        tb = full.cut(path=self.path, firstlineno=self.firstlineno)
        if tb == full:
            tb = full.cut(path=self.path)
        tb = tb.filter(excinfo)
        if self.style == "auto" and len(tb) > 2:   # pytest's own: middle frames short
            tb = Traceback((tb[0], *(e.with_repr_style("short") for e in tb[1:-1]), tb[-1]))
        return tb

    def __call__(self, exc: BaseException) -> Any:
        from _pytest._code import ExceptionInfo
        from _pytest.outcomes import fail
        excinfo = ExceptionInfo.from_exception(exc)
        excinfo.traceback = self._filter(excinfo)    # also where --tb=native starts
        style = "long" if self.style == "auto" else self.style
        if isinstance(exc, fail.Exception) and not exc.pytrace:
            style = "value"
        return excinfo.getrepr(funcargs=True, abspath=self.abspath, showlocals=self.showlocals,
                               style=style, tbfilter=False, truncate_locals=self.verbosity <= 1,
                               truncate_args=self.verbosity <= 2)


_HERE = os.path.dirname(os.path.abspath(__file__)) + os.sep


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
    kind, value, tb, _ = spawn(fn, args, kwargs, timeout=timeout, env=env)
    if kind == "ok":
        return value
    raise with_child_traceback(value, tb)


def with_child_traceback(exc: BaseException, tb: str) -> BaseException:
    """``exc`` with the child's traceback text ``tb`` attached as a note."""
    if tb and hasattr(exc, "add_note"):
        exc.add_note(f"--- traceback in the isolated process ---\n{tb.rstrip()}")
    return exc


def spawn(fn: Callable, args: tuple = (), kwargs: dict | None = None, *, timeout: float | None = None,
          env: dict[str, str] | None = None, render: Callable[[BaseException], Any] | None = None
          ) -> tuple[str, Any, str, Any]:
    """The work of :func:`run_isolated`, without raising the child's exception: returns
    ``(kind, value, traceback_text, rendered)``, kind ``"ok"`` (value: the result) or
    ``"error"`` (value: the exception). ``render``, a picklable callable, runs in the child
    on the exception and its picklable result comes back as ``rendered`` (the pytest
    plugin formats the failure there, where the traceback's frames still exist)."""
    kwargs = kwargs or {}
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
                pickle.dump((fn, args, kwargs, render), f)
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
                status = ("error", RemoteTraceback(f"cannot unpickle the child's result: {e}"), "", None)
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
        return status


def _child_main(f, result_path: str) -> None:
    import faulthandler
    faulthandler.enable()
    render = None
    try:
        fn, args, kwargs, render = pickle.load(f)
        f.close()
        if isinstance(fn, _ModuleFunction):
            fn = fn.resolve()
        status = ("ok", fn(*args, **kwargs), "", None)
    except BaseException as e:  # noqa: BLE001 - report everything, SystemExit included
        tb = traceback.format_exc()
        rendered = None
        if render is not None:
            try:
                rendered = render(e)
                pickle.dumps(rendered)
            except Exception as re:  # noqa: BLE001 - the plain traceback still comes back
                rendered = f"{tb}\n(memwarden could not format this failure: {type(re).__name__}: {re})"
        try:
            pickle.dumps(e)
            status = ("error", e, tb, rendered)
        except Exception:
            status = ("error", RemoteTraceback(f"{type(e).__name__}: {e}"), tb, rendered)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        data = pickle.dumps(status)
    except Exception as e:  # unpicklable return value
        data = pickle.dumps(("error", RemoteTraceback(f"cannot pickle the result: {e}"), "", None))
    tmp = result_path + ".tmp"
    with open(tmp, "wb") as out:
        out.write(data)
    os.replace(tmp, result_path)
