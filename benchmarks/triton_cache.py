"""What Triton's on-disk cache holds after a GPU run: compiled kernels per kernel name.

The test suite on a fresh H200 is bound by kernel compilation (its slowest tests are the ones
that compile many specialisations of the recurrent and convolution kernels); how many variants
of which kernel a run compiled is what a CPU-only session needs to cut that, and the cache says
it: one folder per compiled variant, holding ``<kernel>.cubin``::

    python -m gpu_nn.benchmarks.triton_cache [CACHE_DIR] [--json PATH]

``CACHE_DIR`` defaults to ``TRITON_CACHE_DIR`` or ``~/.triton/cache``. Prints the total and the
kernels with the most variants; ``--json`` keeps every count.
"""

from __future__ import annotations

import argparse
import collections
import json
import os


def cache_dir() -> str:
    return os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")


def summary(path: str) -> dict:
    """``{"dir", "variants", "kernels": {name: count}}``: one variant per cache folder holding a
    ``.cubin`` (a folder without one is a group file or an unfinished compile), largest first."""
    counts: collections.Counter = collections.Counter()
    if os.path.isdir(path):
        for entry in os.scandir(path):
            if not entry.is_dir():
                continue
            for f in os.listdir(entry.path):
                if f.endswith(".cubin"):
                    counts[f[:-len(".cubin")]] += 1
    return {"dir": path, "variants": sum(counts.values()), "kernels": dict(counts.most_common())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpu_nn.benchmarks.triton_cache", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", nargs="?", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)
    s = summary(a.dir or cache_dir())
    print(f"triton cache {s['dir']}: {s['variants']} compiled variants of {len(s['kernels'])} kernels")
    for name, n in list(s["kernels"].items())[:a.top]:
        print(f"  {n:5d}  {name}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(s, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
