"""gpu_nn.fuse: convolution / linear -> activation pairs fused into one of our layers, the
model's function and gradients unchanged, the model itself untouched, parameters shared."""

import collections
import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn.utils.prune

import gpu_nn
import gpu_nn.functional as GF
from gpu_nn import _backend, demo
from gpu_nn.nn.dense import fused_activation

from helpers import assert_close, backend_params, interpreted_launches


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
        self.c3 = torch.nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")  # padded by F.pad, then fused

    def forward(self, x, z):
        a = torch.relu(self.c1(x)).flatten(1)
        a = GF.tanh(self.l2(self.l1(a).sigmoid()))
        b = torch.relu(self.c3(self.act(self.c2(z))))
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
    "mixed": ({"c1": "relu", "l1": "sigmoid", "l2": "tanh", "c2": "tanh", "c3": "relu"}, {"act"}),
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
        assert type(layer).__module__.startswith("gpu_nn.nn") and fused_activation(layer) == act, (target, layer)
        assert called[target] == 1
    assert not gone & set(called), called
    acts = {n.target for n in fused.graph.nodes if n.op == "call_module"
            and isinstance(fused.get_submodule(n.target), (torch.nn.ReLU, torch.nn.Sigmoid, torch.nn.Tanh))}
    assert acts == ({"relu", "hooked_act"} if name == "unfusable" else set()), acts
    if name == "shared":
        assert called == {"conv": 2}
    # the model is as it was: the same classes, no activation set on its layers
    assert {k: type(m) for k, m in model.named_modules()} == before
    assert all(fused_activation(m) is None for k, m in model.named_modules() if k != "pre")
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
    model = _model("cnn")
    x = torch.randn(2, 1, 8, 8)
    counts = []
    with gpu_nn.backend("triton"), torch.no_grad(), interpreted_launches("cpu") as launches:
        for m in (model, gpu_nn.fuse(model)):
            m(x)  # plans and first use
            n0 = len(launches)
            m(x)
            counts.append(len(launches) - n0)
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
    # a torch.compile wrapper names what to fuse (torch.fx's own error did not); a layer of ours
    # alone is nothing to fuse, which only a convolution / linear one takes as activation=
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    with pytest.raises(TypeError, match=r"torch.compile wrapper .*\(compiled._orig_mod\)"):
        gpu_nn.fuse(torch.compile(model))
    with pytest.raises(TypeError, match=r"\(nothing to fuse: Conv1d / Conv2d / Linear take activation=\)"):
        gpu_nn.fuse(gpu_nn.nn.Linear(3, 3))
    with pytest.raises(TypeError, match=r"LSTM is a gpu_nn layer itself \(nothing to fuse\)$"):
        gpu_nn.fuse(gpu_nn.nn.LSTM(3, 3))


def test_parameters_and_state_dict_keep_the_models_order():
    """A model that calls its layers in another order than it made them: the fused model lists
    its parameters and state_dict as the model does (torch.fx's GraphModule lists them in the
    order its graph uses them), so an optimizer state or checkpoint matched up by position lands
    on the same tensors (it moved the momentum of one layer to another of the same shape,
    silently; an audit)."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
            self.inner = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4))
            self.register_buffer("z", torch.zeros(4))
            self.register_buffer("y", torch.ones(4))

        def forward(self, x):
            x = self.b(torch.relu(self.c(torch.relu(self.a(x)))))
            return self.inner[0](self.inner[2](x)) * self.y + self.z

    model = M()
    fused = gpu_nn.fuse(model)
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert list(fused.state_dict()) == list(model.state_dict())
    assert [p is q for p, q in zip(fused.parameters(), model.parameters())] == [True] * 10
    opt_m = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    opt_m.step()
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    opt_f.load_state_dict(opt_m.state_dict())
    for p in model.parameters():
        assert torch.equal(opt_f.state[p]["momentum_buffer"], opt_m.state[p]["momentum_buffer"])


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


# ------------------------------------------------------------------ review findings (each a defect once)


def _same_function(fused, model, *xs):
    """Equal to float32's precision: a fused sigmoid / tanh takes the layer's result before it is
    rounded to float32 (ReLU commutes with the rounding: bitwise equal there)."""
    with gpu_nn.backend("reference"):
        assert_close(fused(*xs), model(*xs), torch.float32, k=16)


def test_a_leaf_modules_child_is_not_fused_into_the_model():
    """A Linear inside a leaf (a module called whole, here torch's TransformerEncoderLayer) and
    also called on its own: its parent is the model's own object, so the fused copy would land in
    the model and change both; the pair stays."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)

        def forward(self, x):
            return torch.sigmoid(self.enc.linear1(self.enc(x)))

    model = M().eval()
    x = torch.randn(3, 5, 8)
    with gpu_nn.backend("reference"):
        before = model(x)
    fused = gpu_nn.fuse(model)
    assert type(model.enc.linear1) is torch.nn.Linear and not hasattr(model.enc.linear1, "activation")
    _same_function(fused, model, x)
    with gpu_nn.backend("reference"):
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


class _ModeSwitch(torch.nn.Module):
    """A frozen Linear + ReLU under a mode switch inside forward, then a trained head."""

    def __init__(self, switch):
        super().__init__()
        self.frozen, self.head, self.switch = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2), switch

    def forward(self, x):
        if self.switch == "set_grad_enabled":
            torch.set_grad_enabled(False)
            h = torch.relu(self.frozen(x))
            torch.set_grad_enabled(True)
        else:
            ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
                   "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
                   "enable_grad": torch.enable_grad,
                   "autocast_off": lambda: torch.autocast("cpu", enabled=False)}[self.switch]()
            with ctx:
                h = torch.relu(self.frozen(x))
            h = h.float().clone()
        return self.head(h)


@pytest.mark.parametrize("switch", ("no_grad", "set_grad_enabled", "inference_mode", "autocast", "enable_grad",
                                    "autocast_off"))
def test_a_forward_that_switches_modes_is_refused(switch):
    """A forward with a torch.no_grad() (set_grad_enabled, inference_mode, autocast) block: torch.fx
    records no mode switch, so the fused model computed the frozen part with gradients (the frozen
    layer got a gradient torch's never does) or in float32 where autocast gives bfloat16, without
    a word (a fuse audit). Refused now, with what to do, also where the switch would change
    nothing at fuse time (enable_grad, autocast(enabled=False): they matter under the caller's
    no_grad or autocast later); a model without a switch still fuses when fuse itself is called
    under no_grad or autocast (the mode is the caller's, not the forward's), and the tracing
    leaves torch's switches as they were."""
    model = _ModeSwitch(switch)
    with pytest.raises(ValueError, match=r"switches gradient, inference or autocast mode .*\(model\.head = gpu_nn\.fuse\(model\.head\)\) instead$"):
        gpu_nn.fuse(model)
    assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
    assert torch._C._set_grad_enabled.__module__ is None or not hasattr(torch._C._set_grad_enabled, "__wrapped__")
    with torch.no_grad():
        assert not torch.is_grad_enabled()
    # a switch in one training mode's forward alone: refused too (the other mode's trace, whose
    # failure would otherwise make a fused model that raises in that mode)

    class OnlyInEval(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x) if not self.training else self.inner.head(self.inner.frozen(x))

    for mode in (True, False):
        with pytest.raises(ValueError, match="switches gradient, inference or autocast mode"):
            gpu_nn.fuse(OnlyInEval().train(mode))
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    x = torch.randn(3, 4)
    for ctx in (torch.no_grad, lambda: torch.autocast("cpu", dtype=torch.bfloat16)):
        with ctx():
            fused = gpu_nn.fuse(plain)
        assert fused_activation(fused.get_submodule("0")) == "relu"
        torch.testing.assert_close(fused(x), plain(x))


def test_hooked_containers_stay_whole_and_a_hooked_model_is_refused():
    block = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    block.register_forward_hook(lambda mod, inp, out: out - 1.0)  # traced through, it would be lost
    model = torch.nn.Sequential(block, torch.nn.Linear(3, 2), torch.nn.Tanh())
    fused = gpu_nn.fuse(model)
    assert type(fused.get_submodule("0.0")) is torch.nn.Linear and fused_activation(fused.get_submodule("1")) == "tanh"
    _same_function(fused, model, torch.randn(4, 3))
    model.register_forward_pre_hook(lambda mod, inp: (inp[0] + 1,))
    with pytest.raises(ValueError, match="has forward / backward / state_dict hooks"):
        gpu_nn.fuse(model)
    with pytest.raises(TypeError, match="Conv2d is a gpu_nn layer itself"):
        gpu_nn.fuse(gpu_nn.nn.Conv2d(2, 3, 3))


def test_layers_with_a_forward_of_their_own_stay():
    """An instance forward (or Module.compile's) belongs to the layer object: a fused copy would
    run it without the activation."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.b(torch.relu(self.a(x))))

    model = M()
    inner = model.a.forward
    model.a.forward = lambda x: inner(x) * 2.0
    model.b.compile(backend="eager")
    fused = gpu_nn.fuse(model)
    assert type(fused.a) is torch.nn.Linear and type(fused.b) is torch.nn.Linear
    _same_function(fused, model, torch.randn(3, 4))


def test_activation_modules_with_a_forward_of_their_own_stay():
    """An activation module whose instance has a forward of its own (assigned, bound with
    MethodType, or Module.compile's) computes what that does, not its class's activation: the
    pair stays unfused (it was fused as the class's relu / sigmoid, an audit: (W x + b) * 2
    became relu(W x + b)); torch.fx calls the instance's forward, as the model does."""
    import types

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Conv1d(1, 1, 1),
                                gpu_nn.nn.Sigmoid(), torch.nn.Linear(3, 3), torch.nn.Tanh())
    model[1].forward = lambda t: t * 2.0
    model[3].forward = types.MethodType(lambda self, t: torch.tanh(t), model[3])
    model[5].compile(backend="eager")

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            h = self.m[1](self.m[0](x))
            h = self.m[3](self.m[2](h[:, None, :3]))[:, 0]
            return self.m[5](self.m[4](h))

    root = Wrap().double()
    fused = gpu_nn.fuse(root)
    assert not any(fused_activation(m) for m in fused.modules())
    _same_function(fused, root, torch.randn(2, 4, dtype=torch.float64))


def test_the_fused_copy_has_containers_of_its_own_and_keeps_state_dict_hooks():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    model[0]._register_state_dict_hook(lambda mod, sd, prefix, local: sd.update(
        {k: v.half() for k, v in sd.items() if k.startswith(prefix)}))
    fused = gpu_nn.fuse(model)
    assert fused_activation(fused.get_submodule("0")) == "relu"
    assert {v.dtype for v in fused.state_dict().values()} == {torch.float16}  # the layer's hook kept
    torch.nn.utils.prune.l1_unstructured(fused.get_submodule("0"), "weight", amount=0.5)
    fused.get_submodule("0").register_buffer("calib", torch.ones(1))
    assert sorted(model.state_dict()) == ["0.bias", "0.weight"]
    model(torch.randn(2, 4))  # still runs: its weight is still a parameter of its own


def test_state_dict_keys_are_the_models_with_unused_tied_and_non_persistent_state():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Linear(3, 3)
            self.alias = self.c                       # a second name of a tied layer
            self.aux_head = torch.nn.Linear(3, 5)     # not used by forward
            self.register_buffer("scale", torch.full((3,), 2.0), persistent=False)
            self.unused = torch.nn.Parameter(torch.zeros(2))

        def forward(self, x):
            return torch.relu(self.c(x)) * self.scale

    model = M()
    fused = gpu_nn.fuse(model)
    assert fused_activation(fused.c) == "relu"
    assert sorted(fused.state_dict()) == sorted(model.state_dict())
    assert "scale" not in fused.state_dict()
    model.load_state_dict(fused.state_dict())
    fused.load_state_dict(model.state_dict())
    assert fused.aux_head.weight is model.aux_head.weight and fused.unused is model.unused
    _same_function(fused, model, torch.randn(2, 3))


def test_a_layer_named_twice_inside_a_leaf_is_looked_up_by_either_name():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 16)
            self.enc = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
            self.enc.linear1 = self.lin
            self.out = torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.out(torch.relu(self.lin(self.enc(x))))

    model = M().eval()
    fused = gpu_nn.fuse(model)
    _same_function(fused, model, torch.randn(3, 5, 8))
    assert type(model.lin) is torch.nn.Linear


def test_containers_with_state_dict_rules_stay_whole():
    """A container that saves its state its own way (a state_dict hook, or a class overriding
    _save_to_state_dict) is called whole, so its state_dict is the model's; a model that does so
    itself is refused (the GraphModule would not)."""
    class Half(torch.nn.Sequential):
        def _save_to_state_dict(self, destination, prefix, keep_vars):
            super()._save_to_state_dict(destination, prefix, keep_vars)
            destination[prefix + "version"] = torch.tensor(2)

    hooked = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    hooked._register_state_dict_hook(lambda mod, sd, prefix, local: sd.update(
        {k: v.half() for k, v in sd.items() if k.startswith(prefix)}))
    model = torch.nn.Sequential(hooked, Half(torch.nn.Linear(3, 3), torch.nn.Tanh()), torch.nn.Linear(3, 2),
                                torch.nn.Sigmoid())
    fused = gpu_nn.fuse(model)
    assert fused_activation(fused.get_submodule("2")) == "sigmoid"  # outside them: fused
    assert type(fused.get_submodule("0.0")) is torch.nn.Linear and type(fused.get_submodule("1.0")) is torch.nn.Linear
    sd, msd = fused.state_dict(), model.state_dict()
    assert sorted(sd) == sorted(msd) and all(sd[k].dtype == msd[k].dtype for k in sd)
    _same_function(fused, model, torch.randn(4, 3))
    with pytest.raises(ValueError, match="state_dict"):
        gpu_nn.fuse(Half(torch.nn.Linear(3, 3), torch.nn.ReLU()))


# ------------------------------------------------------------------ state read when run; both training modes


def _run(module, *xs, seed=0):
    torch.manual_seed(seed)  # the same dropout masks for the model and the fused graph
    with gpu_nn.backend("reference"):
        return module(*xs)


def _same_in_both_modes(fused, model, *xs):
    """The fused graph computes the model's function in eval mode and in training mode (dropout
    drawing the same masks), whichever mode it was in before."""
    for mode in (False, True, False):
        fused.train(mode)
        model.train(mode)
        assert_close(_run(fused, *xs), _run(model, *xs), torch.float32, k=16, what=f"training={mode}")


def _state_dicts_load_each_other(fused, model):
    assert sorted(fused.state_dict()) == sorted(model.state_dict())
    model.load_state_dict(fused.state_dict(), strict=True)
    fused.load_state_dict(model.state_dict(), strict=True)


class Scaled(torch.nn.Module):
    """Buffers and a parameter used in arithmetic, a plain tensor attribute, a counter."""

    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(4, 4)
        self.register_buffer("log_scale", torch.zeros(4))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(4))
        self.gain = torch.nn.Parameter(torch.ones(4))
        self.mask = torch.tensor([1.0, 0.0, 1.0, 1.0])  # neither: a constant of the graph, as in torch.fx

    def forward(self, x):
        self.steps.add_(1)
        self.mean.mul_(0.5).add_(x.mean(0).detach(), alpha=0.5)
        return self.l(x).relu() * self.log_scale.exp() * self.gain * self.mask + torch.tensor(0.5)


def test_buffers_are_read_when_the_graph_runs_not_when_fused():
    model = Scaled()
    before = set(vars(model))
    fused = gpu_nn.fuse(model)
    assert fused_activation(fused.l) == "relu"
    x = torch.randn(3, 4)
    with torch.no_grad():
        model.log_scale.fill_(1.0)   # a buffer the model computes with, changed after fusing
        model.gain.mul_(3.0)         # a parameter used directly
    _same_function(fused, model, x)
    model.load_state_dict({**model.state_dict(), "log_scale": torch.full((4,), -1.0)})
    _same_function(fused, model, x)
    assert fused.log_scale is model.log_scale and fused.gain is model.gain
    _state_dicts_load_each_other(fused, model)  # no _tensor_constantN among the keys
    assert set(vars(model)) == before  # nor left on the model


def test_in_place_buffer_updates_run_at_each_call_not_while_fusing():
    model = Scaled()
    x = torch.randn(3, 4)
    fused = gpu_nn.fuse(model)
    assert model.steps.item() == 0 and not model.mean.any()  # fusing ran nothing on the model
    with gpu_nn.backend("reference"):
        fused(x)
        fused(x)
        assert model.steps.item() == 2 and fused.steps is model.steps
        torch.testing.assert_close(model.mean, x.mean(0) * 0.75)
        model(x)
        assert model.steps.item() == 3
        copied = pickle.loads(pickle.dumps(fused))  # traced again from its code: still an update
        copied(x)
        assert copied.steps.item() == 4 and model.steps.item() == 3
    _state_dicts_load_each_other(fused, model)


class Modal(torch.nn.Module):
    """A forward that reads self.training: F.dropout(..., self.training), an `if self.training:`
    branch (using the layer's output twice there: not fused in either graph; calling a layer
    only there: fused), and modules acting on their own flags (nn.Dropout, BatchNorm1d)."""

    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(4, 8)
        self.l2 = torch.nn.Linear(8, 8)
        self.aux = torch.nn.Linear(8, 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.drop = torch.nn.Dropout(0.25)
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x):
        y = torch.nn.functional.dropout(torch.relu(self.l1(x)), 0.5, self.training)
        z = self.l2(y)
        if self.training:
            y = torch.sigmoid(z) + 0.1 * z + torch.tanh(self.aux(y))
        else:
            y = torch.sigmoid(z)
        return torch.tanh(self.out(self.drop(self.bn(y))))


def test_the_fused_model_follows_its_training_flag():
    model = Modal()
    model.drop.eval()  # a leaf in the other mode: called whole, it follows its own flag
    flags = {k: m.training for k, m in model.named_modules()}
    fused = gpu_nn.fuse(model)
    assert {k: m.training for k, m in model.named_modules()} == flags
    assert isinstance(fused, torch.fx.GraphModule) and fused.training
    assert (fused_activation(fused.l1), fused_activation(fused.out), fused_activation(fused.aux)) == ("relu", "tanh", "tanh")
    assert type(fused.l2) is torch.nn.Linear  # fused in eval mode only: left as it is in both
    x = torch.randn(5, 4)
    assert_close(_run(fused, x), _run(model, x), torch.float32, k=16, what="as fused")
    _same_in_both_modes(fused, model, x)
    _state_dicts_load_each_other(fused, model)
    for k, p in fused.named_parameters():
        assert p is model.get_parameter(k)
    fused.eval()
    assert not fused.training and not model.bn.training  # the modules are the model's: inherent in sharing


def test_a_graph_per_mode_survives_copies_and_compile(tmp_path):
    model = Modal()
    fused = gpu_nn.fuse(model)
    x = torch.randn(5, 4)
    torch.save(fused, tmp_path / "fused.pt")
    for make in (copy.deepcopy, copy.copy, lambda m: pickle.loads(pickle.dumps(m)),
                 lambda m: torch.load(tmp_path / "fused.pt", weights_only=False)):
        copied = make(fused)
        copied.load_state_dict(model.state_dict(), strict=True)  # batch norm's statistics as they are now
        _same_in_both_modes(copied, model, x)
        assert isinstance(copied, torch.fx.GraphModule) and type(copied).__name__ == "Modal"
    compiled = torch.compile(fused, backend="eager")
    forward = type(fused).forward
    torch._dynamo.utils.counters.clear()
    for mode in (True, False, True, False, True):
        fused.train(mode)
        model.train(mode)
        assert_close(_run(compiled, x), _run(model, x), torch.float32, k=16, what=f"compiled, training={mode}")
    # one forward per mode, kept: switching back does not make a new one for torch.compile to compile again
    assert type(fused).forward is forward
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_modes_fuse_cannot_follow():
    class OneMode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l = torch.nn.Linear(4, 4)

        def forward(self, x):
            y = torch.relu(self.l(x))
            if self.training and y.sum() > 0:  # traceable in eval mode only
                y = y * 2
            return y

    model = OneMode().eval()
    fused = gpu_nn.fuse(model)
    x = torch.randn(3, 4)
    _same_function(fused, model, x)
    fused.train()
    with pytest.raises(RuntimeError, match="could not trace the model in training mode"):
        fused(x)

    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.l(x)) * (2.0 if self.training else 1.0)

    model = torch.nn.Sequential(Inner(), torch.nn.Linear(4, 4))
    model[0].eval()  # traced through, in the other mode than the model: no graph per mode follows it
    with pytest.raises(ValueError, match="reads the training flag"):
        gpu_nn.fuse(model)
    assert model.training and not model[0].training


def test_the_graph_of_a_two_mode_result_is_its_present_modes(tmp_path):
    """A result holding a graph per mode is an ordinary GraphModule of its present mode's graph:
    what reads ``graph`` or ``code`` (torch.fx.Interpreter, torch.export, to_folder, tracing it
    again, fusing it again) computes what it computes, in either mode; torch.package keeps both
    graphs. (``graph`` was the eval-mode one whatever the flag: an Interpreter or an export of a
    model in training mode ran it without dropout.)"""
    model = Modal()
    fused = gpu_nn.fuse(model)
    x = torch.randn(5, 4)
    for mode in (True, False):
        fused.train(mode)
        model.train(mode)
        assert ("training = True" in fused.code) == mode
        want = _run(model, x)
        assert_close(_run(torch.fx.Interpreter(fused).run, x), want, torch.float32, k=16, what=f"interpreter {mode}")
        assert_close(_run(torch.fx.symbolic_trace(fused), x), want, torch.float32, k=16, what=f"retraced {mode}")
        with gpu_nn.backend("reference"):
            exported = torch.export.export(fused, (x,)).module()
        assert_close(_run(exported, x), want, torch.float32, k=16, what=f"export {mode}")
        fused.to_folder(tmp_path / f"m{int(mode)}", "Fused")
        assert ("training = True" in (tmp_path / f"m{int(mode)}" / "module.py").read_text()) == mode
    again = gpu_nn.fuse(fused)  # both modes traced again from the fused one
    _same_in_both_modes(again, model, x)
    fused.training = True  # the attribute set directly (as model.train() sets each module's) swaps too
    assert "training = True" in fused.code and fused.train_graph is fused.graph and fused.eval_graph is not fused.graph
    import io

    buf = io.BytesIO()
    with torch.package.PackageExporter(buf) as exporter:
        exporter.intern("fx-generated.**")
        exporter.extern("**")
        exporter.save_pickle("fused", "fused.pkl", fused)
    buf.seek(0)
    loaded = torch.package.PackageImporter(buf).load_pickle("fused", "fused.pkl")
    loaded.load_state_dict(model.state_dict(), strict=True)
    _same_in_both_modes(loaded, model, x)


class BufferShapes(torch.nn.Module):
    """A forward that reads its buffers' sizes, dtype, length and rows: concrete when traced, as
    torch.fx's own tracing gives them (a buffer proxy gave 'Proxy' for each)."""

    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(4, 4)
        self.register_buffer("rows", torch.randn(3, 4))

    def forward(self, x):
        for i in range(self.rows.shape[0]):
            x = x + self.rows[i]
        if self.rows.dim() == 2 and self.rows.size(1) == 4 and self.rows.dtype == torch.float32:
            x = torch.relu(self.l(x))
        for row in self.rows:
            x = x * row.sigmoid()
        return x * len(self.rows) + self.rows.numel() + self.rows.ndim


def test_a_forward_may_read_its_buffers_sizes():
    model = BufferShapes()
    fused = gpu_nn.fuse(model)
    assert fused_activation(fused.l) == "relu"
    x = torch.randn(2, 4)
    _same_function(fused, model, x)
    with torch.no_grad():
        model.rows.mul_(2)  # values are still read when the graph runs
    _same_function(fused, model, x)


def test_torch_fx_traces_a_model_of_our_layers():
    """torch.fx.symbolic_trace of a converted model (our layers are not leaves of torch's tracer,
    which traces through them): each of our functions is one call in the graph (its argument
    checks took the Proxy for a bad input), and the traced module computes the model's function."""
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(27, 5), torch.nn.Tanh(), torch.nn.Softmax(-1))
    ours = gpu_nn.convert(model, inplace=False)
    traced = torch.fx.symbolic_trace(ours)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert targets == [GF.conv2d, GF.relu, GF.max_pool2d, GF.flatten, GF.linear, GF.tanh, GF.softmax], targets
    x = torch.randn(2, 2, 8, 8)
    with gpu_nn.backend("reference"):
        assert_close(traced(x), model(x), torch.float32, k=16, what="traced")
    fused = gpu_nn.fuse(traced)  # a traced model of our functions fuses too
    assert [n.kwargs.get("activation") for n in fused.graph.nodes if n.target in (GF.conv2d, GF.linear)] == ["relu", "tanh"]
    with gpu_nn.backend("reference"):
        assert_close(fused(x), model(x), torch.float32, k=16, what="fused")
