"""The TMA convolution forward's suspect tile, launched again and again on a GPU (issue 15).

``python -m gpu_nn.benchmarks.tma_fwd_repeat [--repeats 40] [--out DIR]`` (CUDA only).

On the H200 at a331102 the conv sweep found one candidate wrong: bfloat16 N=32 C=O=64 56x56 3x3,
channels_last, the TMA tile tma8x16 (8, 16, 128, 64, 8 warps, 3 stages) storing y through
pointers, max error 0.72, every other tile of that shape and the same tile storing an NCHW y
right, the interpreter right (49ad285 keeps it from the tuner: ``TMA_FWD_SUSPECT``). Read on the
CPU since (its sm_90 build as the JIT specialises that launch, Triton 3.6): tma8x16 and tma4x32 are
the same program but for BH / BW; the epilogue's layout conversion and pointer stores are right;
the same cubin served 28x28 C=O=128, which the sweep found right; an error of 0.72 against outputs
of about 1.4 is one K chunk's products missing, not misplaced outputs. One hazard is in every
pipelined TMA tile: Triton splits the register-operand wgmma (A from registers, the box
reshaped) into four with ``wgmma.wait_group 3``, and the next iteration's ``ldmatrix`` rewrites
A's registers while up to three of them may still read them (the PTX ISA calls that undefined;
ptxas warns of nothing): a race, which would show seldom and only in pipelined forms.

This launches the sweep's own problem (its seed 99 inputs) ``repeats`` times per form, y filled
with NaN before each, against a float64 reference: tma8x16 (pointer store), the same tile at one
stage (one dot, waited for in full: no register operand in flight, the control), tma4x32, tma8x8,
tma8x16n64, and tma8x16 storing an NCHW y. Per form: the launches wrong, the worst error, and for
the first wrong launch where its wrong elements lie (``tma_fwd_repeat.json``; the indices of at
most ``KEEP_WRONG`` of them in ``wrong_<form>.pt``); a form that raises is recorded with its error. Reading: wrong now and then in the pipelined forms and never at one stage,
in 16-pixel runs of one block row: the race; wrong at every tma8x16 launch only: a
deterministic fault of that tile (its TMA box, the descriptor); right everywhere: the sweep's row
was a one-off.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time


def main(argv=None) -> int:
    import torch

    from gpu_nn.kernels.triton import conv as kc

    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--out", default=".")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tma_fwd_repeat needs a CUDA device", file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    dev, cl = "cuda", torch.channels_last
    gen = torch.Generator(device="cpu").manual_seed(99)  # benchmarks/sweep.py's inputs
    x = torch.randn(32, 64, 56, 56, generator=gen).to(device=dev, dtype=torch.bfloat16, memory_format=cl)
    w = (torch.randn(64, 64, 3, 3, generator=gen) / math.sqrt(576)).to(device=dev, dtype=torch.bfloat16,
                                                                       memory_format=cl)
    b = torch.randn(64, generator=gen).to(device=dev, dtype=torch.bfloat16)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), 1, 1)
    tiles = kc.TMA_CONFIGS["half"]
    one_stage = (*tiles["tma8x16"][:5], 1)
    forms = [("tma8x16", tiles["tma8x16"], cl), ("tma8x16_1stage", one_stage, cl), ("tma4x32", tiles["tma4x32"], cl),
             ("tma8x8", tiles["tma8x8"], cl), ("tma8x16n64", tiles["tma8x16n64"], cl),
             ("tma8x16_nchw_y", tiles["tma8x16"], torch.contiguous_format)]
    res = {"problem": "bf16 N=32 C=O=64 56x56 3x3 s1 p1 bias, channels_last x / w (seed 99)", "repeats": a.repeats,
           "device": torch.cuda.get_device_name(), "forms": {}}
    for name, tile, y_format in forms:
        cfg = (*tile[:6], kc.TMA)
        t0 = time.time()
        try:  # one form that cannot launch (a tile never built before) must not end the others
            res["forms"][name] = _repeat(kc, name, cfg, y_format, x, w, b, ref, a.repeats, a.out)
        except Exception as exc:
            res["forms"][name] = {"tile": list(cfg[:6]), "error": f"{type(exc).__name__}: {exc}"[:400]}
        res["forms"][name]["seconds"] = round(time.time() - t0, 2)
        print(name, json.dumps(res["forms"][name]), flush=True)
        with open(os.path.join(a.out, "tma_fwd_repeat.json"), "w") as f:  # after each form: a cut run keeps them
            json.dump(res, f, indent=1)
    return 0


KEEP_WRONG = 20000  # wrong elements saved per form at most (the archive of a GPU call comes back whole or not at all)


def _repeat(kc, name, cfg, y_format, x, w, b, ref, repeats, out) -> dict:
    """``repeats`` launches of one form: how many were wrong, the worst error, and where the first
    wrong launch's wrong elements lie (summarised on the host in a few vectorised ops: a per-element
    loop of device reads would take minutes over a whole wrong tile)."""
    import torch

    y = torch.empty(ref.shape, device=ref.device, dtype=torch.bfloat16).to(memory_format=y_format)
    wrong, worst, first = 0, 0.0, None
    for r in range(repeats):
        y.fill_(float("nan"))
        kc._tma_forward(cfg, x, w, b, y, (1, 1), (1, 1, 1, 1), (1, 1), None, "ieee")
        err = (y.double() - ref).abs().nan_to_num(1e9)
        e = float(err.max())
        worst = max(worst, e)
        if e > 0.05:  # bfloat16 outputs of about 1.4: rounding stays under 0.02
            wrong += 1
            if first is None:
                idx = (err > 0.05).nonzero().cpu()
                diff = (y.double() - ref)[tuple(idx.T.to(ref.device))].cpu()
                torch.save({"idx": idx[:KEEP_WRONG], "err": diff[:KEEP_WRONG], "elements": len(idx), "cfg": cfg},
                           os.path.join(out, f"wrong_{name}.pt"))
                bh, bw = cfg[:2]
                blocks = torch.stack([idx[:, 0], idx[:, 2] // bh, idx[:, 3] // bw], 1)
                first = {"launch": r, "elements": len(idx), "max": e,
                         "blocks": int(torch.unique(blocks, dim=0).shape[0]),
                         "rows_in_block": torch.unique(idx[:, 2] % bh).tolist(),
                         "channels": int(torch.unique(idx[:, 1]).numel())}
    return {"tile": list(cfg[:6]), "wrong_launches": wrong, "worst": worst, "first_wrong": first}


if __name__ == "__main__":
    sys.exit(main())
