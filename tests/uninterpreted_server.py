"""A process that imports torch, Triton and gpu-nn once, without ``TRITON_INTERPRET``, and then
forks one child per script it is asked to run (``tests/helpers.py: run_uninterpreted``).

The tests that compile kernels for sm_90 run their code in processes without the interpreter
(kernels imported under it cannot compile); a fresh Python paid about 3.8 s of imports (torch,
Triton, gpu-nn's kernel modules) before each one's first line, about a quarter of most such
tests' time. A forked child starts from those imports already made and is otherwise a process of
its own: its own exit code, standard output and error (written to the files the request names),
working directory and ``sys.argv``. What it does not get is a fresh import: a script that needs
the environment read at import time to differ (a switch read when a module loads) runs as a
real subprocess instead.

With ``--torch-only`` the server imports torch alone (about 2 s of a fresh Python's 3.4 before
gpu-nn's first line) and takes any ``TRITON_INTERPRET``: its children make every other import
themselves, after their environment is set, as a fresh Python does (``tests/helpers.py:
run_fresh``, for the scripts whose point is what gpu-nn or Triton read at import).

Protocol (one request at a time, on stdin / the stdout this process starts with): the server
writes ``{"ready": ...}`` once its imports are made; each request is a JSON line ``{"id": n,
"argv": [...], "cwd": ..., "env": {...}, "out": path, "err": path}`` (env: the child's whole
environment; argv as after ``python``: ``["-m", module, *args]``, ``["-c", code, *args]`` or
``[script, *args]``), answered by ``{"id": n, "pid": p}`` when the child is forked and ``{"id": n,
"rc": c}`` when it has exited (a negative code: killed by that signal, as ``subprocess`` reports
it).
"""

import json
import os
import sys


def _child(req) -> None:
    """Run the request's script as ``python`` would; never returns. Nothing is caught: the
    script's end, its SystemExit or an uncaught exception ends this process through Python's own
    shutdown (the traceback and code 1, non-daemon threads joined, atexit, files left open
    flushed when the interpreter finalises them), as in a fresh ``python``."""
    import runpy
    import types
    import warnings

    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        f = os.open(path, flags, 0o644)  # (stdin: the requests' pipe otherwise)
        os.dup2(f, fd)
        os.close(f)
    os.chdir(req["cwd"])
    os.environ.clear()  # the asking test's environment now (read from here on: not by the imports made before the fork)
    os.environ.update(req["env"])
    argv = req["argv"]
    safe = getattr(sys.flags, "safe_path", False)  # PYTHONSAFEPATH / -P: python puts no path first
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        if not safe:
            sys.path[0] = os.getcwd()  # as ``python -m`` puts it
        if not _TORCH_ONLY:
            # the module was imported here already (the imports this process is for): runpy warns
            # that it runs a second copy as __main__, as ``python -m`` does where its package
            # imports the module (the kernel families import _aot)
            warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package",
                                    category=RuntimeWarning)
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        if not safe:
            sys.path[0] = ""  # as ``python -c`` puts it
        main = types.ModuleType("__main__")  # a __main__ of its own to the end, as python's
        sys.modules["__main__"] = main
        exec(compile(argv[1], "<string>", "exec"), main.__dict__)
    else:
        sys.argv = list(argv)
        if not safe:
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")
    raise SystemExit(0)


_TORCH_ONLY = False  # --torch-only: nothing but torch imported here


def main() -> None:
    global _TORCH_ONLY

    ctl = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol channel
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # whatever the imports print stays off the channel
    os.close(devnull)
    import importlib

    if sys.argv[1:] == ["--torch-only"]:
        _TORCH_ONLY = True
        importlib.import_module("torch")
    else:
        if os.environ.get("TRITON_INTERPRET") not in (None, "", "0"):
            raise SystemExit("the uninterpreted server must start without TRITON_INTERPRET")
        # the imports every such script makes first (the kernel modules: every family's)
        for name in ("torch", "triton", "gpu_nn", "gpu_nn.kernels.triton._aot"):
            importlib.import_module(name)
        for family in importlib.import_module("gpu_nn.kernels.triton").FAMILIES:
            importlib.import_module(f"gpu_nn.kernels.triton.{family}")

    ctl.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            ctl.close()
            _child(req)  # (ends the child)
        ctl.write(json.dumps({"id": req["id"], "pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        ctl.write(json.dumps({"id": req["id"], "rc": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    main()
