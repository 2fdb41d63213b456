"""sm_90 compilation table of every resident-weight form of the persistent RNN kernels.

``python -m gpu_nn.benchmarks.rnn_resident_aot OUT.json COMMIT [--backward]`` compiles
(``triton.compile`` for ``GPUTarget("cuda", 90, 32)``, no GPU needed; TRITON_INTERPRET must be
unset) the ``_rnn_persist_fwd_kernel`` / ``_rnn_persist2_fwd_kernel`` forms with W_hh resident
(``kernels/triton/rnn.py`` ``resident_kp``) at KP 16 to RESIDENT_MAX_KP, every mode, io and output
dtype, GRU b_hh flag and tensor-core dot code, one and two directions; with ``--backward`` the
``_rnn_persist_bwd_kernel`` / ``_rnn_persist2_bwd_kernel`` forms instead (every mode, io and
output-gradient dtype, tensor-core dot code, one and two directions). Each spec in its generic
form (as ``aot_specs()`` lists it, with the SASS counts) and in its aligned launch form (registers
and spills). ``aot_specs()`` compiles KP 16 and RESIDENT_MAX_KP in CI (tests/test_compile.py);
this table is the evidence for the KPs between (benchmarks/results/aot/rnn_resident_kp_*.json,
rnn_resident_bwd_kp_*.json). About four minutes (forward) / ten (backward, 480 compiles) on a 2-core machine.
"""

from __future__ import annotations

import json
import platform
import sys
import time


def main(argv=None) -> int:
    import torch
    import triton

    from gpu_nn.kernels.triton import rnn as kt
    from gpu_nn.kernels.triton._aot import compile_spec

    args = list(argv if argv is not None else sys.argv[1:])
    backward = "--backward" in args
    positional = [a for a in args if a != "--backward"]
    if len(positional) != 2 or any(a.startswith("-") for a in positional):
        print("usage: python -m gpu_nn.benchmarks.rnn_resident_aot OUT.json COMMIT [--backward]\n\n"
              + (__doc__ or "").strip(), file=sys.stderr)
        return 0 if positional in (["-h"], ["--help"]) else 2
    out, commit = positional
    kps = [16 << i for i in range(kt.RESIDENT_MAX_KP.bit_length() - 4)]
    rows = []
    t0 = time.time()
    for kp in kps:
        for single in _singles(kt, kp, backward):
            pair = kt._rnn_persist2_bwd_kernel if backward else kt._rnn_persist2_fwd_kernel
            for spec in (single, kt._pair_spec(pair, single)):
                for form, s, sass in (("generic", spec, True),
                                      ("aligned (launched: pointers and ints divisible by 16)", spec.aligned(), False)):
                    row = compile_spec(s, sass=sass)
                    row.update(kp=kp, form=form)
                    rows.append(row)
    summary = summarize(rows)
    doc = {"what": (__doc__ or "").strip().splitlines()[0] + (" (backward)" if backward else " (forward)"),
           "command": "python -m gpu_nn.benchmarks.rnn_resident_aot OUT COMMIT" + (" --backward" if backward else ""),
           "commit": commit, "triton": triton.__version__, "torch": torch.__version__,
           "python": platform.python_version(), "seconds": round(time.time() - t0, 1), "summary": summary}
    with open(out, "w") as f:  # one line per row: the table is long
        f.write(json.dumps(doc, indent=1)[:-2] + ',\n "rows": [\n'
                + ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in rows) + "\n ]\n}\n")
    print(json.dumps(summary))
    return 1 if summary["spilling"] or not summary["tensor_cores_in_every_generic"] else 0


def summarize(rows) -> dict:
    """The table's summary: spills, registers and shared memory per KP, and the MMA instructions
    of the generic forms. The forward's dot has 64 rows (gates x units) at every KP, a wgmma
    (HGMMA); the backward's has KP rows, a wgmma from KP = 64 and below that an mma.sync (HMMA,
    its small operand in registers)."""
    by_kp = sorted({r["kp"] for r in rows})
    generic = [r for r in rows if r["form"] == "generic"]
    return {"compiles": len(rows), "spilling": sum(1 for r in rows if r["spill_bytes"]),
            "registers_max_by_kp": {k: max(r["registers"] for r in rows if r["kp"] == k) for k in by_kp},
            "shared_bytes_max_by_kp": {k: max(r["shared_bytes"] for r in rows if r["kp"] == k) for k in by_kp},
            "tensor_cores_in_every_generic": all(r["hgmma"] > 0 or r["hmma"] > 0 for r in generic),
            "hgmma_in_every_generic": all(r["hgmma"] > 0 for r in generic),
            "hgmma_in_every_generic_from_kp_64": all(r["hgmma"] > 0 for r in generic if r["kp"] >= 64)}


def _singles(kt, kp, backward):
    """The one-direction specs of every variant at ``kp``: the forward's (mode, io and output
    dtype, GRU b_hh flag, tensor-core dot) or the backward's (mode, io and output-gradient dtype,
    tensor-core dot)."""
    for dt in ("fp32", "fp16", "bf16"):
        for dot in kt.step_dots(dt):
            if dot == kt.DOT_CODES["fp32"]:  # FMA dots never take the resident form
                continue
            for mode, code in kt.MODE_CODES.items():
                for out_dt in sorted({dt, "fp32"}):
                    if backward:
                        yield kt._persist_bwd_spec(mode, dt, out_dt, dot, kp)
                        continue
                    for has_bhh in ((False, True) if mode == "gru" else (False,)):
                        yield kt._persist_spec(code, dt, out_dt, has_bhh, dot, kp)


if __name__ == "__main__":
    sys.exit(main())
