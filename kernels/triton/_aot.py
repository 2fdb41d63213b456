"""Ahead-of-time compilation of every Triton kernel configuration for sm_90, without a GPU.

``python -m gpu_nn.kernels.triton._aot [--family F ...] [--json PATH] [--no-sass]`` compiles each
family's ``aot_specs()`` with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` and reads
registers, spills (the stack frame: see :func:`_resources`), shared memory and the tensor-core,
spill and TMA instructions off the cubin with the
``cuobjdump`` that Triton's wheel ships. It must run in a process where ``TRITON_INTERPRET`` is
unset: interpreted kernels cannot be compiled.

``--cover pairs`` compiles, kernel by kernel, a subset of the list in which every value of every
factor that tells two compiled forms apart (a constexpr, an argument's type, warps, stages, the
arguments compiled as multiples of 16) and every pair of such values that some spec has meets at
least once (all-pairs coverage: :func:`covering`), and takes the rest through Triton's front end
only (where a kernel's own code fails to compile); ``--cover each`` compiles a subset in which
every value meets once and takes the rest of an all-pairs subset through the front end, leaving
the others listed only (the test suite's default: about a fifth of the whole list's compile bill
on a 2-core machine, pairs about half). Every spec the pairs level compiles (but the ``must``
ones) goes at least through the front end at the each level, every spec the full run compiles at
least through the front end at the pairs level. A failure that needs more factors together than
a level covers (three at each's front end, two at its compile) hides from that level.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib
import itertools
import json
import os
import re
import sys
import time
from typing import Any

from ..sass import cuobjdump, functions, straight_path


@dataclasses.dataclass(frozen=True)
class AotSpec:
    """One launchable configuration of one kernel.

    ``signature`` maps every argument name to a Triton type string (``"*fp32"``, ``"i32"``,
    ``"i64"``, ``"fp32"``, or ``"constexpr"``); ``constexprs`` gives the constexpr values.
    ``divisible_by_16`` names the arguments (pointers or ints) compiled as multiples of 16, as
    Triton's JIT specialises them at run time when they are (a launcher that relies on that
    specialisation launches such a configuration only when the arguments are multiples of 16).
    """

    kernel: Any
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""
    divisible_by_16: tuple = ()

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", str(fn))

    def aligned(self) -> "AotSpec":
        """This configuration as a launch with 16-byte aligned tensors and sizes that are multiples
        of 16 compiles it: every pointer and int argument divisible by 16 (Triton's JIT
        specialises each that is; torch's allocations are 256-byte aligned). What such a launch
        runs, where :func:`compile_spec` of the spec itself shows the form that serves every
        launch (for elementwise kernels: 32-bit accesses where the launched form has 128-bit)."""
        # never the kernel's do_not_specialize arguments (the JIT leaves them unspecialised)
        fixed = {getattr(p, "name", p) for p in getattr(self.kernel, "params", ())
                 if getattr(p, "do_not_specialize", False)}
        div = tuple(a for a, t in self.signature.items()
                    if (t.startswith("*") or t in ("i32", "i64")) and a not in fixed)
        return dataclasses.replace(self, label=f"{self.label} launched", divisible_by_16=div)


def _resources(cubin: bytes, sass: bool = True, listing: str | None = None) -> dict:
    """Registers, stack and local memory (``cuobjdump -res-usage``) and, with ``sass``, counts of
    instructions in the disassembly (tensor-core MMAs, spill stores / loads, TMA loads, global
    accesses by width, special-function exp2s, the straight path:
    ``gpu_nn.kernels.sass.straight_path``): ``listing`` where the cubin's was read already
    (``gpu_nn.kernels.sass.disassemble``, many cubins in one run: :func:`compile_specs`), else
    read here.

    ``spill_bytes`` is the per-thread stack frame plus local memory: ptxas places spilled
    registers in the stack frame (``STL`` / ``LDL`` instructions), not in ``LOCAL``, which stays
    0 for Triton's kernels (no local arrays, every call inlined); a non-zero stack in a Triton
    kernel is spilled registers. The disassembly is the slow part (about 0.7 s a cubin, most of
    it the disassembler's start), so the ahead-of-time test skips it."""
    usage, text = cuobjdump(cubin, sass and listing is None)
    if sass and listing is not None:
        text = listing
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", usage)
    regs, stack, shared, local = (int(g) for g in m.groups()) if m else (-1, -1, -1, -1)
    out = {
        "registers": regs,
        "stack_bytes": stack,
        "local_bytes": local,
        "spill_bytes": stack + local if m else -1,
        "static_shared_bytes": shared,
    }
    if text is not None:
        fns = functions(text)
        out.update({
            "hgmma": len(re.findall(r"\bHGMMA\b", text)),
            "hmma": len(re.findall(r"\bHMMA\b", text)),
            "spill_stores": len(re.findall(r"\bSTL\b", text)),
            "spill_loads": len(re.findall(r"\bLDL\b", text)),
            "tma_loads": len(re.findall(r"\bUTMALDG\b", text)),
            "ex2": len(re.findall(r"\bMUFU\.EX2\b", text)),  # the special-function unit's exp2
            # the listing's instructions, NOPs and each function's closing self-branch left out
            # (as the CUDA C report counts them; the line count of cuobjdump's text before)
            "instructions": sum(1 for ins in fns.values() for _, t in ins if not t.startswith("NOP")),
            "global_loads": access_widths(text, "LDG"),
            "global_stores": access_widths(text, "STG"),
            # instructions per thread with every guard holding, each loop once (kernels/sass.py)
            "straight": sum(straight_path(ins) for ins in fns.values()),
        })
    return out


_WIDTH = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def access_widths(sass: str, op: str) -> dict:
    """Global memory instructions ``op`` (``LDG`` / ``STG``) in a disassembly by access width in
    bits, as ``{"32": n, "128": m, ...}`` (string keys: the rows go to JSON). The width is the
    size suffix of the opcode (``LDG.E.128``, ``.64``, ``.U16``, ...), 32 bits without one."""
    out: dict = {}
    for mods in re.findall(rf"\b{op}(?![A-Z0-9_])((?:\.[A-Z0-9_]+)*)", sass):  # not LDGSTS, LDGDEPBAR
        bits = next((_WIDTH[m] for m in mods.split(".") if m in _WIDTH), 32)
        out[str(bits)] = out.get(str(bits), 0) + 1
    return out


def _source(kernel, signature: dict, constexprs: dict, divisible_by_16=()):
    """Triton's ``ASTSource`` of one specialisation: the arguments in ``divisible_by_16``
    compiled as multiples of 16, as the JIT specialises them."""
    from triton.compiler import ASTSource

    arg_names = getattr(kernel, "arg_names", None) or list(signature)
    attrs = {(arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible_by_16}
    return ASTSource(fn=kernel, signature=dict(signature), constexprs=dict(constexprs), attrs=attrs)


# Triton 3.6 and 3.9 give a 32-bit (tf32 / float32) wgmma operand that must be read transposed
# (``tl.trans`` of a loaded tile as the A operand: the wgmma reads 32-bit operands K-major only)
# a shared-memory layout marked ``transposed = true`` and store it so; when that buffer's last
# dimension (the one not contiguous in it: the A operand's M after the transpose) passes 256, the
# store puts the elements from 256 on where the wgmma's descriptors do not read them (the H200's
# wrong float32 gradients of the resident recurrent backward at KP 512, a [64, 512] buffer, found
# by emulating its sm_90 PTX: benchmarks/results/aot/rnn_resident_bwd_trans_a331102.md). At 256
# the layouts coincide, and a buffer long only in its contiguous dimension is read right (the
# resident forward's [512, 16] B operand at KP 512: its outputs matched on the H200). Every
# compiled spec is held to having no such buffer.
WIDE_TRANSPOSED_32BIT = 256
_SHARED_ALIAS = re.compile(r"^(#shared\d*) = #ttg\.nvmma_shared<\{([^}]*)\}>", re.M)
_MEMDESC = re.compile(r"!ttg\.memdesc<((?:\d+x)+)f32, (#shared\d*)")


def wide_transposed_32bit(ttgir: str) -> list[str]:
    """The float32 shared-memory buffers of ``ttgir`` laid out ``transposed = true`` (32-bit
    nvmma_shared) whose last dimension passes WIDE_TRANSPOSED_32BIT, as their memdesc types
    (distinct, in order of appearance): what Triton stores where its wgmma does not read (see
    above)."""
    aliases = {name for name, body in _SHARED_ALIAS.findall(ttgir)
               if "transposed = true" in body and "elementBitWidth = 32" in body}
    out = []
    for dims, alias in _MEMDESC.findall(ttgir):
        last = int(dims.rstrip("x").split("x")[-1])
        desc = f"memdesc<{dims}f32, {alias}>"
        if alias in aliases and last > WIDE_TRANSPOSED_32BIT and desc not in out:
            out.append(desc)
    return out


def rs_wgmma_unguarded(ptx: str) -> tuple[int, int]:
    """(register-operand wgmmas, those with no register moves ahead of their ``wgmma.fence``) in
    ``ptx``. A pipelined wgmma whose A operand comes from registers may still read them when the
    next iteration rewrites them (triton-lang/triton issue 9433, undefined in the PTX ISA); the
    Triton fix (PRs 9514 / 9530) copies the operand to fresh registers with ``mov.b32`` before the
    fence of each such wgmma. Triton 3.9's PTX has those moves, 3.6's has none (the TMA
    convolution tiles, kernels/triton/conv.py TMA_CHOOSER)."""
    lines = ptx.splitlines()
    rs = unguarded = 0
    for i, line in enumerate(lines):
        if "wgmma.mma_async" not in line or not re.search(r"\},\s*\{%r", line):
            continue  # A from shared memory (a descriptor), not registers
        rs += 1
        j = i
        while j > 0 and "wgmma.fence" not in lines[j]:
            j -= 1
        k, moves = j - 1, 0
        while k > max(0, j - 64) and "wgmma" not in lines[k]:
            moves += bool(re.match(r"\s*mov\.b32 %r\d+, %r\d+;", lines[k]))
            k -= 1
        unguarded += moves == 0
    return rs, unguarded


def approx_div_f32(ptx: str) -> int:
    """How many approximate float32 divisions ``ptx`` has: ``div.full.f32`` (what Triton makes of
    ``/`` on float32: within 2 ulp, not IEEE) and ``div.approx.f32``. ``tl.div_rn`` makes IEEE's
    ``div.rn.f32``, which torch's CUDA kernels (nvcc's default) divide with."""
    return len(re.findall(r"\bdiv\.(?:full|approx)(?:\.ftz)?\.f32\b", ptx))


IR_LEVELS = ("ttir", "ttgir", "llir", "ptx", "cubin")


def compile_with_ir(src, options: dict):
    """``triton.compile(src)`` for sm_90 with every level of IR in the result. Triton's cache
    can hold an entry without its IR (``gpu_nn.benchmarks.triton_cache`` carries what a launch
    reads: the metadata and the cubin; ``TRITON_STORE_BINARY_ONLY`` keeps the same): such a hit
    is compiled again here, whatever the cache holds."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)
    compiled = triton.compile(src, target=target, options=options)
    if all(k in compiled.asm for k in IR_LEVELS):
        return compiled
    from triton import knobs

    with knobs.compilation.scope():
        knobs.compilation.always_compile = True
        return triton.compile(src, target=target, options=options)


def _compile(spec: AotSpec) -> tuple:
    """``(row, cubin)``: one spec compiled for sm_90, its row without the cubin's resources."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (interpreted kernels cannot compile)")
    src = _source(spec.kernel, spec.signature, spec.constexprs, spec.divisible_by_16)
    t0 = time.perf_counter()
    compiled = compile_with_ir(src, {"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    row = {
        "kernel": spec.name,
        "label": spec.label,
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "shared_bytes": int(compiled.metadata.shared),
        "compile_s": round(time.perf_counter() - t0, 3),
        "wide_transposed_32bit": wide_transposed_32bit(compiled.asm["ttgir"]),
        "approx_div_f32": approx_div_f32(compiled.asm["ptx"]),
        # tensor-core products issued (sm_90a: each is an HGMMA in the SASS; ptxas has no other
        # form of wgmma), read without a disassembly
        "wgmma": len(re.findall(r"^\s*(?:@%p\d+\s+)?wgmma\.mma_async\b", compiled.asm["ptx"], re.M)),
    }
    return row, compiled.asm["cubin"]


def compile_spec(spec: AotSpec, sass: bool = True) -> dict:
    """Compile one spec for sm_90; returns its resource usage (raises on a compile error); without
    ``sass`` no disassembly counts (see :func:`_resources`). Many specs with their SASS:
    :func:`compile_specs`."""
    row, cubin = _compile(spec)
    row.update(_resources(cubin, sass))
    return row


def compile_specs(specs, sass: bool = True, keep_errors: bool = False) -> list:
    """:func:`compile_spec` of each of ``specs``, in order, every SASS read in one disassembler
    run (``gpu_nn.kernels.sass.disassemble``: the disassembler's start, not the cubin, was most
    of a read). An error (the compile's, or reading a cubin's resources) is raised, or with
    ``keep_errors`` kept in its spec's place; a failed joint read is then taken cubin by cubin."""
    from ..sass import disassemble

    done = []
    for spec in specs:
        try:
            done.append(_compile(spec))
        except Exception as exc:
            if not keep_errors:
                raise
            done.append(exc)
    cubins = [d[1] for d in done if not isinstance(d, Exception)]
    listings = [None] * len(cubins)
    if sass and cubins:
        try:
            listings = disassemble(cubins)
        except Exception:
            if not keep_errors:
                raise
    listings = iter(listings)
    out = []
    for d in done:
        if isinstance(d, Exception):
            out.append(d)
            continue
        try:
            out.append({**d[0], **_resources(d[1], sass, next(listings))})
        except Exception as exc:
            if not keep_errors:
                raise
            out.append(exc)
    return out


_DESC = re.compile(r"tensordesc<(\w+)\[([\d, ]*)\]>$")


def _type_factors(arg: str, ty: str) -> list:
    """An argument's type as factors: the type itself, but a TMA descriptor's
    (``tensordesc<fp32[1, 8, 8, 128]>``) as its element type and each dimension of its block
    apart. The block is made of the tile constexprs (each a factor of its own), so one value per
    descriptor string asked for nearly every tile combination again: the TMA convolution
    forward's x_desc has 12 strings in its 20 forms (13 compiled; 6 with the block split)."""
    m = _DESC.match(ty)
    if m is None:
        if ty.startswith("tensordesc"):  # a form this reading does not know: not a silent whole value
            raise ValueError(f"{arg}: unrecognised descriptor type {ty!r}")
        return [("type", arg, ty)]
    dims = [d.strip() for d in m.group(2).split(",") if d.strip()]
    return [("type", arg, f"tensordesc<{m.group(1)}>")] + [("block", arg, len(dims), i, int(d)) for i, d in enumerate(dims)]


def _factors(spec: AotSpec) -> list:
    """What tells one compiled form of a kernel from another: each constexpr's value, each
    argument's type (a TMA descriptor's element type and block dimensions: :func:`_type_factors`),
    warps, stages, and which arguments are compiled as multiples of 16."""
    out = [("constexpr", k, repr(v)) for k, v in spec.constexprs.items()]
    out += [f for k, v in spec.signature.items() for f in _type_factors(k, v)]
    out += [("num_warps", spec.num_warps), ("num_stages", spec.num_stages),
            ("divisible_by_16", tuple(sorted(spec.divisible_by_16)))]
    return sorted(out, key=repr)


def _pairs(spec: AotSpec) -> frozenset:
    f = _factors(spec)
    return frozenset(f) | frozenset(itertools.combinations(f, 2))


def covering(specs: list, must=(), order: int = 2) -> list[bool]:
    """Which of ``specs`` to compile all the way so that, kernel by kernel, every factor value
    (:func:`_factors`) and, with ``order=2``, every pair of values of two factors that some spec
    of the list has is in a compiled spec (all-pairs coverage; ``order=1``: each value once):
    greedily the spec with the most values / pairs not yet covered, the first of equals (the same
    list gives the same choice). The specs whose ``(kernel name, label)`` is in ``must`` are
    always chosen (the known spills, so that their table is held exactly). A compile failure or
    spill that takes more factors together than ``order`` to appear can hide from this subset;
    the whole list (``--cover all``) finds it."""
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    must = set(must)
    chosen = [False] * len(specs)
    by_kernel = collections.defaultdict(list)
    for i, spec in enumerate(specs):
        by_kernel[spec.name].append(i)
    for idx in by_kernel.values():
        covers = {i: _pairs(specs[i]) if order == 2 else frozenset(_factors(specs[i])) for i in idx}  # what each covers
        todo = set().union(*covers.values())
        for i in idx:
            if (specs[i].name, specs[i].label) in must:
                chosen[i] = True
                todo -= covers[i]
        while todo:
            best = max(idx, key=lambda i: len(covers[i] & todo))  # max keeps the first of equals
            chosen[best] = True
            todo -= covers[best]
    return chosen


def frontend(kernel, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3,
             divisible_by_16: tuple = ()) -> None:
    """Run Triton's front end (the kernel's Python turned into TTIR: where a CompilationError of
    the kernel's own code is raised) for sm_90 on one specialisation, without the backend passes,
    LLVM or ptxas: a tenth of a full compile or less. Raises what the front end raises. Where
    Triton's compile internals are not the ones read here (3.6-3.9), a full compile instead."""
    import triton
    from triton.backends.compiler import GPUTarget

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the front end needs TRITON_INTERPRET unset (interpreted kernels cannot compile)")
    target = GPUTarget("cuda", 90, 32)
    src = _source(kernel, signature, constexprs, divisible_by_16)
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    try:
        from triton._C.libtriton import ir
        from triton.compiler.compiler import make_backend

        backend = make_backend(target)
        extra = src.parse_options() if hasattr(src, "parse_options") else {}
        options = backend.parse_options(dict(opts, **extra))
        context = ir.context()
        ir.load_dialects(context)
        backend.load_dialects(context)
        codegen_fns = backend.get_codegen_implementation(options)
        module_map = backend.get_module_map()
    except (ImportError, AttributeError, TypeError):
        triton.compile(src, target=target, options=opts)
        return
    src.make_ir(target, options, codegen_fns, module_map, context)


def frontend_rows(rows: list) -> list:
    """:func:`frontend` on each of ``rows`` (``{"module", "kernel", "signature", "constexprs",
    "num_warps", "num_stages"}``, as tests/test_aot_coverage.py records the JIT's
    specialisations of real launches); the rows that failed, each with its ``error``."""
    failed = []
    for row in rows:
        kernel = getattr(importlib.import_module(row["module"]), row["kernel"])
        try:
            frontend(kernel, row["signature"], row["constexprs"], row["num_warps"], row["num_stages"])
        except Exception as exc:  # every failing specialisation, not only the first
            failed.append({**row, "error": f"{type(exc).__name__}: {exc}"[-2000:]})
    return failed


def family_specs(family: str, launched: bool = False) -> list[AotSpec]:
    """``family``'s ``aot_specs()``, or with ``launched`` its ``launched_specs()`` (configurations
    in the specialisation common launches compile to; none where the family has no such list)."""
    mod = importlib.import_module(f"{__package__}.{family}")
    fn = getattr(mod, "launched_specs" if launched else "aot_specs", None)
    return list(fn()) if fn is not None else []


def run(families, json_path=None, sass: bool = True, shard: tuple = (0, 1), cover: str = "all", must=()) -> int:
    """Compile every spec of ``families`` (default all); ``shard`` ``(k, n)``: only the specs at
    positions k, k + n, k + 2n, ... of each family (n processes then share a family's list).
    ``cover="pairs"``: only the specs :func:`covering` chooses (with ``must``, order 2) are
    compiled, the others go through the front end alone (their rows say ``"compiled": false``);
    ``cover="each"``: the order-1 subset (with ``must``) is compiled, the rest of the order-2
    subset (with ``must``) goes through the front end, the others are listed only (``"front_end":
    false`` too, and ``"ok": true``: nothing of theirs ran, so nothing failed).
    The whole list through the front end was about 78 s of a 2-core machine's time in every test
    run (1,305 of the 1,542 specs, 12-84 ms each), the pairs subset's rest 26 s."""
    from . import FAMILIES

    k, n = shard
    failures = 0
    rows = []
    for fam in families or FAMILIES:
        specs = family_specs(fam)
        if cover == "all":
            full = front = [True] * len(specs)
        elif cover == "pairs":
            full, front = covering(specs, must, order=2), [True] * len(specs)
        else:
            full, front = covering(specs, must, order=1), covering(specs, must, order=2)
        for i in range(k, len(specs), n):
            spec = specs[i]
            try:
                if full[i]:
                    row = compile_spec(spec, sass)
                elif not front[i]:
                    row = {"kernel": spec.name, "label": spec.label, "num_warps": spec.num_warps,
                           "num_stages": spec.num_stages}
                else:
                    t0 = time.perf_counter()
                    frontend(spec.kernel, spec.signature, spec.constexprs, spec.num_warps, spec.num_stages,
                             spec.divisible_by_16)
                    row = {"kernel": spec.name, "label": spec.label, "num_warps": spec.num_warps,
                           "num_stages": spec.num_stages, "frontend_s": round(time.perf_counter() - t0, 3)}
                row["ok"] = True
            except Exception as exc:  # report every failing config, not only the first
                failures += 1
                row = {"kernel": spec.name, "label": spec.label, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            row["compiled"] = full[i]
            row["front_end"] = full[i] or front[i]
            row["family"] = fam
            rows.append(row)
            print(json.dumps(row), flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failures else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frontend", metavar="ROWS.json",
                   help="only run the front end on the specialisations listed there (frontend_rows; JSON, "
                        "or a pickle for .pkl); prints the failures as JSON, exit status 1 if any")
    p.add_argument("--family", action="append", help="family to compile (repeatable); default all")
    p.add_argument("--json", help="write the rows as a JSON list to this path")
    p.add_argument("--no-sass", action="store_true", help="skip the disassembly counts (registers and spills only)")
    p.add_argument("--shard", default="0/1", metavar="K/N",
                   help="only every N-th spec of each family, from the K-th (0-based; default all)")
    p.add_argument("--cover", choices=("all", "pairs", "each"), default="all",
                   help="all: compile every spec (default); pairs: an all-pairs covering subset (covering()), "
                        "the rest through the front end only; each: a subset with every factor value once, "
                        "the rest of the pairs subset through the front end only, the others listed only")
    p.add_argument("--must", metavar="LIST.json",
                   help="with --cover pairs / each: a JSON list of [kernel, label] always compiled")
    args = p.parse_args(argv)
    if args.frontend:
        if args.frontend.endswith(".pkl"):  # constexpr values JSON cannot hold (Triton dtypes)
            import pickle

            with open(args.frontend, "rb") as f:
                rows = pickle.load(f)
        else:
            with open(args.frontend) as f:
                rows = json.load(f)
        failed = frontend_rows(rows)
        print(json.dumps(failed))
        return 1 if failed else 0
    k, n = (int(v) for v in args.shard.split("/"))
    if not 0 <= k < n:
        p.error(f"--shard K/N needs 0 <= K < N, got {args.shard}")
    must = ()
    if args.must:
        with open(args.must) as f:
            must = {tuple(x) for x in json.load(f)}
    return run(args.family, args.json, sass=not args.no_sass, shard=(k, n), cover=args.cover, must=must)


if __name__ == "__main__":
    sys.exit(main())
