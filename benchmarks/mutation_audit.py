"""Mutation audit: does the suite fail when a kernel is wrong in a small, plausible way?

Each mutation is one textual change to one source file (a bound off by one, a mask or select
dropped, a constant or an operand swapped, at its ``occurrence``-th match), made in a copy of the
working tree's tracked files; then a pytest selection runs there with ``-x``. KILLED: a test
failed (the suite sees the bug); SURVIVED: every test passed (a gap, or a mutant that computes the
same as the original: ``EQUIVALENT`` says why for the known ones); ERROR: pytest could not run.
The copy is imported, not the checkout: the editable install maps ``gpu_nn.kernels`` /
``reference`` / ``benchmarks`` onto the checkout whatever PYTHONPATH says, so the pytest process
drops its finder and the copy gets the package's mapped folders as links. Stop 71 ran every entry
below on the 2-core CPU machine (the Triton kernels under the interpreter, the CUDA C math through
its host build): ``benchmarks/results/cpu/mutation_audit_<commit>.json``::

    .venv/bin/python -m gpu_nn.benchmarks.mutation_audit --list
    .venv/bin/python -m gpu_nn.benchmarks.mutation_audit --only conv- --out /tmp/audit.jsonl

A run of every mutation takes about an hour there (a survivor runs its whole selection).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

_POOL, _CONV, _DENSE = "kernels/triton/pool.py", "kernels/triton/conv.py", "kernels/triton/dense.py"
_RNN, _OPTIM = "kernels/triton/rnn.py", "kernels/triton/optim.py"
_ACT = "kernels/triton/activation.py"
_POOL_CU, _OPTIM_CU = "kernels/cuda/pool_math.cuh", "kernels/cuda/optim_math.cuh"
_T_POOL, _T_CONV, _T_DENSE = ["tests/test_pool.py"], ["tests/test_conv.py", "tests/test_properties.py"], ["tests/test_dense.py"]
_T_RNN, _T_OPTIM = ["tests/test_rnn.py"], ["tests/test_optim.py"]
_T_ACT = ["tests/test_activation.py"]
_T_POOL_CU = ["tests/test_pool.py", "-k", "host or cuda or math or fastdiv"]
_T_OPTIM_CU = ["tests/test_optim.py", "-k", "host or cuda or math"]

# (id, file, old text, new text, occurrence of old (0: the first), pytest arguments)
MUTATIONS = [
    # the activation kernel's torch expressions and math (stop 76)
    ("act-sigmoid-stable", _ACT, "    return tl.div_rn(1.0, 1.0 + libdevice.exp(-x))\n",
     "    e = libdevice.exp(-tl.abs(x))\n    return tl.where(x >= 0, tl.div_rn(1.0, 1.0 + e), tl.div_rn(e, 1.0 + e))\n", 0,
     _T_ACT),
    ("act-sigmoid-bwd-order", _ACT, "g = g * (1.0 - y) * y", "g = g * y * (1.0 - y)", 0, _T_ACT),
    ("act-tanh-bwd-fma", _ACT, "g = g * tl.fma(-y, y, 1.0)", "g = g * (1.0 - y * y)", 0, _T_ACT),
    ("act-tanh-tiny", _ACT, "tl.where(tl.abs(x) < 6.103515625e-05, x, libdevice.tanh(x))",
     "tl.where(tl.abs(x) < 6.103515625e-05, 0.0 * x, libdevice.tanh(x))", 0, _T_ACT),
    ("pool-tie-ge", _POOL, "upd = (v > best) | (v != v)", "upd = (v >= best) | (v != v)", 0, _T_POOL),
    ("pool-nan-values", _POOL, "best = tl.where(nan != nan, nan, best)", "best = best", 0, _T_POOL),
    ("pool-nan-idx", _POOL, "upd = (v > best) | (v != v)", "upd = (v > best)", 0, _T_POOL),
    ("pool-empty-lt", _POOL, "(ch <= 0) | (cw <= 0)", "(ch < 0) | (cw < 0)", 0, _T_POOL),
    ("pool-divisor-off", _POOL, "tl.where(DIVISOR != 0, DIVISOR,", "tl.where(DIVISOR != 0, DIVISOR + 1,", 0, _T_POOL),
    ("pool-wend", _POOL, "wend = tl.minimum(w0 + KW, W + PW)", "wend = tl.minimum(w0 + KW, W + PW + 1)", 0, _T_POOL),
    ("pool-maxflat-fwd-dil", _POOL, "        ih = h0 + i * DH\n        hok = mask", "        ih = h0 + i\n        hok = mask", 0,
     _T_POOL),
    ("pool-maxflat-bwd-nwh", _POOL, "nwh = (KH - 1) * DH // SH + 1", "nwh = (KH - 1) * DH // SH", 0, _T_POOL),
    ("pool-avgflat-bwd-nwh", _POOL, "nwh = (KH - 1) // SH + 1", "nwh = (KH - 1) // SH", 0, _T_POOL),
    # the backward's windows added in decreasing order (the same windows: torch's sums otherwise)
    ("pool-maxflat-bwd-order", _POOL, "        oh = first_h + a\n", "        oh = top - a\n", 0, _T_POOL),
    ("pool-avgflat-bwd-order", _POOL, "    for a in range(nwh - 1, -1, -1):\n        oh = top - a",
     "    for a in range(0, nwh):\n        oh = top - a", 0, _T_POOL),
    ("pool-tile-bwd-order", _POOL, "for a in tl.static_range(NWH - 1, -1, -1):", "for a in tl.static_range(NWH):", 0,
     _T_POOL),
    ("pool-default-pos", _POOL, "start + k * step, first)", "start + k * step, start)", 0, _T_POOL),
    ("pool-maxwin-dil-w", _POOL, "            iw = w0 + j * DW\n            ok = hok & _inside(iw, W)",
     "            iw = w0 + j\n            ok = hok & _inside(iw, W)", 0, _T_POOL),
    ("pool-maxtile-bwd-reach", _POOL, "hok = imask & _inside(oh, OH) & (oh * SH - PH + (KH - 1) * DH >= ih)",
     "hok = imask & _inside(oh, OH)", 0, _T_POOL),
    ("pool-avgtile-bwd-reach", _POOL, "hok = imask & _inside(oh, OH) & (oh * SH - PH + (KH - 1) >= ih)",
     "hok = imask & _inside(oh, OH)", 0, _T_POOL),
    ("pool-minimum-neg", _POOL, "    if MINIMUM:\n        best = -best", "    if MINIMUM:\n        best = best", 0, _T_POOL),
    ("dense-colsum-hi", _DENSE, "(offs_m[:, None] < m_hi)", "(offs_m[:, None] <= m_hi)", 0, _T_DENSE),
    ("dense-online-hi", _DENSE, "    hi = d > 0\n", "    hi = d >= 0\n", 0, _T_DENSE),
    ("dense-softmax-single-pad", _DENSE, "e = tl.where(mask, tl.exp(x - m), 0.0)", "e = tl.exp(x - m)", 0, _T_DENSE),
    ("dense-softmax-bwd-long", _DENSE, "                dx = y * (g - total)\n", "                dx = y * g - total\n", 0,
     _T_DENSE),
    ("dense-ce-shift-wsum", _DENSE, "lin += tl.where(wsum == 0.0, 0.0, wsum * (m - m_new))", "lin += wsum * (m - m_new)", 0,
     _T_DENSE),
    ("dense-ce-smooth-eps0", _DENSE, "loss += tl.where(eps > 0.0, (eps / C) * smooth, 0.0)", "loss += (eps / C) * smooth",
     0, _T_DENSE),
    ("dense-ce-mean-nan", _DENSE, "d = tl.where((eps > 0.0) & (d == 0.0), float(\"nan\"), d)", "d = d", 0, _T_DENSE),
    ("dense-ce-bwd-smooth", _DENSE, "(eps / C) * (w_tot * p - w)", "(eps / C) * (p - w)", 0, _T_DENSE),
    ("conv-tapsrc-h", _CONV, "(ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)\n", "(ih >= 0) & (ih <= H) & (iw >= 0) & (iw < W)\n",
     0, _T_CONV),
    ("conv-dgrad-nonfinite", _CONV, "        acc += tl.where(ok[:, None], tap, 0.0)\n", "        acc += tap\n", 0, _T_CONV),
    ("conv-dgrad-split-hi", _CONV, "        t_hi = tl.minimum(t_lo + per, TAPS)\n", "        t_hi = t_lo + per\n", 0, _T_CONV),
    ("conv-flatk-split", _CONV, "range(split * per, tl.minimum(split * per + per, TAPS * KC))",
     "range(split * per, split * per + per)", 0, _T_CONV),
    ("conv-packed-split", _CONV, "range(split * per, tl.minimum(split * per + per, nkb))",
     "range(split * per, split * per + per)", 0, _T_CONV),
    ("conv-wgrad-mhi", _CONV, "    m_hi = tl.minimum(m_lo + CHUNK, M)\n", "    m_hi = m_lo + CHUNK\n", 0, _T_CONV),
    ("conv-dw-mult", _CONV, "    ci = (offs_o // MULT).to(tl.int64)\n", "    ci = (offs_o % MULT).to(tl.int64)\n", 0, _T_CONV),
    ("conv-dgrad-skip-tap", _CONV, "((rh + PH - i * DH) % SH == 0) & ((rw + PW - j * DW) % SW == 0), OG, 0)",
     "((rh + PH - i * DH) % SH == 0), OG, 0)", 0, _T_CONV),
    ("rnn-valid-le", _RNN, "        valid = t < tl.load(len_ptr + rb, mask=mb, other=0)\n",
     "        valid = t <= tl.load(len_ptr + rb, mask=mb, other=0)\n", 0, _T_RNN),
    ("rnn-gru-bhh-n", _RNN, "            acc2 += tl.load(bhh_ptr + 2 * H + rh", "            acc2 += 0.0 * tl.load(bhh_ptr + 2 * H + rh",
     0, _T_RNN),
    ("rnn-persist-rev", _RNN, "    t = s + reverse * (T - 1 - 2 * s)\n", "    t = s\n", 0, _T_RNN),
    ("rnn-bwd-kend", _RNN, "k_end = tl.where((last < t) | (has_next == 0), 0, GH)",
     "k_end = tl.where((last <= t) | (has_next == 0), 0, GH)", 0, _T_RNN),
    ("rnn-bwd-dout-valid", _RNN, "    dout = tl.where(valid, dout, 0.0)\n", "", 0, _T_RNN),
    ("opt-sgd-first", _OPTIM, "b = tl.where(first != 0, g, b * momentum + damp1 * g)", "b = b * momentum + damp1 * g", 0,
     _T_OPTIM),
    ("opt-sgd-tail", _OPTIM, "        elif start + it * BLOCK < n:\n            _sgd_block",
     "        elif start + it * BLOCK < n - 1:\n            _sgd_block", 0, _T_OPTIM),
    ("opt-adagrad-decay", _OPTIM, "(1.0 + (step - 1.0) * _f64(lr_decay_b))", "(1.0 + step * _f64(lr_decay_b))", 0, _T_OPTIM),
    ("opt-rms-centered", _OPTIM, "        avg = tl.sqrt_rn(tl.fma(-ga, ga, v))\n", "        avg = tl.sqrt_rn(v)\n", 0, _T_OPTIM),
    ("opt-adam-ams-nan", _OPTIM, "v, propagate_nan=tl.PropagateNan.ALL)", "v)", 0, _T_OPTIM),
    ("opt-adamw-decay", _OPTIM, "    decay = (1.0 - lr64 * wd64).to(tl.float32)\n", "    decay = (1.0 - wd64).to(tl.float32)\n", 0,
     _T_OPTIM),
    ("opt-amp-skip", _OPTIM, "        n = tl.where(tl.load(inf_ptr) != 0.0, 0, n)", "        n = n", 0, _T_OPTIM),
    ("opt-lerp", _OPTIM, "    return tl.where(w < 0.5, a + w * d, b - d * (1.0 - w))", "    return a + w * d", 0, _T_OPTIM),
    ("opt-clip-round", _OPTIM, "    if rnd == 1:\n        x = x.to(tl.float16).to(tl.float32)", "    if rnd == 1:\n        x = x", 0,
     _T_OPTIM),
    ("cu-pool-max-nan", _POOL_CU, "if (v > best || gn_isnan(v)) {", "if (v > best) {", 0, _T_POOL_CU),
    ("cu-pool-gather-order", _POOL_CU, "for (I oh = top - reach_h / SH; oh <= top; ++oh) {",
     "for (I oh = top; oh >= top - reach_h / SH; --oh) {", 0, _T_POOL_CU),
    ("cu-pool-avg-empty", _POOL_CU, "*empty = ch <= 0 || cw <= 0;", "*empty = ch < 0 || cw < 0;", 0, _T_POOL_CU),
    ("cu-pool-fastdiv-s", _POOL_CU, "while (s < 31 && (1u << s) < d) ++s;", "while (s < 31 && (1u << s) <= d) ++s;", 0,
     _T_POOL_CU),
    ("cu-opt-ams-nan", _OPTIM_CU, "vmax = (v > vmax || v != v) ? v : vmax;", "vmax = (v > vmax) ? v : vmax;", 0, _T_OPTIM_CU),
    ("cu-opt-lerp", _OPTIM_CU, "    return w < 0.5f ? a + w * d : b - d * (1.0f - w);", "    return a + w * d;", 0, _T_OPTIM_CU),
    ("cu-opt-chunk-tail", _OPTIM_CU, "        for (; i < end; ++i) body(i, 1);", "        for (; i < end - 1; ++i) body(i, 1);", 0,
     _T_OPTIM_CU),
]

# survivors that compute what the original computes, and why (stop 71's reading)
EQUIVALENT = {
    "pool-empty-lt": "an average window always holds an input element under torch's argument checks (padding at most "
                     "half the kernel, ceil_mode's last window starting inside the input or its left padding)",
    "cu-pool-avg-empty": "as pool-empty-lt",
    "pool-maxtile-bwd-reach": "a window that does not reach the element never saved its index: the reach test only "
                              "skips its loads",
    "dense-online-hi": "at d = 0, e = 1: s e + 1 and s + e are the same sum",
    "dense-softmax-single-pad": "the padding lanes matter only in an all -inf row, whose real lanes are NaN already",
    "conv-packed-split": "the packed (channel, tap) candidates never split K (problem_candidates offers no PACKED + "
                         "SPLIT): one split covers every trip",
}

# the pytest process drops the editable install's finder, which would map gpu_nn.kernels /
# reference / benchmarks back onto the checkout
_BOOT = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if not "
         "getattr(f, '__module__', '').startswith('__editable__')]; import pytest; "
         "sys.exit(pytest.main(sys.argv[1:]))")
_MAPPED = {"kernels": "kernels", "reference": "reference", "benchmarks": "benchmarks"}  # pyproject's package-dir


def find(src: str, old: str, occurrence: int) -> int:
    """The offset of the ``occurrence``-th match of ``old`` in ``src``, or -1."""
    at = -1
    for _ in range(occurrence + 1):
        at = src.find(old, at + 1)
        if at < 0:
            return -1
    return at


def copy_tree(dest: str, root: str = ROOT) -> None:
    """The working tree's tracked files (as they are now) under ``dest``, and the package's mapped
    folders linked into ``dest/gpu_nn``."""
    files = subprocess.run(["git", "-C", root, "ls-files", "-z"], capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        src = os.path.join(root, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
    for name, folder in _MAPPED.items():
        link = os.path.join(dest, "gpu_nn", name)
        if not os.path.exists(link):
            os.symlink(os.path.join(dest, folder), link)


def run_one(tree: str, mutation, timeout: float = 1200.0) -> dict:
    """Apply ``mutation`` in ``tree``, run its tests, restore the file; the record."""
    mid, rel, old, new, occurrence, tests = mutation
    path = os.path.join(tree, rel)
    with open(path) as f:
        src = f.read()
    at = find(src, old, occurrence)
    rec = {"id": mid, "file": rel, "old": old, "new": new, "occurrence": occurrence, "tests": tests}
    if at < 0:
        rec["status"] = "BADSPEC"
        return rec
    with open(path, "w") as f:
        f.write(src[:at] + new + src[at + len(old):])
    env = dict(os.environ, PYTHONPATH=tree, GPU_NN_POISON="0")
    env.pop("PYTEST_ADDOPTS", None)
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-c", _BOOT, "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=tree,
                           env=env, capture_output=True, text=True, timeout=timeout)
        lines = (r.stdout + r.stderr).strip().splitlines()
        rec["status"] = {0: "SURVIVED", 1: "KILLED"}.get(r.returncode, f"ERROR rc={r.returncode}")
        rec["failed"] = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:3]
        rec["last"] = lines[-1] if lines else ""
    except subprocess.TimeoutExpired:
        rec["status"] = "ERROR timeout"
    finally:
        with open(path, "w") as f:
            f.write(src)
    rec["seconds"] = round(time.time() - t0, 1)
    if rec["status"] == "SURVIVED" and mid in EQUIVALENT:
        rec["equivalent"] = EQUIVALENT[mid]
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=(), help="ids (or id prefixes) to run")
    ap.add_argument("--list", action="store_true", help="list the mutations and stop")
    ap.add_argument("--out", help="JSON lines, one record per mutation (appended)")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(m[0].startswith(o) for o in args.only)]
    if args.list:
        for m in chosen:
            print(f"{m[0]:28s} {m[1]}: {m[2]!r} -> {m[3]!r}")
        return 0
    gaps = 0
    with tempfile.TemporaryDirectory(prefix="gpu_nn_mutation_") as tree:
        copy_tree(tree)
        for m in chosen:
            rec = run_one(tree, m)
            gap = rec["status"] != "KILLED" and "equivalent" not in rec
            gaps += gap
            print(f"{rec['id']:28s} {rec['status']:10s} {rec.get('seconds', 0):7.1f} s  {rec.get('last', '')[:80]}",
                  flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
    print(f"{len(chosen)} mutations, {gaps} not killed and not known equivalent")
    return 1 if gaps else 0


if __name__ == "__main__":
    sys.exit(main())
