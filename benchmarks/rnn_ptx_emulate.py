"""The resident persistent recurrent backward's compiled sm_90 PTX, run on the CPU against the
interpreter (issue 16; no GPU needed).

``python -m gpu_nn.benchmarks.rnn_ptx_emulate [--mode rnn_tanh|lstm|gru] [--single] [--H 512]
[--B 4] [--T 6] [--source RNN_PY] [--json OUT]`` compiles ``_rnn_persist2_bwd_kernel`` (both
directions; ``--single``: ``_rnn_persist_bwd_kernel``, one) in its resident-weight form, float32
under TF32 (dot code 3), KP the next power of two of H, as the launch specialises it (ints equal
to 1 constant, the rest and the pointers divisible by 16), runs its PTX for every program of the
grid in ``benchmarks/ptxemu.py`` (the grid barrier's counter run exactly), and compares what it
writes (the state gradients ``carry`` / ``dc`` and the gate gradients ``dgi`` / ``dgh``) with the
same launch's L2 form (KP 0, one program) under Triton's interpreter, from random data of the
given sizes. ``--source`` compiles another copy of ``kernels/triton/rnn.py`` (say ``git show
COMMIT:kernels/triton/rnn.py > /tmp/rnn_old.py``); the reference is always this tree's.

Why: Triton's interpreter runs no compiled code, so a fault of the compiled kernel alone (a
layout Triton gets wrong) passes every CPU test; this finds such faults for this kernel. At
a331102 the H200 gave wrong float32 gradients at KP 512 (H = 512): emulated, the source of that
run gives the same error (0.33 at B=4, bidirectional Elman; exact at H = 256) and the source
that loads W_hh transposed is exact (benchmarks/results/aot/rnn_resident_bwd_trans_a331102.md).
About 10 s of emulation at B=4 H=512 T=6 on the 2-core CPU machine, plus the compile and the
interpreter's reference. Exit status 1 when the largest relative error passes 1e-5.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

MODES = ("rnn_tanh", "lstm", "gru")  # rnn_relu: rnn_tanh's kernel but for the activation
TOL = 1e-5


def _kt():
    from gpu_nn.kernels.triton import rnn as kt

    return kt


def make(mode: str, T: int, B: int, H: int, seed: int = 0) -> dict:
    """The launch's buffers (float32, int64 lengths, the barrier's int32 counter), both
    directions' (``name`` and ``name1``); outputs start NaN, so an element never written shows."""
    kt = _kt()
    rng = np.random.default_rng(seed)
    GH = kt.NGATES[kt.MODE_CODES[mode]] * H
    d = {}
    for r in ("", "1"):
        d["w" + r] = (rng.uniform(-1, 1, (GH, H)) / np.sqrt(H)).astype(np.float32)
        d["carry" + r] = rng.standard_normal((B, H)).astype(np.float32)
        d["dc" + r] = rng.standard_normal((B, H)).astype(np.float32) if mode == "lstm" else None
        d["dout" + r] = rng.standard_normal((T, B, H)).astype(np.float32)
        d["hs" + r] = np.tanh(rng.standard_normal((T + 1, B, H))).astype(np.float32)
        d["cs" + r] = rng.standard_normal((T + 1, B, H)).astype(np.float32) if mode == "lstm" else None
        if mode == "lstm":
            d["g" + r] = rng.uniform(0.05, 0.95, (T, B, GH)).astype(np.float32)
        elif mode == "gru":
            g = rng.uniform(0.05, 0.95, (T, B, 4 * H)).astype(np.float32)
            g[..., 2 * H:3 * H] = np.tanh(rng.standard_normal((T, B, H)))
            g[..., 3 * H:] = rng.standard_normal((T, B, H))
            d["g" + r] = g
        else:
            d["g" + r] = None
        d["dgi" + r] = np.full((T, B, GH), np.nan, np.float32)
        d["dgh" + r] = np.full((T, B, GH), np.nan, np.float32) if mode == "gru" else None
    d["len"] = np.full(B, T, np.int64)
    d["count"] = np.zeros(1, np.int32)
    d["ws"] = np.full(2 * kt.resident_ws_size(B, H), np.nan, np.float32)
    return d


def launch_args(d: dict, mode: str, single: bool) -> list:
    """(name, value) in the kernel's argument order; a value is a buffer name or an int."""
    T, B, GH = d["dgi"].shape
    H = d["carry"].shape[1]
    gs = (d["g"].shape[2] * B, d["g"].shape[2]) if d["g"] is not None else (0, 0)

    def buf(n, alt):
        return n if d.get(n) is not None else alt

    def both(name, n, alt=None):
        return [(f"{name}_ptr", buf(n, alt)), (f"{name}1_ptr", buf(n + "1", alt and alt + "1"))]

    if single:
        return [("w_ptr", "w"), ("stride_w0", H), ("stride_w1", 1), ("carry_ptr", "carry"),
                ("dc_ptr", buf("dc", "carry")), ("has_dc", int(mode == "lstm")), ("dout_ptr", "dout"),
                ("stride_dot", B * H), ("stride_dob", H), ("g_ptr", buf("g", "carry")), ("stride_gt", gs[0]),
                ("stride_gb", gs[1]), ("hs_ptr", "hs"), ("cs_ptr", buf("cs", "hs")), ("stride_hs", B * H),
                ("dgi_ptr", "dgi"), ("dgh_ptr", buf("dgh", "dgi")), ("stride_dgt", B * GH), ("stride_dgb", GH),
                ("len_ptr", "len"), ("count_ptr", "count"), ("ws_ptr", "ws"), ("reverse", 0), ("T", T), ("B", B),
                ("H", H)]
    return [*both("w", "w"), ("stride_w0", H), ("stride_w1", 1), *both("carry", "carry"), *both("dc", "dc", "carry"),
            ("has_dc", int(mode == "lstm")), *both("dout", "dout"), ("stride_dot", B * H), ("stride_dob", H),
            *both("g", "g", "carry"), ("stride_gt", gs[0]), ("stride_gb", gs[1]), *both("hs", "hs"),
            *both("cs", "cs", "hs"), ("stride_hs", B * H), *both("dgi", "dgi"), *both("dgh", "dgh", "dgi"),
            ("stride_dgt", B * GH), ("stride_dgb", GH), ("len_ptr", "len"), ("count_ptr", "count"), ("ws_ptr", "ws"),
            ("T", T), ("B", B), ("H", H)]


def outputs(mode: str, single: bool) -> tuple:
    names = ("carry", "dgi") + (("dc",) if mode == "lstm" else ()) + (("dgh",) if mode == "gru" else ())
    return names if single else tuple(n + r for n in names for r in ("", "1"))


def _kernels(source: str | None):
    if source is None:
        return _kt()
    spec = importlib.util.spec_from_file_location("gpu_nn.kernels.triton._rnn_emulated", source)
    kt = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = kt  # (relative imports resolve in gpu_nn.kernels.triton)
    spec.loader.exec_module(kt)
    return kt


def reference(a) -> dict:
    """The L2 form of the same launch (KP 0, one program: the steps in order, no barrier to wait
    at) under the interpreter; TRITON_INTERPRET must be 1 before Triton is imported."""
    import torch

    kt = _kernels(None)
    d = make(a.mode, a.T, a.B, a.H)
    t = {k: torch.from_numpy(v.copy()) for k, v in d.items() if v is not None}
    vals = [t[v] if isinstance(v, str) else v for _, v in launch_args(d, a.mode, a.single)]
    kernel = kt._rnn_persist_bwd_kernel if a.single else kt._rnn_persist2_bwd_kernel
    bb, bh, bk = kt.PERSIST_BLOCKS
    kernel[(1,)](*vals, MODE=kt.MODE_CODES[a.mode], DOT_DT=kt.DOT_CODES["tf32"], BLOCK_B=bb, BLOCK_H=bh,
                 BLOCK_K=bk, KP=0, num_warps=8, num_stages=1)
    return {k: t[k].numpy() for k in outputs(a.mode, a.single)}


def compile_ptx(a) -> tuple[str, int]:
    """The PTX of the resident form as the launch specialises it, and its KP."""
    from gpu_nn.kernels.triton._aot import _source, compile_with_ir

    kt = _kernels(a.source)
    kp = max(16, 1 << (a.H - 1).bit_length())
    spec = kt._persist_bwd_spec(a.mode, "fp32", "fp32", kt.DOT_CODES["tf32"], kp)
    if not a.single:
        spec = kt._pair_spec(kt._rnn_persist2_bwd_kernel, spec)
    vals = dict(launch_args(make(a.mode, a.T, a.B, a.H), a.mode, a.single))
    sig, cons, div = dict(spec.signature), dict(spec.constexprs), []
    for name, typ in spec.signature.items():
        if typ == "constexpr":
            continue
        v = vals.get(name)
        if isinstance(v, int) and v == 1:  # Triton's JIT makes an int equal to 1 a constant
            sig[name], cons[name] = "constexpr", 1
        elif typ.startswith("*") or v % 16 == 0:
            div.append(name)
    spec = dataclasses.replace(spec, signature=sig, constexprs=cons, divisible_by_16=tuple(div))
    src = _source(spec.kernel, spec.signature, spec.constexprs, spec.divisible_by_16)
    compiled = compile_with_ir(src, {"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    return compiled.asm["ptx"], kp


def emulate(ptx: str, a) -> dict:
    """Every program of the launch through the emulator; the outputs' buffers afterwards."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ptxemu import CTA, Memory, Program

    body = ptx[ptx.index(".visible .entry"):]
    body = body[:body.index("$L__func_end0")] if "$L__func_end0" in body else body
    prog = Program(body)
    d = make(a.mode, a.T, a.B, a.H)
    mem = Memory(256 << 20)
    addr = {k: mem.alloc(k, v) for k, v in d.items() if v is not None}
    params = [addr[v] if isinstance(v, str) else v for _, v in launch_args(d, a.mode, a.single)
              if not (isinstance(v, int) and v == 1)]
    params += [0, 0]  # Triton's global and profile scratch pointers
    params = {i: int(p) for i, p in enumerate(params)}
    nprog = (1 if a.single else 2) * _kt().persist_tiles(a.B, a.H)  # the resident form: one tile a program
    gens = [CTA(prog, i, nprog, params, mem).run() for i in range(nprog)]
    state = [next(g) for g in gens]
    done = [False] * nprog
    count = (addr["count"] - mem.base) // 4
    counter = mem.heap.view(np.int32)
    while not all(done):
        progress = False
        for i in range(nprog):  # the barrier's increments first
            while not done[i] and state[i][0] == "atom":
                old = int(counter[count])
                counter[count] = old + state[i][3]
                try:
                    state[i] = gens[i].send(old)
                except StopIteration:
                    done[i] = True
                progress = True
        for i in range(nprog):  # then its spin loads
            if not done[i] and state[i][0] == "acquire":
                try:
                    state[i] = gens[i].send(int(counter[count]))
                except StopIteration:
                    done[i] = True
                    progress = True
                    continue
                progress = progress or state[i][0] != "acquire"
        if not progress:
            raise RuntimeError("every program waits at the barrier: deadlock")
    return {k: mem.get(k) for k in outputs(a.mode, a.single)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--mode", default="rnn_tanh", choices=MODES)
    p.add_argument("--single", action="store_true", help="one direction (_rnn_persist_bwd_kernel)")
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=6)
    p.add_argument("--source", help="another copy of kernels/triton/rnn.py to compile")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--reference", help=argparse.SUPPRESS)  # internal: the interpreter's side, to this .npz
    a = p.parse_args(argv)
    if a.reference:
        np.savez(a.reference, **reference(a))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("rnn_ptx_emulate compiles for sm_90: run it with TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = os.path.join(tmp, "ref.npz")
        cmd = [sys.executable, os.path.abspath(__file__), "--reference", ref_path, "--mode", a.mode, "--H", str(a.H),
               "--B", str(a.B), "--T", str(a.T)] + (["--single"] if a.single else [])
        subprocess.run(cmd, check=True, env={**os.environ, "TRITON_INTERPRET": "1"})
        ref = dict(np.load(ref_path))
    ptx, kp = compile_ptx(a)
    t0 = time.time()
    got = emulate(ptx, a)
    seconds = time.time() - t0
    errors = {}
    for k, want in ref.items():
        have = got[k]
        if not np.array_equal(np.isnan(have), np.isnan(want)):
            errors[k] = float("inf")
            continue
        diff = np.nan_to_num(np.abs(have.astype(np.float64) - want))
        errors[k] = float(diff.max()) / max(float(np.nanmax(np.abs(want))), 1.0)
    worst = max(errors.values())
    res = {"mode": a.mode, "directions": 1 if a.single else 2, "T": a.T, "B": a.B, "H": a.H, "KP": kp,
           "source": a.source or "this tree", "emulated_s": round(seconds, 1), "max_rel_err": errors,
           "worst": worst, "ok": worst <= TOL}
    print(json.dumps(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if worst <= TOL else 1


if __name__ == "__main__":
    sys.exit(main())
