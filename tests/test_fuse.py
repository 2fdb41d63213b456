"""gpu_nn.fuse: convolution / linear -> activation pairs fused into one of our layers, the
model's function and gradients unchanged, the model itself untouched, parameters shared."""

import collections

import numpy as np
import pytest
import torch

import gpu_nn
import gpu_nn.functional as GF
from gpu_nn import _backend, demo

from helpers import assert_close, backend_params


class Mixed(torch.nn.Module):
    """torch's layers, ours, and each form of activation: a function, a method, our functional,
    torch's module."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv1d(3, 4, 3, padding=1)
        self.l1 = torch.nn.Linear(4 * 7, 5)
        self.l2 = gpu_nn.nn.Linear(5, 6)
        self.c2 = torch.nn.Conv2d(2, 3, 3)
        self.act = torch.nn.Tanh()

    def forward(self, x, z):
        a = torch.relu(self.c1(x)).flatten(1)
        a = GF.tanh(self.l2(self.l1(a).sigmoid()))
        b = self.act(self.c2(z))
        return a, b.flatten(1)


class MyConv(torch.nn.Conv2d):
    """A subclass with code of its own: never fused."""

    def forward(self, x):
        return super().forward(x) * 2


class Unfusable(torch.nn.Module):
    """Pairs fuse must leave alone."""

    def __init__(self):
        super().__init__()
        self.res = torch.nn.Conv2d(2, 2, 3, padding=1)  # its output used twice
        self.hooked = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.hooked.register_forward_hook(lambda m, i, o: o - 1.0)  # the hook sees (and changes) the output
        self.reflect = torch.nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
        self.pre = gpu_nn.nn.Linear(50, 4, activation="relu")  # already fused
        self.mine = MyConv(2, 2, 3, padding=1)
        self.leaky = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.before_hooked_act = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.hooked_act = torch.nn.Sigmoid()
        self.hooked_act.register_forward_hook(lambda m, i, o: o + 1.0)
        self.relu = torch.nn.ReLU()

    def forward(self, x):
        y = self.res(x)
        y = self.relu(y) + y
        y = torch.relu(self.hooked(y))
        y = torch.relu(self.reflect(y))
        y = torch.relu(self.mine(y))
        y = torch.nn.functional.leaky_relu(self.leaky(y))  # not an activation we fuse
        y = self.hooked_act(self.before_hooked_act(y))
        return torch.sigmoid(self.pre(y.flatten(1)))


class Shared(torch.nn.Module):
    """One layer called twice, once followed by an activation: left alone (a fused copy beside
    it would give the state_dict a second name for its parameters)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return torch.sigmoid(self.conv(x)) + self.conv(x)


def _inputs(name, rng, dtype, device):
    def r(*s):
        return torch.from_numpy(rng.standard_normal(s)).to(device, dtype)
    return {"cnn": lambda: (r(3, 1, 8, 8),), "mixed": lambda: (r(2, 3, 7), r(2, 2, 6, 6)),
            "unfusable": lambda: (r(2, 2, 5, 5),), "shared": lambda: (r(2, 2, 5, 5),)}[name]()


def _model(name):
    torch.manual_seed(0)
    return {"cnn": lambda: demo.build("cnn", gpu_nn.nn), "mixed": Mixed, "unfusable": Unfusable,
            "shared": Shared}[name]()


# per model: the fused layers and their activations; the modules the fused graph no longer calls
FUSED = {
    "cnn": ({"conv1": "relu", "conv2": "relu", "fc1": "relu"}, {"relu1", "relu2", "relu3"}),
    "mixed": ({"c1": "relu", "l1": "sigmoid", "l2": "tanh", "c2": "tanh"}, {"act"}),
    "unfusable": ({}, set()),
    "shared": ({}, set()),
}


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def _called(gm):
    return collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))  # conv and linear: no cupy
@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_model_computes_the_models_function_and_gradients(name, backend, device, rng):
    # float64 on the reference; our GPU kernels compute in float32
    dtype = torch.float64 if backend == "reference" else torch.float32
    model = _model(name).to(device, dtype)
    before = {k: type(m) for k, m in model.named_modules()}
    fused = gpu_nn.fuse(model)
    want, gone = FUSED[name]

    called = _called(fused)
    for target, act in want.items():
        layer = fused.get_submodule(target)
        assert type(layer).__module__.startswith("gpu_nn.nn") and layer.activation == act, (target, layer)
        assert called[target] == 1
    assert not gone & set(called), called
    acts = {n.target for n in fused.graph.nodes if n.op == "call_module"
            and isinstance(fused.get_submodule(n.target), (torch.nn.ReLU, torch.nn.Sigmoid, torch.nn.Tanh))}
    assert acts == ({"relu", "hooked_act"} if name == "unfusable" else set()), acts
    if name == "shared":
        assert called == {"conv": 2}
    # the model is as it was: the same classes, no activation set on its layers
    assert {k: type(m) for k, m in model.named_modules()} == before
    assert all(getattr(m, "activation", None) is None for k, m in model.named_modules() if k != "pre")
    # parameters shared, state_dict keys the model's (in the order of the calls)
    assert sorted(fused.state_dict()) == sorted(model.state_dict())
    for k, p in fused.named_parameters():
        assert p is model.get_parameter(k)

    xs = _inputs(name, rng, dtype, device)
    with gpu_nn.backend(backend):
        got = _outputs(fused(*xs))
        gp = torch.autograd.grad(sum(o.square().sum() for o in got), list(model.parameters()), allow_unused=True)
        exp = _outputs(model(*xs))
        ep = torch.autograd.grad(sum(o.square().sum() for o in exp), list(model.parameters()), allow_unused=True)
    for i, (g, e) in enumerate(zip(got, exp)):
        assert_close(g, e, dtype, k=64, what=f"output {i}")
    for (k, _), g, e in zip(model.named_parameters(), gp, ep):
        assert (g is None) == (e is None), k
        if e is not None:
            assert_close(g, e, dtype, k=256, what=f"grad {k}")


def test_fused_layers_launch_fewer_kernels():
    """Under the Triton interpreter: the demo CNN's forward launches one kernel fewer per fused
    pair (its three activations ride in the convolutions' and linear's epilogues)."""
    if torch.cuda.is_available() or not _backend.interpret_mode():
        pytest.skip("counts launches through the Triton interpreter")
    from triton.runtime.interpreter import InterpretedFunction

    model = _model("cnn")
    x = torch.randn(2, 1, 8, 8)
    launches = [0]
    orig = InterpretedFunction.run

    def run(self, *a, **k):
        launches[0] += 1
        return orig(self, *a, **k)

    counts = []
    InterpretedFunction.run = run
    try:
        with gpu_nn.backend("triton"), torch.no_grad():
            for m in (model, gpu_nn.fuse(model)):
                m(x)  # plans and first use
                n0 = launches[0]
                m(x)
                counts.append(launches[0] - n0)
    finally:
        InterpretedFunction.run = orig
    assert counts[1] == counts[0] - 3, counts


def test_trains_the_models_parameters():
    """An optimizer built on the model's parameters trains the fused graph's."""
    model = _model("cnn")
    fused = gpu_nn.fuse(model)
    opt = gpu_nn.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 9, 1])
    with gpu_nn.backend("reference"):
        w0 = model.conv1.weight.detach().clone()
        gpu_nn.nn.CrossEntropyLoss()(fused(x), y).backward()
        assert model.conv1.weight.grad is not None and model.fc2.bias.grad is not None
        opt.step()
        assert not torch.equal(model.conv1.weight, w0)
        np.testing.assert_array_equal(fused(x).detach().numpy(), model(x).detach().numpy())


def test_refusals():
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        gpu_nn.fuse(lambda x: x)

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)

        def forward(self, x):
            return torch.relu(self.fc(x)) if x.sum() > 0 else x

    with pytest.raises(torch.fx.proxy.TraceError) as info:
        gpu_nn.fuse(Branchy())
    assert any("gpu_nn.fuse traces the model with torch.fx" in n for n in info.value.__notes__)


def test_conv_modules_take_activation():
    conv = gpu_nn.nn.Conv2d(2, 3, 3, activation="tanh")
    assert "activation='tanh'" in repr(conv)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    conv = conv.double()
    with gpu_nn.backend("reference"):
        assert_close(conv(x), torch.tanh(torch.nn.functional.conv2d(x, conv.weight, conv.bias)), torch.float64)
    with pytest.raises(gpu_nn.KernelInputError, match="Conv1d: unknown activation 'gelu'"):
        gpu_nn.nn.Conv1d(2, 3, 3, activation="gelu")
    assert list(conv.state_dict()) == ["weight", "bias"]


class Functional(torch.nn.Module):
    """Functional layers: torch's conv1d / conv2d / linear and ours, one already fused, one
    output used twice."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        p = lambda *s: torch.nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64))  # noqa: E731
        self.w1, self.b1, self.w2, self.w3, self.b3 = p(3, 2, 3), p(3), p(4, 3, 2, 2), p(5, 12), p(5)
        self.w4 = p(5, 5)

    def forward(self, x):
        y = torch.nn.functional.conv1d(x, self.w1, self.b1, padding=1).sigmoid()           # torch's: fused
        z = torch.nn.functional.conv2d(y.reshape(2, 3, 2, 2), self.w2, None, 1, 1)
        z = torch.relu(z) + z                                                             # used twice: stays
        u = GF.linear(z.flatten(1)[:, :12], self.w3, self.b3, activation="relu")          # fused already
        return torch.tanh(GF.linear(torch.tanh(u), self.w4))                              # ours: fused


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_functional_layers_are_fused_into_ours(backend, device, rng):
    dtype = torch.float64 if backend == "reference" else torch.float32
    model = Functional().to(device, dtype)
    fused = gpu_nn.fuse(model)
    calls = [(n.target, n.kwargs.get("activation")) for n in fused.graph.nodes if n.op == "call_function"
             and n.target in (GF.conv1d, GF.conv2d, GF.linear, torch.conv1d, torch.conv2d)]
    assert calls == [(GF.conv1d, "sigmoid"), (torch.conv2d, None), (GF.linear, "relu"), (GF.linear, "tanh")], calls
    methods = [n.target for n in fused.graph.nodes if n.op == "call_method"]
    assert "sigmoid" not in methods
    x = torch.from_numpy(rng.standard_normal((2, 2, 4))).to(device, dtype)
    with gpu_nn.backend(backend):
        got, exp = fused(x), model(x)
        gg = torch.autograd.grad(got.square().sum(), list(model.parameters()))
        ge = torch.autograd.grad(exp.square().sum(), list(model.parameters()))
    assert_close(got, exp, dtype, k=64, what="output")
    for (k, _), a, b in zip(model.named_parameters(), gg, ge):
        assert_close(a, b, dtype, k=256, what=f"grad {k}")
