"""Which compiled Triton variants a test run asks for, counted without a GPU (issue 17).

On a fresh H200 the test suite is bound by kernel compilation: every distinct specialisation of
a kernel (its constexprs and launch options, and per runtime argument the facts the JIT
specialises on: dtype, 16-byte alignment of a pointer, an int equal to 1 or divisible by 16) is
compiled once, at seconds each. Under ``TRITON_INTERPRET=1`` nothing is compiled, but every
launch still names its variant: with ``GPU_NN_VARIANT_CENSUS=DIR`` set, ``tests/conftest.py``
installs :func:`install`, which records, per launch, the kernel, the variant's key (computed by
Triton's own ``native_specialize_impl`` with the kernel's ``do_not_specialize`` flags, as the
JIT's binder does) and the test that launched it, one JSON-lines file per pytest worker::

    GPU_NN_VARIANT_CENSUS=/tmp/census python -m pytest -n 2 -q tests
    python -m gpu_nn.benchmarks.variant_census /tmp/census [--json PATH]

The report: distinct variants in all, per kernel, per test file, and the tests that alone ask
for the most variants nobody else needs (where cutting a parametrisation saves compile time).

A proxy, not the GPU's count: the interpreter's launchers pick some configurations of their own
(smaller tiles and chunks, ``kernels/triton`` ``INTERPRET``), the tests that run only on a GPU
are not seen, CPU tensors stand for CUDA ones (the same alignment facts: both allocators hand
out aligned blocks), and choices made by device run their CPU branch (the recurrent forward runs
its per-step kernels here where a GPU runs the persistent one for batches up to
``PERSIST_DEFAULT_MAX_B``: the census counts step-forward variants a GPU does not compile and
misses persistent ones it does). A launch whose arguments cannot be keyed (a tensor without
storage) is kept as ``unkeyed`` and left out of the counts. ``benchmarks/triton_cache.py`` counts
what a GPU run really compiled.
"""

from __future__ import annotations

import argparse
import collections
import json
import os

UNKEYED = "unkeyed"  # the key of a launch whose arguments could not be keyed

_params: dict = {}


def _kernel_params(interp):
    """``({name: (is_constexpr, binder flags)}, names in order)`` of an interpreted kernel's
    parameters, read from a JITFunction made of the same function (no compilation); the flags
    as ``_launch.binder_flags`` gives them."""
    got = _params.get(id(interp))
    if got is None:
        from triton.runtime.jit import JITFunction

        from gpu_nn.kernels.triton._launch import binder_flags

        kw = {k: v for k, v in getattr(interp, "kwargs", {}).items()
              if k in ("do_not_specialize", "do_not_specialize_on_alignment", "version")}
        jf = JITFunction(interp.fn, **kw)
        # interp kept in the entry: its id stays its own while the entry exists
        got = _params[id(interp)] = (interp, {p.name: (p.is_constexpr, binder_flags(p)) for p in jf.params},
                                     [p.name for p in jf.params])
    return got[1:]


def _value(v):
    """A JSON-able, hashable stand-in for a constexpr or launch option."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return repr(v)


def variant_key(interp, args, kwargs) -> tuple:
    """(kernel, ((name, spec) ...)) of one launch: per runtime argument the JIT's specialisation
    (type and its ``D`` / ``1`` facts), per constexpr or launch option its value."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    params, names = _kernel_params(interp)
    parts = []
    for name, a in [(names[i] if i < len(names) else f"#{i}", a) for i, a in enumerate(args)] + sorted(kwargs.items()):
        constexpr, flags = params.get(name, (True, None))  # a launch option: by value
        parts.append((name, _value(a) if constexpr else list(native_specialize_impl(BaseBackend, a, *flags))))
    fn = interp.fn
    return f"{fn.__module__}.{fn.__qualname__}", json.dumps(parts, default=str)


def install(directory: str):
    """Record every interpreted launch's variant under ``directory`` (one file per process,
    line-buffered); returns that file (its writer is the patched ``InterpretedFunction.run``)."""
    from triton.runtime.interpreter import InterpretedFunction

    os.makedirs(directory, exist_ok=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    out = open(os.path.join(directory, f"census-{worker}-{os.getpid()}.jsonl"), "a", buffering=1)
    real = InterpretedFunction.run
    seen = set()  # (kernel, key, test) already written

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            try:
                kernel, key = variant_key(self, args, kwargs)
            except Exception as e:  # noqa: BLE001 - a census must not change what a test does
                fn = self.fn
                kernel, key = f"{fn.__module__}.{fn.__qualname__}", f"{UNKEYED}: {type(e).__name__}: {e}"
            test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
            mark = (kernel, key, test)
            if mark not in seen:
                seen.add(mark)
                out.write(json.dumps({"kernel": kernel, "key": key, "test": test}) + "\n")
        return real(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    return out


def keyed(rows: list) -> list:
    """``rows`` without the launches that could not be keyed."""
    return [r for r in rows if not r["key"].startswith(UNKEYED)]


def load(directory: str) -> list:
    rows = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".jsonl"):
            with open(os.path.join(directory, name)) as f:
                rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def summary(rows: list) -> dict:
    """Distinct variants in all, per kernel and per test file; per test the variants it alone
    asks for (no other test launches them); ``unkeyed``: the launches that could not be keyed
    (per test), left out of the rest."""
    tests_of = collections.defaultdict(set)
    unkeyed = collections.Counter()
    for r in rows:
        if r["key"].startswith(UNKEYED):
            unkeyed[r["test"]] += 1
            continue
        tests_of[(r["kernel"], r["key"])].add(r["test"])
    per_kernel = collections.Counter(k for k, _ in tests_of)
    per_file = collections.defaultdict(set)
    only = collections.Counter()
    only_base = collections.Counter()
    for v, tests in tests_of.items():
        for t in tests:
            per_file[t.split("::")[0]].add(v)
        if len(tests) == 1:
            t = next(iter(tests))
            only[t] += 1
            only_base[t.split("[")[0]] += 1
    return {
        "variants": len(tests_of),
        "kernels": dict(per_kernel.most_common()),
        "files": {f: len(v) for f, v in sorted(per_file.items(), key=lambda kv: -len(kv[1]))},
        "tests_alone": dict(only.most_common(60)),
        "test_functions_alone": dict(only_base.most_common(60)),
        "unkeyed": dict(unkeyed),
    }


def spec_of(kernel: str, key: str):
    """The ``_aot.AotSpec`` that compiles a recorded variant as the JIT would (an int equal to 1 a
    constant, ``D`` facts as 16-divisibility), or None where a value does not survive the record
    (a constexpr kept as its repr)."""
    import importlib

    from gpu_nn.kernels.triton._aot import AotSpec

    module, name = kernel.rsplit(".", 1)
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError:  # a kernel a test module defines
        return None
    signature, constexprs, div, opts = {}, {}, [], {}
    for arg, v in json.loads(key):
        if arg in ("num_warps", "num_stages"):
            opts[arg] = v
        elif isinstance(v, list):
            if v[0] == "constexpr":
                signature[arg], constexprs[arg] = "constexpr", v[1]
            else:
                signature[arg] = v[0]
                if v[1] == "D":
                    div.append(arg)
        else:
            if isinstance(v, str) and v.startswith(("<", "tl.", "triton")):
                return None
            signature[arg], constexprs[arg] = "constexpr", v
    for p in getattr(fn, "params", ()):  # constexprs left at their defaults
        if p.name not in signature and p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", p.default
    return AotSpec(fn, signature, constexprs, opts.get("num_warps", 4), opts.get("num_stages", 3),
                   label="census", divisible_by_16=tuple(div))


def compile_sample(rows: list, per_kernel: int, seed: int = 0) -> dict:
    """Compile up to ``per_kernel`` recorded variants of each kernel for sm_90 (no GPU needed, no
    TRITON_INTERPRET); per kernel its variant count, the sample's mean compile seconds and their
    product, the estimate of what compiling them all costs one core."""
    import random

    from gpu_nn.kernels.triton._aot import compile_spec

    keys = collections.defaultdict(set)
    for r in keyed(rows):
        keys[r["kernel"]].add(r["key"])
    rnd = random.Random(seed)
    out = {}
    for kernel, ks in sorted(keys.items(), key=lambda kv: -len(kv[1])):
        times, errors = [], 0
        for key in rnd.sample(sorted(ks), min(per_kernel, len(ks))):
            spec = spec_of(kernel, key)
            if spec is None:
                continue
            try:
                times.append(compile_spec(spec, sass=False)["compile_s"])
            except Exception:  # noqa: BLE001 - counted, the estimate uses what compiled
                errors += 1
        mean = sum(times) / len(times) if times else None
        out[kernel] = {"variants": len(ks), "sampled": len(times), "errors": errors,
                       "mean_compile_s": None if mean is None else round(mean, 3),
                       "estimate_s": None if mean is None else round(mean * len(ks), 1)}
        print(f"  {len(ks):5d} x {mean if mean is not None else float('nan'):6.2f} s = "
              f"{(mean or 0) * len(ks):7.1f} s  {kernel}", flush=True)
    return out


def schedule_model(order: list, variants: dict, cost, workers: int = 16, per_test_s: float = 0.1) -> dict:
    """What pytest-xdist's ``load`` scheduler (``xdist/scheduler/load.py``: a first run of
    ``len // workers // 4`` consecutive tests per worker, then runs of up to ``pending // workers //
    2`` to a worker whose queue falls below a quarter of that, held back while its last test took
    0.1 s or more and two are queued) makes of ``order`` (test ids) when each test costs
    ``per_test_s`` plus the compile of each variant (``variants[test]``, ``cost(variant)``
    seconds) that no worker has finished compiling before it is needed; a variant another worker
    is still compiling is compiled again, as Triton's on-disk cache does. A model: what a test runs
    besides compiling is one constant. Returns the makespan, the compiles and the duplicated ones,
    and the bound (every variant compiled once, spread evenly)."""
    import heapq

    n = workers
    pending = collections.deque(range(len(order)))
    queues = [collections.deque() for _ in range(n)]
    for q in queues:  # xdist's first deal
        for _ in range(max(len(order) // n // 4, 2)):
            if pending:
                q.append(pending.popleft())
    done_at, busy_until, seen = {}, {}, [set() for _ in range(n)]
    compiles = dups = 0
    finish = [0.0] * n
    # (time, worker, duration of the test it just finished: None at the start)
    heap = [(0.0, i, None) for i in range(n)]
    while heap:
        now, i, last = heapq.heappop(heap)
        q = queues[i]
        # xdist's check_schedule on the test's completion, with its duration
        if last is not None and pending and len(q) < max(2, len(pending) // n // 4) and not (last >= 0.1 and len(q) >= 2):
            for _ in range(max(2, len(pending) // n // 2) - len(q)):
                if pending:
                    q.append(pending.popleft())
        if not q:  # nothing pending either (an empty queue is always refilled): the worker stops
            continue
        took = per_test_s
        for v in variants.get(order[q.popleft()], ()):
            if v in seen[i]:
                continue
            seen[i].add(v)
            if done_at.get(v, float("inf")) <= now + took:
                continue
            if v in busy_until:
                dups += 1
            compiles += 1
            took += cost(v)
            busy_until[v] = now + took
            done_at[v] = min(done_at.get(v, float("inf")), now + took)
        finish[i] = now + took
        heapq.heappush(heap, (now + took, i, took))
    distinct = {v for t in order for v in variants.get(t, ())}
    bound = sum(cost(v) for v in distinct) / n + len(order) * per_test_s / n
    return {"makespan_s": round(max(finish), 2), "compiles": compiles, "duplicated": dups,
            "bound_s": round(bound, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpu_nn.benchmarks.variant_census",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("dir")
    p.add_argument("--json", default=None)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--exclude", default="test_aot_coverage.py",
                   help="comma-separated test-file names whose launches never run on a GPU (default: %(default)s)")
    p.add_argument("--compile-sample", type=int, default=0, metavar="N",
                   help="compile N variants per kernel for sm_90 and estimate the compile time of all")
    p.add_argument("--schedule", default=None, metavar="ORDER",
                   help="a file of test ids in run order (pytest --collect-only -q): model xdist's load "
                        "scheduler over it with the compile times of --means")
    p.add_argument("--means", default=None, metavar="JSON",
                   help="a --json report with compile samples: its per-kernel mean compile seconds")
    p.add_argument("--factor", type=float, default=1.8, help="compile seconds there per second here (default 1.8, the H200's)")
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--per-test-s", type=float, default=0.1, help="what a test costs besides compiling (default 0.1)")
    a = p.parse_args(argv)
    excluded = tuple(x for x in a.exclude.split(",") if x)
    rows = [r for r in load(a.dir) if not any(x in r["test"] for x in excluded)]
    s = summary(rows)
    print(f"{s['variants']} distinct variants of {len(s['kernels'])} kernels")
    for title, table in (("per kernel", s["kernels"]), ("per test file", s["files"]),
                         ("variants no other test asks for, per test function", s["test_functions_alone"])):
        print(f"\n{title}:")
        for name, n in list(table.items())[:a.top]:
            print(f"  {n:6d}  {name}")
    if a.compile_sample:
        print(f"\ncompiling up to {a.compile_sample} variants per kernel for sm_90:")
        s["compile"] = compile_sample(rows, a.compile_sample)
        total = sum(v["estimate_s"] or 0 for v in s["compile"].values())
        print(f"estimated compile time of every variant: {total:.0f} s of one core")
    if a.schedule:
        sample = s.get("compile") or {}
        if a.means:  # a --json report, or a recorded census (benchmarks/results/census: its "after")
            with open(a.means) as f:
                m = json.load(f)
            sample = m.get("compile") or m.get("after", {}).get("compile_sample", {})
        means = {k.rsplit(".", 1)[-1]: v["mean_compile_s"] for k, v in sample.items() if v.get("mean_compile_s")}
        if not means:
            p.error("--schedule needs compile times: --compile-sample N, or --means a report that has them")
        fallback = sorted(means.values())[len(means) // 2]  # kernels the sample lacks: the median
        with open(a.schedule) as f:
            order = [line.strip() for line in f if "::" in line]
        variants = collections.defaultdict(list)
        for r in keyed(rows):
            variants[r["test"]].append((r["kernel"], r["key"]))
        s["schedule"] = dict(schedule_model(order, variants, lambda v: a.factor * means.get(v[0].rsplit(".", 1)[-1], fallback),
                                            a.workers, a.per_test_s),
                             order=a.schedule, tests=len(order), workers=a.workers, factor=a.factor, per_test_s=a.per_test_s)
        print(f"\nxdist load scheduler model: {s['schedule']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(s, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
