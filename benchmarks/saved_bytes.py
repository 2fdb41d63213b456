"""What the recurrent layers keep for the backward, against torch's, on the CPU (no GPU needed).

Every tensor autograd saves during one forward of a layer is seen through
``torch.autograd.graph.saved_tensors_hooks``; the bytes counted are those of the distinct storages
behind them, less the storages of the layer's parameters and of its input (which the caller holds
anyway): what the forward adds to memory until the backward runs. Ours run on the reference
backend (the CPU's: its saved tensors are the ones the GPU backends save, the same shapes and
dtypes, tests/test_rnn.py's reserve tests), torch's on its own CPU path (oneDNN where it takes the
case).

    python -m gpu_nn.benchmarks.saved_bytes [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

import torch

# (name, layer, kwargs, T, B, I, H, dtype, lengths or None)
CASES = [
    ("lstm-2layer-bi-fp32", "LSTM", dict(num_layers=2, bidirectional=True), 10, 4, 8, 16, torch.float32, None),
    ("gru-fp32", "GRU", {}, 10, 4, 8, 16, torch.float32, None),
    ("rnn-fp32", "RNN", {}, 10, 4, 8, 16, torch.float32, None),
    ("lstm-bf16", "LSTM", {}, 10, 4, 8, 16, torch.bfloat16, None),
    ("gru-bf16", "GRU", {}, 10, 4, 8, 16, torch.bfloat16, None),
    ("rnn-bf16", "RNN", {}, 10, 4, 8, 16, torch.bfloat16, None),
    ("lstm-packed-long-tail-fp32", "LSTM", {}, 40, 8, 8, 16, torch.float32, [40, 6, 5, 4, 3, 3, 2, 1]),
    ("lstm-packed-fp32", "LSTM", {}, 7, 3, 8, 16, torch.float32, [7, 5, 2]),
]


def saved_bytes(module: torch.nn.Module, x, lengths) -> int:
    """Bytes of the distinct storages autograd saves in one forward of ``module`` on ``x``
    (packed with ``lengths`` when given), less the parameters' and the input's."""
    held = {p.untyped_storage().data_ptr() for p in module.parameters()} | {x.untyped_storage().data_ptr()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in held:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        inp = x if lengths is None else torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=True)
        out = module(inp)
    del out
    return sum(seen.values())


def run() -> list[dict]:
    import gpu_nn
    import gpu_nn.nn as gnn

    rows = []
    for name, layer, kw, T, B, I, H, dtype, lengths in CASES:
        torch.manual_seed(0)
        ours = getattr(gnn, layer)(I, H, **kw).to(dtype)
        theirs = getattr(torch.nn, layer)(I, H, **kw).to(dtype)
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(T, B, I, dtype=dtype, requires_grad=True)
        row = {"case": name, "layer": layer, "kwargs": kw, "T": T, "B": B, "I": I, "H": H, "dtype": str(dtype),
               "lengths": lengths}
        with gpu_nn.backend("reference"):
            row["ours_bytes"] = saved_bytes(ours, x, lengths)
        try:
            row["torch_bytes"] = saved_bytes(theirs, x, lengths)
            row["ratio"] = round(row["ours_bytes"] / row["torch_bytes"], 3) if row["torch_bytes"] else None
        except RuntimeError as exc:  # (torch's CPU path refuses some half cases)
            row["torch_bytes"] = None
            row["torch_error"] = str(exc).splitlines()[0][:200]
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows, versions and commit here")
    args = ap.parse_args(argv)
    rows = run()
    for r in rows:
        theirs = r["torch_bytes"] if r["torch_bytes"] is not None else "n/a (" + r.get("torch_error", "") + ")"
        print(f"{r['case']:28s} ours {r['ours_bytes']:>9d} B   torch {theirs} B   ratio {r.get('ratio')}")
    if args.json:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = None
        doc = {"what": __doc__.splitlines()[0], "method": "saved_tensors_hooks, distinct storages less "
               "parameters and input", "torch": torch.__version__, "python": platform.python_version(),
               "machine": platform.machine(), "commit": commit, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
