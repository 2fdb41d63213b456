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
  (re-reading W_hh from L2) in every case timing both; kept on when it is not slower in any.

"Beats" is a ratio of medians below 1; the ratios are printed so that a reader can see how
close the call was. A session copies a changed value into the code, with the run's commit.
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
    stats = row.get("stats", {}).get(provider)
    if stats and stats.get("median") is not None:
        return float(stats["median"])
    s = row.get("seconds", {}).get(provider)
    return float(s) if s is not None else None


def _label(row):
    return f"{row['name']} {row['shape']}"


def _key(c):
    return tuple(c[k] for k in ("mode", "T", "N", "I", "H", "L", "bi", "packed", "dtype"))


def decide(results: list[dict], current: dict) -> dict:
    """The three decisions from bench.json's ``results`` rows; ``current`` holds the code's
    ``persist_default_max_b``, ``persist_max_b`` and ``persistent_bwd_by_default``."""
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
    bwd_cases, unmatched = {}, []
    for r, c in rows:
        if not c["backward"] or c["L"] != 1 or c["bi"] or c["packed"] or c["N"] > limit:
            continue
        f = fwd.get(_key(c))
        vals = [_median(r, PERSIST), _median(r, STEP)] + ([_median(f, PERSIST), _median(f, STEP)] if f else [])
        if len(vals) < 4 or None in vals:
            if vals[0] is not None and vals[1] is not None:
                unmatched.append(_label(r))
            continue
        pb, sb = vals[0] - vals[2], vals[1] - vals[3]
        if pb > 0 and sb > 0:
            bwd_cases[_label(r)] = pb / sb
    bwd = {"current": current["persistent_bwd_by_default"],
           "recommended": (all(v < 1.0 for v in bwd_cases.values()) if bwd_cases
                           else current["persistent_bwd_by_default"]),
           "basis": ("one-layer fwd+bwd cases within the batch bound: (fwd+bwd - fwd) of triton-persistent / "
                     "of triton, medians"),
           "cases": bwd_cases}
    if unmatched:
        bwd["without_a_forward_case"] = unmatched
    if not bwd_cases:
        bwd["note"] = "no fwd+bwd case with its forward timed both providers: the code's value stands"

    # 3. the resident form against the L2 form
    res_cases = {}
    for r, c in rows:
        a, b = _median(r, PERSIST), _median(r, L2)
        if a is not None and b is not None:
            res_cases[_label(r)] = a / b
    resident = {"current": True, "recommended": all(v <= 1.0 for v in res_cases.values()) if res_cases else True,
                "basis": "cases timing both: triton-persistent (resident) / triton-persistent-l2, medians",
                "cases": res_cases}
    if res_cases and not resident["recommended"]:
        resident["slower"] = {k: v for k, v in res_cases.items() if v > 1.0}
    if not res_cases:
        resident["note"] = "no case timed both forms: the resident default stands"
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
        for extra in ("note", "without_a_forward_case"):
            if extra in d:
                lines.append(f"  {extra}: {d[extra]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpu_nn.benchmarks.rnn_defaults", description=__doc__.splitlines()[0])
    p.add_argument("bench_json", help="a GPU run's bench.json (gpu-nn bench --out)")
    p.add_argument("--json", help="also write the decisions here")
    args = p.parse_args(argv)
    with open(args.bench_json) as f:
        doc = json.load(f)
    decisions = decide(doc.get("results", []), current_values())
    print(report(decisions))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(decisions, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
