"""The ``gpu-nn`` command.

Subcommands: ``info`` (versions, devices, backends), ``check`` (every op on every backend
against the reference), plus those contributed by other modules (``bench``, ``demo``,
``sass``), each exposing ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys

SUBCOMMANDS = {
    "bench": ("gpu_nn.benchmarks.suite", "benchmark our kernels against torch"),
    "demo": ("gpu_nn.demo", "train the textbook CNN and recurrent models on digits"),
    "sass": ("gpu_nn.benchmarks.sass_report", "registers, spills and tensor-core use of each kernel on sm_90"),
    "results": ("gpu_nn.benchmarks.results", "keep a GPU run's figures in benchmarks/results/ and the README"),
}


def _version(mod: str) -> str:
    try:
        m = importlib.import_module(mod)
    except Exception as exc:
        return f"not importable ({type(exc).__name__})"
    return getattr(m, "__version__", "?")


def cmd_info(args) -> int:
    import torch

    from . import _backend
    from ._errors import BackendUnavailableError

    print(f"gpu-nn   {_version('gpu_nn')}")
    print(f"python   {platform.python_version()} ({sys.executable})")
    for mod in ("torch", "triton", "numpy", "cupy"):
        print(f"{mod:<8} {_version(mod)}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"device   cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB)")
    else:
        print("device   cpu only (torch.cuda.is_available() is False)")
    try:
        requested = _backend.requested()
    except BackendUnavailableError as exc:  # a bad GPU_NN_BACKEND: said here, which is where one looks
        requested = f"invalid ({exc})"
    print(f"backend  requested: {requested}")
    for name in ("reference", "triton", "cupy"):
        ok, why = _backend.status(name)
        print(f"  {name:<10} {'works' if ok else 'unavailable'}: {why}")
    return 0


_RERUN = "GPU_NN_CHECK_RERUN"  # set in the fresh process cmd_check reruns itself in


def cmd_check(args) -> int:
    import json
    import os

    import torch

    from . import _backend

    # the heuristic configurations unless the caller set GPU_NN_TUNE (the workers inherit it):
    # check's odd shapes would each compile and time every candidate of a tuned launcher, in
    # every worker process at once on one GPU, for choices no model uses; what it proves is the
    # values, which every configuration must give (the tuner's own tests time them)
    os.environ.setdefault("GPU_NN_TUNE", "0")
    if not torch.cuda.is_available() and "gpu_nn.kernels.triton" not in sys.modules:
        # no GPU: check the Triton kernels in the interpreter (decided before they are imported)
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if os.environ["TRITON_INTERPRET"] == "1":
            if _backend.triton_library_compiled() and os.environ.get(_RERUN) != "1":
                # Triton's language library came in compiled before the variable was set (a caller
                # of main() imported triton or torch.utils.flop_counter): the interpreted kernels
                # could not call it, so the check runs in a fresh process that has the variable
                # from its start (once: _RERUN marks that process)
                import subprocess

                env = {**os.environ, _RERUN: "1"}
                return subprocess.call([sys.executable, "-m", "gpu_nn.cli", *args.argv], env=env)
            print("no CUDA device: Triton kernels run in the interpreter (TRITON_INTERPRET=1)", flush=True)
    import time

    from . import check

    known = {case.op for _, case in check.collect_cases()}
    unknown = sorted(set(args.op or ()) - known)
    if unknown:
        print(f"gpu-nn check: error: unknown op {', '.join(unknown)}; expected one of {', '.join(sorted(known))}",
              file=sys.stderr)
        return 2
    workers = args.workers if args.workers is not None else check.default_workers()
    t0 = time.perf_counter()
    planned = len(check.plan(args.op))
    print(f"gpu-nn check: {planned} checks on {', '.join(b for b, _, _ in check.targets())}, "
          f"{workers} worker process{'es' if workers != 1 else ''}", flush=True)

    def on_op(op, op_rows):
        line = check.op_line(op, op_rows)
        if args.no_progress:
            print(line, flush=True)
        else:
            from tqdm import tqdm

            tqdm.write(line)

    rows = check.run_checks(ops=args.op, seed=args.seed, progress=not args.no_progress, workers=workers, on_op=on_op)
    wall = time.perf_counter() - t0
    check.print_table(rows)
    failed = [r for r in rows if not r["ok"]]
    busy = sum(r["seconds"] for r in rows)
    comp = sum(r["compile_s"] for r in rows)
    print(f"time: {wall:.1f} s wall; {busy:.1f} s of checks in {workers} process{'es' if workers != 1 else ''}, "
          f"of which {comp:.1f} s ({100 * comp / max(busy, 1e-9):.0f}%) compiling kernels")
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    if len(rows) != planned:  # a check that returned no row passed nothing
        print(f"gpu-nn check: {planned} checks planned, {len(rows)} rows returned", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed or not rows or len(rows) != planned else 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="gpu-nn", description="gpu-nn: classic layers as our own GPU kernels")
    p.add_argument("--version", action="version", version=f"gpu-nn {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("info", help="versions, devices and which backends work here")
    sp.set_defaults(func=cmd_info)
    sp = sub.add_parser("check", help="every op on every working backend against the reference")
    sp.add_argument("--op", action="append", help="only this op (repeatable)")
    sp.add_argument("--seed", type=count(0), default=0, help="seed of the random inputs (default %(default)s)")
    sp.add_argument("--json", type=output_path, help="write the rows to this JSON file")
    sp.add_argument("--no-progress", action="store_true")
    sp.add_argument("--workers", type=count(1), default=None,
                    help="processes to spread the checks over (default: one per CPU core but one, at most 16, on a "
                         "GPU machine, where kernel compilation dominates; 1 without a GPU)")
    sp.set_defaults(func=cmd_check)
    for name, (mod_name, help_text) in SUBCOMMANDS.items():
        mod = importlib.import_module(mod_name)
        sp = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(sp)
        sp.set_defaults(func=mod.run)
    return p


def output_path(path: str) -> str:
    """argparse type of an output file: its folder must exist and the file must open for writing,
    so that a long run does not fail at its very end when it writes (checked when the arguments
    are parsed: a file that did not exist is made and removed again, one that did is opened to
    append, which changes nothing; a folder that exists but takes no file, such as /proc, was
    found only after the run)."""
    import os

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"no folder {folder} to write {path} into")
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path} is a folder, not a file")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write {path}: {exc.strerror or exc}") from None
    if not existed:
        os.remove(path)
    return path


def count(minimum: int):
    """argparse type: an int of at least ``minimum``."""
    def parse(text: str) -> int:
        v = int(text)
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {v}")
        return v

    parse.__name__ = "int"  # argparse names the type in its 'invalid int value' message
    return parse


def main(argv=None) -> int:
    from ._errors import BackendUnavailableError

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a command re-run in a fresh process takes
    try:
        return int(args.func(args) or 0)
    except (BackendUnavailableError, OSError) as exc:
        # what a user can mend (a backend this machine cannot run, a path): the message, no traceback
        print(f"gpu-nn {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
