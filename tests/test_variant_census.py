"""gpu_nn.benchmarks.variant_census: the compiled variants a test run would ask a GPU for,
recorded under the Triton interpreter (CPU machines only: a GPU compiles, and its cache says it)."""

import collections
import json

import pytest
import torch

import gpu_nn
from gpu_nn.benchmarks import variant_census as vc
from gpu_nn.kernels import triton as ktriton

# the census and its key records launches through the Triton interpreter (CPU only); the schedule
# model's tests are plain Python and run everywhere
interpreted = pytest.mark.skipif(not ktriton.INTERPRET, reason="records launches through the Triton interpreter (CPU only)")


def _installed(tmp_path, monkeypatch, run=None):
    """The census installed for one test, over the interpreter's run or over ``run`` in its place
    (the interpreter's run put back afterwards)."""
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(InterpretedFunction, "run", run or InterpretedFunction.run)
    out = vc.install(str(tmp_path / "census"))
    yield tmp_path / "census"
    out.close()


@pytest.fixture
def census(tmp_path, monkeypatch):
    """The census installed for this test alone."""
    yield from _installed(tmp_path, monkeypatch)


@pytest.fixture
def dry_census(tmp_path, monkeypatch):
    """The census over launches that compute nothing (the interpreter's run made a no-op before
    the census wraps it): for tests that count variants and read no kernel's results."""
    yield from _installed(tmp_path, monkeypatch, lambda self, *args, grid, warmup, **kwargs: None)


@interpreted
def test_launches_are_recorded_as_the_jit_specialises_them(census):
    """relu forward on 32, 7 and 1 elements: three variants of the forward kernel, the element
    count specialised as Triton's binder does (a multiple of 16: ``D``; neither: plain ``i32``;
    one: a constant), the pointers' 16-byte alignment and dtype, the constexprs and launch options
    by value; the values the kernel computes are untouched; a launch repeated by the same test
    is recorded once."""
    with gpu_nn.backend("triton"):
        for n in (32, 7, 1, 7):
            x = torch.randn(n)
            torch.testing.assert_close(gpu_nn.functional.relu(x), torch.relu(x), rtol=0, atol=0)
    rows = vc.load(str(census))
    fwd = [json.loads(r["key"]) for r in rows if r["kernel"] == "gpu_nn.kernels.triton.activation._act_fwd_kernel"]
    assert len(fwd) == 3, fwd
    ns = sorted(json.dumps(dict(k)["n"]) for k in fwd)
    assert ns == sorted(['["i32", "D"]', '["i32", ""]', '["constexpr", 1]']), ns
    for k in map(dict, fwd):
        assert k["x_ptr"] == ["*fp32", "D"] and k["y_ptr"] == ["*fp32", "D"]
        assert isinstance(k["BLOCK"], int) and "num_warps" in k
    assert {r["test"] for r in rows} == {
        "tests/test_variant_census.py::test_launches_are_recorded_as_the_jit_specialises_them"}


@interpreted
def test_misaligned_view_and_summary(census):
    """A view one element in is not 16-byte aligned (``""``), a new variant; the summary counts
    variants per kernel and what each test alone asks for; each recorded variant becomes the
    AOT spec that compiles it (a constant where the JIT made one, 16-divisibility where it
    found it)."""
    base = torch.randn(33)
    with gpu_nn.backend("triton"):
        gpu_nn.functional.relu(base[:32])
        gpu_nn.functional.relu(base[1:])
    rows = vc.load(str(census))
    fwd = [dict(json.loads(r["key"])) for r in rows if r["kernel"].endswith("activation._act_fwd_kernel")]
    assert sorted(k["x_ptr"][1] for k in fwd) == ["", "D"]
    s = vc.summary(rows + [dict(rows[0], test="tests/other.py::test_x"),
                           dict(rows[0], key="unkeyed: RuntimeError: no storage")])
    assert s["unkeyed"] == {rows[0]["test"]: 1}
    assert s["variants"] == len({(r["kernel"], r["key"]) for r in rows})
    assert s["kernels"]["gpu_nn.kernels.triton.activation._act_fwd_kernel"] == 2
    me = "tests/test_variant_census.py::test_misaligned_view_and_summary"
    assert s["tests_alone"][me] == s["variants"] - 1  # rows[0] is shared with the other test
    for r in rows:
        if not r["kernel"].endswith("activation._act_fwd_kernel"):
            continue
        spec = vc.spec_of(r["kernel"], r["key"])
        key = dict(json.loads(r["key"]))
        assert spec.signature["n"] == "i32" and spec.constexprs["BLOCK"] == key["BLOCK"]
        assert ("x_ptr" in spec.divisible_by_16) == (key["x_ptr"][1] == "D")
        assert ("n" in spec.divisible_by_16) == (key["n"][1] == "D")


@interpreted
def test_do_not_specialize_flags_are_the_kernels():
    """A kernel's ``do_not_specialize`` int keeps its type alone (no ``D``, no constant at 1) and a
    ``do_not_specialize_on_alignment`` pointer no alignment fact, as the JIT's binder keys them;
    the other arguments as before."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["t"], do_not_specialize_on_alignment=["y_ptr"])
    def kernel(x_ptr, y_ptr, n, t, BLOCK: tl.constexpr):
        pass

    x = torch.zeros(32)
    for n, t in ((32, 1), (1, 32)):
        _, key = vc.variant_key(kernel, (x, x, n, t), {"BLOCK": 16, "num_warps": 1})
        k = dict(json.loads(key))
        assert k["t"][0] == "i32" and not k["t"][1], k
        assert k["y_ptr"][0] == "*fp32" and not k["y_ptr"][1] and k["x_ptr"] == ["*fp32", "D"], k
        assert k["n"] == (["i32", "D"] if n == 32 else ["constexpr", 1]), k
        assert k["BLOCK"] == 16 and k["num_warps"] == 1


def test_schedule_model_follows_xdist_load_scheduling():
    """Two workers, four tests, tests a and b sharing one variant (2 s to compile): in the order
    a, b, c, d xdist's first runs give a and b to one worker, which compiles it once; in the order
    a, c, b, d each worker gets one of them and both compile it at once (Triton's cache does not
    wait for a compile in flight): one duplicated, and the worker that compiles y after it
    finishes later."""
    variants = {"a": [("k", "x")], "b": [("k", "x")], "c": [("k", "y")], "d": []}
    cost = {"x": 2.0, "y": 0.5}
    together = vc.schedule_model(["a", "b", "c", "d"], variants, lambda v: cost[v[1]], workers=2, per_test_s=0.1)
    assert together == {"makespan_s": 2.2, "compiles": 2, "duplicated": 0, "bound_s": 1.45}
    apart = vc.schedule_model(["a", "c", "b", "d"], variants, lambda v: cost[v[1]], workers=2, per_test_s=0.1)
    assert apart == {"makespan_s": 2.7, "compiles": 3, "duplicated": 1, "bound_s": 1.45}


def test_schedule_model_refills_workers_as_xdist_does():
    """Two workers, twelve tests: the first deal gives each two; a heavy first test (10 s) keeps
    its worker busy while the other takes the eight pending ones as it finishes each (xdist tops a
    worker's queue up on completion), compiling their eight variants: nine compiles, and the
    makespan the heavy worker's two tests."""
    order = [f"t{i}" for i in range(12)]
    variants = {"t0": [("k", "x")], **{f"t{i}": [("k", f"v{i}")] for i in range(4, 12)}}
    cost = lambda v: 10.0 if v[1] == "x" else 0.5  # noqa: E731
    got = vc.schedule_model(order, variants, cost, workers=2, per_test_s=0.1)
    assert got == {"makespan_s": 10.2, "compiles": 9, "duplicated": 0, "bound_s": 7.6}


def _lstm_variants(census, monkeypatch, twins: bool) -> collections.Counter:
    """Distinct variants per recurrent kernel of an LSTM at odd sizes (B=5, H=7, float32: state
    rows of 140 bytes, their alignment changing from step to step), one and two directions, with
    and without a projection, forward and backward, on the triton backend; ``twins`` False puts
    each kernel in place of its twin for rows at any alignment (the launches as before them)."""
    from gpu_nn.kernels.triton import rnn as kt

    if not twins:
        monkeypatch.setattr(kt, "LOOSE_ROWS", {k: k for k in kt.LOOSE_ROWS})
    torch.manual_seed(0)
    for proj in (0, 3):
        for bi in (False, True):
            m = gpu_nn.nn.LSTM(4, 7, num_layers=2, bidirectional=bi, proj_size=proj)
            x = torch.randn(6, 5, 4, requires_grad=True)
            # a learned initial state: its gradient's final dh0 step runs (none without one)
            D = 2 if bi else 1
            h0 = torch.randn(2 * D, 5, proj or 7, requires_grad=True)
            c0 = torch.randn(2 * D, 5, 7, requires_grad=True)
            with gpu_nn.backend("triton"):
                y, _ = m(x, (h0, c0))
                y.sum().backward()
    rows = vc.load(str(census))
    return collections.Counter(k.rsplit(".", 1)[-1] for k, _ in {(r["kernel"], r["key"]) for r in rows})


STEP_KERNELS = ("_rnn_step_fwd_kernel", "_rnn_step2_fwd_kernel", "_rnn_step_bwd_kernel", "_rnn_step2_bwd_kernel",
                "_rnn_proj_fwd_kernel", "_rnn_proj_bwd_kernel")


@interpreted
@pytest.mark.parametrize("twins", [True, False])
def test_odd_sized_time_loops_compile_one_variant_per_role(dry_census, monkeypatch, twins):
    """The twins for rows at any alignment (kernels/triton/rnn.py LOOSE_ROWS) keep an odd-sized
    recurrent layer to one compiled variant per role of a kernel: the two-direction forward loop
    one, its backward three (first step, the others, the final dh0 step), the six step and
    projection kernels 16 in all. Without them the same layers ask for 66 (each step's pattern
    of aligned rows its own variant): the count the test pins both ways, so that it fails if the
    twins stop being used."""
    got = _lstm_variants(dry_census, monkeypatch, twins)  # (dry: the launches depend on shapes and addresses only)
    steps = {k: got[k] for k in STEP_KERNELS}
    if twins:
        assert steps["_rnn_step2_fwd_kernel"] == 1 and steps["_rnn_step2_bwd_kernel"] == 3, steps
        assert sum(steps.values()) == 16, steps
    else:
        assert sum(steps.values()) == 66, steps
