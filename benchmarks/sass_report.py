"""``gpu-nn sass``: every Triton kernel configuration compiled for sm_90, and what the SASS says.

For each family (``gpu_nn.kernels.triton.<family>``) every ``aot_specs()`` configuration is
compiled with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` through
:mod:`gpu_nn.kernels.triton._aot`, which reads the cubin with the ``cuobjdump`` shipped in
Triton's wheel. No GPU is needed. The table shows per configuration: registers per thread,
spills (the stack frame plus local memory, bytes per thread, with the SASS's spill stores / loads:
ptxas keeps spilled registers in the stack frame), shared memory (Triton's dynamic allocation
plus static), and the tensor-core instructions in the SASS (HGMMA: Hopper warpgroup MMA; HMMA:
the older warp-level MMA), the global loads and stores by access width (bits x count: 128 is
a 16-byte vector access, what memory-bound kernels want), and the straight path (instructions
one thread issues with every guard holding, each loop once: for the memory-bound kernels, which
issue-bound kernels such as pooling are, what an element costs). The float16/bfloat16 convolution and
linear (matmul) kernels are flagged when their SASS has neither tensor-core instruction.
``--launched`` compiles the configurations as common launches specialise them (aligned tensors,
sizes multiples of 16), where the general forms know no alignment and access 32 bits at a time.
``--cuda`` reports the CUDA C kernels instead (NVRTC, the same ``cuobjdump``): the builds the
CuPy launchers load at the benchmark shapes, per kernel registers, spills, calls (slow-path
subroutines), instructions, and the straight path (the instructions one thread issues for one
element whose guards all hold, every loop run once: the per-element cost of a straight-line
kernel such as a pooling window compiled in, a lower bound for kernels with run-time loops).

Compilation runs in subprocesses (one per family, several at once) whose environment has no
``TRITON_INTERPRET``: kernels imported under the interpreter cannot be compiled, and a test
session sets it. A family whose kernel module does not exist is listed as missing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

HALF_TYPES = ("*fp16", "*bf16")
# Families whose half-precision kernels do matrix products and should use tensor cores.
MMA_FAMILIES = ("conv", "dense")


def _families():
    from gpu_nn.kernels.triton import FAMILIES

    return FAMILIES


def add_arguments(parser) -> None:
    # The help must not list _families(): importing gpu_nn.kernels.triton here, while `gpu-nn`
    # builds its parser, would fix TRITON_INTERPRET for the whole process before `gpu-nn check`
    # can set it, and check would then drop the Triton (interpreter) backend on a CPU machine.
    parser.add_argument("--family", action="append",
                        help="family to compile (repeatable); default all of gpu_nn.kernels.triton.FAMILIES "
                             "(with --cuda: pool, optim or rnn, the CUDA C sources)")
    from gpu_nn.cli import output_path  # (a typo in the path failed after minutes of compiling)

    parser.add_argument("--json", type=output_path, help="write the rows as a JSON list to this path")
    from gpu_nn.cli import count

    parser.add_argument("--jobs", type=count(1), default=max(1, min(8, (os.cpu_count() or 2))),
                        help="families compiled at once (default %(default)s)")
    parser.add_argument("--timeout", type=_seconds, default=900, help="seconds per family (default %(default)s)")
    parser.add_argument("--cuda", action="store_true",
                        help="the CUDA C kernels instead: the builds the CuPy launchers load at the benchmark shapes "
                             "(pooling windows compiled in, optimizer steps, recurrent loops)")
    parser.add_argument("--launched", action="store_true",
                        help="compile the families' launched_specs() instead: configurations in the specialisation "
                             "common launches compile to (aligned tensors, sizes multiples of 16, unit strides as "
                             "constants): the elementwise activations, the softmax rows and the dense matmul in "
                             "linear's three layouts")


def _seconds(text: str) -> float:
    """argparse type: a positive number of seconds (0 timed every family out at once)."""
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return v


def _needs_mma(row: dict) -> bool:
    """A half-precision conv or linear/matmul kernel: one that should show HGMMA or HMMA."""
    if row.get("family") not in MMA_FAMILIES or not row.get("half"):
        return False
    name = row.get("kernel", "").lower()
    return any(k in name for k in ("conv", "linear", "matmul", "gemm", "dgrad", "wgrad"))


# ------------------------------------------------------------------------------- worker side


def _worker(family: str, json_path: str, launched: bool = False) -> int:
    """In a TRITON_INTERPRET-free process: compile every spec of ``family`` (``launched``: its
    launched_specs()); rows to JSON."""
    from gpu_nn.kernels.triton import _aot

    rows = []
    try:
        specs = _aot.family_specs(family, launched)
    except Exception as exc:
        rows.append({"family": family, "kernel": "-", "label": "", "ok": False,
                     "error": f"aot_specs() failed: {type(exc).__name__}: {exc}"[:2000]})
        specs = []
    # every failing config is reported, not only the first; the SASS read in one run for all
    for spec, row in zip(specs, _aot.compile_specs(specs, keep_errors=True)):
        half = any(str(t) in HALF_TYPES for t in spec.signature.values())
        if isinstance(row, Exception):
            row = {"kernel": spec.name, "label": spec.label, "num_warps": spec.num_warps,
                   "num_stages": spec.num_stages, "ok": False, "error": f"{type(row).__name__}: {row}"[:2000]}
        else:
            row["ok"] = True
        row["family"] = family
        row["half"] = half
        row["needs_mma"] = _needs_mma(row)
        rows.append(row)
    with open(json_path, "w") as f:
        json.dump(rows, f)
    return 0


# ------------------------------------------------------------------------------- parent side


def _kernel_module_exists(family: str) -> bool:
    return importlib.util.find_spec(f"gpu_nn.kernels.triton.{family}") is not None


def _compile_family(family: str, timeout: float, launched: bool = False) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, f"{family}.json")
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "gpu_nn.benchmarks.sass_report", "--worker", family, out]
                + (["--launched"] if launched else []),
                env=env, capture_output=True, text=True, timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return [{"family": family, "kernel": "-", "label": "", "ok": False, "error": f"timed out after {timeout:.0f} s"}]
        if not os.path.exists(out):
            tail = (proc.stderr or proc.stdout)[-1500:]
            return [{"family": family, "kernel": "-", "label": "", "ok": False,
                     "error": f"compile process exited {proc.returncode}: {tail}"}]
        with open(out) as f:
            return json.load(f)


def collect(families, jobs: int = 4, timeout: float = 900, launched: bool = False) -> list[dict]:
    """Rows for every configuration of every family; a missing family gives one 'missing' row."""
    rows_by_family = {}
    present = []
    for fam in families:
        if _kernel_module_exists(fam):
            present.append(fam)
        else:
            rows_by_family[fam] = [{"family": fam, "kernel": "-", "label": "", "ok": None,
                                    "missing": True, "error": f"missing: no kernels/triton/{fam}.py"}]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {fam: pool.submit(_compile_family, fam, timeout, launched) for fam in present}
        for fam, fut in futures.items():
            rows_by_family[fam] = fut.result()
    return [r for fam in families for r in rows_by_family[fam]]


def _mma_cell(r: dict) -> str:
    hg, hm = r.get("hgmma", 0), r.get("hmma", 0)
    parts = [f"HGMMA {hg}"] if hg else []
    parts += [f"HMMA {hm}"] if hm else []
    text = ", ".join(parts) if parts else "none"
    if r.get("needs_mma"):
        return f"[green]{text}[/green]" if parts else "[red]none (expected HGMMA/HMMA)[/red]"
    return text


def _access_cell(r: dict) -> str:
    """Global loads / stores by access width (bits x count), widest first: e.g. "128x2 / 128x2"."""
    def fmt(d):
        return " ".join(f"{b}x{n}" for b, n in sorted((d or {}).items(), key=lambda kv: -int(kv[0]))) or "-"
    if "global_loads" not in r:
        return "-"
    return f"{fmt(r['global_loads'])} / {fmt(r.get('global_stores'))}"


def _spill_bytes(r: dict) -> int:
    """Spilled bytes per thread of a row (rows written before ``spill_bytes`` existed: stack + local)."""
    return r.get("spill_bytes", r.get("stack_bytes", 0) + r.get("local_bytes", 0))


def _console_table(console, title: str, caption: str, columns, right):
    """(console, a rich table with ``columns``, those in ``right`` right-aligned); the console is
    200 columns wide when it writes to a file or pipe."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)
    table = Table(title=title, caption=caption)
    for col in columns:
        table.add_column(col, justify="right" if col in right else "left")
    return console, table


def print_table(rows: list[dict], console=None) -> None:
    console, table = _console_table(
        console, "Triton kernels compiled for sm_90 (no GPU needed)",
        "spills = stack frame + local memory, bytes per thread (STL / LDL instructions); "
        "shared = Triton's allocation + static",
        ("family", "kernel", "config", "warps/stages", "registers", "spills", "shared B", "tensor cores",
         "global ld / st bits", "straight"), ("registers", "spills", "shared B", "straight"))
    for r in rows:
        if r.get("missing"):
            table.add_row(r["family"], "[red]missing[/red]", r["error"], "-", "-", "-", "-", "-", "-", "-")
            continue
        if not r["ok"]:
            table.add_row(r["family"], r.get("kernel", "-"), r.get("label", ""), "-", "-", "-", "-",
                          f"[red]compile error[/red] {r['error'][:100]}", "-", "-")
            continue
        spills = _spill_bytes(r)
        spill = f"[red]{spills}[/red]" if spills > 0 else "0"
        if r.get("spill_stores") or r.get("spill_loads"):
            spill += f" ({r.get('spill_stores', 0)} STL / {r.get('spill_loads', 0)} LDL)"
        table.add_row(r["family"], r["kernel"], r["label"], f"{r['num_warps']}/{r['num_stages']}",
                      str(r["registers"]), spill, str(r["shared_bytes"] + r.get("static_shared_bytes", 0)), _mma_cell(r),
                      _access_cell(r), str(r.get("straight", "-")))
    console.print(table)
    ok = [r for r in rows if r.get("ok")]
    need = [r for r in ok if r.get("needs_mma")]
    with_mma = [r for r in need if r.get("hgmma") or r.get("hmma")]
    console.print(
        f"{len(ok)} configurations compiled, {sum(1 for r in rows if r.get('ok') is False)} failed, "
        f"{sum(1 for r in ok if _spill_bytes(r) > 0)} spill; "
        f"float16/bfloat16 conv and linear kernels on tensor cores: {len(with_mma)} of {len(need)}"
        + (f" (HGMMA in {sum(1 for r in need if r.get('hgmma'))})" if need else "")
    )
    missing = [r["family"] for r in rows if r.get("missing")]
    if missing:
        console.print(f"[red]families without kernels: {', '.join(missing)}[/red]")


def cuda_builds() -> list[tuple]:
    """(source, label, defines) of the CUDA C builds the CuPy launchers load at the benchmark
    shapes: pooling max_pool2d 3x3/2 (its window compiled in; float32 NCHW with 32-bit and with
    int64 indices, bfloat16 channels_last) and a 9x9 window (run-time window kernels), the
    optimizer steps per parameter dtype, the LSTM device loop (float32 on the CUDA cores, bfloat16
    on the tensor cores)."""
    import torch

    from gpu_nn.ops import pool
    from gpu_nn.optim import _cupy as optim

    w3 = pool._window((3, 3), (2, 2))
    out = [
        ("pool", "fp32 3x3/2 NCHW", pool.cuda_defines(torch.float32, True, False, w3, True)),
        ("pool", "fp32 3x3/2 NCHW int64", pool.cuda_defines(torch.float32, False, False, w3, True)),
        ("pool", "bf16 3x3/2 channels_last", pool.cuda_defines(torch.bfloat16, True, True, w3, False)),
        ("pool", "fp32 9x9 NCHW (run-time window)", pool.cuda_defines(torch.float32, True, False,
                                                                      pool._window((9, 9), (1, 1)), True)),
    ]
    out += [("optim", str(dt).replace("torch.", ""), {"PARAM_KIND": kind, "OPTIM_CHUNK": optim.CHUNK})
            for dt, kind in optim._KIND.items()]
    out += [("rnn", "lstm fp32", {"GN_MODE": 2, "GN_ROUND": 0, "GN_MMA": 0}),
            ("rnn", "lstm bf16 mma", {"GN_MODE": 2, "GN_ROUND": 2, "GN_MMA": 1})]
    return out


def collect_cuda(sources=None) -> list[dict]:
    """One row per kernel of every :func:`cuda_builds` build (an error row for a build that
    fails); ``sources``: only the builds of these CUDA C sources (``pool``, ``optim``, ``rnn``)."""
    from gpu_nn.kernels import cuda as kcuda
    from gpu_nn.kernels.sass import disassemble

    builds = [b for b in cuda_builds() if not sources or b[0] in sources]
    cubins = []
    for name, _, defines in builds:
        try:
            cubins.append(kcuda.compile_cubin(name, defines))
        except Exception as exc:  # noqa: BLE001 - a row says what failed
            cubins.append(exc)
    built = [c for c in cubins if not isinstance(c, Exception)]
    try:
        listings = iter(disassemble(built))  # (every build's SASS in one disassembler run)
    except Exception:  # noqa: BLE001 - then each build reads its own (sass_report), a failure its row
        listings = iter([None] * len(built))
    rows = []
    for (name, label, defines), cubin in zip(builds, cubins):
        if isinstance(cubin, Exception):
            rows.append({"source": name, "label": label, "kernel": "-", "ok": False,
                         "error": f"{type(cubin).__name__}: {cubin}"})
            continue
        try:
            report = kcuda.sass_report(cubin, next(listings))
        except Exception as exc:  # noqa: BLE001 - a row says what failed
            rows.append({"source": name, "label": label, "kernel": "-", "ok": False,
                         "error": f"{type(exc).__name__}: {exc}"})
            continue
        rows += [{"source": name, "label": label, "kernel": k, "ok": True, "defines": defines, **v}
                 for k, v in sorted(report.items())]
    return rows


def print_cuda_table(rows: list[dict], console=None) -> None:
    numbers = ("registers", "stack B", "calls", "instructions", "straight")
    console, table = _console_table(
        console, "CUDA C kernels compiled by NVRTC for sm_90 (no GPU needed)",
        "stack = spilled registers and registers saved around calls, bytes per thread; "
        "straight = instructions for one element with every guard holding, each loop run once",
        ("source", "build", "kernel", *numbers, "global ld / st bits"), numbers)
    for r in rows:
        if not r["ok"]:
            table.add_row(r["source"], r["label"], "-", "-", "-", "-", f"[red]error[/red] {r['error'][:100]}", "-", "-")
            continue
        stack = str(r["stack_bytes"])
        if r["spill_stores"] or r["spill_loads"]:
            stack += f" ({r['spill_stores']} STL / {r['spill_loads']} LDL)"
        access = _access_cell(r)
        if r.get("generic_loads") or r.get("generic_stores"):
            generic = {"global_loads": r["generic_loads"], "global_stores": r["generic_stores"]}
            access += "; generic " + _access_cell(generic)
        table.add_row(r["source"], r["label"], r["kernel"], str(r["registers"]), stack, str(r["calls"]),
                      str(r["instructions"]), str(r["straight"]), access)
    console.print(table)
    console.print(f"{sum(1 for r in rows if r['ok'])} kernels, {sum(1 for r in rows if not r['ok'])} builds failed")


def run(args) -> int:
    if args.cuda:
        # --family names CUDA C sources here (their builds are cuda_builds()'s)
        sources = sorted({b[0] for b in cuda_builds()})
        unknown = [f for f in args.family or () if f not in sources]
        if unknown:
            raise SystemExit(f"gpu-nn sass --cuda: unknown family {', '.join(unknown)}; expected {', '.join(sources)}")
        rows = collect_cuda(args.family)
        print_cuda_table(rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 1 if any(not r["ok"] for r in rows) else 0
    fams = args.family or list(_families())
    unknown = [f for f in fams if f not in _families()]
    if unknown:
        raise SystemExit(f"gpu-nn sass: unknown family {', '.join(unknown)}; expected {', '.join(_families())}")
    rows = collect(fams, jobs=args.jobs, timeout=args.timeout, launched=args.launched)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any(r.get("ok") is False for r in rows) else 0


def main(argv=None) -> int:
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker(argv[1], argv[2], launched="--launched" in argv[3:])
    p = argparse.ArgumentParser(prog="gpu-nn sass", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
