"""The recurrent layers' measured defaults, read off a GPU run's bench.json.

``python -m gpu_nn.benchmarks.rnn_defaults BENCH.json [--json OUT.json]`` (no GPU needed: run it
on the bench.json a GPU session brought back, e.g. ``/tmp/gpu-run/bench.json`` from
``benchmarks/gpu_run.sh``) prints, for each switch that ``gpu_nn/ops/rnn.py`` and
``kernels/triton/rnn.py`` leave to a measurement, its value in the code, the value the run
supports and the per-case ratios behind it:

- ``PERSIST_DEFAULT_MAX_B`` (ops/rnn.py: the batch bound of the persistent forward's default):
  the largest batch N such that in every forward case of a batch <= N timing both, the persistent
  forward (provider ``triton-persistent``) beats the per-step launches (``triton``), capped at
  ``PERSIST_MAX_B``; the code's value where no case times both.
- ``PERSISTENT_BWD_BY_DEFAULT`` (ops/rnn.py): the backward alone, each provider's fwd+bwd median
  less its forward median at the same shape (the persistent provider runs both passes
  persistent), persistent against per step, in every one-layer one-direction unpacked fwd+bwd case
  whose batch is within the bound above; True when it wins in every one of them.
- the resident form (``GPU_NN_RNN_RESIDENT`` unset: W_hh kept on the SMs where ``resident_kp``
  allows): ``triton-persistent`` (resident where it applies) against ``triton-persistent-l2``
  (re-reading W_hh from L2) in every case timing both where the resident form applies (KP =
  next power of two of H at most RESIDENT_MAX_KP, one program per tile: directions x batch tiles
  x hidden tiles at most the GPU's SM count, ``--sms``, 132 for the H200; elsewhere both
  providers run the same L2 kernel and their ratio is noise); kept on unless it is slower in one
  of them by more than the larger interquartile range of the two timings.

"Beats" is a ratio of medians below 1 (a change from the code's value needs a win in every case);
the ratios are printed so that a reader can see how close the call was. A session copies a
changed value into the code, with the run's commit.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

_SHAPE = re.compile(r"T=(\d+) N=(\d+) I=(\d+) H=(\d+)(?: L=(\d+))?( bi)?( packed)? (\w+)$")
STEP, PERSIST, L2 = "triton", "triton-persistent", "triton-persistent-l2"


def parse_case(row: dict) -> dict | None:
    """(mode, pass, T, N, I, H, L, bidirectional, packed, dtype) of a bench_rnn row, None for
    another family's row or a shape it does not name this way."""
    if row.get("family") != "rnn":
        return None
    m = _SHAPE.match(row.get("shape", ""))
    parts = row.get("name", "").split()
    if m is None or len(parts) != 2 or parts[1] not in ("fwd", "fwd+bwd"):
        return None
    T, N, I, H, L, bi, packed, dtype = m.groups()
    return {"mode": parts[0], "backward": parts[1] == "fwd+bwd", "T": int(T), "N": int(N), "I": int(I),
            "H": int(H), "L": int(L or 1), "bi": bool(bi), "packed": bool(packed), "dtype": dtype}


def _median(row, provider):
    """The provider's median seconds (a harness row's ``seconds`` are medians), None if untimed."""
    s = row.get("seconds", {}).get(provider)
    return float(s) if s is not None else None


def _iqr(row, provider):
    stats = row.get("stats", {}).get(provider) or {}
    return float(stats.get("iqr") or 0.0)


_BENCH_DOTS = {"float32": "tf32", "bfloat16": "bf16", "float16": "fp16"}  # float32: TF32, torch's default


def resident_applies(c: dict, sm_count: int) -> bool:
    """Whether bench case ``c`` (:func:`parse_case`) runs the persistent kernels with W_hh
    resident under the ``triton-persistent`` provider: the launchers' own program count
    (``persist_programs``, or ``persist_pair_programs`` for a bidirectional layer) and
    ``resident_kp`` with that provider's GPU_NN_RNN_RESIDENT (bench_rnn.PROVIDERS), for the
    forward and, in a fwd+bwd case, the backward too."""
    from gpu_nn.benchmarks import bench_rnn, harness
    from gpu_nn.kernels.triton import rnn as kt

    N, H = c["N"], c["H"]
    tiles = (2 if c["bi"] else 1) * kt.persist_tiles(N, H)
    programs = (kt.persist_pair_programs if c["bi"] else kt.persist_programs)(N, H, sm_count)
    if not programs:
        return False
    dot = kt.DOT_CODES[_BENCH_DOTS[c["dtype"]]]
    with harness.env_var(bench_rnn.RESIDENT_ENV, bench_rnn.PROVIDERS[PERSIST][2]):
        # a fwd+bwd case compares the two forms only where the backward is resident too (its own
        # bound, RESIDENT_BWD_MAX_KP): else half of it times the same L2 kernels on both sides
        return kt.resident_kp(H, dot, tiles, programs) > 0 and (
            not c["backward"] or kt.resident_kp(H, dot, tiles, programs, backward=True) > 0)


def _label(row):
    return f"{row['name']} {row['shape']}"


def _key(c):
    return tuple(c[k] for k in ("mode", "T", "N", "I", "H", "L", "bi", "packed", "dtype"))


def decide(results: list[dict], current: dict, sm_count: int = 132) -> dict:
    """The three decisions from bench.json's ``results`` rows; ``current`` holds the code's
    ``persist_default_max_b``, ``persist_max_b`` and ``persistent_bwd_by_default``; ``sm_count``
    the run's GPU's (the H200's 132 by default)."""
    rows = [(r, c) for r in results if (c := parse_case(r)) is not None]
    fwd = {_key(c): r for r, c in rows if not c["backward"]}

    # 1. the persistent forward's batch bound
    by_n: dict[int, list] = {}
    for r, c in rows:
        a, b = _median(r, PERSIST), _median(r, STEP)
        if not c["backward"] and a is not None and b is not None:
            by_n.setdefault(c["N"], []).append((_label(r), a / b))
    bound = None
    for n in sorted(by_n):
        if n > current["persist_max_b"] or any(ratio >= 1.0 for _, ratio in by_n[n]):
            break
        bound = n
    max_b = {"current": current["persist_default_max_b"],
             "recommended": current["persist_default_max_b"] if not by_n else (bound or 0),
             "basis": "forward cases: triton-persistent / triton median, per batch",
             "cases": {str(n): dict(v) for n, v in sorted(by_n.items())}}
    if not by_n:
        max_b["note"] = "no forward case timed both providers: the code's value stands"
    elif bound is None:
        max_b["note"] = "the persistent forward lost at the smallest batch measured: 0 turns its default off"

    # 2. the persistent backward, alone (fwd+bwd less the forward of the same shape)
    limit = max_b["recommended"]
    bwd_cases = {}
    left_out = {"without_a_forward_case": [], "forward_lacks_a_provider": [], "backward_not_positive": []}
    for r, c in rows:
        if not c["backward"] or c["L"] != 1 or c["bi"] or c["packed"] or c["N"] > limit:
            continue
        pf, sf = _median(r, PERSIST), _median(r, STEP)
        if pf is None or sf is None:
            continue
        f = fwd.get(_key(c))
        if f is None:
            left_out["without_a_forward_case"].append(_label(r))
            continue
        pq, sq = _median(f, PERSIST), _median(f, STEP)
        if pq is None or sq is None:
            left_out["forward_lacks_a_provider"].append(_label(r))
            continue
        pb, sb = pf - pq, sf - sq
        if pb <= 0 or sb <= 0:  # a backward no longer than nothing: noise, not a measurement
            left_out["backward_not_positive"].append(_label(r))
            continue
        bwd_cases[_label(r)] = pb / sb
    bwd = {"current": current["persistent_bwd_by_default"],
           "recommended": (all(v < 1.0 for v in bwd_cases.values()) if bwd_cases
                           else current["persistent_bwd_by_default"]),
           "basis": ("one-layer fwd+bwd cases within the batch bound: (fwd+bwd - fwd) of triton-persistent / "
                     "of triton, medians"),
           "cases": bwd_cases}
    bwd.update({k: v for k, v in left_out.items() if v})
    if not bwd_cases:
        bwd["note"] = "no usable fwd+bwd case (see the lists of those left out): the code's value stands"

    # 3. the resident form against the L2 form
    res_cases, slower, not_resident = {}, {}, []
    for r, c in rows:
        a, b = _median(r, PERSIST), _median(r, L2)
        if a is None or b is None:
            continue
        if not resident_applies(c, sm_count):
            not_resident.append(_label(r))
            continue
        res_cases[_label(r)] = a / b
        if a - b > max(_iqr(r, PERSIST), _iqr(r, L2)):
            slower[_label(r)] = a / b
    resident = {"current": True, "recommended": not slower,
                "basis": ("cases timing both where the resident form applies: triton-persistent (resident) / "
                          "triton-persistent-l2, medians; slower: by more than the larger IQR"),
                "cases": res_cases}
    if slower:
        resident["slower"] = slower
    if not_resident:
        resident["not_resident"] = not_resident
    if not res_cases:
        resident["note"] = "no case timed both forms where the resident form applies: the resident default stands"
    return {"persist_default_max_b": max_b, "persistent_bwd_by_default": bwd, "resident": resident}


def current_values() -> dict:
    from gpu_nn.ops import rnn as ops

    return {"persist_default_max_b": ops.PERSIST_DEFAULT_MAX_B, "persist_max_b": ops.PERSIST_MAX_B,
            "persistent_bwd_by_default": ops.PERSISTENT_BWD_BY_DEFAULT}


def report(decisions: dict) -> str:
    lines = []
    for name, d in decisions.items():
        change = "" if d["recommended"] == d["current"] else "   <- change"
        lines.append(f"{name}: code {d['current']}, run {d['recommended']}{change}")
        lines.append(f"  {d['basis']}")
        cases = d["cases"]
        flat = ({f"N={n}: {k}": v for n, sub in cases.items() for k, v in sub.items()}
                if name == "persist_default_max_b" else cases)
        for k, v in flat.items():
            lines.append(f"    {v:6.3f}  {k}")
        for extra in ("note", "slower", "not_resident", "without_a_forward_case", "forward_lacks_a_provider",
                      "backward_not_positive"):
            if extra in d:
                lines.append(f"  {extra}: {d[extra]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpu_nn.benchmarks.rnn_defaults", description=__doc__.splitlines()[0])
    p.add_argument("bench_json", help="a GPU run's bench.json (gpu-nn bench --out)")
    p.add_argument("--json", help="also write the decisions here")
    p.add_argument("--sms", type=int, default=132, help="the run's GPU's SM count (default 132: the H200)")
    args = p.parse_args(argv)
    with open(args.bench_json) as f:
        doc = json.load(f)
    decisions = decide(doc.get("results", []), current_values(), args.sms)
    print(report(decisions))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(decisions, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
