"""Optimizers and clipping: 25-step trajectories against torch.optim (float64 to 1e-10, float32
to float32 rounding) on the reference and on every kernel backend, state_dict interchange with
torch in both directions mid-run, schedulers, clipping, validation messages, skipped params,
sparse gradients, the CUDA C per-element math on the host."""

import copy
import importlib.util
import ctypes
import math
import warnings

import numpy as np
import pytest
import torch

import gpu_nn
import gpu_nn.optim as go
from gpu_nn import KernelInputError
from gpu_nn.nn.utils import clip_grad_norm_
from gpu_nn.reference import optim as ref
from helpers import CUDA, backend_params, build_host_library, fptr

CONFIGS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("SGD", dict(lr=0.01, momentum=0.8, dampening=0.3, maximize=True)),
    ("Adagrad", dict(lr=0.1)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1, eps=1e-6)),
    ("Adadelta", dict()),
    ("Adadelta", dict(lr=0.5, rho=0.8, eps=1e-5, weight_decay=0.1, maximize=True)),
    ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, alpha=0.9, momentum=0.9, centered=True, weight_decay=0.1)),
    ("RMSprop", dict(lr=0.001, centered=True, maximize=True)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), amsgrad=True, weight_decay=0.1)),
    ("Adam", dict(lr=0.001, maximize=True, eps=1e-6)),
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.01, amsgrad=True, weight_decay=0.3)),
]
IDS = [f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)]


class _Scaled(torch.nn.Module):
    """``net(x) * scale``: a 0-d parameter (a learnable temperature, say) beside the layers'."""

    def __init__(self, net):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.25))
        self.net = net

    def forward(self, x):
        return self.net(x) * self.scale


def _model(dtype, device="cpu", seed=0):
    torch.manual_seed(seed)
    # odd sizes; a bias-free layer and a frozen tensor exercise "params without grads"; one parameter is 0-d
    m = _Scaled(torch.nn.Sequential(torch.nn.Linear(37, 29), torch.nn.Tanh(), torch.nn.Linear(29, 5, bias=False),
                                    torch.nn.Tanh(), torch.nn.Linear(5, 3)))
    return m.to(device=device, dtype=dtype)


def _batch(dtype, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return torch.randn(11, 37, dtype=dtype, generator=g).to(device), torch.randn(11, 3, dtype=dtype, generator=g).to(device)


def _train(models_opts, x, y, steps, backend="reference", sched=None):
    """Run ``steps`` steps of every (model, optimizer); yield after each step."""
    for _ in range(steps):
        for i, (m, o) in enumerate(models_opts):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            if i == 0:
                with gpu_nn.backend(backend):
                    o.step()
            else:
                o.step()
        if sched:
            for s in sched:
                s.step()
        yield


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max() / max(float(b.detach().abs().max()), 1e-30))


def _half_ulp(v, dtype):
    """The spacing of ``dtype`` (float16 / bfloat16) at each value of the float32 ``v``:
    2^(exponent - mantissa bits), the subnormal spacing below the normal range."""
    fi, bits = torch.finfo(dtype), {torch.float16: 10, torch.bfloat16: 7}[dtype]
    return torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(fi.tiny))) - bits)


def _max_err(m1, m2):
    return max(_rel(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def _f32_tol(steps=25):
    # float32 rounding: both sides round every op; differences grow at most linearly with the steps
    return 64 * 1.2e-7 * steps


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_trajectory_matches_torch(name, kw, dtype):
    m1 = _model(dtype)
    m2 = copy.deepcopy(m1)
    x, y = _batch(dtype)
    o1, o2 = getattr(go, name)(m1.parameters(), **kw), getattr(torch.optim, name)(m2.parameters(), **kw)
    worst = 0.0
    for _ in _train([(m1, o1), (m2, o2)], x, y, 25):
        worst = max(worst, _max_err(m1, m2))
    bound = 1e-10 if dtype == torch.float64 else _f32_tol()
    assert worst <= bound, f"{name} {kw} {dtype}: {worst:.3e} > {bound:.1e}"
    # the state has torch's keys and values
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        s1, s2 = o1.state[p1], o2.state[p2]
        assert set(s1) == set(s2)
        for k in s2:
            assert _rel(s1[k], s2[k]) <= bound * 10 + 1e-300


@pytest.mark.parametrize("name,kw", CONFIGS[1::2], ids=IDS[1::2])
@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_state_dict_swap_mid_run(name, kw, direction):
    dtype = torch.float64
    x, y = _batch(dtype)
    ma = _model(dtype)
    mb = copy.deepcopy(ma)
    first = go if direction == "ours_to_torch" else torch.optim
    second = torch.optim if direction == "ours_to_torch" else go
    oa = getattr(first, name)(ma.parameters(), **kw)
    ob = getattr(torch.optim, name)(mb.parameters(), **kw)  # uninterrupted torch run
    for _ in _train([(ma, oa), (mb, ob)], x, y, 10):
        pass
    mc = copy.deepcopy(ma)
    oc = getattr(second, name)(mc.parameters(), **kw)
    oc.load_state_dict(copy.deepcopy(oa.state_dict()))
    assert set(oc.state_dict()["param_groups"][0]) >= set(ob.state_dict()["param_groups"][0]) - {"params"}
    for _ in _train([(mc, oc), (mb, ob)], x, y, 15):
        pass
    assert _max_err(mc, mb) <= 1e-10


@pytest.mark.parametrize("default", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,fused", [(n, False) for n in ("Adam", "AdamW", "Adagrad", "RMSprop", "Adadelta")]
                         + [(n, True) for n in ("Adam", "AdamW", "Adagrad")])  # (torch's fused ones)
def test_step_count_dtype_and_device_as_torchs(name, fused, default):
    """A new state's step count has torch's dtype and device: the default dtype's on the CPU, but
    float32 in a fused group whatever the default (torch's _get_scalar_dtype(is_fused=True));
    ours was float64 under set_default_dtype(float64) with fused=True (an audit)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        steps = []
        for mod in (go, torch.optim):
            p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
            opt = getattr(mod, name)([p], **({"fused": True} if fused else {}))
            p.grad = torch.full_like(p, 0.5)
            opt.step()
            steps.append(opt.state[p]["step"])
    finally:
        torch.set_default_dtype(before)
    ours, theirs = steps
    assert (ours.dtype, ours.device, ours.shape, float(ours)) == (theirs.dtype, theirs.device, theirs.shape, 1.0)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_half_parameters_resume_from_a_checkpoint_bit_for_bit(backend, device, dtype, name, kw):
    """Our float16 / bfloat16 parameters keep float32 state; a run saved and loaded into a new
    optimizer (state_dict through a deep copy, as torch.save / load) goes on exactly as the run
    that was not interrupted. torch's load casts the state to the parameter's dtype: our float32
    moments were rounded (Adam's small second moments to 0) and the resumed float16 run moved
    1.4x as far as the other."""
    def run(resume):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter((torch.randn(7, 5) * 0.1).to(device, dtype)), torch.nn.Parameter(torch.zeros(3, device=device, dtype=dtype))]
        opt = getattr(go, name)(ps, **kw)
        g = torch.Generator().manual_seed(1)
        for i in range(6):
            if resume and i == 3:
                sd = copy.deepcopy(opt.state_dict())
                assert all(v.dtype == torch.float32 for s in sd["state"].values() for k, v in s.items() if k != "step")
                opt = getattr(go, name)(ps, **kw)
                opt.load_state_dict(sd)
            for p in ps:
                p.grad = (torch.randn(p.shape, generator=g) * 2e-3).to(device, dtype)
            with gpu_nn.backend(backend):
                opt.step()
        return [p.detach().clone() for p in ps], opt
    (once, _), (resumed, opt) = run(False), run(True)
    for a, b in zip(once, resumed):
        assert torch.equal(a, b), f"{name} {dtype}: resumed {b} != uninterrupted {a}"
    assert all(v.dtype == torch.float32 for s in opt.state.values() for k, v in s.items() if k != "step")


_TENSOR_HP = [("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.1)), ("AdamW", dict(lr=0.01, weight_decay=0.1, eps=1e-3)),
              ("Adam", dict(lr=0.01, eps=1e-3)), ("RMSprop", dict(lr=0.01, alpha=0.9, momentum=0.5, eps=1e-3)),
              ("Adadelta", dict(rho=0.5, eps=1e-3, weight_decay=0.1)), ("Adagrad", dict(lr=0.1, lr_decay=0.1, eps=1e-3))]


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("name,kw", _TENSOR_HP, ids=[n for n, _ in _TENSOR_HP])
def test_tensor_hyperparameters_step_as_torchs(backend, device, name, kw):
    """0-d tensors for the hyperparameters other than lr (momentum, weight_decay, eps, alpha, rho,
    lr_decay), which torch's steps take: the reference's NumPy refused them (a TypeError after
    the step count had moved). Against torch in float64 on the reference (the kernels' float32
    on the Triton backend): torch computes some of its step scalars in the tensors' float32
    (Adagrad's decayed lr), hence float32's bound."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    # (torch's twin on the CPU: its multi-tensor CUDA steps may not take CPU tensor scalars)
    ps = [torch.nn.Parameter(torch.linspace(-1, 1, 7, dtype=dtype, device=dev)) for dev in (device, "cpu")]
    hp = {k: (v if k == "lr" else torch.tensor(v)) for k, v in kw.items()}
    opts = [getattr(go, name)([ps[0]], **hp), getattr(torch.optim, name)([ps[1]], **hp)]
    for i in range(4):
        for p, o in zip(ps, opts):
            p.grad = torch.cos(torch.arange(7.0, dtype=dtype) + i).to(p.device)
            with gpu_nn.backend(backend):
                o.step()
    torch.testing.assert_close(ps[0].cpu(), ps[1], rtol=1e-6 if dtype == torch.float64 else 1e-5, atol=1e-7)


def test_state_of_another_shape_refused_with_torchs_error():
    """A state_dict loaded onto parameters of other shapes (another model; the same parameters in
    another order): the step raises torch's error where it was reshaped onto the parameters (the
    same number of elements: trained on scrambled moments, no error). SGD's momentum buffer in
    a gradient's shape that broadcasts to the parameter (torch's SGD keeps it so) loads and steps
    as torch's."""
    for a_shape, b_shape, msg in (((2, 6), (3, 4), r"size of tensor a \(6\) must match the size of tensor b \(4\) "
                                   r"at non-singleton dimension 1"),
                                  ((1, 6), (2, 6), r"output with shape \[1, 6\] doesn't match the broadcast shape \[2, 6\]")):
        for mod in (torch.optim, go):
            src_p = torch.nn.Parameter(torch.ones(a_shape))
            src = mod.Adam([src_p], lr=0.1)
            src_p.grad = torch.ones(a_shape)
            src.step()
            dst_p = torch.nn.Parameter(torch.ones(b_shape))
            dst = mod.Adam([dst_p], lr=0.1)
            dst.load_state_dict(src.state_dict())
            dst_p.grad = torch.ones(b_shape)
            with pytest.raises(RuntimeError, match=msg):
                dst.step()
    ps = [torch.nn.Parameter(torch.arange(12.0).reshape(2, 6)) for _ in range(2)]
    opts = [torch.optim.SGD([ps[0]], lr=0.1, momentum=0.9), go.SGD([ps[1]], lr=0.1, momentum=0.9)]
    opts[0].state[ps[0]]["momentum_buffer"] = torch.linspace(-1, 1, 6).reshape(1, 6)
    opts[1].load_state_dict(copy.deepcopy(opts[0].state_dict()))
    for _ in range(3):
        for p, o in zip(ps, opts):
            p.grad = torch.zeros(2, 6)
            p.grad.data = torch.linspace(0, 1, 6).reshape(1, 6)  # (set through .data: autograd's check skipped)
            o.step()
    torch.testing.assert_close(ps[1], ps[0])
    assert opts[1].state[ps[1]]["momentum_buffer"].shape == (2, 6)


def test_scheduler_and_closure():
    dtype = torch.float64
    x, y = _batch(dtype)
    m1 = _model(dtype)
    m2 = copy.deepcopy(m1)
    o1, o2 = go.Adam(m1.parameters(), lr=0.05), torch.optim.Adam(m2.parameters(), lr=0.05)
    s = [torch.optim.lr_scheduler.StepLR(o1, 5, 0.5), torch.optim.lr_scheduler.StepLR(o2, 5, 0.5)]
    for _ in _train([(m1, o1), (m2, o2)], x, y, 25, sched=s):
        pass
    assert o1.param_groups[0]["lr"] == o2.param_groups[0]["lr"] < 0.05
    assert _max_err(m1, m2) <= 1e-10

    def closure():
        o1.zero_grad()
        loss = ((m1(x) - y) ** 2).mean()
        loss.backward()
        return loss

    assert isinstance(o1.step(closure), torch.Tensor)


def test_params_without_grads_are_skipped():
    a = torch.randn(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for cls in (go.SGD, go.Adam, go.RMSprop, go.Adadelta):
        kw = dict(lr=0.1, momentum=0.9) if cls is go.SGD else dict(lr=0.1)
        o = cls([a, b], **kw)
        b0 = b.detach().clone()
        a.grad = torch.randn_like(a)
        b.grad = None
        o.step()
        assert torch.equal(b, b0)
        assert len(o.state[b]) == 0
    o = go.Adam([a, b])
    o.step()  # nothing has grads: no-op


def test_sparse_gradients_raise():
    emb = torch.nn.Embedding(10, 3, sparse=True).double()
    emb(torch.tensor([1, 2])).sum().backward()
    for cls in (go.SGD, go.Adagrad, go.Adam, go.RMSprop, go.Adadelta):
        with pytest.raises(gpu_nn.KernelInputError, match="sparse"):  # (a RuntimeError, as torch's)
            cls(emb.parameters(), lr=0.1).step()


NAMES = ("SGD", "Adam", "AdamW", "Adagrad", "Adadelta", "RMSprop")


def _kw(name):
    return dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.1)


@pytest.mark.parametrize("name", NAMES)
def test_meta_parameters_step_as_torchs(name):
    """A meta parameter (no data: deferred initialisation) beside a CPU one: the step updates the
    CPU one as torch's does and computes nothing for the meta one (it raised after updating the
    CPU parameter, "Tensor.item() cannot be called on meta tensors")."""
    got = []
    for lib in (torch.optim, go):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
        m = torch.nn.Parameter(torch.empty(4, device="meta"))
        p.grad, m.grad = torch.randn(3, dtype=torch.float64), torch.empty(4, device="meta")
        o = getattr(lib, name)([p, m], **_kw(name))
        o.step()
        o.step()
        assert set(o.state[m]) == set(o.state[p]) and all(
            t.is_meta for k, t in o.state[m].items() if torch.is_tensor(t) and k != "step")
        step = o.state[m].get("step")
        got.append((p.detach().clone(), None if step is None else (float(step), step.device.type)))
    torch.testing.assert_close(got[1][0], got[0][0], rtol=1e-14, atol=0)
    assert got[1][1] == got[0][1]  # the meta parameter's step count: 2.0 on the CPU, as torch's


_LATE_BAD = [(n, "weight_decay", "x") for n in NAMES] + [
    ("RMSprop", "eps", None), ("Adam", "eps", [1e-8]), ("Adagrad", "lr_decay", "0"), ("Adadelta", "rho", None),
    ("RMSprop", "alpha", "0.9"), ("Adam", "betas", (0.9,))]


@pytest.mark.parametrize("name,key,value", _LATE_BAD, ids=[f"{n}-{k}-{v!r}" for n, k, v in _LATE_BAD])
def test_hyperparameter_spoilt_after_construction_refused_before_any_state(name, key, value):
    """A group's hyperparameter set to a non-number after construction: torch's step raises a
    TypeError (a wrong-length betas a ValueError) before it makes state; ours too, and touches no
    parameter (a string weight decay reached NumPy's UFuncTypeError after Adam's state was made,
    a string for SGD float()'s ValueError)."""
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    before = p.detach().clone()
    o = getattr(go, name)([p], **_kw(name))
    state0 = {k: v.clone() if torch.is_tensor(v) else v for k, v in o.state[p].items()}  # (Adagrad's, made at init)
    o.param_groups[0][key] = value
    t = getattr(torch.optim, name)([torch.nn.Parameter(torch.randn(3))], **_kw(name))
    t.param_groups[0]["params"][0].grad = torch.randn(3)
    t.param_groups[0][key] = value
    with pytest.raises((TypeError, ValueError)) as theirs:
        t.step()
    with pytest.raises(gpu_nn.KernelInputError if key != "betas" else ValueError) as ours:
        o.step()
    assert isinstance(ours.value, type(theirs.value))
    assert torch.equal(p.detach(), before)
    assert set(o.state[p]) == set(state0)


BAD = [
    ("SGD", dict(lr=-1.0)), ("SGD", dict(lr=0.1, momentum=-0.5)), ("SGD", dict(lr=0.1, weight_decay=-1.0)),
    ("SGD", dict(lr=0.1, nesterov=True)), ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)),
    ("Adagrad", dict(lr=-0.1)), ("Adagrad", dict(lr_decay=-1.0)), ("Adagrad", dict(initial_accumulator_value=-1.0)),
    ("Adagrad", dict(eps=-1.0)), ("Adadelta", dict(rho=1.5)), ("Adadelta", dict(eps=-1.0)),
    ("RMSprop", dict(alpha=-0.1)), ("RMSprop", dict(momentum=-0.1)), ("RMSprop", dict(eps=-1e-3)),
    ("Adam", dict(lr=-1.0)), ("Adam", dict(betas=(1.0, 0.999))), ("Adam", dict(betas=(0.9, -0.1))),
    ("Adam", dict(eps=-1.0)), ("Adam", dict(weight_decay=-1.0)), ("AdamW", dict(betas=(0.9, 1.0))),
    ("Adam", dict(betas=(0, 0.9))), ("AdamW", dict(betas=(0.9, torch.tensor(0.99)))),  # floats or Tensors, both
    # tensors that torch's foreach path (capturable off) would read on the host: refused as torch does
    ("Adam", dict(lr=torch.tensor(0.01), foreach=True)),
    ("AdamW", dict(betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=True)),
]


@pytest.mark.parametrize("name,kw", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_hyperparameters_raise_like_torch(name, kw):
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError) as theirs:
        getattr(torch.optim, name)(p, **kw)
    with pytest.raises(ValueError) as ours:
        getattr(go, name)(p, **kw)
    assert str(ours.value) == str(theirs.value)


def test_flags_accepted_and_differentiable_refused():
    p = [torch.nn.Parameter(torch.randn(3))]
    go.Adam(p, foreach=True)
    go.Adam(p, fused=True)
    go.AdamW(p, capturable=True)
    go.SGD(p, foreach=False)
    with pytest.raises(ValueError, match="differentiable"):
        go.Adam(p, differentiable=True)
    with pytest.raises(RuntimeError, match="cannot be `True` together"):
        go.Adam(p, fused=True, foreach=True)
    assert go.AdamW(p).defaults["weight_decay"] == 1e-2
    assert isinstance(go.SGD(p), torch.optim.Optimizer)


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "Adam", "AdamW"])
@pytest.mark.parametrize("flags", [dict(fused=True, differentiable=True),
                                   dict(fused=True, differentiable=True, foreach=True),
                                   dict(fused=True, foreach=True)], ids=["diff", "diff-foreach", "foreach"])
@pytest.mark.parametrize("params", ["one", "empty"])
def test_fused_flag_refusals_are_torchs(name, flags, params):
    """The fused optimizers' flag refusals as torch's constructors raise them: its parameter
    checks first (an empty list), then fused with differentiable, then fused with foreach."""
    p = [torch.nn.Parameter(torch.randn(3))] if params == "one" else []
    with pytest.raises(Exception) as theirs:
        getattr(torch.optim, name)(p, **flags)
    with pytest.raises(Exception) as ours:
        getattr(go, name)(p, **flags)
    assert (type(ours.value), str(ours.value)) == (type(theirs.value), str(theirs.value))


# (parameter, gradient set through .data) pairs: integer and bool parameters, gradients torch
# cannot broadcast, gradients it broadcasts or promotes, other dtypes that its lerp refuses
BAD_GRADS = {
    "int64": (lambda: torch.ones(3, 4, dtype=torch.int64), lambda p: torch.ones_like(p)),
    "int32": (lambda: torch.ones(3, 4, dtype=torch.int32), lambda p: torch.ones_like(p)),
    "uint8": (lambda: torch.ones(3, 4, dtype=torch.uint8), lambda p: torch.ones_like(p)),
    "bool": (lambda: torch.ones(3, 4, dtype=torch.bool), lambda p: torch.ones_like(p)),
    "grad(5,)": (lambda: torch.randn(3, 4), lambda p: torch.randn(5)),
    "grad(4,3)": (lambda: torch.randn(3, 4), lambda p: torch.randn(4, 3)),
    "grad(2,3,4)": (lambda: torch.randn(3, 4), lambda p: torch.randn(2, 3, 4)),
    "grad(3,1)": (lambda: torch.randn(3, 4), lambda p: torch.randn(3, 1)),
    "grad(4,)": (lambda: torch.randn(3, 4), lambda p: torch.randn(4)),
    "grad()": (lambda: torch.randn(3, 4), lambda p: torch.randn(())),
    "grad-f64": (lambda: torch.randn(3, 4), lambda p: torch.randn(3, 4, dtype=torch.float64)),
    "grad-f16": (lambda: torch.randn(3, 4), lambda p: torch.randn(3, 4).half()),
    "grad-int64": (lambda: torch.randn(3, 4), lambda p: torch.randint(-3, 4, (3, 4))),
}


def _step_twice(mod, name, kw, case, backend=None, device="cpu"):
    make_p, make_g = BAD_GRADS[case]
    torch.manual_seed(3)
    p = make_p().to(device)  # drawn on the CPU: the same values on every device
    o = getattr(mod, name)([p], **kw)
    for _ in range(2):
        p.grad = torch.zeros_like(p)
        p.grad.data = make_g(p).to(device)  # .data bypasses the assignment's shape/dtype check, as in issue 19
        if backend is None:
            o.step()
        else:
            with gpu_nn.backend(backend):
                o.step()
    return p


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_bad_params_and_grads_like_torch(backend, device, name, kw):
    """Issue 19 item 3: integer parameters were zeroed, and gradients of another shape or dtype
    applied silently (or failed inside NumPy). torch's step raises for these with its type and
    message, or broadcasts / promotes the gradient: ours does the same, on every backend, on its
    device. torch's step runs on the CPU: ours reproduces the errors of torch's single-tensor
    implementation on CPU tensors (they name its CPU kernels, "lerp_kernel_scalar"...), and on
    CUDA tensors torch defaults to its foreach implementation instead."""
    for case in BAD_GRADS:
        if name == "SGD" and kw.get("momentum") and not kw.get("weight_decay") and case in ("grad-f16", "grad-int64"):
            # documented difference: without weight decay torch's SGD clones the gradient into
            # its momentum buffer, so the buffer has the gradient's dtype (float16 rounding each
            # step; int64 raises on the second step); ours keeps it in the parameter's dtype
            continue
        try:
            want = _step_twice(torch.optim, name, kw, case)
            theirs = None
        except Exception as e:  # noqa: BLE001 - torch's exception is the expectation
            theirs = e
        if theirs is None:
            got = _step_twice(go, name, kw, case, backend, device)
            torch.testing.assert_close(got.cpu(), want, rtol=_f32_tol(2), atol=1e-6, msg=f"{case}")
            continue
        with pytest.raises(gpu_nn.KernelInputError) as ours:
            _step_twice(go, name, kw, case, backend, device)
        assert isinstance(ours.value, type(theirs)), f"{case}: {type(ours.value)} is not a {type(theirs)}"
        assert str(theirs).splitlines()[0] in str(ours.value), f"{case}: {ours.value!r} vs torch {theirs!r}"


# -- clipping -----------------------------------------------------------------------------

def _grads(rng, dtype, device="cpu", scale=1.0):
    shapes = [(7, 13), (13,), (5,), (3, 17), (1,)]
    ps = [torch.nn.Parameter(torch.zeros(s, dtype=dtype, device=device)) for s in shapes]
    for p in ps:
        p.grad = torch.from_numpy(rng.standard_normal(p.shape) * scale).to(dtype=dtype, device=device)
    ps.append(torch.nn.Parameter(torch.zeros(4, dtype=dtype, device=device)))  # no grad
    return ps


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton", "cupy")))
@pytest.mark.parametrize("name", NAMES)
def test_step_moves_the_version_counters_as_torchs_in_place_step(backend, device, name):
    """A step changes the parameters in place, as torch's does with in-place ops: their version
    counters move, so a second backward through a graph that saved them before the step fails as
    torch's does ("modified by an inplace operation"). Ours wrote past autograd (the kernels, the
    reference's NumPy views): the counter stayed, and that backward quietly mixed old and new
    weights; the kept plan's step (a second step over the same tensors) too. float16 as well."""
    from gpu_nn.optim._dispatch import BACKENDS as OPTIM_BACKENDS

    if backend not in OPTIM_BACKENDS[getattr(go, name)._KIND]:
        pytest.skip(f"{name} has no {backend} kernels")
    for dtype in (torch.float32, torch.float16):
        w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0], dtype=dtype, device=device))
        opt = getattr(go, name)([w], lr=0.1)
        for step in range(2):
            loss = (w * w).sum()
            loss.backward(retain_graph=True)
            before = w._version
            with gpu_nn.backend(backend):
                opt.step()
            assert w._version > before, (name, dtype, step)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()
            w.grad = None


_FUSED = [("Adam", {}), ("AdamW", {"weight_decay": 0.1}), ("Adam", {"amsgrad": True, "maximize": True}),
          ("SGD", {"momentum": 0.9}), ("SGD", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
          ("Adagrad", {"lr_decay": 0.01})]


class _NoHostRead(torch.Tensor):
    """A found_inf the step may hand to kernels but never read on the host (a CUDA one would
    be a synchronisation per step)."""

    def __float__(self):
        raise AssertionError("found_inf read on the host")

    def item(self):
        raise AssertionError("found_inf read on the host")

    def __bool__(self):
        raise AssertionError("found_inf read on the host")


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton", "cupy")))
@pytest.mark.parametrize("name,kw", _FUSED, ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_fused_steps_take_gradscalers_scale_and_found_inf_as_torchs(backend, device, name, kw):
    """fused=True: _step_supports_amp_scaling, and the step reads GradScaler's grad_scale and
    found_inf attributes as torch's fused steps do: found_inf nonzero skips everything (parameters,
    state, gradients, the step count as it was), else the gradients are divided by the scale,
    left so, and the step uses them (ours ignored both: GradScaler unscaled and checked on the host,
    a synchronisation per step). Against torch's fused step on the CPU, float32; the kernel
    paths never read found_inf on the host."""
    if backend == "cupy" and name != "Adam" and name != "AdamW":
        pytest.skip("the cupy backend has kernels for Adam / AdamW and RMSprop only")
    torch.manual_seed(0)
    init = [torch.randn(5, 3), torch.randn(7)]
    grads = [torch.randn(5, 3) * 64, torch.randn(7) * 64]

    def make(lib, dev):
        ps = [torch.nn.Parameter(t.clone().to(dev)) for t in init]
        opt = getattr(lib, name)(ps, lr=0.05, fused=True, **kw)
        # (ours always; torch's fused Adagrad says so in 2.13, not in 2.11, and reads the two either way)
        assert lib is torch.optim or opt._step_supports_amp_scaling
        return ps, opt

    def steps(ps, opt, dev, wrap=lambda t: t):
        seen = []
        for scale, found in ((8.0, 0.0), (8.0, 1.0), (None, 0.0), (4.0, 0.0), (4.0, 1.0)):
            for p, g in zip(ps, grads):
                p.grad = g.clone().to(dev)
            opt.grad_scale = None if scale is None else torch.tensor(scale, device=dev)
            opt.found_inf = wrap(torch.tensor(found, device=dev))
            opt.step()
            del opt.grad_scale, opt.found_inf
            state = [{k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                     for p in ps]
            seen.append(([p.detach().cpu().clone() for p in ps], [p.grad.cpu().clone() for p in ps], state))
        return seen

    want = steps(*make(torch.optim, "cpu"), "cpu")
    ps, opt = make(go, device)
    with gpu_nn.backend(backend):
        got = steps(ps, opt, device, (lambda t: t.as_subclass(_NoHostRead)) if backend != "reference" else (lambda t: t))
    for i, ((wp, wg, ws), (gp, gg, gs)) in enumerate(zip(want, got)):
        for a, b in zip(gg, wg):  # the gradients as the step left them: unscaled, or untouched
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"step {i} gradient")
        for a, b in zip(gp, wp):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7, msg=f"step {i} parameter")
        for a, b in zip(gs, ws):
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(torch.as_tensor(a[k]), torch.as_tensor(b[k]), rtol=2e-6, atol=1e-7,
                                           msg=f"step {i} state {k}")
    assert all(torch.equal(a, b) for a, b in zip(got[1][0], got[0][0]))  # step 1 found an inf: nothing moved


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton", "cupy")))
def test_fused_step_leaves_a_staged_gradient_unscaled(backend, device):
    """A gradient in another layout than its parameter runs on a staged copy (the kernels walk one
    dense layout): the unscaled values are copied back into the user's gradient, as torch's fused
    Adam leaves it, and the step equals torch's (given the same values contiguous: torch's CPU fused
    Adam reads a gradient of another layout in its memory order, wrongly)."""
    got = []
    for lib, dev, be in ((torch.optim, "cpu", "reference"), (go, device, backend)):
        p = torch.nn.Parameter(torch.arange(12.0, device=dev).reshape(3, 4))
        p.grad = torch.linspace(-8, 8, 12, device=dev).reshape(4, 3).t()  # column-major
        if lib is torch.optim:
            p.grad = p.grad.contiguous()
        opt = lib.Adam([p], lr=0.1, fused=True)
        opt.grad_scale, opt.found_inf = torch.tensor(4.0, device=dev), torch.tensor(0.0, device=dev)
        with gpu_nn.backend(be):
            opt.step()
        got.append((p.detach().cpu(), p.grad.cpu()))
    torch.testing.assert_close(got[0][1], got[1][1], rtol=0, atol=0)
    torch.testing.assert_close(got[0][0], got[1][0], rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_fused_steps_under_gradscaler_match_torchs_fused(backend, device):
    """A float32 training loop under torch.amp.GradScaler with fused Adam, inf losses on two
    steps: the same scales (the same steps skipped) and parameters as torch's fused Adam, with
    and without scaler.unscale_ before the step (where the scale arrives as None)."""
    def run(lib, unscale_first):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(device)
        opt = lib.Adam(model.parameters(), lr=0.01, fused=True)
        scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2)
        x = torch.randn(5, 3, device=device)
        scales = []
        for i in range(6):
            opt.zero_grad()
            loss = model(x).pow(2).sum() * (float("inf") if i in (1, 4) else 1.0)
            scaler.scale(loss).backward()
            if unscale_first:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        return scales, [p.detach().cpu() for p in model.parameters()]

    for unscale_first in (False, True):
        want = run(torch.optim, unscale_first)
        with gpu_nn.backend(backend):
            got = run(go, unscale_first)
        assert got[0] == want[0]
        for a, b in zip(got[1], want[1]):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_clip_grad_norm_moves_the_gradients_version_counters(backend, device):
    """torch's clip_grad_norm_ scales the gradients with mul_ (always, the factor clamped to 1):
    their version counters move; ours did not (kernels, NumPy views)."""
    p = [torch.nn.Parameter(torch.ones(3, device=device)) for _ in range(2)]
    for t in p:
        t.grad = torch.full((3,), 10.0, device=device)
    before = [t.grad._version for t in p]
    with gpu_nn.backend(backend):
        clip_grad_norm_(p, 1.0)
    assert all(t.grad._version > v for t, v in zip(p, before))


def test_a_gradient_with_the_negative_bit_steps_as_torchs():
    """A gradient that is a negative view (torch._neg_view: the sign a lazy bit) steps as torch's
    step takes it; the reference handed it to numpy(), which refuses the bit."""
    for name in NAMES:
        ps = [torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0])) for _ in range(2)]
        opts = [getattr(go, name)([ps[0]], lr=0.1), getattr(torch.optim, name)([ps[1]], lr=0.1)]
        for p, opt in zip(ps, opts):
            p.grad = torch._neg_view(torch.tensor([0.5, 1.0, -2.0]))
            opt.step()
        torch.testing.assert_close(ps[0], ps[1], msg=name)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("norm_type", [2.0, float("inf"), 1.0, 3.0])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(backend, device, norm_type, max_norm, rng):
    dtypes = (torch.float64, torch.float32) if backend == "reference" else (torch.float32, torch.float16)
    for dtype in dtypes:
        ours = _grads(rng, dtype, device)
        theirs = [torch.nn.Parameter(p.detach().cpu().double()) for p in ours]
        for a, b in zip(ours, theirs):
            b.grad = None if a.grad is None else a.grad.detach().cpu().double().clone()
        with gpu_nn.backend(backend):
            tn = clip_grad_norm_(ours, max_norm, norm_type)
        tt = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
        bound = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3}[dtype]
        assert tn.dtype == dtype and tn.shape == ()
        assert abs(float(tn) - float(tt)) <= bound * float(tt)
        for a, b in zip(ours, theirs):
            if b.grad is None:
                assert a.grad is None
            else:
                assert _rel(a.grad.cpu(), b.grad) <= bound


def _clip_in_groups(grads_of, device, groups_of, norm_type, error_if_nonfinite=False):
    """clip_grad_norm_ on the Triton path with the gradients dealt to ``groups_of(grads)``
    device groups (on one machine device: the exchange of partials a model split over GPUs
    takes, run where it can), against torch on float64 copies."""
    from gpu_nn.optim import _triton

    ours = grads_of()
    theirs = [torch.nn.Parameter(p.detach().cpu().double()) for p in ours]
    for a, b in zip(ours, theirs):
        b.grad = None if a.grad is None else a.grad.detach().cpu().double().clone()
    real = _triton._device_groups
    try:
        _triton._device_groups = lambda grads: [(torch.device(device), g) for g in groups_of(grads)]
        with gpu_nn.backend("triton"):
            tn = clip_grad_norm_(ours, 0.5, norm_type, error_if_nonfinite)
    finally:
        _triton._device_groups = real
    return ours, theirs, tn, torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type)


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
@pytest.mark.parametrize("norm_type", [2.0, float("inf"), 3.0])
def test_clip_grad_norm_over_device_groups_matches_torch(backend, device, norm_type, rng):
    """Gradients on several devices (a model split over GPUs) took the reference through the host
    (every gradient copied out and back, two host waits each, refused in a CUDA graph); each
    device now reduces its own and the partials are exchanged, queued. Run here as groups of one
    device: every way of dealing float32 and float16 gradients (a group of half gradients only,
    one of an empty gradient first, one group) gives torch's total and gradients."""
    def grads_of():
        ps = _grads(rng, torch.float32, device)
        for p in _grads(rng, torch.float16, device)[:3]:
            ps.append(p)
        if math.isinf(norm_type):  # (an empty gradient's max is refused, as torch refuses it)
            return ps
        empty = torch.nn.Parameter(torch.zeros(0, device=device))
        empty.grad = torch.zeros(0, device=device)
        return [empty] + ps

    deals = {
        "one": lambda gs: [gs],
        "alternate": lambda gs: [gs[0::2], gs[1::2]],
        "by dtype, empty first": lambda gs: [gs[:1], [g for g in gs[1:] if g.dtype == torch.float32],
                                              [g for g in gs[1:] if g.dtype == torch.float16]],
    }
    for name, deal in deals.items():
        ours, theirs, tn, tt = _clip_in_groups(grads_of, device, deal, norm_type)
        assert tn.dtype == torch.float32 and tn.device == ours[0].grad.device
        assert abs(float(tn) - float(tt)) <= 2e-3 * float(tt), name
        for a, b in zip(ours, theirs):
            if b.grad is not None and b.grad.numel():
                assert _rel(a.grad.cpu().double(), b.grad) <= 2e-3, name


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_clip_grad_norm_over_device_groups_refuses_a_nonfinite_total(backend, device, rng):
    def grads_of():
        ps = _grads(rng, torch.float32, device)
        ps[3].grad[1, 2] = float("inf")
        return ps

    with pytest.raises(RuntimeError, match="is non-finite"):
        _clip_in_groups(grads_of, device, lambda gs: [gs[:2], gs[2:]], 2.0, error_if_nonfinite=True)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two GPUs: gradients split over devices; the exchange of partial norms itself "
                           "runs on one device in test_clip_grad_norm_over_device_groups_matches_torch")
def test_clip_grad_norm_on_two_gpus_matches_torch(rng):
    ours = _grads(rng, torch.float32, "cuda:0")[:3] + _grads(rng, torch.float32, "cuda:1")[:3]
    theirs = [torch.nn.Parameter(p.detach().cpu().double()) for p in ours]
    for a, b in zip(ours, theirs):
        b.grad = a.grad.detach().cpu().double().clone()
    with gpu_nn.backend("triton"):
        tn = clip_grad_norm_(ours, 0.5)
    tt = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    assert tn.device == torch.device("cuda:0") and abs(float(tn) - float(tt)) <= 1e-6 * float(tt)
    for a, b in zip(ours, theirs):
        assert _rel(a.grad.cpu().double(), b.grad) <= 1e-6


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_clip_grad_norm_of_mixed_dtypes_is_in_their_promoted_dtype(backend, device):
    """torch stacks the per-tensor norms, which promotes: a float16 gradient beside a float32 one
    gives a float32 total (1e5 here, which float16 cannot hold), and float32 beside float64 sums
    the squares in float64 (1e40 would overflow float32 and zero every gradient)."""
    cases = [((torch.float16, 0.1), (torch.float32, 5e4))]
    if backend == "reference":  # the kernels take no float64 (auto sends such lists to the reference)
        cases.append(((torch.float32, 1.0), (torch.float64, 1e20)))
    for spec in cases:
        ours, theirs = [], []
        for dtype, value in spec:
            for lst in (ours, theirs):
                p = torch.nn.Parameter(torch.zeros(4, dtype=dtype, device=device))
                p.grad = torch.full((4,), value, dtype=dtype, device=device)
                lst.append(p)
        with gpu_nn.backend(backend):
            tn = clip_grad_norm_(ours, 1.0)
        tt = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        assert tn.dtype == tt.dtype and math.isfinite(float(tn)), (spec, tn, tt)
        assert abs(float(tn) - float(tt)) <= 1e-6 * float(tt), (spec, tn, tt)
        for a, b in zip(ours, theirs):
            assert a.grad.dtype == b.grad.dtype
            torch.testing.assert_close(a.grad.cpu(), b.grad.cpu(), rtol=2e-3 if a.grad.dtype == torch.float16 else 1e-6,
                                       atol=0)


def test_reference_overflow_and_nan_are_silent_as_in_torch():
    """Where torch gives inf or NaN without a word, the reference does not warn either: a sum of
    squares past float32's range in clipping, RMSprop's square average below 0 (torch takes
    alpha > 1)."""
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), 1e20)
    q = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    o = go.RMSprop([q], alpha=1.5)
    with warnings.catch_warnings(), gpu_nn.backend("reference"):
        warnings.simplefilter("error")
        assert math.isinf(float(clip_grad_norm_([p], 1.0)))
        for g in ([1.0, 2.0, 3.0], [3.0, 0.1, 1.0]):
            q.grad = torch.tensor(g, dtype=torch.float64)
            o.step()
    assert torch.isnan(q).all()


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_clip_grad_norm_nonfinite(backend, device, rng):
    ps = _grads(rng, torch.float32, device)
    ps[1].grad[3] = float("inf")
    with gpu_nn.backend(backend):
        with pytest.raises(RuntimeError, match="non-finite"):
            clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)
        tn = clip_grad_norm_(ps, 1.0)  # scales by the non-finite norm anyway, as torch does
    assert math.isinf(float(tn))
    assert float(clip_grad_norm_([], 1.0)) == 0.0
    single = torch.nn.Parameter(torch.ones(4, device=device))
    single.grad = torch.full((4,), 2.0, device=device)
    with gpu_nn.backend(backend):
        assert abs(float(clip_grad_norm_(single, 1.0)) - 4.0) < 1e-6


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("norm_type", (0.5, 1.0, 2.0, 3.0, float("inf")))
def test_clip_grad_norm_nan_gradient_as_torch(backend, device, norm_type):
    """A NaN gradient makes the total norm NaN for every norm type, as torch's, so every gradient
    is scaled by NaN and error_if_nonfinite raises. The Triton path's general p once raised 0 to
    the p-th power in place of NaN (|x|^p selected to 0 where not |x| > 0): a finite total, a NaN
    guard that did nothing."""
    def grads():
        out = []
        for vals in ([float("nan"), 1.0, -2.0], [0.5, 0.0, 3.0, 4.0, -1.0]):
            q = torch.nn.Parameter(torch.zeros(len(vals), device=device))
            q.grad = torch.tensor(vals, device=device)
            out.append(q)
        return out

    theirs = grads()
    tt = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    ours = grads()
    with gpu_nn.backend(backend):
        tn = clip_grad_norm_(ours, 1.0, norm_type)
        with pytest.raises(RuntimeError, match="non-finite"):
            clip_grad_norm_(grads(), 1.0, norm_type, error_if_nonfinite=True)
    assert math.isnan(float(tt)) and math.isnan(float(tn)), (tt, tn)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad.cpu(), b.grad.cpu(), equal_nan=True)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("norm_type", (float("inf"), float("-inf")))
@pytest.mark.parametrize("foreach", (None, False, True))
def test_clip_grad_norm_inf_of_an_empty_gradient_refused_as_torch(backend, device, norm_type, foreach):
    """An empty gradient under norm_type inf / -inf: a max / min over no elements, which torch
    refuses in words that depend on foreach; ours returned the other gradients' norm (or 0) and
    scaled them (an optimizer audit's leftover). torch's error, every gradient left as it was."""
    def params():
        p, q = torch.nn.Parameter(torch.zeros(3, device=device)), torch.nn.Parameter(torch.zeros(0, device=device))
        p.grad, q.grad = torch.full((3,), 4.0, device=device), torch.zeros(0, device=device)
        return [p, q]

    with pytest.raises(RuntimeError) as want:
        torch.nn.utils.clip_grad_norm_(params(), 1.0, norm_type, foreach=foreach)
    ours = params()
    with gpu_nn.backend(backend), pytest.raises(KernelInputError) as got:
        clip_grad_norm_(ours, 1.0, norm_type, foreach=foreach)
    assert str(got.value) == str(want.value)
    assert torch.equal(ours[0].grad.cpu(), torch.full((3,), 4.0))


def test_clip_grad_norm_refuses_complex_gradients_before_touching_any():
    """Complex gradients: torch clips them (the norm of their moduli); ours cast them to float32
    and wrote the real part back, the imaginary part dropped with only NumPy's warning (a dtype
    audit). Refused now, as the optimizers refuse complex parameters, with every gradient left
    as it was."""
    real = torch.zeros(3, requires_grad=True)
    real.grad = torch.full((3,), 5.0)
    c = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    c.grad = torch.full((3,), 3 + 4j, dtype=torch.complex64)
    with pytest.raises(KernelInputError, match="complex gradients"):
        clip_grad_norm_([real, c], 1.0)
    assert torch.equal(c.grad, torch.full((3,), 3 + 4j, dtype=torch.complex64)) and torch.equal(real.grad, torch.full((3,), 5.0))


def test_clip_grad_norm_refuses_sparse_gradients_as_torch():
    """A sparse gradient: torch's norm has no sparse kernel (NotImplementedError); ours the same
    class, and a KernelInputError, before any gradient is touched."""
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(NotImplementedError):
        torch.nn.utils.clip_grad_norm_(emb.parameters(), 1.0)
    before = emb.weight.grad.to_dense().clone()
    with pytest.raises(KernelInputError, match="sparse") as ours:
        clip_grad_norm_(emb.parameters(), 1.0)
    assert isinstance(ours.value, NotImplementedError)
    assert torch.equal(emb.weight.grad.to_dense(), before)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_clip_grad_norm_of_half_gradients_past_their_range_as_torch(backend, device):
    """float16 gradients whose total norm passes float16's range (6e4 twice): torch's total is
    float16 inf, so it scales every gradient by 0 and error_if_nonfinite raises; ours returned the
    same inf total but scaled by its float32 total's coefficient (0.707 where torch has 0) and did
    not raise (a special-values audit). Within range the gradients are as torch's, to float16's
    rounding of the coefficient."""
    def grads(vals):
        q = torch.nn.Parameter(torch.zeros(len(vals), dtype=torch.float16, device=device))
        q.grad = torch.tensor(vals, dtype=torch.float16, device=device)
        return [q]

    for vals, past in (([6e4, 6e4, 1.0], True), ([3e4, -2e4, 7.0], False)):
        theirs, ours = grads(vals), grads(vals)
        tt = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        with gpu_nn.backend(backend):
            tn = clip_grad_norm_(ours, 1.0)
            if past:
                with pytest.raises(RuntimeError, match="non-finite"):
                    clip_grad_norm_(grads(vals), 1.0, error_if_nonfinite=True)
        assert tn.dtype == tt.dtype == torch.float16 and math.isinf(float(tt)) == past == math.isinf(float(tn))
        torch.testing.assert_close(ours[0].grad.cpu(), theirs[0].grad.cpu(), rtol=2e-3, atol=0)
        if past:
            assert not ours[0].grad.any()


def _clipped(fn, vals, backend, device, *args):
    """``fn`` (torch's clip_grad_norm_ or ours) over parameters on ``device`` whose gradients
    are copies of ``vals`` (each in its dtype), under ``backend``: (total, gradients) on the CPU."""
    ps = [torch.nn.Parameter(torch.zeros(v.shape, dtype=v.dtype, device=device)) for v in vals]
    for p, v in zip(ps, vals):
        p.grad = v.clone().to(device)
    with gpu_nn.backend(backend):
        total = fn(ps, *args)
    return total.cpu(), [p.grad.cpu() for p in ps]


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("norm_type,scale", [(1.0, 1e30), (1.0, 1e12), (1.0, 1e-30), (3.0, 1e10), (3.0, 1e-10),
                                             (2.5, 1e10), (2.5, 1e-10)])
def test_clip_grad_norm_of_large_and_small_gradients_as_accurate_as_torchs(backend, device, norm_type, scale):
    """float32 gradients far from 1 (an accuracy audit): the total norm's error against float64.
    The Triton path made |x|^p and the p-th root as exp(p log |x|) in float32 for every p but 2
    and inf, p = 1 included, whose rounding grows with |p log|x||: 2.8-22 ulp in these cases
    (torch's own: 0.2-26, its powf in float32); now p = 1 is the plain sum and another p's power
    and root are taken in float64 and rounded once: 0-1 ulp here, held to 3. The reference
    computes as torch does (powf in float32): held to twice torch's error or 16 ulp."""
    g = torch.Generator().manual_seed(11)
    vals = [torch.randn(s, generator=g) * scale for s in ((4096,), (300,), (17, 19))]
    exact = float(torch.linalg.vector_norm(torch.cat([v.double().flatten() for v in vals]), norm_type))
    errs = {}
    for name, fn, be in (("torch", torch.nn.utils.clip_grad_norm_, backend), ("ours", clip_grad_norm_, backend)):
        total, grads = _clipped(fn, vals, be, device if name == "ours" else "cpu", 3e38, norm_type)
        assert total.dtype == torch.float32
        errs[name] = abs(float(total) - exact) / exact
    bound = 3 * 2.0 ** -24 if backend == "triton" else max(2 * errs["torch"], 16 * 2.0 ** -24)
    assert errs["ours"] <= bound, errs


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_clip_grad_norm_of_half_gradients_bit_for_bit(backend, device, dtype):
    """Half gradients scaled exactly as torch's: its coefficient max_norm / (total + 1e-6) is 0-d
    math in the total's half dtype (the sum, the reciprocal and the product each rounded to it),
    ours was float32's, which left a gradient in 20 an ulp off (a parity audit). Random norms on
    both sides of max_norm, several tensors, the totals and every gradient bit for bit."""
    g = torch.Generator().manual_seed(5)
    for trial in range(12):
        shapes = [(3, 4), (7,), (2, 3, 2)]
        scale = float(torch.rand((), generator=g)) * 6
        vals = [(torch.randn(s, generator=g) * scale).to(dtype) for s in shapes]
        max_norm = float(torch.rand((), generator=g)) * 4 + 0.05
        (tt, tg), (ot, og) = (_clipped(fn, vals, backend, device, max_norm)
                              for fn in (torch.nn.utils.clip_grad_norm_, clip_grad_norm_))
        assert torch.equal(ot, tt), (trial, ot, tt)
        for a, b in zip(og, tg):
            assert torch.equal(a, b), (trial, max_norm, float(tt))


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("norm_type", [2.0, 3.0, float("inf")])
def test_clip_grad_norm_rounds_each_gradients_norm_to_its_dtype(backend, device, norm_type):
    """torch's total is the norm of the per-tensor norms, each in its gradient's dtype: a float16
    gradient whose own norm passes 65504 is inf there, so the float32 total beside float32
    gradients is inf and every gradient scales by 0 (NaN where one was inf). Ours summed every
    element in float32 (a finite total: the gradients scaled by it; a gap known since stop 58).
    Within range, mixed float16 / bfloat16 / float32 lists as torch's: the totals bit for bit
    (to float32's rounding for p = 3, whose power the kernels take as exp(p log x)), the
    gradients to float32's rounding."""
    g = torch.Generator().manual_seed(3)
    past = [torch.full((4,), 5e4, dtype=torch.float16), torch.randn(5, generator=g)]  # its own norm 1e5 (p=2)
    within = [torch.randn(6, generator=g).half() * 30, torch.randn(3, 2, generator=g).bfloat16(), torch.randn(7, generator=g)]
    for vals, over in ((past, norm_type != float("inf")), (within, False)):
        (tt, tg), (ot, og) = (_clipped(fn, vals, backend, device, 1.0, norm_type)
                              for fn in (torch.nn.utils.clip_grad_norm_, clip_grad_norm_))
        assert ot.dtype == tt.dtype and math.isinf(float(ot)) == math.isinf(float(tt)) == over, (float(ot), float(tt))
        if norm_type == 3.0:
            torch.testing.assert_close(ot, tt, rtol=2e-6, atol=0)
        else:
            assert torch.equal(ot, tt), (float(ot), float(tt))
        for a, b in zip(og, tg):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton", "cupy")))
@pytest.mark.parametrize("name", ("Adam", "AdamW"))
def test_amsgrad_keeps_nan_in_its_running_max(backend, device, name):
    """amsgrad's max_exp_avg_sq takes a NaN second moment as torch.maximum does (NaN kept), and
    keeps it on the next step; the Triton kernel's max once dropped it (Triton's default max
    returns the other operand), leaving the state unlike torch's."""
    def model():
        q = torch.nn.Parameter(torch.tensor([1.0, 0.8, -0.3], device=device))
        return q

    ours, theirs = model(), model()
    o1 = getattr(go, name)([ours], lr=1e-3, amsgrad=True)
    o2 = getattr(torch.optim, name)([theirs], lr=1e-3, amsgrad=True)
    for g in ([0.5, 1.0, -1.0], [float("nan"), 1.0, 2.0], [0.1, -0.2, 0.3]):
        ours.grad = torch.tensor(g, device=device)
        theirs.grad = torch.tensor(g, device=device)
        with gpu_nn.backend(backend):
            o1.step()
        o2.step()
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(o1.state[ours][key].cpu(), o2.state[theirs][key].cpu(), equal_nan=True,
                                       msg=lambda m, key=key: f"{name} {key}: {m}")
        torch.testing.assert_close(ours.detach().cpu(), theirs.detach().cpu(), equal_nan=True)


# -- kernel backends ----------------------------------------------------------------------

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the interpreter too: _compat makes its bfloat16 exact


@pytest.mark.parametrize("backend,device", backend_params(("triton", "cupy")))
@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_kernel_trajectory_matches_torch(backend, device, name, kw):
    if backend == "cupy" and name not in ("Adam", "AdamW", "RMSprop"):
        pytest.skip("the cupy backend implements Adam/AdamW/RMSprop only")
    for dtype in KERNEL_DTYPES[:1]:
        m1 = _model(dtype, device)
        m2 = copy.deepcopy(m1)
        x, y = _batch(dtype, device)
        o1, o2 = getattr(go, name)(m1.parameters(), **kw), getattr(torch.optim, name)(m2.parameters(), **kw)
        worst = 0.0
        for _ in _train([(m1, o1), (m2, o2)], x, y, 25, backend=backend):
            worst = max(worst, _max_err(m1, m2))
        assert worst <= _f32_tol(), f"{name} {kw} {backend}: {worst:.3e}"
        for p in m1.parameters():
            if "step" in o1.state[p]:
                assert o1.state[p]["step"].device == p.device and float(o1.state[p]["step"]) == 25


@pytest.mark.parametrize("backend,device", backend_params(("triton", "cupy")))
@pytest.mark.parametrize("name,kw", [CONFIGS[2], CONFIGS[4], CONFIGS[6], CONFIGS[8], CONFIGS[11], CONFIGS[14]],
                         ids=["SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "AdamW"])
def test_kernel_half_params_fp32_state(backend, device, name, kw):
    """float16 and bfloat16 parameters with float32 state against a float32 shadow run
    of the reference started from the same rounded values."""
    if backend == "cupy" and name not in ("Adam", "AdamW", "RMSprop"):
        pytest.skip("the cupy backend implements Adam/AdamW/RMSprop only")
    for dtype in KERNEL_DTYPES[1:]:
        m1 = _model(dtype, device)
        m2 = copy.deepcopy(m1).to("cpu", torch.float32)
        x, y = _batch(dtype, device)
        o1, o2 = getattr(go, name)(m1.parameters(), **kw), getattr(go, name)(m2.parameters(), **kw)
        for _ in range(5):
            o1.zero_grad()
            ((m1(x) - y) ** 2).mean().backward()
            for a, b in zip(m1.parameters(), m2.parameters()):
                b.grad = a.grad.detach().to("cpu", torch.float32)
            with gpu_nn.backend(backend):
                o1.step()
            with gpu_nn.backend("reference"):
                o2.step()
            for i, (a, b) in enumerate(zip(m1.parameters(), m2.parameters(), strict=True)):
                # the kernel rounds its float32 update into the half parameter once per step: each
                # element within one of its own ulps of the reference's float32 value (half an ulp
                # of rounding, and float32 arithmetic that may differ near a rounding tie). A
                # parameter left where it was fails wherever the reference moved it by more
                got, want = a.detach().float().cpu(), b.detach()
                err = (got - want).abs() / _half_ulp(want, dtype)
                assert float(err.max()) <= 1.0, f"{name} {dtype} parameter {i}: {float(err.max()):.2f} ulp"
                sa, sb = o1.state[a], o2.state[b]
                assert sa.keys() == sb.keys()
                for k, v in sa.items():  # float32 state, as the reference's from the same values
                    if k != "step":
                        # within 1e-5 of the state's own scale (float32 arithmetic in another
                        # order: an element that cancels to near zero differs relatively more)
                        assert v.dtype == torch.float32
                        err = float((v.cpu() - sb[k]).abs().max()) / max(float(sb[k].abs().max()), 1e-30)
                        assert err <= 1e-5, f"{name} {dtype} parameter {i} {k}: {err:.2e} of its scale"
                b.data.copy_(got)  # resynchronise the rounding of the parameter


RMSPROP_EDGE = [dict(lr=0.01, momentum=0.9, centered=True), dict(lr=0.01, centered=True),
                dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.1, alpha=0.9), dict(lr=0.01, momentum=0.5)]


def _huge_grads(dtype, steps=3):
    """Gradients whose square overflows ``dtype`` (and, centered, whose running mean's square
    overflows too: |ga| = (1 - alpha) |g| > sqrt(max)), next to ordinary ones."""
    big = 0.9 * torch.finfo(dtype).max
    return [torch.tensor([big, -big, 1.0, -0.5 * k, big * 1e-3, 2.0 ** (k - 80)], dtype=dtype) for k in range(steps)]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's g * g, as meant
@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton", "cupy")))
@pytest.mark.parametrize("kw", RMSPROP_EDGE, ids=["centered-momentum", "centered", "centered-momentum-wd", "momentum"])
def test_rmsprop_overflowing_grad_matches_torch(backend, device, kw):
    """Issue 19: centered RMSprop with momentum and a 3e38 gradient left the parameter NaN where
    torch leaves it unchanged (square_avg = inf, so g / avg = 0). torch's ``v - ga^2`` is one
    fused multiply-add; rounding ga^2 alone overflowed it to inf and inf - inf gave NaN."""
    dtypes = (torch.float64, torch.float32) if backend == "reference" else (torch.float32,)
    for dtype in dtypes:
        ours = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 0.25, -1.0, 3.0], dtype=dtype, device=device))
        theirs = torch.nn.Parameter(ours.detach().cpu().clone())
        o1, o2 = go.RMSprop([ours], **kw), torch.optim.RMSprop([theirs], **kw)
        for g in _huge_grads(dtype):
            ours.grad, theirs.grad = g.to(device), g.clone()
            with gpu_nn.backend(backend):
                o1.step()
            o2.step()
            torch.testing.assert_close(ours.detach().cpu(), theirs.detach(), equal_nan=True, rtol=_f32_tol(3), atol=0)
            for k, v in o2.state[theirs].items():
                if k != "step":
                    torch.testing.assert_close(o1.state[ours][k].cpu().to(dtype), v, equal_nan=True,
                                               rtol=_f32_tol(3), atol=0, msg=f"{k} {dtype}")
        assert torch.isfinite(ours).all()


# -- CUDA C per-element math on the host ---------------------------------------------------

_HOST = r"""
#include "optim_math.cuh"
extern "C" void adam_host(float* p, const float* g, float* m, float* v, float* vmax, long long n, int amsgrad,
                          int maximize, int decoupled, float w1, float beta2, float w2, float wd, float eps,
                          float neg_step_size, float bc2_sqrt, float decay) {
    for (long long i = 0; i < n; ++i) {
        float vm = amsgrad ? vmax[i] : 0.0f;
        gn_adam_update(p[i], g[i], m[i], v[i], vm, amsgrad, maximize, decoupled, w1, beta2, w2, wd, eps,
                       neg_step_size, bc2_sqrt, decay);
        if (amsgrad) vmax[i] = vm;
    }
}
extern "C" void rmsprop_host(float* p, const float* g, float* v, float* ga, float* buf, long long n, int centered,
                             int use_momentum, int maximize, float lr, float alpha, float w, float eps, float wd,
                             float momentum) {
    for (long long i = 0; i < n; ++i) {
        float gai = centered ? ga[i] : 0.0f, bi = use_momentum ? buf[i] : 0.0f;
        gn_rmsprop_update(p[i], g[i], v[i], gai, bi, centered, use_momentum, maximize, lr, alpha, w, eps, wd, momentum);
        if (centered) ga[i] = gai;
        if (use_momentum) buf[i] = bi;
    }
}
extern "C" void adam_scalars_host(double lr, double beta1, double beta2, double eps, double wd, double step, float* out) {
    GnAdamScalars s = gn_adam_scalars(lr, beta1, beta2, eps, wd, step);
    const float v[8] = {s.neg_step_size, s.bc2_sqrt, s.w1, s.beta2, s.w2, s.wd, s.eps, s.decay};
    for (int i = 0; i < 8; ++i) out[i] = v[i];
}
extern "C" void rmsprop_scalars_host(double lr, double alpha, double eps, double wd, double momentum, float* out) {
    GnRmspropScalars s = gn_rmsprop_scalars(lr, alpha, eps, wd, momentum);
    const float v[7] = {s.lr, s.alpha, s.w, s.eps, s.wd, s.momentum, (float)s.use_momentum};
    for (int i = 0; i < 7; ++i) out[i] = v[i];
}
extern "C" void lerp_host(const float* a, const float* b, float w, float* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = gn_lerp(a[i], b[i], w);
}
// optim.cu's chunk loop run for every thread of a block: per element of [start, end), how many
// times it was updated (count) and the size of the group it was updated in (group)
extern "C" void chunk_cover(int aligned, long long start, long long end, long long nthreads, int* count, int* group) {
    for (long long t = 0; t < nthreads; ++t)
        gn_chunk_loop(aligned != 0, start, end, t, nthreads, [&](long long i, int n) {
            for (int j = 0; j < n; ++j) {
                count[i + j - start] += 1;
                group[i + j - start] = n;
            }
        });
}
"""


@pytest.mark.parametrize("aligned", [1, 0], ids=["aligned", "unaligned"])
def test_cuda_chunk_loop_updates_every_element_once_on_host(aligned):
    """optim.cu's chunk loop (gn_chunk_loop) over every thread of a block: each element of the
    chunk updated exactly once, in groups of four where the chunk's tensors are aligned except
    the chunk's last (len % 4) elements, one at a time otherwise; chunk lengths around group and
    block multiples, blocks of 1, 3 and 256 threads (the launch's), chunks at 0 and at 16384."""
    lib = build_host_library(_HOST, "optim_math")
    for start in (0, 16384):
        for length in (0, 1, 3, 4, 5, 1023, 1024, 1027, 4099, 16384):
            for threads in (1, 3, 256):
                count = np.zeros(max(length, 1), np.int32)
                group = np.zeros(max(length, 1), np.int32)
                lib.chunk_cover(aligned, ctypes.c_longlong(start), ctypes.c_longlong(start + length),
                                ctypes.c_longlong(threads), count.ctypes.data_as(ctypes.c_void_p),
                                group.ctypes.data_as(ctypes.c_void_p))
                assert (count[:length] == 1).all(), (start, length, threads)
                full = length - length % 4 if aligned else 0
                assert (group[:full] == 4).all() and (group[full:length] == 1).all(), (start, length, threads)


@pytest.mark.parametrize("opts", [dict(), dict(amsgrad=True, weight_decay=0.1), dict(maximize=True, decoupled=True, weight_decay=0.2)])
def test_cuda_adam_math_on_host(opts, rng):
    lib = build_host_library(_HOST, "optim_math")
    n = 1001
    p, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    m, v = (rng.standard_normal(n) * 0.1).astype(np.float32), (rng.random(n) * 0.1).astype(np.float32)
    vmax = v + np.float32(0.01) * rng.random(n).astype(np.float32)
    arrs = [a.copy() for a in (p, g, m, v, vmax)]
    lr, b1, b2, eps, wd, step = 0.01, 0.9, 0.999, 1e-8, opts.get("weight_decay", 0.0), 7
    ams, mx, dec = opts.get("amsgrad", False), opts.get("maximize", False), opts.get("decoupled", False)
    ref.adam_step([p], [g], [m], [v], [vmax], [step], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, amsgrad=ams,
                  maximize=mx, decoupled_weight_decay=dec)
    bc1, bc2 = 1 - b1**step, 1 - b2**step
    f = ctypes.c_float
    lib.adam_host(*[fptr(a) for a in arrs], ctypes.c_longlong(n), int(ams), int(mx), int(dec), f(1 - b1), f(b2),
                  f(1 - b2), f(wd), f(eps), f(-(lr / bc1)), f(bc2**0.5), f(1 - lr * wd))
    for a, b in zip(arrs, (p, g, m, v, vmax)):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("w", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_cuda_lerp_is_torchs_two_sided_formula_on_host(w, rng):
    """gn_lerp (Adam's first moment, centered RMSprop's mean gradient) is torch.lerp's formula,
    ``a + w (b - a)`` below w = 0.5 and ``b - (b - a)(1 - w)`` from it on, bit for bit (each op
    rounded to float32, as the host build and the GPU's non-fused arithmetic compute it), so
    exact at w = 1 (beta1 = 0). The mutation audit found the one-sided form passing the adam
    math test, whose tolerance is wider than the ulps between the two."""
    lib = build_host_library(_HOST, "optim_math")
    n = 4097
    a, b = rng.standard_normal(n).astype(np.float32) * 3, rng.standard_normal(n).astype(np.float32)
    out = np.empty(n, np.float32)
    lib.lerp_host(fptr(a), fptr(b), ctypes.c_float(w), fptr(out), ctypes.c_longlong(n))
    wf, d = np.float32(w), b - a
    want = a + wf * d if w < 0.5 else b - d * (np.float32(1) - wf)
    np.testing.assert_array_equal(out, want)
    if w == 1.0:
        np.testing.assert_array_equal(out, b)


def test_cuda_amsgrad_keeps_nan_on_host(rng):
    """gn_adam_update's amsgrad maximum keeps a NaN second moment (torch.maximum propagates NaN;
    a plain ``v > vmax ? v : vmax`` keeps the old maximum): the mutation audit found no host test
    with a NaN gradient under amsgrad."""
    lib = build_host_library(_HOST, "optim_math")
    n = 7
    p, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    g[[1, 4]] = np.nan
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    vmax = np.full(n, 0.5, np.float32)
    f = ctypes.c_float
    b1, b2, lr = 0.9, 0.999, 0.01
    lib.adam_host(fptr(p), fptr(g), fptr(m), fptr(v), fptr(vmax), ctypes.c_longlong(n), 1, 0, 0, f(1 - b1), f(b2),
                  f(1 - b2), f(0.0), f(1e-8), f(-(lr / (1 - b1))), f((1 - b2) ** 0.5), f(1.0))
    assert np.isnan(vmax[[1, 4]]).all() and np.isnan(p[[1, 4]]).all()
    assert np.isfinite(vmax[[0, 2, 3, 5, 6]]).all() and np.isfinite(p[[0, 2, 3, 5, 6]]).all()


@pytest.mark.parametrize("opts", [dict(), dict(centered=True, momentum=0.9, weight_decay=0.1, maximize=True)])
def test_cuda_rmsprop_math_on_host(opts, rng):
    lib = build_host_library(_HOST, "optim_math")
    n = 999
    p, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    v = (rng.random(n) + 0.5).astype(np.float32)
    ga, buf = (rng.standard_normal(n) * 0.1).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    arrs = [a.copy() for a in (p, g, v, ga, buf)]
    lr, alpha, eps = 0.01, 0.9, 1e-8
    c, mom, wd, mx = opts.get("centered", False), opts.get("momentum", 0.0), opts.get("weight_decay", 0.0), opts.get("maximize", False)
    ref.rmsprop_step([p], [g], [v], [ga], [buf], lr=lr, alpha=alpha, eps=eps, weight_decay=wd, momentum=mom,
                     centered=c, maximize=mx)
    f = ctypes.c_float
    lib.rmsprop_host(*[fptr(a) for a in arrs], ctypes.c_longlong(n), int(c), int(mom > 0), int(mx), f(lr), f(alpha),
                     f(1 - alpha), f(eps), f(wd), f(mom))
    for a, b in zip(arrs, (p, g, v, ga, buf)):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)


# steps 1, 2, 3 (where the bias corrections move most), odd counts, powers of two and their
# neighbours (the integer power's square-and-multiply bits), up to 2^24 (float32 step limit)
SCALAR_STEPS = [1, 2, 3, 7, 10, 31, 64, 65, 1000, 4097, 99991, 2**20 + 3, 2**24]


@pytest.mark.parametrize("name,kw", [c for c in CONFIGS if c[0] in ("Adam", "AdamW")] +
                         [("Adam", dict(lr=3e-4, betas=(0.5, 0.9999), weight_decay=0.05)),
                          ("AdamW", dict(lr=0.1, betas=(0.0, 0.25), weight_decay=0.7))],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_cuda_adam_step_scalars_on_host(name, kw):
    """optim.cu's per-block setup (gn_adam_scalars) against torch.optim.Adam's Python formulas
    (torch/optim/adam.py, _single_tensor_adam: bias corrections with ``beta ** step``, the step
    size, ``bias_correction2 ** 0.5``, the decoupled decay), each rounded to float32 once."""
    lib = build_host_library(_HOST, "optim_math")
    lr, (b1, b2) = kw.get("lr", 1e-3), kw.get("betas", (0.9, 0.999))
    eps, wd = kw.get("eps", 1e-8), kw.get("weight_decay", 1e-2 if name == "AdamW" else 0.0)
    out = np.full(8, np.nan, dtype=np.float32)
    for step in SCALAR_STEPS:
        lib.adam_scalars_host(ctypes.c_double(lr), ctypes.c_double(b1), ctypes.c_double(b2), ctypes.c_double(eps),
                              ctypes.c_double(wd), ctypes.c_double(float(step)), fptr(out))
        step = float(step)  # torch: step = _get_value(step_t), a Python float
        bias_correction1 = 1 - b1**step
        bias_correction2 = 1 - b2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        want = np.array([-step_size, bias_correction2_sqrt, 1 - b1, b2, 1 - b2, wd, eps, 1 - lr * wd], np.float32)
        # the integer power and pow() may differ by a few double ulps, which float32 rounding
        # absorbs except at a rounding boundary: one float32 ulp at most
        np.testing.assert_array_max_ulp(out, want, maxulp=1)


@pytest.mark.parametrize("name,kw", [c for c in CONFIGS if c[0] == "RMSprop"] +
                         [("RMSprop", dict(lr=0.3, alpha=0.0, momentum=1e-3, weight_decay=5e-4))],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_cuda_rmsprop_step_scalars_on_host(name, kw):
    """optim.cu's per-block setup (gn_rmsprop_scalars) against torch.optim.RMSprop's formulas:
    ``1 - alpha`` (addcmul value, lerp weight), momentum used when ``> 0``; no step dependence."""
    lib = build_host_library(_HOST, "optim_math")
    lr, alpha, eps = kw.get("lr", 1e-2), kw.get("alpha", 0.99), kw.get("eps", 1e-8)
    wd, mom = kw.get("weight_decay", 0.0), kw.get("momentum", 0.0)
    out = np.full(7, np.nan, dtype=np.float32)
    lib.rmsprop_scalars_host(ctypes.c_double(lr), ctypes.c_double(alpha), ctypes.c_double(eps), ctypes.c_double(wd),
                             ctypes.c_double(mom), fptr(out))
    want = np.array([lr, alpha, 1 - alpha, eps, wd, mom, float(mom > 0)], np.float32)
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("kw", RMSPROP_EDGE, ids=["centered-momentum", "centered", "centered-momentum-wd", "momentum"])
def test_cuda_rmsprop_overflowing_grad_on_host(kw):
    """gn_rmsprop_update with gradients whose square overflows float32, three steps, against
    torch.optim.RMSprop (the parameter stays finite: v = inf makes g / avg = 0)."""
    lib = build_host_library(_HOST, "optim_math")
    theirs = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 0.25, -1.0, 3.0]))
    o = torch.optim.RMSprop([theirs], **kw)
    p = theirs.detach().numpy().copy()
    v, ga, buf = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    c, mom = kw.get("centered", False), kw.get("momentum", 0.0)
    alpha, wd = kw.get("alpha", 0.99), kw.get("weight_decay", 0.0)
    f = ctypes.c_float
    for g in _huge_grads(torch.float32):
        theirs.grad = g.clone()
        o.step()
        gn = g.numpy().copy()
        lib.rmsprop_host(fptr(p), fptr(gn), fptr(v), fptr(ga), fptr(buf), ctypes.c_longlong(p.size), int(c),
                         int(mom > 0), 0, f(kw["lr"]), f(alpha), f(1 - alpha), f(1e-8), f(wd), f(mom))
        np.testing.assert_allclose(p, theirs.detach().numpy(), rtol=_f32_tol(3), atol=0)
        st = o.state[theirs]
        np.testing.assert_allclose(v, st["square_avg"].numpy(), rtol=_f32_tol(3), atol=0)
        if mom > 0:
            np.testing.assert_allclose(buf, st["momentum_buffer"].numpy(), rtol=_f32_tol(3), atol=0)
    assert np.isfinite(p).all()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device: the GPU step must not synchronise with the host")
def test_gpu_step_does_not_sync():
    m = _model(torch.float32, "cuda")
    o = go.Adam(m.parameters(), lr=0.01)
    x, y = _batch(torch.float32, "cuda")
    ((m(x) - y) ** 2).mean().backward()
    o.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o.step()
        clip_grad_norm_(m.parameters(), 1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton", "cupy")))
@pytest.mark.parametrize("name", ["Adam", "RMSprop", "SGD"])
def test_kernel_odd_layouts(backend, device, name, rng):
    """Misaligned views of a flat buffer and transposed parameters go through copies, written back."""
    if backend == "cupy" and name == "SGD":
        pytest.skip("the cupy backend implements Adam/AdamW/RMSprop only")
    kw = dict(lr=0.01, momentum=0.9) if name != "Adam" else dict(lr=0.01)
    flat = torch.from_numpy(rng.standard_normal(600)).float().to(device)
    ours = [flat[1:38], flat[41:41 + 517].view(11, 47), torch.from_numpy(rng.standard_normal((7, 5))).float().to(device).t()]
    theirs = [p.detach().clone() for p in ours]
    for p in ours + theirs:
        p.requires_grad_()
    o1, o2 = getattr(go, name)(ours, **kw), getattr(torch.optim, name)(theirs, **kw)
    for _ in range(3):
        for a, b in zip(ours, theirs):
            g = torch.from_numpy(rng.standard_normal(a.shape)).float().to(device)
            a.grad, b.grad = g.clone(), g.clone()
        with gpu_nn.backend(backend):
            o1.step()
        o2.step()
    for a, b in zip(ours, theirs):
        assert _rel(a, b) <= _f32_tol(3)


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["fp32", "fp16", "bf16"])
def test_cuda_optim_compiles_for_every_param_dtype(kind):
    """Every entry point, the learning rate by value and read on the device (``*_lr_ptr``: a
    tensor lr), in the cubin of every parameter dtype."""
    from gpu_nn.kernels import cuda as kcuda

    cubin = kcuda.compile_cubin("optim", {"PARAM_KIND": kind, "OPTIM_CHUNK": 16384}, arch="sm_90")
    assert cubin[:4] == b"\x7fELF"
    for entry in ("adam_step", "adam_step_lr_ptr", "rmsprop_step", "rmsprop_step_lr_ptr"):
        assert entry.encode() + b"\x00" in cubin, f"{entry} missing from the cubin"


# -- kept step plans ---------------------------------------------------------------------
# A step over the same tensors as the last one reuses its plan (optimizers._Plan): no
# per-parameter checks, state look-ups or table builds. Every event below changes one fact a
# plan was built from, at step 4 of 8, on our optimizer and on torch's alike; the
# trajectories must stay equal, which they would not if a stale plan ran (a stale state
# tensor does not advance, a stale table reads the old layout or address).

PLAN_OPTS = [("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)), ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
             ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True)), ("Adagrad", dict(lr=0.1)),
             ("Adadelta", dict(lr=0.5))]
PLAN_EVENTS = ["none", "grads-new-addresses", "grad-none", "grad-layout-same-address", "state-replaced",
               "state-data-moved", "param-data-moved", "param-layout-same-address", "lr-changed", "load-state-dict", "backend-switch",
               "group-added", "momentum-on"]


class _GradPool:
    """Gradients as views of one buffer: new tensor objects at the same addresses each step
    (as a caching allocator hands back after ``zero_grad(set_to_none=True)``)."""

    def __init__(self, shapes, dtype):
        self.buf = torch.empty(sum(math.prod(s) + 16 for s in shapes), dtype=dtype)
        self.offsets = []
        o = 0
        for s in shapes:
            self.offsets.append(o)
            o += -(-math.prod(s) // 16) * 16  # every view 64-byte aligned: the kernels take it as it is

    def view(self, i, shape, transposed=False):
        n = math.prod(shape)
        flat = self.buf[self.offsets[i]:self.offsets[i] + n]
        if transposed:  # the same address, column-major strides
            return flat.view(shape[::-1]).t()
        return flat.view(shape)


def _plan_run(backend, name, kw, event, dtype=torch.float32):
    torch.manual_seed(5)
    shapes = [(7, 5), (5,), (3, 7)]
    if name == "SGD" and event == "momentum-on":
        kw = dict(lr=0.05)
    ours = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    o1, o2 = getattr(go, name)(ours, **kw), getattr(torch.optim, name)(theirs, **kw)
    pool = _GradPool(shapes, dtype)
    extra = None
    worst = 0.0
    for step in range(8):
        grads = [torch.randn(s, dtype=dtype) for s in shapes]
        for i, (a, b, g) in enumerate(zip(ours, theirs, grads)):
            # new gradient tensors at the same addresses every step (a kept plan serves them),
            # except where the event is another address or layout
            if event == "grads-new-addresses" and step == 4:
                a.grad = g.clone()
            else:
                view = pool.view(i, g.shape, transposed=(event == "grad-layout-same-address" and step >= 4 and g.dim() == 2))
                view.copy_(g)
                a.grad = view
            b.grad = g.clone()
        if step == 4:
            if event == "grad-none":
                ours[1].grad = theirs[1].grad = None
            elif event == "state-replaced":
                for o, p in ((o1, ours[0]), (o2, theirs[0])):
                    k = next(k for k, v in o.state[p].items() if torch.is_tensor(v) and v.dim())
                    o.state[p][k] = o.state[p][k].clone()
            elif event == "state-data-moved":
                for o, p in ((o1, ours[0]), (o2, theirs[0])):
                    for v in o.state[p].values():
                        if torch.is_tensor(v) and v.dim():
                            v.data = v.data.clone()
            elif event == "param-data-moved":
                ours[2].data = ours[2].data.clone()
                theirs[2].data = theirs[2].data.clone()
            elif event == "param-layout-same-address":
                # the same address and shape, column-major strides (a kept plan keyed on the
                # address alone stepped it row-major: other elements than torch's)
                for p in (ours[0], theirs[0]):
                    p.data = p.data.as_strided(p.shape, (1, p.shape[0]))
            elif event == "lr-changed":
                for o in (o1, o2):
                    o.param_groups[0]["lr"] *= 0.5
            elif event == "load-state-dict":
                o1.load_state_dict(copy.deepcopy(o1.state_dict()))
                o2.load_state_dict(copy.deepcopy(o2.state_dict()))
            elif event == "group-added":
                extra = (torch.nn.Parameter(torch.randn(4, dtype=dtype)),)
                extra = extra + (torch.nn.Parameter(extra[0].detach().clone()),)
                o1.add_param_group({"params": [extra[0]]})
                o2.add_param_group({"params": [extra[1]]})
                if name == "Adagrad" and not o2.state[extra[1]]:
                    # torch before 2.13 initialised Adagrad's state in __init__ only, so its own
                    # step raised KeyError 'sum' on an added group (the H200's torch 2.11); the
                    # oracle's state then as torch 2.13 creates it on the first step
                    init = o2.defaults["initial_accumulator_value"]
                    o2.state[extra[1]].update(step=torch.tensor(0.0), sum=torch.full_like(extra[1], init))
            elif event == "momentum-on" and name == "SGD":
                for o in (o1, o2):
                    o.param_groups[0]["momentum"] = 0.9
        if extra is not None:
            g = torch.randn(4, dtype=dtype)
            extra[0].grad, extra[1].grad = g.clone(), g.clone()
        with gpu_nn.backend("reference" if event == "backend-switch" and step == 5 else backend):
            o1.step()
        o2.step()
        pairs = list(zip(ours, theirs)) + ([extra] if extra is not None else [])
        worst = max(worst, max(_rel(a, b) for a, b in pairs))
        for a, b in pairs:
            for k, v in o2.state[b].items():
                if torch.is_tensor(v) and v.dim():
                    worst = max(worst, _rel(o1.state[a][k], v))
    return worst


@pytest.fixture
def on_device(device):
    """Tensors the test makes without a device go to the parametrised ``device`` (CUDA on a GPU
    machine, where the triton backend refuses CPU tensors; the CPU under the interpreter)."""
    with torch.device(device):
        yield


def _count_full_steps(monkeypatch):
    """A list that grows by one at every full step (``_dispatch.parts``: a step no kept plan served)."""
    from gpu_nn.optim import _dispatch

    full = []
    real = _dispatch.parts
    monkeypatch.setattr(_dispatch, "parts", lambda *a: full.append(1) or real(*a))
    return full


def _within_ulps(got, exact, what, scale=None, ulps=2.0):
    """``got`` within ``ulps`` ulps of its dtype of the float64 value ``exact``, the ulp taken at
    ``scale`` (default ``exact``: the largest magnitude the computation went through, where a
    difference cancels). Two: a step's float32 roundings (the learning rate, the product, the
    sum) are each at most half an ulp of that magnitude; a half-precision result adds its one
    rounding to the negligible float32 ones."""
    bits = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[got.dtype]
    mag = exact.abs() if scale is None else scale
    ulp = torch.exp2(torch.floor(torch.log2(mag.clamp_min(torch.finfo(got.dtype).tiny))) - bits)
    err = (got.double() - exact).abs() / ulp
    assert float(err.max()) <= ulps, f"{what}: {float(err.max()):.2f} ulp"


DUPLICATE_OPTS = [("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.5)), ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
                  ("SGD", dict(lr=0.1)), ("Adam", dict(lr=0.1, amsgrad=True)), ("AdamW", dict(lr=0.1, weight_decay=0.1)),
                  ("Adagrad", dict(lr=0.1, lr_decay=0.01)), ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True)),
                  ("Adadelta", dict(lr=0.5, weight_decay=0.1))]


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("name,kw", DUPLICATE_OPTS, ids=[f"{n}-{'-'.join(k)}" for n, k in DUPLICATE_OPTS])
def test_a_parameter_listed_twice_is_stepped_as_torch_steps_it(backend, device, name, kw):
    """torch warns about a group listing a parameter twice and steps the entries one after the
    other, each reading what the one before wrote (its per-tensor step; a multi-tensor step over
    one tensor twice is a race on a GPU, so torch runs per tensor here too). Ours stepped the
    shared state several times over in one launch (SGD's buffer four updates in two steps on
    Triton, 0.095 against torch's 0.339), and the reference's SGD made one buffer where torch's
    first step makes one per entry, the last kept (with weight decay the runs parted at step 2)
    (a parity audit)."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    torch.manual_seed(7)
    p0, q0 = torch.randn(3, 2, dtype=dtype, device=device), torch.randn(4, dtype=dtype, device=device)
    ours_p, ours_q = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(q0.clone())
    theirs_p, theirs_q = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(q0.clone())
    with pytest.warns(UserWarning, match="duplicate parameters"):
        o1 = getattr(go, name)([ours_p, ours_q, ours_p], **kw)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        o2 = getattr(torch.optim, name)([theirs_p, theirs_q, theirs_p], foreach=False, **kw)
    for step in range(3):
        gp, gq = torch.randn_like(p0), torch.randn_like(q0)
        ours_p.grad, ours_q.grad = gp.clone(), gq.clone()
        theirs_p.grad, theirs_q.grad = gp.clone(), gq.clone()
        with gpu_nn.backend(backend):
            o1.step()
        o2.step()
        for a, b in ((ours_p, theirs_p), (ours_q, theirs_q)):
            torch.testing.assert_close(a.detach(), b.detach(), msg=lambda m: f"step {step}: {m}")
            for k, v in o2.state[b].items():
                if k == "step":  # torch's (not fused, not capturable) is a CPU tensor, ours on the parameter's device
                    assert float(o1.state[a][k]) == float(v), (step, k)
                    continue
                torch.testing.assert_close(o1.state[a][k], v, msg=lambda m: f"step {step} state {k}: {m}")


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_tables_of_another_dtype_at_the_same_addresses_are_their_own(backend, device):
    """The chunk tables of a step and of clipping are kept by the tensors' addresses; their
    offsets count elements, so a float16 / bfloat16 run whose tensors a caching allocator puts
    where a float32 run's were (the same addresses and sizes: blocks of 512 bytes) needs its own
    table: served the float32 one, the second tensor was stepped and scaled 256 bytes into the
    first's block and left as it was (a helper's audit). Each dtype in turn, against the step and
    the clipping computed in float64 from the same values. (The Triton backend's tables: CuPy's
    hold raw addresses, and it has neither SGD nor clipping.)"""
    pbuf = torch.zeros(4096, dtype=torch.uint8, device=device)
    gbuf = torch.zeros(4096, dtype=torch.uint8, device=device)

    def views(buf, dtype, n=100):
        es = torch.empty((), dtype=dtype).element_size()
        return [buf[0:n * es].view(dtype), buf[512:512 + n * es].view(dtype)]

    torch.manual_seed(3)
    lr, max_norm = 0.1, 1.0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for opt in ("SGD", "clip"):
            ours = [torch.nn.Parameter(v) for v in views(pbuf, dtype)]
            for p, g in zip(ours, views(gbuf, dtype)):
                with torch.no_grad():
                    p.copy_(torch.randn(100))
                    g.copy_(torch.randn(100) * 3)
                p.grad = g
            p64 = [p.detach().double().cpu() for p in ours]
            g64 = [p.grad.double().cpu() for p in ours]
            with gpu_nn.backend(backend):
                if opt == "SGD":
                    go.SGD(ours, lr=lr).step()
                    got, exact = [p.detach().cpu() for p in ours], [p - lr * g for p, g in zip(p64, g64)]
                    scales = [torch.maximum(p.abs(), (lr * g).abs()) for p, g in zip(p64, g64)]
                else:
                    total = clip_grad_norm_(ours, max_norm)
                    norm = torch.linalg.vector_norm(torch.cat(g64))
                    _within_ulps(total.cpu(), norm, f"clip {dtype} total")
                    coef = min(1.0, max_norm / (float(norm) + 1e-6))
                    got, exact = [p.grad.cpu() for p in ours], [g * coef for g in g64]
                    scales = [e.abs() for e in exact]
            for i, (a, b, m) in enumerate(zip(got, exact, scales)):
                _within_ulps(a, b, f"{opt} {dtype} tensor {i}", m)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("event", PLAN_EVENTS)
@pytest.mark.parametrize("name,kw", PLAN_OPTS, ids=[n for n, _ in PLAN_OPTS])
def test_kept_plan_follows_every_change_like_torch(backend, device, name, kw, event, on_device):
    worst = _plan_run(backend, name, kw, event)
    assert worst <= _f32_tol(8), f"{name} {event} {backend}: {worst:.3e}"


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("name,kw", PLAN_OPTS, ids=[n for n, _ in PLAN_OPTS])
def test_kept_plan_is_reused(backend, device, name, kw, monkeypatch, on_device):
    """Gradients kept (zero_grad(set_to_none=False)), or new tensors elsewhere (the pool's
    addresses from step 3): only the first step (and SGD's first momentum step) takes the full
    path; the kept launch follows the gradients where they lie (before, step 3 took it too)."""
    full = _count_full_steps(monkeypatch)
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in ((7, 5), (5,))]
    o = getattr(go, name)(ps, **kw)
    pool = _GradPool([p.shape for p in ps], torch.float32)
    with gpu_nn.backend(backend):
        for step in range(6):
            for i, p in enumerate(ps):
                if step < 3:  # the same gradient tensors, zeroed and refilled
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad.copy_(torch.randn(p.shape))
                else:  # new tensors at the same addresses
                    p.grad = pool.view(i, p.shape)
                    p.grad.copy_(torch.randn(p.shape))
            o.step()
    assert len(full) == (2 if name == "SGD" else 1)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_kept_plans_follow_gradients_that_cycle_through_address_sets(backend, device, monkeypatch, on_device):
    """Gradients alternating between two address sets (an allocator handing blocks back every
    other step): one plan serves both, its launch following the gradients where they lie, so
    only the first step takes the full path; replacing a state tensor drops the plans that held
    the old one (one more full step). Values against torch."""
    full = _count_full_steps(monkeypatch)
    torch.manual_seed(4)
    shapes = [(7, 5), (5,)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    o1, o2 = go.Adam(ours, lr=0.01), torch.optim.Adam(theirs, lr=0.01)
    pools = [_GradPool(shapes, torch.float32), _GradPool(shapes, torch.float32)]
    for step in range(9):
        if step == 6:  # a state tensor replaced (same values): the old plans must not keep the old one
            for o, p in ((o1, ours[0]), (o2, theirs[0])):
                o.state[p]["exp_avg"] = o.state[p]["exp_avg"].clone()
        for i, (a, b) in enumerate(zip(ours, theirs)):
            g = torch.randn(a.shape)
            a.grad = pools[step % 2].view(i, a.shape)
            a.grad.copy_(g)
            b.grad = g.clone()
        with gpu_nn.backend(backend):
            o1.step()
        o2.step()
        assert max(_rel(a, b) for a, b in zip(ours, theirs)) <= _f32_tol(9)
        if step == 6:
            assert len(o1._plans[id(o1.param_groups[0])]) == 1
    # step 0, and 6 (the state replaced)
    assert len(full) == 2


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
@pytest.mark.parametrize("name,kw", PLAN_OPTS, ids=[n for n, _ in PLAN_OPTS])
def test_kept_launch_follows_gradients_that_move_every_step(backend, device, name, kw, monkeypatch, on_device):
    """New gradient tensors at new addresses every step, their offsets from one another changing
    too (what the H200's caching allocator did in a training loop: the full step ran 10 times in
    10 before), one of them at a 4-byte misaligned address at step 5 (that part is prepared again,
    staged through a copy): values against torch every step, the full path only where it must,
    and the kept launch's table rebuilt for the new gradient column, not the whole prepare."""
    from gpu_nn.optim import _triton as glue

    full = _count_full_steps(monkeypatch)
    rebuilt = []
    real = glue.chunk_rows
    monkeypatch.setattr(glue, "chunk_rows", lambda *a: rebuilt.append(1) or real(*a))
    torch.manual_seed(6)
    shapes = [(7, 5), (5,), (3, 7)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    o1, o2 = getattr(go, name)(ours, **kw), getattr(torch.optim, name)(theirs, **kw)
    for step in range(8):
        # one buffer per step, the gradients at shuffled 64-byte-aligned slots of it
        buf = torch.empty(64 * 16 * (step + 4))
        slots = np.random.default_rng(step).permutation(len(shapes) + step)[:len(shapes)] * 64
        for i, (a, b) in enumerate(zip(ours, theirs)):
            g = torch.randn(a.shape)
            off = int(slots[i]) + (1 if step == 5 and i == 1 else 0)  # 4 bytes off: not 16-byte aligned
            a.grad = buf[off:off + g.numel()].view(g.shape)
            a.grad.copy_(g)
            b.grad = g.clone()
        with gpu_nn.backend(backend):
            o1.step()
        o2.step()
        assert max(_rel(a, b) for a, b in zip(ours, theirs)) <= _f32_tol(8), (name, step)
    momentum_first = name == "SGD" and kw.get("momentum")
    assert len(full) == (2 if momentum_first else 1), full
    assert len(rebuilt) >= 7 - len(full)  # a gradient column per moved step (step 5's part prepared)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device: the caching allocator's addresses are what this measures")
@pytest.mark.parametrize("name", ["Adam", "RMSprop", "SGD"])
def test_kept_plan_serves_a_cuda_training_loop(name, monkeypatch):
    """zero_grad(set_to_none=True), forward, backward, step: new gradient tensors every step,
    wherever the caching allocator puts them (on the H200 at 09f2311 at other addresses every
    step: the full path ran 10 times in 10 while plans were keyed by them); the kept plan serves
    every step after the first (SGD: the first two; at most three allowed)."""
    full = _count_full_steps(monkeypatch)
    m = _model(torch.float32, "cuda")
    x, y = _batch(torch.float32, "cuda")
    o = getattr(go, name)(m.parameters(), lr=0.01, **(dict(momentum=0.9) if name == "SGD" else {}))
    for _ in range(10):
        o.zero_grad()
        ((m(x) - y) ** 2).mean().backward()
        o.step()
    assert len(full) <= 3, f"the full step ran {len(full)} times in 10"


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_steps_captured_into_a_graph_keep_their_tables_and_no_plan(backend, device, monkeypatch, on_device):
    """While a CUDA graph is captured (simulated here: the capture test says yes), a step's
    chunk table is written only when the graph replays: it is not cached by address, not kept
    in a plan or a part, and it is kept alive for the graph; clipping's tables too. After the
    capture, plans work as before. Values against torch throughout."""
    from gpu_nn.optim import _triton
    from gpu_nn.optim import optimizers as optmod

    full = _count_full_steps(monkeypatch)
    capturing = [True]
    fake = lambda device: capturing[0]  # noqa: E731
    monkeypatch.setattr(_triton, "capturing", fake)
    monkeypatch.setattr(optmod, "_capturing", fake)
    torch.manual_seed(2)
    shapes = [(7, 5), (5,)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    o1, o2 = go.Adam(ours, lr=0.01), torch.optim.Adam(theirs, lr=0.01)
    pool = _GradPool(shapes, torch.float32)
    kept = len(_triton._GRAPH_TABLES)
    for step in range(6):
        capturing[0] = step < 3
        tables = dict(_triton._TABLES)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            g = torch.randn(a.shape)
            a.grad = pool.view(i, a.shape)
            a.grad.copy_(g)
            b.grad = g.clone()
        with gpu_nn.backend(backend):
            clip_grad_norm_(ours, 1.0)
            o1.step()
        torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        o2.step()
        assert max(_rel(a, b) for a, b in zip(ours, theirs)) <= _f32_tol(6)
        if step < 3:
            assert _triton._TABLES == tables  # nothing cached while capturing
            assert id(o1.param_groups[0]) not in o1._plans
            assert len(_triton._GRAPH_TABLES) == kept + 2 * (step + 1)  # the step's and clipping's
    assert len(_triton._GRAPH_TABLES) == kept + 6  # after the capture nothing more is kept
    assert len(full) == 4  # three captured steps, then one full step records the plan it reuses


def test_clipping_that_must_read_its_norm_refuses_a_capture_before_any_launch(monkeypatch):
    """``error_if_nonfinite=True`` reads the total norm on the host, which CUDA refuses while a
    stream is captured (and the refused read invalidates the capture, as torch's own clipping's
    does): during a capture (simulated: the capture test says yes) the Triton path refuses it
    with a KernelInputError before any kernel is launched, the gradients untouched; without the
    flag the captured clipping runs, and outside a capture the flag works as before."""
    from helpers import interpreted_launches

    from gpu_nn.optim import _triton

    capturing = [True]
    monkeypatch.setattr(_triton, "capturing", lambda device: capturing[0])
    torch.manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((7, 5), (5,))]
    for p in params:
        p.grad = torch.randn(p.shape) * 10
    before = [p.grad.clone() for p in params]
    with gpu_nn.backend("triton"), interpreted_launches("cpu") as launched:
        with pytest.raises(KernelInputError, match="error_if_nonfinite=True .* CUDA graph is being captured"):
            clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert launched == [] and all(torch.equal(p.grad, b) for p, b in zip(params, before))
    with gpu_nn.backend("triton"):
        captured = clip_grad_norm_(params, 1.0)
        capturing[0] = False
        for p, b in zip(params, before):
            p.grad.copy_(b)
        eager = clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert float(captured) == pytest.approx(float(eager)) and float(eager) > 1.0


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_tensor_betas_are_kept_and_read_at_every_step_as_torch(backend, device, name, monkeypatch):
    """Tensor betas stay tensors in param_groups and the state_dict (0-d, as torch's _to_scalar
    makes a [1] tensor) and each step reads them, so changing them in place (a beta schedule)
    takes effect as in torch; ours held floats made at construction and ignored the change (a
    user audit). During a CUDA graph capture (simulated) the step refuses them before doing
    anything: it reads them on the host."""
    from gpu_nn.optim import optimizers as optmod

    torch.manual_seed(4)
    dt = torch.float64 if backend == "reference" else torch.float32
    p0 = torch.randn(6, 5, dtype=dt)
    ours, theirs = torch.nn.Parameter(p0.to(device)), torch.nn.Parameter(p0.clone())
    b_ours = (torch.tensor(0.9, dtype=dt), torch.tensor([0.999], dtype=dt))
    b_theirs = (torch.tensor(0.9, dtype=dt), torch.tensor([0.999], dtype=dt))
    with gpu_nn.backend(backend):
        o1 = getattr(go, name)([ours], lr=0.01, betas=b_ours)
        o2 = getattr(torch.optim, name)([theirs], lr=0.01, betas=b_theirs)
        for step in range(4):
            g = torch.randn(6, 5, dtype=dt)
            ours.grad, theirs.grad = g.to(device), g.clone()
            o1.step()
            o2.step()
            tol = 1e-12 if dt == torch.float64 else _f32_tol(6)
            assert _rel(ours.detach().cpu(), theirs) <= tol, step
            for b in (*b_ours, *b_theirs):
                b.mul_(0.9)  # a schedule on both
        got, want = o1.param_groups[0]["betas"], o2.param_groups[0]["betas"]
        assert all(isinstance(b, torch.Tensor) and b.dim() == 0 for b in got)
        assert [float(b) for b in got] == [float(b) for b in want]
        assert all(isinstance(b, torch.Tensor) for b in o1.state_dict()["param_groups"][0]["betas"])
        monkeypatch.setattr(optmod, "_capturing", lambda device: True)
        before = ours.detach().clone()
        with pytest.raises(KernelInputError, match="tensor betas cannot be captured"):
            o1.step()
        assert torch.equal(ours.detach(), before)


@pytest.mark.parametrize("name,key", [("SGD", "momentum"), ("Adam", "eps"), ("RMSprop", "alpha"),
                                      ("Adagrad", "lr_decay"), ("Adadelta", "rho"), ("AdamW", "weight_decay")])
def test_tensor_hyperparameters_refused_in_a_capture_before_the_step(name, key, monkeypatch):
    """A tensor hyperparameter the step reads on the host (any but lr, which the kernels may read
    on the device) inside a CUDA graph capture: a KernelInputError naming it before the step
    touches anything, as for tensor betas (the host read raised CUDA's own error there, which
    also invalidates the capture); outside a capture it steps as torch's."""
    from gpu_nn.optim import optimizers as optmod

    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    kw = {key: torch.tensor(0.9 if key in ("momentum", "alpha", "rho") else 1e-3, dtype=torch.float64)}
    with gpu_nn.backend("reference"):
        opt = getattr(go, name)([p], lr=0.01, **kw)
        p.grad = torch.randn(4, 3, dtype=torch.float64)
        opt.step()
        monkeypatch.setattr(optmod, "_capturing", lambda device: True)
        before = p.detach().clone()
        with pytest.raises(KernelInputError, match=f"a tensor {key} cannot be captured"):
            opt.step()
        assert torch.equal(p.detach(), before) and opt.state[p]
        # what a step never reads is not refused: a scheduler's initial_lr (a tensor where lr is)
        optmod._refuse_captured_tensor_scalars([{"params": [p], "lr": torch.tensor(0.01),
                                                 "initial_lr": torch.tensor(0.01), "eps": 1e-8}])


def test_adagrad_sums_start_at_the_constructors_value_as_torch():
    """torch's Adagrad fills every sum with the constructor's initial_accumulator_value (its
    defaults'), also for a group that names its own or is added later; ours read the group's
    (a user audit). share_memory() as torch's: the sums shared."""
    res = []
    for mod in (torch.optim, go):
        a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
        o = mod.Adagrad([{"params": [a], "initial_accumulator_value": 1.0}], lr=1.0, initial_accumulator_value=0.5)
        o.add_param_group({"params": [b], "initial_accumulator_value": 2.0})
        if mod is torch.optim and not o.state[b]:
            # torch before 2.13 made the state in __init__ only (its step raised KeyError 'sum' on an
            # added group: the H200's 2.11); the oracle's state as 2.13 makes it, from its defaults
            o.state[b].update(step=torch.tensor(0.0), sum=torch.full_like(b, o.defaults["initial_accumulator_value"]))
        a.grad, b.grad = torch.ones(2), torch.ones(2)
        o.step()
        o.share_memory()
        assert o.state[a]["sum"].is_shared() and o.state[b]["sum"].is_shared()
        res.append((o.state[a]["sum"].clone(), o.state[b]["sum"].clone(), a.detach().clone(), b.detach().clone()))
    for x, y in zip(*res):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [go.SGD, go.Adagrad, go.Adadelta, go.RMSprop, go.Adam, go.AdamW])
def test_tensor_lr_steps_like_a_float_and_refuses_a_graph_capture(cls, monkeypatch):
    """A 1-element tensor lr (torch's way to vary it under CUDA graphs) steps as its value does,
    following changes to the tensor between steps; on the reference backend (CPU tensors under
    auto) the step reads it on the host, so during a CUDA graph capture (simulated: the capture
    test says yes) the step raises KernelInputError before any kernel runs (what it read would be
    fixed into the graph, and a CUDA tensor cannot be read on the host while capturing); a float
    lr is captured as before. The kernels' own reading on the device: the tests below."""
    from gpu_nn.optim import optimizers as optmod

    torch.manual_seed(3)
    kw = {"momentum": 0.9} if cls is go.SGD else {}
    ours = [torch.nn.Parameter(torch.randn(5, 3))]
    theirs = [torch.nn.Parameter(ours[0].detach().clone())]
    lr = torch.tensor(0.01)
    o1, o2 = cls(ours, lr=lr, **kw), getattr(torch.optim, cls.__name__)(theirs, lr=0.01, **kw)
    for step in range(3):
        g = torch.randn(5, 3)
        ours[0].grad, theirs[0].grad = g.clone(), g.clone()
        o1.step()
        o2.step()
        assert _rel(ours[0], theirs[0]) <= _f32_tol(6)
        lr.fill_(0.01 * (step + 2))  # a scheduler stepping the tensor
        o2.param_groups[0]["lr"] = 0.01 * (step + 2)
    monkeypatch.setattr(optmod, "_capturing", lambda device: True)
    before = ours[0].detach().clone()
    with pytest.raises(KernelInputError, match="tensor lr cannot be captured"):
        o1.step()
    assert torch.equal(ours[0].detach(), before)
    fresh = [torch.nn.Parameter(torch.randn(5, 3))]
    fresh[0].grad = torch.randn(5, 3)
    o3 = cls(fresh, lr=lr, **kw)
    made = {p: sorted(st) for p, st in o3.state.items()}  # (Adagrad makes its sum at construction, as torch's)
    with pytest.raises(KernelInputError, match="tensor lr cannot be captured"):
        o3.step()  # a first step: refused before any state is made (a graph would never fill it)
    assert {p: sorted(st) for p, st in o3.state.items()} == made
    o1.param_groups[0]["lr"] = 0.05
    o1.step()  # a float lr steps under the (simulated) capture
    assert not torch.equal(ours[0].detach(), before)


# -- tensor learning rate read on the device -----------------------------------------------
# A 1-element float32 tensor lr on the parameters' device is read by the kernels when they run
# (triton, cupy; the triton backend under the interpreter on the CPU): no host read, capturable,
# and an in-place change of the tensor reaches the next step. Everything else is read on the host.

LR_FACTORS = [1.0, 0.5, 0.5, 1.7, 0.3, 2.5]  # the lr of each step, times the config's: changed in place


def _f32(x: float) -> float:
    """``x`` rounded to float32, as a Python float: the value a float32 tensor lr of ``x`` holds."""
    return float(np.float32(x))


def _spy_host_reads(monkeypatch, watched) -> list:
    """A list that grows whenever a tensor of ``watched`` (a list, may grow) is read on the host
    through ``float()`` or ``.item()`` (what reading a tensor lr's value on the host takes)."""
    reads = []
    real_float, real_item = torch.Tensor.__float__, torch.Tensor.item

    def spy_float(self):
        if any(self is t for t in watched):
            reads.append("float")
        return real_float(self)

    def spy_item(self):
        if any(self is t for t in watched):
            reads.append("item")
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "__float__", spy_float)
    monkeypatch.setattr(torch.Tensor, "item", spy_item)
    return reads


def _state_of(opt, params):
    return [{k: v.detach().clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()} for p in params]


def _assert_same_run(a, b, sa, sb, what):
    for x, y in zip(a, b):
        assert torch.equal(x.detach(), y.detach()), f"{what}: parameters differ by {float((x - y).abs().max()):.3e}"
    for x, y in zip(sa, sb):
        assert set(x) == set(y), what
        for k in x:
            if torch.is_tensor(x[k]):
                assert torch.equal(x[k].cpu(), y[k].cpu()), f"{what}: state {k!r} differs"
            else:
                assert x[k] == y[k], f"{what}: state {k!r} differs"


def _tensor_lr_pair(backend, device, name, kw, dtype, monkeypatch, steps=len(LR_FACTORS), lr_device=None):
    """Two runs of optimizer ``name`` from the same start and gradients on ``backend``: one with a
    float32 tensor lr on ``lr_device`` (default ``device``, the parameters') that is changed in
    place (``fill_``) between steps, one with float lrs of the same values. Returns both
    (params, state) and the host reads of the tensor."""
    cls = getattr(go, name)
    base = kw.get("lr", cls.__init__.__defaults__[0])
    lrs = [_f32(base * f) for f in LR_FACTORS]
    torch.manual_seed(11)
    shapes = [(37, 29), (29,), (5, 3), (1,)]
    a = [torch.nn.Parameter(torch.randn(s).to(device=device, dtype=dtype)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    lr = torch.tensor(lrs[0], dtype=torch.float32, device=device if lr_device is None else lr_device)
    o1 = cls(a, **{**kw, "lr": lr})
    o2 = cls(b, **{**kw, "lr": lrs[0]})
    reads = _spy_host_reads(monkeypatch, [lr])
    with gpu_nn.backend(backend):
        for step in range(steps):
            if step:
                lr.fill_(lrs[step])  # a scheduler changing the tensor in place
                o2.param_groups[0]["lr"] = lrs[step]
            for x, y in zip(a, b):
                g = torch.randn(x.shape).to(device=device, dtype=dtype)
                x.grad, y.grad = g.clone(), g.clone()
            o1.step()
            o2.step()
    assert o1.param_groups[0]["lr"] is lr
    return (a, _state_of(o1, a)), (b, _state_of(o2, b)), reads


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton", "cupy")))
@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_tensor_lr_steps_exactly_as_its_float_value(backend, device, name, kw, monkeypatch):
    """A float32 tensor lr on the parameters' device, changed in place between steps, gives the
    very parameters and state of the float lr of the same values (a float32 lr widens exactly;
    the kernels keep the float path's float64 arithmetic), every optimizer and option. The kernel
    backends read it on the device (never on the host); the reference reads its value."""
    if backend == "cupy" and name not in ("Adam", "AdamW", "RMSprop"):
        pytest.skip("the cupy backend implements Adam/AdamW/RMSprop only")
    (a, sa), (b, sb), reads = _tensor_lr_pair(backend, device, name, kw, torch.float32, monkeypatch)
    _assert_same_run(a, b, sa, sb, f"{name} {kw} {backend}")
    if backend == "reference":
        assert len(reads) == len(LR_FACTORS)  # its value, once per step
    else:
        assert reads == [], f"{backend} read the tensor lr on the host: {reads}"


@pytest.mark.parametrize("backend,device", backend_params(("triton", "cupy")))
@pytest.mark.parametrize("name,kw", [CONFIGS[1], CONFIGS[4], CONFIGS[6], CONFIGS[8], CONFIGS[11], CONFIGS[14]],
                         ids=["SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "AdamW"])
def test_tensor_lr_half_params(backend, device, name, kw, monkeypatch):
    """float16 / bfloat16 parameters (float32 state) with a float32 tensor lr: as the float lr."""
    if backend == "cupy" and name not in ("Adam", "AdamW", "RMSprop"):
        pytest.skip("the cupy backend implements Adam/AdamW/RMSprop only")
    for dtype in KERNEL_DTYPES[1:]:
        (a, sa), (b, sb), reads = _tensor_lr_pair(backend, device, name, kw, dtype, monkeypatch, steps=3)
        _assert_same_run(a, b, sa, sb, f"{name} {dtype} {backend}")
        assert reads == []


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("name,kw", PLAN_OPTS, ids=[n for n, _ in PLAN_OPTS])
def test_kept_plan_follows_lr_between_floats_and_tensors(backend, device, name, kw, monkeypatch, on_device):
    """A kept plan serves every step while the group's lr goes from a float to a tensor, is
    changed in place, is replaced by another tensor, goes back to a float and to the first tensor
    again: each step uses the lr of that moment (exactly as a float-lr run of the same values),
    and the full step runs only where the plan is first made (SGD: and its first momentum step).
    The kernel backends never read the tensors on the host."""
    lr0 = kw["lr"]
    ta, tb = torch.tensor(0.0), torch.tensor(_f32(0.7 * lr0))
    # per step: (the group's new lr, or None to keep it; (tensor, value) to fill in place, or None)
    events = [(lr0, (ta, _f32(2 * lr0))), (None, None), (ta, None), (None, (ta, _f32(0.4 * lr0))), (tb, None),
              (lr0, None), (ta, (ta, _f32(1.3 * lr0))), (None, (ta, _f32(0.9 * lr0)))]
    held = {id(tb): _f32(0.7 * lr0)}  # each tensor's value as the schedule goes
    values, cur = [], None  # the lr each step sees
    for new, fill in events:
        if fill is not None:
            held[id(fill[0])] = fill[1]
        cur = cur if new is None else new
        values.append(held[id(cur)] if torch.is_tensor(cur) else cur)
    shapes = [(7, 5), (5,), (3, 7)]
    torch.manual_seed(6)
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in events]

    def run(schedule):
        ps = [torch.nn.Parameter(x.clone()) for x in start]
        o = getattr(go, name)(ps, **kw)
        pool = _GradPool(shapes, torch.float32)  # new gradient tensors at the same addresses
        out = []
        with gpu_nn.backend(backend):
            for (new, fill), gs in zip(schedule, grads):
                if fill is not None:
                    fill[0].fill_(fill[1])
                if new is not None:
                    o.param_groups[0]["lr"] = new
                for i, (p, g) in enumerate(zip(ps, gs)):
                    p.grad = pool.view(i, p.shape)
                    p.grad.copy_(g)
                o.step()
                out.append(([p.detach().clone() for p in ps], _state_of(o, ps)))
        return out

    floats = run([(v, None) for v in values])
    full = _count_full_steps(monkeypatch)
    reads = _spy_host_reads(monkeypatch, [ta, tb])
    tensors = run(events)
    for i, ((pa, sa), (pb, sb)) in enumerate(zip(tensors, floats)):
        _assert_same_run(pa, pb, sa, sb, f"{name} {backend} step {i} (lr {values[i]})")
    assert len(full) == (2 if name == "SGD" else 1)
    if backend == "reference":
        assert reads  # the reference takes the value
    else:
        assert reads == [], f"{backend} read a tensor lr on the host: {reads}"


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_capture_takes_a_tensor_lr_read_on_the_device_and_refuses_a_host_read(backend, device, monkeypatch,
                                                                              on_device):
    """During a CUDA graph capture (simulated: the capture test says yes) a float32 tensor lr on
    the parameters' device steps (the kernels read it; no host read), as its float value does;
    a float64 tensor lr, or the reference backend, would be read on the host: refused with
    KernelInputError before any state is made or kernel runs."""
    from gpu_nn.optim import optimizers as optmod

    monkeypatch.setattr(optmod, "_capturing", lambda device: True)
    torch.manual_seed(8)
    a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    lr = torch.tensor(_f32(0.03))
    o1, o2 = go.Adam(a, lr=lr, amsgrad=True), go.Adam(b, lr=_f32(0.03), amsgrad=True)
    reads = _spy_host_reads(monkeypatch, [lr])
    with gpu_nn.backend(backend):
        for step in range(2):
            for x, y in zip(a, b):
                g = torch.randn(x.shape)
                x.grad, y.grad = g.clone(), g.clone()
            o1.step()
            o2.step()
    _assert_same_run(a, b, _state_of(o1, a), _state_of(o2, b), "captured tensor lr")
    assert reads == []
    for lr_bad, be, why in ((torch.tensor(0.03, dtype=torch.float64), backend, "torch.float64"),
                            (torch.tensor(0.03), "reference", "backend reference")):
        fresh = [torch.nn.Parameter(torch.randn(5, 3))]
        fresh[0].grad = torch.randn(5, 3)
        before = fresh[0].detach().clone()
        o3 = go.Adam(fresh, lr=lr_bad)
        with gpu_nn.backend(be):
            with pytest.raises(KernelInputError, match="tensor lr cannot be captured") as err:
                o3.step()
        assert why in str(err.value)
        assert not o3.state[fresh[0]] and torch.equal(fresh[0].detach(), before)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device: captures a step into a real CUDA graph")
@pytest.mark.parametrize("backend", ["triton", "cupy"])
@pytest.mark.parametrize("name,kw", [CONFIGS[1], CONFIGS[4], CONFIGS[6], CONFIGS[8], CONFIGS[11], CONFIGS[14]],
                         ids=["SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "AdamW"])
def test_cuda_graph_replays_follow_a_tensor_lr(backend, name, kw):
    """One step captured into a torch.cuda.CUDAGraph with a CUDA float32 tensor lr, replayed
    with new gradients after ``lr.fill_`` each time (a scheduler): every replay gives the
    parameters and state of eager steps with float lrs of the same values."""
    ok, why = gpu_nn._backend.status(backend)
    if not ok:
        pytest.skip(f"{backend} backend unavailable: {why}")
    if backend == "cupy" and name not in ("Adam", "AdamW", "RMSprop"):
        pytest.skip("the cupy backend implements Adam/AdamW/RMSprop only")
    cls = getattr(go, name)
    base = kw.get("lr", cls.__init__.__defaults__[0])
    lrs = [_f32(base * f) for f in LR_FACTORS]
    torch.manual_seed(12)
    shapes = [(37, 29), (29,), (5, 3)]
    a = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p in a:
        p.grad = torch.zeros_like(p)  # the graph's gradients: refilled before each replay
    lr = torch.tensor(lrs[0], device="cuda")
    o1, o2 = cls(a, **{**kw, "lr": lr}), cls(b, **{**kw, "lr": lrs[0]})

    def grads():
        gs = [torch.randn(s, device="cuda") for s in shapes]
        for p, q, g in zip(a, b, gs):
            p.grad.copy_(g)
            q.grad = g.clone()

    with gpu_nn.backend(backend):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (state, compilation) outside the capture, as torch's docs do
            for _ in range(2):
                grads()
                o1.step()
                o2.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o1.step()
        for v in lrs[1:]:
            lr.fill_(v)
            o2.param_groups[0]["lr"] = v
            grads()
            graph.replay()
            o2.step()
    torch.cuda.synchronize()
    _assert_same_run(a, b, _state_of(o1, a), _state_of(o2, b), f"{name} {backend} replays")


@pytest.mark.parametrize("kind", ["adam", "rmsprop"])
def test_cupy_launch_passes_a_tensor_lr_by_address(kind, monkeypatch):
    """The cupy glue (no GPU needed: the launch is recorded): a float lr goes by value as a
    float64 to ``adam_step`` / ``rmsprop_step``; a tensor lr goes as the tensor (its address) to
    the ``*_lr_ptr`` entry point, every other argument the same."""
    from gpu_nn.kernels import cuda as kcuda
    from gpu_nn.optim import _cupy

    calls = []
    monkeypatch.setattr(kcuda, "launch", lambda mod, name, grid, block, args, device=0: calls.append((name, args)))
    hp = dict(lr=0.25, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=True, maximize=False,
              decoupled_weight_decay=True, alpha=0.99, momentum=0.5, centered=True)
    table = torch.zeros(3, 8, dtype=torch.int64)
    launch = _cupy.Launch(kind, table, 3, object(), 0, [])
    lr = torch.tensor(0.25)
    launch(hp)
    launch(dict(hp, lr=lr))
    (n1, a1), (n2, a2) = calls
    assert (n1, n2) == (f"{kind}_step", f"{kind}_step_lr_ptr")
    assert type(a1[1]) is np.float64 and a1[1] == 0.25 and a2[1] is lr
    assert a1[0] is a2[0] is table and all(type(x) is type(y) and x == y for x, y in zip(a1[2:], a2[2:]))


def test_cupy_launch_passes_gradscalers_scalars_by_address(monkeypatch):
    """The cupy glue (the launch recorded, no GPU): Adam's entry points take GradScaler's scale
    and found_inf last, as the tensors (their addresses), or null pointers without them; RMSprop
    (no fused form in torch) refuses them."""
    from gpu_nn.kernels import cuda as kcuda
    from gpu_nn.optim import _cupy

    calls = []
    monkeypatch.setattr(kcuda, "launch", lambda mod, name, grid, block, args, device=0: calls.append((name, args)))
    hp = dict(lr=0.25, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=True, maximize=False,
              decoupled_weight_decay=True, alpha=0.99, momentum=0.5, centered=True)
    table = torch.zeros(3, 8, dtype=torch.int64)
    scale, found = torch.tensor(8.0), torch.tensor(0.0)
    _cupy.Launch("adam", table, 3, object(), 0, [])(hp)
    _cupy.Launch("adam", table, 3, object(), 0, [])(dict(hp, grad_scale=scale, found_inf=found))
    (_, plain), (_, amp) = calls
    assert [type(a) for a in plain[-2:]] == [np.uint64, np.uint64] and plain[-2:] == (0, 0)
    assert amp[-2] is scale and amp[-1] is found and len(amp) == len(plain)
    with pytest.raises(KernelInputError, match="no fused RMSprop"):
        _cupy.Launch("rmsprop", table, 3, object(), 0, [])(dict(hp, grad_scale=scale, found_inf=found))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device: a CPU tensor lr for CUDA parameters")
@pytest.mark.parametrize("name,kw", [CONFIGS[1], CONFIGS[11]], ids=["SGD", "Adam"])
def test_cpu_tensor_lr_for_cuda_params_is_read_on_the_host(name, kw, monkeypatch):
    """A tensor lr on another device than the parameters (here the CPU) is read on the host at
    every step, as before (the kernels could not read it), and steps as its float value."""
    (a, sa), (b, sb), reads = _tensor_lr_pair("auto", "cuda", name, kw, torch.float32, monkeypatch, lr_device="cpu")
    _assert_same_run(a, b, sa, sb, f"{name} CPU lr")
    assert len(reads) == len(LR_FACTORS)


def test_chunk_rows_are_the_row_at_a_time_table():
    """optim/_triton.chunk_rows (NumPy) builds exactly the table the kernels read: per tensor with
    elements one row per chunk, in order, its offsets, the chunk's start, its numel and flag; empty
    tensors none; the column count the kernels' (NCOL); without flags the CuPy kernels' 8 columns."""
    from gpu_nn.optim import _triton as glue

    rng = np.random.default_rng(3)
    for chunk in (1, 7, 512, 4096):
        for _ in range(20):
            t = int(rng.integers(1, 9))
            numels = [int(v) for v in rng.integers(0, 3 * chunk + 5, t)]
            numels[int(rng.integers(0, t))] = 0  # an empty tensor among them
            cols = [[int(v) for v in rng.integers(-10**9, 10**9, t)] for _ in range(6)]
            flags = [bool(v) for v in rng.integers(0, 2, t)]
            want = [[cols[0][i], cols[1][i], cols[2][i], cols[3][i], cols[4][i], cols[5][i], start, n, int(flags[i])]
                    for i, n in enumerate(numels) for start in range(0, n, chunk)]
            got = glue.chunk_rows(cols, numels, flags, chunk)
            assert got.dtype == np.int64 and got.shape == (len(want), glue.NCOL)
            assert got.tolist() == want
            # the CuPy kernels' table: no flag column
            assert glue.chunk_rows(cols, numels, None, chunk).tolist() == [r[:-1] for r in want]
    assert glue.chunk_rows([[]] * 6, [], [], 8).shape == (0, glue.NCOL)
    if importlib.util.find_spec("triton") is not None:
        from gpu_nn.kernels.triton import optim as kt

        assert glue.NCOL == kt.NCOL


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_an_empty_first_parameter_measures_the_table_from_the_next(backend, device, on_device):
    """A part whose first parameter (and gradient, and state) is empty: an empty tensor may have
    no address, the table's offsets are measured from the first tensor that has one, and the
    kernels' bases are that tensor (they were the first tensor: the kernels read near address 0,
    a crash). Adam, SGD with momentum and clip_grad_norm_ against torch, three steps."""
    for name, kw in (("Adam", dict(lr=0.1)), ("SGD", dict(lr=0.1, momentum=0.9))):
        torch.manual_seed(2)
        shapes = [(0,), (300,), (7,)]
        ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
        o1, o2 = getattr(go, name)(ours, **kw), getattr(torch.optim, name)(theirs, **kw)
        for step in range(3):
            for a, b in zip(ours, theirs):
                g = torch.randn(a.shape)
                a.grad, b.grad = g.clone(), g.clone()
            with gpu_nn.backend(backend):
                n1 = clip_grad_norm_(ours, 1.0)
                o1.step()
            n2 = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
            o2.step()
            assert abs(float(n1) - float(n2)) <= 1e-5 * float(n2), (name, step)
            assert max(_rel(a, b) for a, b in zip(ours[1:], theirs[1:])) <= _f32_tol(8), (name, step)


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_kept_launch_refuses_gradients_shifted_off_alignment_together(backend, device, monkeypatch, on_device):
    """Every gradient moved by the same 4 bytes (their offsets from one another unchanged, the
    first no longer 16-byte aligned, as the kernels' vector loads need): the kept launch does
    not take them as they are; the part is prepared again (staged), values as torch's."""
    from gpu_nn.optim import _dispatch as disp

    prepared = []
    real = disp._prepare
    monkeypatch.setattr(disp, "_prepare", lambda *a: prepared.append(1) or real(*a))
    torch.manual_seed(3)
    shapes = [(8, 4), (16,)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    o1, o2 = go.Adam(ours, lr=0.05), torch.optim.Adam(theirs, lr=0.05)
    buf = torch.empty(256)
    for step in range(4):
        shift = 1 if step >= 2 else 0  # one float32 element: 4 bytes
        offs = [shift, 64 + shift]
        for i, (a, b) in enumerate(zip(ours, theirs)):
            g = torch.randn(a.shape)
            a.grad = buf[offs[i]:offs[i] + g.numel()].view(g.shape)
            a.grad.copy_(g)
            b.grad = g.clone()
        with gpu_nn.backend(backend):
            o1.step()
        o2.step()
        assert max(_rel(a, b) for a, b in zip(ours, theirs)) <= _f32_tol(4), step
    assert len(prepared) == 3, prepared  # step 0, then steps 2 and 3 (staged launches are never kept)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "Adagrad"])
def test_optimizers_stepping_in_threads_equal_one_thread(name):
    """Threads stepping their own optimizers at once get what each gets alone (reference
    backend, parameters of several of its blocks): the reference's scratch vectors were one set
    for the process, and NumPy releases the GIL inside its loops, so concurrent Adam steps
    overwrote each other's temporaries (NaN parameters; a concurrency audit)."""
    import threading

    n, steps = 3 * (1 << 15) + 7, 12

    def train(seed, out):
        gen = torch.Generator().manual_seed(seed)
        p = torch.nn.Parameter(torch.randn(n, generator=gen))
        opt = getattr(go, name)([p], lr=1e-2)
        grads = [torch.randn(n, generator=gen) for _ in range(steps)]
        start.wait()
        for g in grads:
            p.grad = g
            opt.step()
        out[seed] = p.detach().clone()

    alone, together = {}, {}
    start = threading.Barrier(1)
    for seed in range(4):
        train(seed, alone)
    start = threading.Barrier(4)
    threads = [threading.Thread(target=train, args=(seed, together)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed in range(4):
        torch.testing.assert_close(together[seed], alone[seed], rtol=0, atol=0)


COMPILED_STEPS = [("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, maximize=True)),
                  ("Adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.1)),
                  ("Adadelta", dict(weight_decay=0.1)), ("RMSprop", dict(lr=0.01, centered=True, momentum=0.5)),
                  ("Adam", dict(lr=0.01, amsgrad=True)), ("AdamW", dict(lr=0.01, fused=True))]


def test_compiled_step_compiles_the_closure_and_survives_unpickling(tmp_path):
    """The step is opaque to torch.compile but for its closure (the user's forward, compiled as
    with torch's optimizers: the opaque region took it along, 0 frames compiled), and an
    optimizer unpickled in a new process is opaque too (only the constructor made the step
    opaque: a loaded RMSprop centered raised under torch.compile again; a review's finds)."""
    from helpers import run_uninterpreted
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    m = torch.nn.Linear(8, 8)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt = go.SGD(m.parameters(), lr=0.1)
    x = torch.randn(4, 8)
    counter = CompileCounter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = torch.compile(lambda: opt.step(lambda: (m(x) ** 2).sum()), backend=counter)()
    torch._dynamo.reset()
    assert counter.frame_count == 1 and counter.op_count >= 3
    torch.testing.assert_close(loss, (m(x) ** 2).sum())
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    p.grad = torch.randn(4, 3, dtype=torch.float64)
    saved = go.RMSprop([p], lr=0.01, centered=True, momentum=0.9)
    saved.step()
    torch.save({"opt": saved, "p": p}, tmp_path / "opt.pt")
    code = (
        "import warnings, torch, gpu_nn\n"
        "import gpu_nn.optim.optimizers as oo\n"
        f"d = torch.load({str(tmp_path / 'opt.pt')!r}, weights_only=False)\n"
        "assert oo._opaque_step is not oo._step_of\n"
        "d['p'].grad = torch.ones(4, 3, dtype=torch.float64)\n"
        "warnings.simplefilter('ignore')\n"
        "torch.compile(d['opt'].step, backend='eager')()\n"
        "print('ok')\n")
    # a process of its own that never constructed an optimizer: forked from the uninterpreted
    # server (torch and gpu-nn imported: about 3.4 s a fresh Python spent on them)
    out = run_uninterpreted(["-c", code], timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.mark.parametrize("name,kw", COMPILED_STEPS, ids=[n for n, _ in COMPILED_STEPS])
def test_compiled_step_equals_eager(name, kw):
    """torch.compile(optimizer.step) on the reference backend steps as the eager step, bit for
    bit, as torch's optimizers compile: Dynamo traced the reference's NumPy code through its
    own NumPy emulation, which refused RMSprop centered's masked copy (the compiled step
    raised; a compile-contract audit), and behind one graph break: Dynamo traced the step's
    Python planning with a break at every host read (19 reasons for Adam: the compiled step ran
    1.4x slower than the eager one). The step is opaque to the compiler now: one break, there."""
    from torch._dynamo.utils import counters

    def run(compiled):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        ps = [torch.randn(4, 3, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64,
                                                                                    requires_grad=True)]
        opt = getattr(go, name)(ps, **kw)
        step = torch.compile(opt.step, backend="eager") if compiled else opt.step
        for i in range(3):
            for p in ps:
                p.grad = torch.sin(p.detach() * (i + 1))
            step()
        return ps, opt.state_dict()["state"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Dynamo's note that it drops the step's record_function
        (got, got_state), (want, want_state) = run(True), run(False)
        run(True)
        breaks = list(counters["graph_break"])  # (each reason once)
        assert len(breaks) <= 1 and all("torch.compiler.disable" in b for b in breaks), breaks
    torch._dynamo.reset()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for k in want_state:
        for key, v in want_state[k].items():
            torch.testing.assert_close(got_state[k][key], v, rtol=0, atol=0)


_OVERLAP = "more than one element of the written-to tensor refers to a single memory location"


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton", "cupy")))
@pytest.mark.parametrize("name", ("SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "AdamW"))
def test_an_expanded_parameter_is_refused_as_torch(backend, device, name):
    """A parameter made by expand() (stride 0 over 4 rows: every row one memory location): torch's
    in-place update refuses it; ours wrote each row's update to the same place, the last one
    winning (a fuzz's leftover of stop 69). torch's error, before the parameter or any state is
    touched; an expanded gradient is still taken (torch reads it only)."""
    def param():
        p = torch.nn.Parameter(torch.arange(3.0, device=device).reshape(1, 3).expand(4, 3))
        p.grad = torch.ones(4, 3, device=device)
        return p

    with pytest.raises(RuntimeError) as want:
        getattr(torch.optim, name)([param()], lr=0.1).step()
    p = param()
    opt = getattr(go, name)([p], lr=0.1)
    with gpu_nn.backend(backend), pytest.raises(KernelInputError) as got:
        opt.step()
    assert _OVERLAP in str(want.value) and str(got.value) == str(want.value)
    assert torch.equal(p.detach().cpu(), torch.arange(3.0).expand(4, 3))
    # no state made by the step (Adagrad's, made by its constructor as torch's, not stepped)
    assert all(float(s["step"]) == 0 and not s["sum"].any() for s in opt.state.values()) if name == "Adagrad" else not opt.state

    q = torch.nn.Parameter(torch.zeros(4, 3, device=device))
    q.grad = torch.arange(3.0, device=device).reshape(1, 3).expand(4, 3)
    with gpu_nn.backend(backend):
        opt = getattr(go, name)([q], lr=0.1)
        opt.step()
    assert torch.isfinite(q).all() and torch.equal(q[0], q[3])

    # an expanded state tensor (a loaded state_dict's: .to() keeps it as it is): torch's update
    # refuses it; ours stepped through it (the last write winning) or failed late on Triton
    for k, v in list(opt.state[q].items()):
        if torch.is_tensor(v) and v.dim():
            opt.state[q][k] = v[:1].expand(4, 3)
    if any(torch.is_tensor(v) and v.dim() for v in opt.state[q].values()):
        with gpu_nn.backend(backend), pytest.raises(KernelInputError, match=_OVERLAP):
            opt.step()


def _clip_refused_as_torch(params, backend, *args):
    """clip_grad_norm_(params(), *args) refused by torch and by ours on ``backend`` with the same
    words (ours a KernelInputError); returns our parameters, for what the refusal left."""
    with pytest.raises(RuntimeError) as want:
        torch.nn.utils.clip_grad_norm_(params(), *args)
    ours = params()
    with gpu_nn.backend(backend), pytest.raises(KernelInputError) as got:
        clip_grad_norm_(ours, *args)
    assert str(got.value) == str(want.value)
    return ours


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_clip_grad_norm_refuses_an_expanded_gradient_as_torch(backend, device):
    """An expanded gradient (stride 0 over 4 rows): torch's in-place scaling refuses it; ours
    scaled the shared row (on the Triton path each program read-modify-writing the same memory).
    torch's error, every gradient left as it was."""
    def params():
        p, q = torch.nn.Parameter(torch.zeros(4, 3, device=device)), torch.nn.Parameter(torch.zeros(2, device=device))
        p.grad = torch.full((1, 3), 5.0, device=device).expand(4, 3)
        q.grad = torch.full((2,), 5.0, device=device)
        return [q, p]

    ours = _clip_refused_as_torch(params, backend, 1.0)
    assert torch.equal(ours[0].grad.cpu(), torch.full((2,), 5.0)) and torch.equal(ours[1].grad.cpu(), torch.full((4, 3), 5.0))


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("dtype", (torch.int64, torch.int32, torch.uint8, torch.bool))
def test_clip_grad_norm_refuses_integer_gradients_as_torch(backend, device, dtype):
    """An integer or bool gradient: torch's norm refuses its dtype; ours wrote zeros into it and
    then failed making the total with NumPy's TypeError (an optimizer fuzz). torch's error now,
    before any gradient is touched."""
    def params():
        p = torch.nn.Parameter(torch.zeros(2, device=device))
        p.grad = torch.full((2,), 5.0, device=device)
        q = torch.zeros(3, dtype=dtype, device=device)
        q.grad = torch.tensor([3, 4, 12], device=device).to(dtype)
        return [p, q]

    ours = _clip_refused_as_torch(params, backend, 1.0)
    assert torch.equal(ours[0].grad.cpu(), torch.full((2,), 5.0))
    assert torch.equal(ours[1].grad.cpu(), torch.tensor([3, 4, 12]).to(dtype))


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("norm_type", (-1.0, -0.5))
def test_clip_grad_norm_negative_norm_of_an_empty_gradient_refused_as_torch(backend, device, norm_type):
    """A negative norm_type over an empty gradient: a sum of negative powers has no identity, and
    torch refuses it; ours returned 0 and left the gradients unclipped (an optimizer fuzz)."""
    def params():
        p, q = torch.nn.Parameter(torch.zeros(2, device=device)), torch.nn.Parameter(torch.zeros(0, device=device))
        p.grad, q.grad = torch.tensor([3.0, 4.0], device=device), torch.zeros(0, device=device)
        return [p, q]

    ours = _clip_refused_as_torch(params, backend, 1.0, norm_type)
    assert torch.equal(ours[0].grad.cpu(), torch.tensor([3.0, 4.0]))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_clip_grad_norm_of_meta_gradients_as_torch(dtype):
    """Meta gradients (a model built on the meta device): torch returns a meta 0-d total of the
    gradients' dtype, bumps their versions, and refuses error_if_nonfinite (it reads the total);
    ours raised NotImplementedError from the reference's host copy."""
    def params():
        p = torch.zeros(2, 3, device="meta", dtype=dtype, requires_grad=True)
        p.grad = torch.zeros(2, 3, device="meta", dtype=dtype)
        return [p]

    a, b = params(), params()
    want = torch.nn.utils.clip_grad_norm_(a, 1.0)
    got = clip_grad_norm_(b, 1.0)
    assert (got.device, got.dtype, got.shape) == (want.device, want.dtype, want.shape)
    assert b[0].grad._version == a[0].grad._version
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_norm_(params(), 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as ours:
        clip_grad_norm_(params(), 1.0, error_if_nonfinite=True)
    assert str(ours.value) == str(theirs.value)


def test_clip_grad_norm_empty_generator_warning_points_at_the_caller():
    """The empty-generator warning is attributed to the caller's line, as torch's (its stacklevel
    counted torch.no_grad's wrapper as the caller: filterwarnings(module=...) missed it)."""
    for clip in (torch.nn.utils.clip_grad_norm_, clip_grad_norm_):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            clip((p for p in []), 1.0)
        assert [w.filename for w in caught] == [__file__], clip


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_kept_plan_refuses_a_parameter_reshaped_at_its_address(backend, device):
    """p.data swapped for a reshaped view at the same address, its gradient keeping the old
    shape: torch's step refuses the broadcast; a kept plan keyed on the address alone stepped it
    quietly (an optimizer fuzz). The plan's key holds the parameter's shape: torch's error."""
    def run(mod):
        p = torch.nn.Parameter(torch.zeros(2, 2, device=device))
        opt = mod.SGD([p], lr=1.0)
        p.grad = torch.zeros(2, 2, device=device)
        opt.step()
        p.grad = torch.ones(2, 2, device=device)
        p.data = p.data.view(4)
        opt.step()

    with pytest.raises(RuntimeError) as want:
        run(torch.optim)
    with gpu_nn.backend(backend), pytest.raises(KernelInputError) as got:
        run(go)
    assert str(got.value) == str(want.value)


class _Wrapped(torch.Tensor):
    """A ``__torch_dispatch__`` wrapper subclass (as DTensor and FSDP2's parameters are): every
    op runs on the wrapped tensor ``elem``; no storage of its own for NumPy or a kernel to read."""

    @staticmethod
    def __new__(cls, elem):
        r = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(), dtype=elem.dtype,
                                                device=elem.device, requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_map

        def un(t):
            return t.elem if isinstance(t, _Wrapped) else t

        def wrap(t):
            return _Wrapped(t) if isinstance(t, torch.Tensor) and not isinstance(t, _Wrapped) else t

        return tree_map(wrap, func(*tree_map(un, args), **tree_map(un, kwargs or {})))


_SUBCLASS_CASES = [("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)), ("SGD", dict(lr=0.1, weight_decay=0.1)),
                   ("Adam", dict(lr=0.1, amsgrad=True, weight_decay=0.1)), ("AdamW", dict(lr=0.1, maximize=True)),
                   ("Adagrad", dict(lr=0.1, lr_decay=0.01)), ("Adadelta", dict(lr=0.5, weight_decay=0.1)),
                   ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True))]


@pytest.mark.parametrize("dtype", (torch.float64, torch.bfloat16), ids=["f64", "bf16"])
@pytest.mark.parametrize("backend", ("reference", "triton"))
@pytest.mark.parametrize("name,kw", _SUBCLASS_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(_SUBCLASS_CASES)])
def test_wrapper_subclass_parameters_step_as_torchs(backend, name, kw, dtype):
    """Parameters and gradients of a ``__torch_dispatch__`` wrapper subclass (DTensor's kind):
    torch's step runs its in-place ops through the subclass; ours failed (".numpy() is not
    supported for tensor subclasses" on the reference, an invalid storage on Triton). Now torch's
    own functional step runs on them, into our state: the parameters and state as torch's over
    three steps, bit for bit, on any backend (a mode fuzz). bfloat16: torch keeps the state in
    the parameter's dtype, ours in float32 (the step runs on copies in torch's dtype: a review
    found Adam's lerp refusing our float32 state)."""
    got = []
    for lib in (torch.optim, go):
        torch.manual_seed(0)
        p = _Wrapped(torch.randn(5, dtype=dtype)).requires_grad_()
        opt = getattr(lib, name)([p], **kw)
        with gpu_nn.backend(backend):
            for _ in range(3):
                p.grad = _Wrapped(torch.randn(5, dtype=dtype))
                opt.step()
        state = {k: (v.elem if isinstance(v, _Wrapped) else v).clone() for k, v in opt.state[p].items()
                 if torch.is_tensor(v)}
        got.append((p.elem.clone(), state))
    torch.testing.assert_close(got[1][0], got[0][0], rtol=0, atol=0)
    assert set(got[1][1]) == set(got[0][1])
    for k, v in got[0][1].items():
        torch.testing.assert_close(got[1][1][k].to(v.dtype), v, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ("reference", "triton"))
def test_clip_grad_norm_of_wrapper_subclass_gradients_as_torch(backend):
    """Gradients of a wrapper subclass: torch's clipping runs through it; ours failed in the host
    copy (reference) or the kernel's launch (Triton). Now torch's clipping: its total and scaled
    gradients."""
    out = []
    for clip in (torch.nn.utils.clip_grad_norm_, clip_grad_norm_):
        p = _Wrapped(torch.ones(3)).requires_grad_()
        p.grad = _Wrapped(torch.full((3,), 2.0))
        with gpu_nn.backend(backend):
            total = clip([p], 1.0)
        out.append((getattr(total, "elem", total), p.grad.elem.clone()))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=0, atol=0)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=["f32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_steps_and_clipping_under_fake_tensor_mode_as_torchs(name, dtype):
    """Under FakeTensorMode (tracing, memory estimates): torch's step and clipping run on the fake
    tensors; ours failed (".numpy() is not supported for tensor subclasses"). Now torch's: the
    same state keys and shapes, fake results (bfloat16: our state in float32, as ours keeps it)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    got = []
    for lib, clip in ((torch.optim, torch.nn.utils.clip_grad_norm_), (go, clip_grad_norm_)):
        with FakeTensorMode():
            p = torch.randn(3, 4, requires_grad=True, dtype=dtype)
            p.grad = torch.randn(3, 4, dtype=dtype)
            total = clip([p], 1.0)
            opt = getattr(lib, name)([p], **_kw(name))
            opt.step()
            opt.step()
        assert isinstance(total, FakeTensor) and isinstance(p, FakeTensor)
        got.append({k: v.shape for k, v in opt.state[p].items() if torch.is_tensor(v) and k != "step"})
    assert got[1] == got[0]


def test_which_tensors_take_torchs_step():
    """optim._dispatch.needs_torch: nn.Parameter, its plain subclasses and plain tensors are ours
    (whatever torch-function mode is active: a review found a Parameter subclass sent to torch's
    step inside ``torch.device(...)``); a wrapper subclass, an ``as_subclass`` view and any
    tensor under a dispatch mode are torch's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gpu_nn.optim._dispatch import needs_torch

    class MyParam(torch.nn.Parameter):
        pass

    class Sub(torch.Tensor):
        pass

    mine = [torch.ones(2), torch.nn.Parameter(torch.ones(2)), MyParam(torch.ones(2))]
    assert not needs_torch(mine, [torch.ones(2)])
    with torch.device("cpu"):
        assert not needs_torch(mine, [])
    assert needs_torch([_Wrapped(torch.ones(2))], [])
    assert needs_torch([torch.nn.Parameter(torch.ones(2))], [torch.ones(2).as_subclass(Sub)])
    with FakeTensorMode():
        assert needs_torch(mine, [])


@pytest.mark.parametrize("backend", ("reference", "triton"))
@pytest.mark.parametrize("name", NAMES)
def test_inference_tensors_refused_outside_inference_mode_as_torch(backend, name):
    """Parameters made under torch.inference_mode, stepped (or their gradients clipped) outside
    it: torch refuses the in-place update; ours wrote through (NumPy views, kernels) and changed
    them (a mode fuzz). torch's words, nothing written; inside inference mode both step, and a
    later step outside is refused again (the kept plan does not skip the check)."""
    def param():
        with torch.inference_mode():
            p = torch.ones(3)
            p.grad = torch.full((3,), 2.0)
        return p

    with pytest.raises(RuntimeError) as want:
        getattr(torch.optim, name)([param()], **_kw(name)).step()
    p = param()
    opt = getattr(go, name)([p], **_kw(name))
    with gpu_nn.backend(backend):
        with pytest.raises(KernelInputError) as got:
            opt.step()
        assert str(got.value) == str(want.value) and "inference tensor" in str(got.value)
        assert torch.equal(p, torch.ones(3))
        with pytest.raises(KernelInputError, match="inference tensor"):
            clip_grad_norm_([p], 1.0)
        assert torch.equal(p.grad, torch.full((3,), 2.0))
        with torch.inference_mode():
            opt.step()
            opt.step()
        assert not torch.equal(p, torch.ones(3))
        moved = p.clone()
        with pytest.raises(KernelInputError, match="inference tensor"):
            opt.step()
    assert torch.equal(p, moved)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton", "cupy")))
@pytest.mark.parametrize("name", ("Adam", "AdamW"))
def test_first_moment_is_the_gradient_exactly_at_beta1_zero(backend, device, name):
    """torch's exp_avg.lerp_(grad, 1 - beta1) is exact at weight 1 (its two-sided formula takes
    ``grad - (grad - m) * 0`` there): with beta1 = 0 the first moment after a step is the
    gradient itself, bit for bit, whatever it was before. The mutation audit found the
    one-sided ``m + w (g - m)`` (off by rounding where |m| dwarfs |g|) passing every optimizer
    test, their tolerances being wider than its ulps."""
    p = torch.nn.Parameter(torch.zeros(1000, device=device))
    opt = getattr(go, name)([p], lr=1e-3, betas=(0.0, 0.999))
    g = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    with gpu_nn.backend(backend):
        for scale in (1e4, 1e-3):
            p.grad = (g * scale).to(device)
            g = g.roll(1)
            opt.step()
    assert torch.equal(opt.state[p]["exp_avg"].cpu(), p.grad.cpu())
