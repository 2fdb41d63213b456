"""Drop-in integration (issue 8): convert, torch.compile, save/load, deepcopy, pickling,
.to(dtype), DistributedDataParallel on gloo."""

import copy
import io
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn as tnn

import gpu_nn
import gpu_nn.nn as gnn
from gpu_nn.nn.dense import fused_activation
from helpers import backend_params


class MixedCNN(tnn.Module):
    """Every supported CNN layer, plus one we do not support (reflect padding)."""

    def __init__(self):
        super().__init__()
        self.c1 = tnn.Conv1d(3, 4, 3, padding=1)
        self.features = tnn.Sequential(
            tnn.Conv2d(3, 6, 3, padding="same"),
            tnn.ReLU(),
            tnn.MaxPool2d(2, ceil_mode=True),
            tnn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect"),  # padded as torch's, then ours
            tnn.Sigmoid(),
            tnn.AvgPool2d(2, count_include_pad=False, padding=1),
            tnn.Tanh(),
        )
        self.p1 = tnn.MaxPool1d(2)
        self.p2 = tnn.AvgPool1d(3, stride=1)
        self.flat = tnn.Flatten()
        self.head = tnn.Linear(6 * 4 * 4 + 4 * 2, 5)
        self.sm = tnn.Softmax(dim=1)
        self.lsm = tnn.LogSoftmax(dim=1)

    def forward(self, x, s):
        a = self.flat(self.features(x))
        b = self.flat(self.p2(self.p1(self.c1(s))))
        z = self.head(torch.cat([a, b], dim=1))
        return self.lsm(z) + self.sm(z)


class Recurrent(tnn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = tnn.LSTM(5, 7, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = tnn.GRU(14, 6, batch_first=True)
        self.rnn = tnn.RNN(6, 4, nonlinearity="relu")
        self.cell = tnn.GRUCell(4, 3)
        self.out = tnn.Linear(3, 2)

    def forward(self, x):
        y, _ = self.lstm(x)
        y, _ = self.gru(y)
        y, _ = self.rnn(y.transpose(0, 1))
        return self.out(self.cell(y[-1]))


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 11, 11, generator=g, dtype=dtype), torch.randn(2, 3, 9, generator=g, dtype=dtype)


def test_convert_swaps_supported_layers_and_keeps_tensors():
    torch.manual_seed(0)
    model = MixedCNN().double()
    reference = copy.deepcopy(model)
    params_before = {n: p for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer converts: no warning (a reflect-padded conv was left, warned)
        out = gpu_nn.convert(model)
    assert out is model
    for name, mod in model.named_modules():
        if name in ("", "features"):
            continue
        assert type(mod).__module__.startswith("gpu_nn.nn"), name
        assert isinstance(mod, getattr(tnn, type(mod).__name__))
    assert model.features[3].padding_mode == "reflect"
    for n, p in model.named_parameters():
        assert p is params_before[n], n
    x, s = _inputs()
    torch.testing.assert_close(model(x, s), reference(x, s), rtol=1e-10, atol=1e-12)


def test_convert_not_inplace_leaves_model_alone():
    model = MixedCNN()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = gpu_nn.convert(model, inplace=False)
    assert new is not model
    assert type(model.head) is tnn.Linear
    assert type(new.head) is gnn.Linear


@pytest.mark.parametrize("layer", ["Linear", "Conv1d", "Conv2d", "LazyLinear"])
@pytest.mark.parametrize("value", ["tanh", "module", None])
def test_convert_takes_a_layer_with_its_own_activation_attribute(layer, value):
    """A torch layer carrying an attribute of its own named ``activation`` (a string kept for a
    config, a submodule stored beside it, even None) converts like any other, the attribute
    kept and not read: our layers keep the activation they fuse under a name of ours
    (``_gpu_nn_activation``). Until then they read ``activation``, so convert left such layers
    as torch's (a string would have been applied, a module refused)."""
    make = {"Linear": lambda: tnn.Linear(4, 3), "Conv1d": lambda: tnn.Conv1d(4, 3, 1),
            "Conv2d": lambda: tnn.Conv2d(4, 3, 1), "LazyLinear": lambda: tnn.LazyLinear(3)}[layer]
    x = torch.randn(2, 4, *({"Conv1d": (5,), "Conv2d": (5, 5)}.get(layer, ())), dtype=torch.float64)
    m = make().double()
    act = m.activation = tnn.ReLU() if value == "module" else value
    model = tnn.Sequential(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the lazy layer's warning about its parameters)
        want = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left as torch's
        gpu_nn.convert(model)
    # (the lazy layer became torch.nn.Linear at its first call)
    assert type(model[0]) is getattr(gnn, layer.replace("Lazy", "")) and model[0].activation is act
    assert fused_activation(model[0]) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _subclasses_with_an_activation(nn):
    """Three subclasses of ``nn``'s Linear / Conv2d (torch.nn or gpu_nn.nn) that keep an
    ``activation`` of their own and apply it after ``super().forward``: a module given to the
    constructor, a name set in the constructor, a class attribute."""

    class Dense(nn.Linear):
        def __init__(self, i, o, act=None):
            super().__init__(i, o)
            self.activation = act

        def forward(self, x):
            y = super().forward(x)
            return self.activation(y) if self.activation is not None else y

    class ConvTanh(nn.Conv2d):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.activation = "tanh"

        def forward(self, x):
            y = super().forward(x)
            return torch.tanh(y) if self.activation == "tanh" else y

    class Tagged(nn.Linear):
        activation = "relu"

        def forward(self, x):
            y = super().forward(x)
            return torch.relu(y) if self.activation == "relu" else y

    return Dense, ConvTanh, Tagged


def test_a_subclass_of_our_layers_keeps_its_own_activation_attribute():
    """A model written against ``gpu_nn.nn`` (the drop-in import) whose subclass of Linear or
    Conv2d keeps an ``activation`` of its own computes what the same code computes with torch.nn
    (float64, the same weights): our layers once read that attribute as the activation they
    fuse, so a module there was refused ('unknown activation Tanh()'), a name was applied twice,
    and a class attribute was hidden behind the instance's None (an audit)."""
    x = torch.randn(4, 3, dtype=torch.float64)
    xi = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    got = {}
    for nn in (tnn, gnn):
        Dense, ConvTanh, Tagged = _subclasses_with_an_activation(nn)
        torch.manual_seed(0)
        layers = (Dense(3, 2, nn.Tanh()).double(), ConvTanh(1, 2, 3).double(), Tagged(3, 2).double())
        assert layers[2].activation == "relu"
        got[nn] = [layers[0](x), layers[1](xi), layers[2](x)]
    for ours, theirs in zip(got[gnn], got[tnn]):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ["tanh", None])
def test_a_layer_pickled_with_activation_as_its_fused_activation_unpickles_fused(act):
    """A layer pickled by a gpu-nn that kept its fused activation as ``activation`` (simulated:
    the attribute renamed in the instance's dict) unpickles with it fused, as it was pickled;
    one of today's pickles and copies round-trip as they are."""
    torch.manual_seed(0)
    layer = gnn.Linear(3, 2, activation=act).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    want = layer(x)
    old_state = dict(layer.__dict__)  # what such a gpu-nn pickled: the instance's dict as it was
    old_state["activation"] = old_state.pop("_gpu_nn_activation")
    old = gnn.Linear.__new__(gnn.Linear)
    old.__setstate__(old_state)
    assert fused_activation(old) == act
    torch.testing.assert_close(old(x), want, rtol=0, atol=0)
    for made in (old, layer):
        back = pickle.loads(pickle.dumps(made))
        assert fused_activation(back) == act and fused_activation(copy.deepcopy(made)) == act
        torch.testing.assert_close(back(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "revert-copy"])
@pytest.mark.parametrize("layer", ["Linear", "LazyLinear"])
def test_a_users_own_activation_survives_copies_of_a_converted_layer(layer, how):
    """A layer whose own ``activation`` (a fused name, 'tanh', kept for the user's code) came to
    us through convert (a torch layer swapped) or a lazy layer (which becomes ours): copies and
    pickles keep it the user's and fuse nothing (review: the old-pickle migration read it as
    the fused activation of an old pickle, 0.128 off after a deepcopy)."""
    torch.manual_seed(0)
    m = (tnn.Linear(4, 3) if layer == "Linear" else gnn.LazyLinear(3)).double()
    m.activation = "tanh"
    model = tnn.Sequential(m)
    x = torch.randn(2, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the lazy layer's warning about its parameters)
        want = model(x)
        gpu_nn.convert(model)
        got = {"deepcopy": lambda: copy.deepcopy(model), "pickle": lambda: pickle.loads(pickle.dumps(model)),
               "revert-copy": lambda: gpu_nn.revert(model, inplace=False)}[how]()
    assert got[0].activation == "tanh" and fused_activation(got[0]) is None
    torch.testing.assert_close(got(x), want, rtol=1e-12, atol=1e-12)


def test_a_lazy_layers_forward_called_directly_runs_ours():
    """A lazy layer of ours given its parameters (a state_dict loaded) and its forward called
    directly, before any call made it ours: our forward runs on the lazy instance, which has no
    fused activation (review: it read an attribute the lazy instance lacked, AttributeError)."""
    w, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64)
    m = gnn.LazyLinear(4).double()
    m.load_state_dict({"weight": w, "bias": b})
    torch.testing.assert_close(m.forward(x), x @ w.T + b, rtol=1e-12, atol=1e-12)
    c = gnn.LazyConv1d(2, 3).double()
    c.load_state_dict({"weight": torch.randn(2, 1, 3, dtype=torch.float64), "bias": torch.zeros(2, dtype=torch.float64)})
    xc = torch.randn(1, 1, 5, dtype=torch.float64)
    torch.testing.assert_close(c.forward(xc), torch.nn.functional.conv1d(xc, c.weight, c.bias), rtol=1e-12, atol=1e-12)

@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_a_default_device_elsewhere_leaves_our_internals_on_the_operands_device(backend, device):
    """Under torch.set_default_device (here a ``torch.device`` context: meta) our ops and
    optimizers keep their own tensors where the operands are: a CPU optimizer step made its step
    count on the default device ('Tensor.item() cannot be called on meta tensors'; CUDA under
    set_default_device('cuda')), a packed sequence its length masks, clip_grad_norm_ of half
    gradients its rounding."""
    from torch.nn.utils.rnn import pack_padded_sequence

    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    lstm = gnn.LSTM(3, 4, num_layers=2, bidirectional=True).to(dev)
    x = torch.randn(5, 2, 3, generator=g).to(dev)
    ps = [torch.nn.Parameter(torch.randn(6, generator=g).to(dev)) for _ in range(6)]
    half = torch.nn.Parameter(torch.randn(6, generator=g).to(dev, torch.float16))
    half.grad = torch.full((6,), 3e4, dtype=torch.float16, device=dev)
    packed = pack_padded_sequence(x, torch.tensor([5, 3]), enforce_sorted=False)  # (torch's own packing wants no meta default)
    with gpu_nn.backend(backend), torch.device("meta"):
        out, _ = lstm(packed)
        out.data.sum().backward()
        for p, name in zip(ps, ("SGD", "Adam", "AdamW", "Adagrad", "Adadelta", "RMSprop")):
            p.grad = torch.ones(6, device=dev)
            o = getattr(gpu_nn.optim, name)([p], lr=0.1)
            o.step()
            o.step()
            assert all(t.device.type != "meta" for t in o.state[p].values() if torch.is_tensor(t)), name
        total = gpu_nn.nn.utils.clip_grad_norm_([half], 1.0)
    assert out.data.device == dev and total.device == dev and torch.isinf(total)  # (a float16 total past 65504)
    assert all(p.grad is not None for p in lstm.parameters())


def test_changing_the_imports_keeps_a_torch_script_working():
    """``import gpu_nn.nn as nn`` (and functional, optim) in a torch script: our layers where
    gpu-nn has them, torch's names everywhere else (nn.Module, Sequential, BatchNorm2d, Dropout,
    F.nll_loss, optim.lr_scheduler, nn.utils.rnn); they raised AttributeError, so a script's
    ``class Net(nn.Module)`` failed at its first line. nn.functional is ours, private names are
    not taken from torch, and a name neither has is the usual AttributeError."""
    import gpu_nn.functional as F
    import gpu_nn.nn as nn
    import gpu_nn.optim as optim

    assert nn.Module is tnn.Module and nn.Sequential is tnn.Sequential and nn.init is tnn.init
    assert nn.functional is F and F.dropout is torch.nn.functional.dropout
    assert nn.utils.rnn is torch.nn.utils.rnn and nn.utils.clip_grad_value_ is torch.nn.utils.clip_grad_value_
    assert optim.lr_scheduler is torch.optim.lr_scheduler and optim.NAdam is torch.optim.NAdam
    assert {"Sequential", "LSTM", "functional", "utils"} <= set(dir(nn)) and "dropout" in dir(F)
    for mod, name in ((nn, "NoSuchLayer"), (nn, "_reduction"), (F, "no_such_op"), (optim, "_functional"),
                      (nn.utils, "nothing_here")):
        with pytest.raises(AttributeError, match=f"module '{mod.__name__}' has no attribute '{name}'"):
            getattr(mod, name)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Dropout(0.0), nn.Flatten(), nn.Linear(4 * 4 * 4, 10))

        def forward(self, x):
            return F.log_softmax(self.body(x), dim=1)

    torch.manual_seed(0)
    net = Net().double()
    twin = copy.deepcopy(net)
    for m in twin.modules():  # the same model of torch's own layers
        if type(m).__module__.startswith("gpu_nn"):
            m.__class__ = getattr(tnn, type(m).__name__)
    assert type(net.body[0]) is gnn.Conv2d and type(twin.body[0]) is tnn.Conv2d
    x, y = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (5,))
    for model, opt_mod in ((net, optim), (twin, torch.optim)):
        opt = opt_mod.SGD(model.parameters(), lr=0.1, momentum=0.9)  # (Adam's division magnifies float64 rounding)
        sched = opt_mod.lr_scheduler.StepLR(opt, 1, gamma=0.5)
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.nll_loss(model(x), y).backward()
            opt.step()
            sched.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


_TORCH_SCRIPT = """
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn import init
from torch.nn.modules.loss import NLLLoss
from torch.nn.utils import clip_grad_norm_
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.optim import SGD
from torch.optim.lr_scheduler import StepLR


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.out = nn.Linear(4, 5)
        init.zeros_(self.out.bias)

    def forward(self, x, lengths):
        y, _ = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        y, _ = pad_packed_sequence(y, batch_first=True)
        return F.log_softmax(self.out(y[:, -1]), dim=1)


torch.manual_seed(0)
net = Net().double()
opt = SGD(net.parameters(), lr=0.1, momentum=0.9)
sched = StepLR(opt, 1, gamma=0.5)
x, lengths, y = torch.randn(4, 6, 3, dtype=torch.float64), torch.tensor([6, 3, 5, 2]), torch.tensor([0, 4, 2, 1])
for _ in range(2):
    opt.zero_grad()
    NLLLoss()(net(x, lengths), y).backward()
    clip_grad_norm_(net.parameters(), 0.5)
    opt.step()
    sched.step()
"""


def test_replacing_torch_nn_and_torch_optim_throughout_a_script_keeps_it_running():
    """A script's every ``torch.nn`` / ``torch.optim`` replaced by ``gpu_nn.nn`` / ``gpu_nn.optim``,
    from-imports of submodules included (``torch.optim.lr_scheduler``, ``torch.nn.utils.rnn``,
    ``torch.nn.modules.loss``: ModuleNotFoundError before, where only attribute access fell back):
    our LSTM, Linear, log_softmax, SGD and clip_grad_norm_, torch's modules for the rest (the
    same module objects, never a second copy of torch's files under our names), the same
    trained weights as the script as written."""
    import sys

    import gpu_nn.functional as gF

    theirs, ours = {}, {}
    exec(compile(_TORCH_SCRIPT, "torch_script", "exec"), theirs)
    changed = _TORCH_SCRIPT.replace("torch.nn", "gpu_nn.nn").replace("torch.optim", "gpu_nn.optim")
    exec(compile(changed, "changed_script", "exec"), ours)
    assert type(ours["net"].rnn) is gnn.LSTM and type(ours["net"].out) is gnn.Linear
    assert ours["F"] is gF and ours["clip_grad_norm_"] is gpu_nn.nn.utils.clip_grad_norm_
    assert type(ours["opt"]) is gpu_nn.optim.SGD and ours["StepLR"] is torch.optim.lr_scheduler.StepLR
    assert ours["pack_padded_sequence"] is torch.nn.utils.rnn.pack_padded_sequence and ours["NLLLoss"] is tnn.NLLLoss
    for a, b in zip(ours["net"].parameters(), theirs["net"].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for name in ("gpu_nn.optim.lr_scheduler", "gpu_nn.nn.utils.rnn", "gpu_nn.nn.modules", "gpu_nn.nn.modules.loss"):
        module = sys.modules[name]
        assert module is sys.modules["torch" + name[len("gpu_nn"):]] and module.__spec__.name == module.__name__, name
    assert sys.modules["gpu_nn.nn.functional"] is gF
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    assert not [n for n, m in sys.modules.items() if n.startswith("gpu_nn.") and getattr(m, "__name__", n).startswith("gpu_nn.")
                and str(getattr(m, "__file__", "") or "").startswith(torch_dir)]  # no torch file loaded as ours
    for name in ("gpu_nn.nn.no_such", "gpu_nn.optim._functional", "gpu_nn.nn.utils.no_such", "gpu_nn.nn.modules.no_such"):
        with pytest.raises(ModuleNotFoundError, match=f"No module named '{name}'"):
            __import__(name)
    # a submodule its package shadows with a function of the same name (torch.nn.parallel's
    # data_parallel, torch.nn.utils' weight_norm): imported through our name it is the module,
    # and neither torch's package nor ours has its function replaced by it (the import system
    # sets a loaded submodule on its parent: torch.nn.parallel.data_parallel became a module)
    import importlib

    for ours_name, parent, attr in (("gpu_nn.nn.parallel.data_parallel", torch.nn.parallel, "data_parallel"),
                                    ("gpu_nn.nn.utils.weight_norm", gpu_nn.nn.utils, "weight_norm"),
                                    ("gpu_nn.nn.utils.spectral_norm", torch.nn.utils, "spectral_norm")):
        before = getattr(parent, attr)
        module = importlib.import_module(ours_name)
        assert module is sys.modules["torch" + ours_name[len("gpu_nn"):]] and getattr(parent, attr) is before, ours_name
        assert callable(getattr(parent, attr)) and not isinstance(getattr(parent, attr), type(sys))
    from gpu_nn._namespace import _FINDER

    spec = _FINDER.find_spec("gpu_nn.optim.lr_scheduler")  # (our spec made into a module twice: a crash before)
    theirs = torch.optim.lr_scheduler.__spec__
    try:
        assert importlib.util.module_from_spec(spec) is importlib.util.module_from_spec(spec) is torch.optim.lr_scheduler
    finally:  # (module_from_spec alone, outside an import, leaves the alias's spec on it: put torch's back)
        torch.optim.lr_scheduler.__spec__ = theirs


def test_convert_a_transformer_quietly():
    """A model with attention: its MultiheadAttention's out_proj (torch's own Linear subclass,
    which attention reads as weights and never calls) is left alone without a warning; its
    feed-forward Linear layers are ours; the function is unchanged. A user's Linear subclass with
    a forward of its own is still named."""
    torch.manual_seed(0)
    model = tnn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True).double().eval()
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gpu_nn.convert(model)
    assert type(model.linear1) is gnn.Linear and type(model.self_attn.out_proj) is type(reference.self_attn.out_proj)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference(x))

    class Mine(tnn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.warns(UserWarning, match=r"0 \(Mine\): a subclass of torch.nn.Linear, left as it is"):
        gpu_nn.convert(tnn.Sequential(Mine(2, 2)))


def test_convert_recurrent_model_same_function_and_gradients():
    torch.manual_seed(1)
    model = Recurrent().double()
    reference = copy.deepcopy(model)
    gpu_nn.convert(model)
    assert type(model.lstm) is gnn.LSTM and type(model.cell) is gnn.GRUCell
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    y, yr = model(x), reference(x)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-12)
    y.sum().backward()
    yr.sum().backward()
    for (n, p), (_, pr) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, pr.grad, rtol=1e-9, atol=1e-12, msg=n)


def test_lstm_projection_converts_and_matches_torch():
    torch.manual_seed(3)
    model = tnn.Sequential(tnn.LSTM(4, 6, proj_size=3, num_layers=2, bidirectional=True)).double()
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converted without a "not supported" warning
        gpu_nn.convert(model)
    assert type(model[0]) is gnn.LSTM and model[0].proj_size == 3
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    with gpu_nn.backend("reference"):
        out, (hn, cn) = model(x)
    want, (whn, wcn) = reference(x)
    assert hn.shape == (4, 2, 3) and cn.shape == (4, 2, 6)
    for a, b in ((out, want), (hn, whn), (cn, wcn)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_compiled_converted_model_equals_eager():
    """A converted model under torch.compile(fullgraph): our custom ops in the graph (a layer
    traced as torch's forward would pass the value checks alone), values and gradients as eager,
    and as the torch model it was converted from."""
    from torch._dynamo.backends.registry import lookup_backend

    torch.manual_seed(2)
    model = MixedCNN()
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpu_nn.convert(model)
    x, s = _inputs(torch.float32)
    eager = model(x, s)
    torch.testing.assert_close(eager, twin(x, s), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=record)
    torch.testing.assert_close(compiled(x, s), eager)
    ours = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function" and "gpu_nn" in str(n.target)}
    assert {"gpu_nn.conv_forward", "gpu_nn.linear"} <= {t.split(".default")[0] for t in ours}, ours
    # gradients through the compiled graph too
    xr = x.clone().requires_grad_()
    compiled(xr, s).sum().backward()
    xe = x.clone().requires_grad_()
    model(xe, s).sum().backward()
    torch.testing.assert_close(xr.grad, xe.grad)


def test_save_load_deepcopy_pickle_and_to():
    torch.manual_seed(3)
    model = gpu_nn.convert(tnn.Sequential(tnn.Conv2d(3, 4, 3), tnn.ReLU(), tnn.Flatten(), tnn.Linear(4 * 9 * 9, 3)))
    x, _ = _inputs(torch.float32)
    expect = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded[0]) is gnn.Conv2d
    torch.testing.assert_close(loaded(x), expect)
    torch.testing.assert_close(copy.deepcopy(model)(x), expect)
    torch.testing.assert_close(pickle.loads(pickle.dumps(model))(x), expect)
    # state_dict round trip into a plain torch model
    plain = tnn.Sequential(tnn.Conv2d(3, 4, 3), tnn.ReLU(), tnn.Flatten(), tnn.Linear(4 * 9 * 9, 3))
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain(x), expect)
    model64 = model.to(torch.float64)
    assert model64[0].weight.dtype == torch.float64
    torch.testing.assert_close(model64(x.double()), plain.double()(x.double()))


def _ddp_worker(rank, world, init_file, result_file):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = _ddp_model()
        ddp = DDP(model)
        opt = gpu_nn.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        x, y = _ddp_batch()
        per = x.shape[0] // world
        for _ in range(3):
            opt.zero_grad()
            loss = gnn.CrossEntropyLoss()(ddp(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per])
            loss.backward()
            opt.step()
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def _ddp_model():
    return gpu_nn.convert(tnn.Sequential(
        tnn.Conv2d(1, 3, 3), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(), tnn.Linear(3 * 3 * 3, 4),
    )).double()


def _ddp_batch():
    g = torch.Generator().manual_seed(5)
    return torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g)


def test_distributed_data_parallel_gloo(tmp_path):
    import torch.multiprocessing as mp

    init_file, result = str(tmp_path / "rendezvous"), str(tmp_path / "params")
    mp.spawn(_ddp_worker, args=(2, init_file, result), nprocs=2, join=True)
    ranks = [torch.load(f"{result}.{r}") for r in range(2)]
    torch.manual_seed(0)
    single = _ddp_model()
    opt = gpu_nn.optim.SGD(single.parameters(), lr=0.1, momentum=0.9)
    x, y = _ddp_batch()
    for _ in range(3):
        opt.zero_grad()
        gnn.CrossEntropyLoss()(single(x), y).backward()
        opt.step()
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ranks[0][k], ranks[1][k], rtol=0, atol=0, msg=f"ranks differ at {k}")
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-10, atol=1e-12, msg=f"DDP != single process at {k}")


def _cpu_autocast_cases():
    """(name, ours, theirs, inputs): each public op / module of ours beside torch's twin."""
    import torch.nn.functional as TF

    import gpu_nn.functional as GF

    g = torch.Generator().manual_seed(2)
    x4, w4 = torch.randn(2, 3, 8, 8, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    x3, w3 = torch.randn(2, 3, 8, generator=g), torch.randn(4, 3, 3, generator=g)
    t = torch.tensor([0, 1])
    cases = [
        ("conv2d", GF.conv2d, TF.conv2d, (x4, w4)), ("conv1d", GF.conv1d, TF.conv1d, (x3, w3)),
        ("linear", GF.linear, TF.linear, (torch.randn(2, 5, generator=g), torch.randn(3, 5, generator=g))),
        ("softmax", lambda x: GF.softmax(x, 1), lambda x: TF.softmax(x, 1), (torch.randn(2, 5, generator=g),)),
        ("log_softmax", lambda x: GF.log_softmax(x, 1), lambda x: TF.log_softmax(x, 1), (torch.randn(2, 5, generator=g),)),
        ("cross_entropy", lambda x: GF.cross_entropy(x, t), lambda x: TF.cross_entropy(x, t), (torch.randn(2, 5, generator=g),)),
        ("max_pool2d", lambda x: GF.max_pool2d(x, 2), lambda x: TF.max_pool2d(x, 2), (x4,)),
        ("avg_pool2d", lambda x: GF.avg_pool2d(x, 2), lambda x: TF.avg_pool2d(x, 2), (x4,)),
        ("relu", GF.relu, TF.relu, (x4,)),
    ]
    for name in ("RNN", "LSTM", "GRU"):
        for kw in ({}, {"num_layers": 2, "bidirectional": True}):
            torch.manual_seed(0)
            theirs = getattr(tnn, name)(3, 4, **kw)
            ours = gpu_nn.convert(copy.deepcopy(theirs))
            cases.append((f"{name} {kw}", lambda x, m=ours: m(x)[0], lambda x, m=theirs: m(x)[0],
                          (torch.randn(5, 2, 3, generator=g),)))
    for name in ("RNNCell", "LSTMCell", "GRUCell"):
        torch.manual_seed(0)
        theirs = getattr(tnn, name)(3, 4)
        ours = gpu_nn.convert(copy.deepcopy(theirs))
        first = (lambda o: o[0]) if name == "LSTMCell" else (lambda o: o)
        cases.append((name, lambda x, m=ours, f=first: f(m(x)), lambda x, m=theirs, f=first: f(m(x)),
                      (torch.randn(2, 3, generator=g),)))
    return cases


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_cpu_autocast_gives_torchs_dtypes(autocast_dtype, input_dtype):
    """In a CPU autocast region every op and layer returns the dtype torch's twin returns: torch's
    CPU lists differ from its CUDA ones (softmax runs in the input's dtype; GRU, LSTMCell and
    GRUCell are not cast themselves, their inner matmuls are, so a float32 input gives float32).
    Where torch's own layer fails (its LSTM has no float16 CPU kernel) there is nothing to match."""
    compared = 0
    for name, ours, theirs, inputs in _cpu_autocast_cases():
        inputs = [i.to(input_dtype) for i in inputs]
        with torch.autocast("cpu", dtype=autocast_dtype):
            try:
                want = theirs(*inputs)
            except RuntimeError:
                # torch's oneDNN LSTM (a float32 input, or bfloat16 where this CPU's oneDNN has
                # it) in an autocast dtype this CPU's oneDNN lacks (float16; bfloat16 on an
                # AVX2-only CPU): nothing to match
                assert name.startswith("LSTM ") and (input_dtype == torch.float32 or _onednn_bf16()), name
                continue
            got = ours(*inputs)
        assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, want.dtype)
        # and the values: both cast the same operands to the autocast dtype, so within a few of
        # its ulps of each other (O(1) values; the dtypes alone passed outputs doubled)
        bound = 8 * torch.finfo(autocast_dtype).eps
        torch.testing.assert_close(got.float(), want.float(), rtol=bound, atol=bound, msg=lambda m, n=name: f"{n}: {m}")
        compared += 1
    assert compared >= 16  # of 9 ops, 6 sequence layers, 3 cells: all but the two LSTMs at least


def _onednn_bf16() -> bool:
    """This CPU's oneDNN bfloat16 support (AVX-512 on x86), which decides torch's CPU LSTM path."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("proj", [0, 3], ids=["plain", "proj"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_cpu_autocast_lstm_dtypes_as_torchs_native_and_onednn_paths(autocast_dtype, proj, packed):
    """torch's CPU LSTM under autocast: its oneDNN path (padded, no projection, a float32 or
    bfloat16 input) runs in the autocast dtype; its native path (packed, projected, or a float16
    input) autocasts only the matmuls, so output, h and c come out promoted (float32 for a float32
    input), a projection's output and h in the autocast dtype. Ours returned the autocast dtype for
    all (a user audit: a packed LSTM classifier's output bfloat16 where torch's is float32). Every
    input dtype where torch's own layer runs (it has no float16 oneDNN kernel for the others)."""
    from torch.nn.utils.rnn import pack_padded_sequence

    compared = 0
    for input_dtype in (torch.float32, torch.float16, torch.bfloat16):
        torch.manual_seed(0)
        theirs = tnn.LSTM(6, 5, batch_first=True, proj_size=proj)
        ours = gpu_nn.convert(copy.deepcopy(theirs))
        x = torch.randn(3, 4, 6, dtype=input_dtype)
        inp = pack_padded_sequence(x, torch.tensor([4, 2, 3]), batch_first=True, enforce_sorted=False) if packed else x
        with torch.autocast("cpu", dtype=autocast_dtype), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch: "LSTM with projections is not supported with oneDNN"
            try:
                want = theirs(inp)
            except RuntimeError:
                # torch's oneDNN path (padded, no projection, a float32 input or a bfloat16 one on
                # a CPU with oneDNN's bfloat16) in a dtype this CPU's oneDNN lacks: nothing to match
                assert not packed and not proj and (input_dtype == torch.float32 or _onednn_bf16())
                continue
            got = ours(inp)
        for a, b in ((got[0], want[0]), *zip(got[1], want[1])):
            a, b = (a.data, b.data) if packed and a is got[0] else (a, b)
            assert a.dtype == b.dtype and a.shape == b.shape, (input_dtype, a.dtype, b.dtype)
        compared += 1
    assert compared == 3 if packed or proj else compared >= 1  # torch's native path runs everywhere


class _BF16Autocast(torch.nn.Module):
    """A recurrent layer's output run inside a CPU bfloat16 autocast region of the forward."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.m(x)[0]


def test_lstm_exported_under_cpu_autocast_keeps_the_eager_dtype_as_torchs():
    """An LSTM exported (torch.export) with a CPU bfloat16 autocast region inside its forward: torch
    turns oneDNN off while it traces, so ours took torch's native path there (float32 results)
    where the exported program and eager give bfloat16 (torch's runs its oneDNN LSTM when it
    runs; a compile audit). Now the exported program gives what eager gives, as torch's does."""
    torch.manual_seed(0)
    ours = _BF16Autocast(gpu_nn.convert(tnn.LSTM(3, 4)))
    x = torch.randn(5, 2, 3)
    eager = ours(x)
    assert eager.dtype == torch.bfloat16  # torch's own CPU autocast rule for its LSTM
    exported = torch.export.export(ours, (x,)).module()(x)
    assert exported.dtype == eager.dtype, (exported.dtype, eager.dtype)
    torch.testing.assert_close(exported, eager, rtol=0, atol=0)


def test_torchs_lstm_exported_under_cpu_autocast_keeps_the_eager_dtype():
    """The baseline of the test above: torch's own LSTM, exported with the same CPU bfloat16
    autocast region, gives what its eager call gives (bfloat16), where torch's oneDNN builds a
    bfloat16 LSTM on this CPU: an AVX2-only one refuses ("could not create a primitive descriptor
    for the LSTM forward propagation primitive", seen on a 2-core AMD EPYC), and the check skips."""
    torch.manual_seed(0)
    theirs = _BF16Autocast(tnn.LSTM(3, 4))
    x = torch.randn(5, 2, 3)
    try:
        eager = theirs(x)
    except RuntimeError as exc:
        if "primitive descriptor" not in str(exc):
            raise
        pytest.skip(f"torch's own bfloat16 LSTM under CPU autocast does not run on this CPU: {exc}"[:200])
    exported = torch.export.export(theirs, (x,)).module()(x)
    assert exported.dtype == eager.dtype == torch.bfloat16, (exported.dtype, eager.dtype)


@pytest.mark.parametrize("name", ["lstm_cell", "gru_cell", "rnn_tanh_cell"])
def test_cell_dtype_mismatches_raise_torchs_words(name):
    """A cell given tensors of mixed dtypes raises where torch raises, with torch's message (its
    input linear checked first, then the hidden one: addmm's bias-then-input order, mm's words
    without biases); a CPU autocast region with a float64 input (not cast) and float32 weights
    (cast by torch's inner matmuls) refuses as torch does. Ours said it in its own words, and under
    autocast cast the weights to float64 and computed (a user audit)."""
    import gpu_nn.functional as GF

    G = {"lstm_cell": 4, "gru_cell": 3, "rnn_tanh_cell": 1}[name]
    compared = 0
    for what in ("input", "hx", "w_ih", "w_hh", "b_ih", "b_hh", "input+hx"):
        for other in (torch.float64, torch.bfloat16):
            for bias in (True, False):
                if not bias and what.startswith("b_"):
                    continue
                dt = dict.fromkeys(("input", "hx", "w_ih", "w_hh", "b_ih", "b_hh"), torch.float32)
                dt.update(dict.fromkeys(what.split("+"), other))
                h = torch.randn(2, 4, dtype=dt["hx"])
                args = (torch.randn(2, 3, dtype=dt["input"]), (h, h.clone()) if name == "lstm_cell" else h,
                        torch.randn(G * 4, 3, dtype=dt["w_ih"]), torch.randn(G * 4, 4, dtype=dt["w_hh"]))
                if bias:
                    args += (torch.randn(G * 4, dtype=dt["b_ih"]), torch.randn(G * 4, dtype=dt["b_hh"]))
                with pytest.raises(RuntimeError) as want:
                    getattr(torch, name)(*args)
                with pytest.raises(gpu_nn.KernelInputError) as got:
                    getattr(GF, name)(*args)
                assert str(got.value) == str(want.value), (what, other, bias)
                compared += 1
    assert compared == 24
    for cls in ("GRUCell", "LSTMCell", "RNNCell"):
        theirs = getattr(tnn, cls)(3, 4)
        ours = gpu_nn.convert(copy.deepcopy(theirs))
        x = torch.randn(2, 3, dtype=torch.float64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with pytest.raises(RuntimeError) as want:
                theirs(x)
            with pytest.raises(gpu_nn.KernelInputError) as got:
                ours(x)
        assert str(got.value) == str(want.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast through our kernels needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_on_gpu(dtype):
    torch.manual_seed(4)
    model = gpu_nn.convert(tnn.Sequential(tnn.Conv2d(3, 8, 3), tnn.ReLU(), tnn.Flatten(), tnn.Linear(8 * 9 * 9, 5))).cuda()
    plain = copy.deepcopy(model)
    x = torch.randn(4, 3, 11, 11, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y = model(x)
    assert y.dtype == dtype
    expect = tnn.functional.linear(
        tnn.functional.relu(tnn.functional.conv2d(x, plain[0].weight, plain[0].bias)).flatten(1), plain[3].weight, plain[3].bias
    )
    torch.testing.assert_close(y.float(), expect, rtol=5e-2, atol=5e-2)



def _inplace_cases(device="cpu"):
    """name -> (ours, torch's, input shape), every constant and module on ``device``."""
    import torch.nn.functional as TF

    import gpu_nn.functional as F

    w, b = torch.randn(5, 4, device=device), torch.randn(5, device=device)
    t = torch.tensor([0, 1, 2, 0], device=device)
    cases = {
        "linear 3-d": (lambda x: F.linear(x, w), lambda x: TF.linear(x, w), (2, 3, 4)),
        "linear 3-d bias": (lambda x: F.linear(x, w, b), lambda x: TF.linear(x, w, b), (2, 3, 4)),
        "linear 2-d": (lambda x: F.linear(x, w, b), lambda x: TF.linear(x, w, b), (3, 4)),
        "cross_entropy none": (lambda x: F.cross_entropy(x, t, reduction="none"),
                               lambda x: TF.cross_entropy(x, t, reduction="none"), (4, 3)),
        "cross_entropy none 3-d": (lambda x: F.cross_entropy(x, t[:2].view(1, 2).expand(4, 2), reduction="none"),
                                   lambda x: TF.cross_entropy(x, t[:2].view(1, 2).expand(4, 2), reduction="none"), (4, 3, 2)),
        "cross_entropy none probabilities": (
            lambda x: F.cross_entropy(x, torch.full((4, 3), 1 / 3, device=device), reduction="none"),
            lambda x: TF.cross_entropy(x, torch.full((4, 3), 1 / 3, device=device), reduction="none"), (4, 3)),
        "conv2d": (lambda x: F.conv2d(x, torch.ones(2, 3, 2, 2, device=device)), lambda x: TF.conv2d(x, torch.ones(2, 3, 2, 2, device=device)), (2, 3, 5, 5)),
        "conv1d unbatched": (lambda x: F.conv1d(x, torch.ones(2, 3, 2, device=device)), lambda x: TF.conv1d(x, torch.ones(2, 3, 2, device=device)), (3, 6)),
        "avg_pool2d": (lambda x: F.avg_pool2d(x, 2), lambda x: TF.avg_pool2d(x, 2), (2, 3, 4, 4)),
        "max_pool1d": (lambda x: F.max_pool1d(x, 2), lambda x: TF.max_pool1d(x, 2), (2, 3, 6)),
        "max_pool2d unbatched": (lambda x: F.max_pool2d(x, 2), lambda x: TF.max_pool2d(x, 2), (3, 4, 4)),
        "softmax": (lambda x: F.softmax(x, -1), lambda x: TF.softmax(x, -1), (2, 3, 4)),
        "relu": (lambda x: F.relu(x), lambda x: TF.relu(x), (2, 3, 4)),
    }
    for name in ("GRUCell", "LSTMCell", "RNNCell"):  # torch's GRU / LSTM cells save no output, its Elman cell its h'
        theirs = getattr(tnn, name)(4, 5).to(device)
        ours = getattr(gnn, name)(4, 5).to(device)
        ours.load_state_dict(theirs.state_dict())
        first = (lambda m: lambda x: (lambda r: r[0] if isinstance(r, tuple) else r)(m(x)))
        cases[name] = (first(ours), first(theirs), (3, 4))
    # torch's twin on the CPU: its CUDA cell is the fused kernel in every dtype, which saves c' and
    # refuses; a GPU backend runs float64 in float32 and returns a c' it did not save (allowed, as
    # torch's CPU cell allows it, with that gradient)
    lstm_t, lstm_o = tnn.LSTMCell(4, 5), gnn.LSTMCell(4, 5).to(device)
    lstm_o.load_state_dict(lstm_t.state_dict())
    cases["LSTMCell c' float64"] = (lambda x: lstm_o.double()(x.double())[1],
                                    lambda x: lstm_t.double()(x.double().cpu())[1], (3, 4))
    lstm32_t, lstm32_o = tnn.LSTMCell(4, 5).to(device), gnn.LSTMCell(4, 5).to(device)
    lstm32_o.load_state_dict(lstm32_t.state_dict())
    cases["LSTMCell c' float32"] = (lambda x: lstm32_o(x)[1], lambda x: lstm32_t(x)[1], (3, 4))
    return cases


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", list(_inplace_cases()))
def test_changing_an_output_in_place_before_backward_is_as_in_torch(backend, case):
    """`y = op(x); y.mul_(2); y.sum().backward()`: allowed exactly where torch allows it (an op
    whose backward does not read its output), with torch's gradient; refused with torch's error
    where torch's backward needs the output. An op returning a view made inside its autograd
    Function (linear of a 3-d input, cross_entropy(reduction='none') on the Triton backend) was
    refused with 'Output 0 of Eager_... is a view and is being modified inplace'."""
    if backend == "triton" and "triton" not in gpu_nn.available_backends():
        pytest.skip("triton backend unavailable here")
    # Triton on a GPU machine runs CUDA tensors only (CPU ones under the interpreter); torch's
    # twin on the same device
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    ours, theirs, shape = _inplace_cases(device)[case]
    x0 = torch.randn(*shape, device=device)
    results = []
    for fn, name in ((theirs, None), (ours, backend)):
        x = x0.clone().requires_grad_()
        with gpu_nn.backend(name or "reference"):
            try:
                y = fn(x)
                y.mul_(2)
                y.sum().backward()
                results.append(x.grad)
            except RuntimeError as e:
                results.append(str(e).split(":")[0].split(";")[0])
    theirs_r, ours_r = results
    if case == "LSTMCell c' float32" and backend == "triton":
        # the GPU kernels' backward reads tanh(c') from c', as torch's fused CUDA cell does (its
        # CPU cell, compared here, does not): refused as torch refuses it on a GPU
        assert isinstance(ours_r, str) and "modified by an inplace operation" in ours_r, ours_r
        return
    if isinstance(theirs_r, str):
        assert isinstance(ours_r, str) and "modified by an inplace operation" in ours_r and theirs_r == ours_r, results
    else:
        assert not isinstance(ours_r, str), ours_r
        torch.testing.assert_close(ours_r, theirs_r, rtol=1e-4, atol=1e-5)


def _dtype_cases():
    import torch.nn.functional as TF

    import gpu_nn.functional as F

    return {
        "conv2d": lambda L, x: L.conv2d(x, torch.ones(2, 3, 2, 2).to(x.dtype)),
        "conv1d float weight": lambda L, x: L.conv1d(x[..., 0], torch.ones(2, 3, 2)),
        "max_pool2d": lambda L, x: L.max_pool2d(x, 2),
        "max_pool2d indices": lambda L, x: L.max_pool2d(x, 2, return_indices=True),
        "max_pool1d": lambda L, x: L.max_pool1d(x[..., 0], 2),
        "avg_pool2d": lambda L, x: L.avg_pool2d(x, 2),
        "avg_pool1d": lambda L, x: L.avg_pool1d(x[..., 0], 2),
        "relu": lambda L, x: L.relu(x),
        "sigmoid": lambda L, x: L.sigmoid(x),
        "tanh": lambda L, x: L.tanh(x),
        "linear": lambda L, x: L.linear(x[0, 0], torch.ones(3, 4).to(x.dtype)),
        "linear bias": lambda L, x: L.linear(x[0, 0], torch.ones(3, 4).to(x.dtype), torch.ones(3).to(x.dtype)),
        "linear float bias": lambda L, x: L.linear(x[0, 0], torch.ones(3, 4).to(x.dtype), torch.ones(3)),
        "softmax dim 1": lambda L, x: L.softmax(x, 1),
        "softmax last dim": lambda L, x: L.softmax(x, -1),
        "log_softmax": lambda L, x: L.log_softmax(x, 1),
        "cross_entropy": lambda L, x: L.cross_entropy(x[0, :, 0], torch.tensor([0, 1, 2])),
        "cross_entropy probabilities": lambda L, x: L.cross_entropy(x[0, :, 0], x[0, :, 0]),
    }, (TF, F)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64,
                                   torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_a_dtype_our_kernels_do_not_take_gets_torchs_verdict(dtype):
    """Integer, bool, complex and float8 tensors: where torch refuses them too, ours is torch's error with
    its type (NotImplementedError "... not implemented for 'Bool'" is a NotImplementedError here
    too, the README's promise) and words, which name torch's kernels for that call; where torch
    computes, ours is torch's value (relu of integers, sigmoid / tanh of integers in the default
    float dtype) or our documented refusal, a KernelInputError saying floating-point tensors."""
    cases, (TF, F) = _dtype_cases()
    x = torch.arange(96).view(2, 3, 4, 4).to(dtype)
    for name, call in cases.items():
        try:
            want = call(TF, x)
        except Exception as e:  # noqa: BLE001 -- its type is what we compare
            with pytest.raises(type(e)) as got:
                call(F, x)
            assert isinstance(got.value, gpu_nn.KernelInputError), name
            assert str(got.value) == str(e), name
            continue
        try:
            ours = call(F, x)
        except gpu_nn.KernelInputError as e:
            assert "floating-point tensor" in str(e), (name, str(e))
            continue
        want, ours = (want[0], ours[0]) if isinstance(want, tuple) else (want, ours)
        assert ours.dtype == want.dtype, name
        torch.testing.assert_close(ours, want)


def _flops(model, x, backward):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        y = model(x)
        y = y[0] if isinstance(y, tuple) else y
        if backward:
            y.sum().backward()
    return counter.get_total_flops()


def test_import_leaves_triton_and_the_flop_counter_until_they_are_wanted():
    """``import gpu_nn`` imports neither torch's flop counter nor Triton (the counter loads Triton
    on torch 2.13, and a Triton imported before TRITON_INTERPRET=1 cannot interpret our kernels:
    gpu-nn check sets the variable after importing gpu_nn); importing the counter afterwards
    registers our formulas, so FlopCounterMode counts our linear as torch's, forward and backward.
    In a fresh process, since this session has imported both."""

    code = """
import sys
import torch, gpu_nn
assert "torch.utils.flop_counter" not in sys.modules and "triton.language" not in sys.modules, sorted(
    m for m in sys.modules if m.startswith(("triton", "torch.utils.flop")))
from torch.utils.flop_counter import FlopCounterMode
x = torch.randn(3, 8, requires_grad=True)
counts = []
for m in (gpu_nn.nn.Linear(8, 5), torch.nn.Linear(8, 5)):
    with FlopCounterMode(display=False) as fc:
        m(x).sum().backward()
    counts.append(fc.get_total_flops())
assert counts[0] == counts[1] == 3 * 2 * 3 * 8 * 5, counts
import inspect, torch.utils.flop_counter as fc
# the module's own loader is wrapped, not modified: what else it serves (get_source) still works
assert "def register_flop_formula" in inspect.getsource(fc)
assert "exec_module" not in vars(fc.__spec__.loader._loader)
print("ok")
"""
    from helpers import run_fresh, uninterpreted_env

    out = run_fresh(["-c", code], env=uninterpreted_env())
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout[-2000:] + out.stderr[-2000:]


def test_flop_counter_counts_our_layers_as_torchs():
    """torch.utils.flop_counter.FlopCounterMode counts our conv / linear ops as it counts torch's
    (its own formulas: forward, and backward with and without an input gradient), and our
    recurrent ops' products (a converted model counted 0)."""
    torch.manual_seed(0)

    def cnn():
        return tnn.Sequential(tnn.Conv2d(3, 4, 3, padding=1), tnn.ReLU(), tnn.Conv2d(4, 6, 3, stride=2, groups=2),
                              tnn.Flatten(), tnn.Linear(6 * 3 * 3, 5))

    theirs = cnn()
    ours = gpu_nn.convert(cnn())
    assert isinstance(ours[0], gnn.Conv2d) and isinstance(ours[4], gnn.Linear)
    for grad in (False, True):
        x = torch.randn(2, 3, 7, 7, requires_grad=grad)
        for backward in (False, True):
            want = _flops(theirs, x, backward)
            assert want > 0 and _flops(ours, x, backward) == want, (grad, backward)
    # a first (or frozen) Linear: the gradient nobody wants is not computed, or counted, as torch's
    mlp = tnn.Sequential(tnn.Linear(7, 6), tnn.Tanh(), tnn.Linear(6, 3))
    ours = gpu_nn.convert(tnn.Sequential(tnn.Linear(7, 6), tnn.Tanh(), tnn.Linear(6, 3)))
    for frozen in (False, True):
        for m in (mlp, ours):
            m[2].weight.requires_grad_(not frozen)
        for grad in (False, True):
            x = torch.randn(5, 7, requires_grad=grad)
            assert _flops(ours, x, True) == _flops(mlp, x, True) > 0, (frozen, grad)
    x = torch.randn(6, 3, 4, requires_grad=True)
    for name in ("GRU", "RNN"):  # (torch's CPU LSTM runs one fused op that it counts as 0)
        t, o = getattr(tnn, name)(4, 5, num_layers=2, bidirectional=True), getattr(gnn, name)(4, 5, num_layers=2, bidirectional=True)
        assert _flops(o, x, False) == _flops(t, x, False) > 0
        # the backward's products as torch's, what nobody wants left out as torch leaves it: a
        # data input's, frozen weights', a zero initial state's last step (every case here)
        for data, frozen in ((False, False), (True, False), (False, True)):
            for m in (t, o):
                m.requires_grad_(not frozen)
            xi = x.detach() if data else x
            assert _flops(o, xi, True) == _flops(t, xi, True) > 0, (name, data, frozen)
    for name in ("LSTMCell", "GRUCell", "RNNCell"):
        t, o = getattr(tnn, name)(4, 5), getattr(gnn, name)(4, 5)
        assert _flops(o, x[0], False) == _flops(t, x[0], False) > 0
        for data, frozen in ((False, False), (True, False), (False, True)):
            for m in (t, o):
                m.requires_grad_(not frozen)
            xi = x[0].detach() if data else x[0]
            assert _flops(o, xi, True) == _flops(t, xi, True) > 0, (name, data, frozen)
    lstm = gnn.LSTM(4, 5, proj_size=3)
    assert _flops(lstm, x, False) == 2 * 6 * 3 * (20 * 4 + 20 * 3 + 3 * 5)  # input, recurrent, projection


@pytest.mark.parametrize("layer", ["Linear", "Conv2d", "LSTM"])
@pytest.mark.parametrize("how", ["weight_norm", "spectral_norm", "custom"])
def test_convert_takes_parametrized_layers(layer, how):
    """A layer parametrized by torch.nn.utils.parametrize (weight_norm, spectral_norm, a user's
    parametrization) converts, to parametrize's generated class over ours, with torch's values and
    gradients; remove_parametrizations leaves our layer. It stayed torch's, with a warning calling
    the generated class 'a subclass with code of its own'."""
    class Double(tnn.Module):
        def forward(self, X):
            return 2 * X

    make = {"Linear": lambda: tnn.Linear(4, 3), "Conv2d": lambda: tnn.Conv2d(2, 3, 3), "LSTM": lambda: tnn.LSTM(4, 3)}[layer]
    x = {"Linear": torch.randn(5, 4), "Conv2d": torch.randn(1, 2, 6, 6), "LSTM": torch.randn(3, 2, 4)}[layer]
    name = "weight_hh_l0" if layer == "LSTM" else "weight"
    theirs = make()
    ours = make()
    ours.load_state_dict(theirs.state_dict())
    for m in (theirs, ours):
        torch.manual_seed(1)  # spectral_norm's random start vector
        if how == "custom":
            torch.nn.utils.parametrize.register_parametrization(m, name, Double())
        else:
            getattr(torch.nn.utils.parametrizations, how)(m, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left as torch's
        assert gpu_nn.convert(ours) is ours
        # converted again, alone or in a model: ours already, no warning (it was named as a
        # torch subclass left alone: parametrize's class names its own module)
        kind = type(ours)
        assert gpu_nn.convert(ours) is ours and type(ours) is kind
        assert gpu_nn.convert(tnn.Sequential(ours))[0] is ours and type(ours) is kind
    assert isinstance(ours, getattr(gnn, layer)) and torch.nn.utils.parametrize.is_parametrized(ours, name)
    theirs.eval()
    ours.eval()
    first = (lambda r: r[0] if isinstance(r, tuple) else r)
    with gpu_nn.backend("reference"):
        y = first(ours(x))
        y.sum().backward()
    want = first(theirs(x))
    want.sum().backward()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    grads = dict(theirs.named_parameters())
    for k, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[k].grad, rtol=1e-4, atol=1e-5)
    torch.nn.utils.parametrize.remove_parametrizations(ours, name)
    assert type(ours) is getattr(gnn, layer)


@pytest.mark.parametrize("name", ["LazyLinear", "LazyConv1d", "LazyConv2d"])
def test_lazy_layers_become_ours(name):
    """gpu_nn.nn.LazyLinear / LazyConv1d / LazyConv2d become our Linear / Conv1d / Conv2d at their
    first call, which runs on ours too (they were torch's lazy classes through the name fallback,
    which become torch's layers: a model written with gpu_nn.nn ran torch's kernels there, a
    parity audit); convert() of a torch lazy layer not yet called swaps it for ours, without the
    warning it gave, and any torch lazy subclass is still left with it. Values, gradients and
    the state_dict (torch's loaded into ours) as torch's."""
    args = (5,) if name == "LazyLinear" else (5, 3)
    x = {"LazyLinear": torch.randn(2, 4), "LazyConv1d": torch.randn(2, 3, 8), "LazyConv2d": torch.randn(2, 3, 6, 6)}[name]
    final = getattr(gnn, name.replace("Lazy", ""))
    theirs = getattr(tnn, name)(*args)
    made = getattr(gnn, name)(*args)
    converted = tnn.Sequential(getattr(tnn, name)(*args))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gpu_nn.convert(converted)
    assert type(converted[0]) is getattr(gnn, name)
    outs = []
    for m in (theirs, made, converted[0]):
        torch.manual_seed(1)  # materialised at the first call: the same draws
        with gpu_nn.backend("reference"):
            y = m(x)
        outs.append(y)
        assert y.grad_fn is not None and ("Eager" in type(y.grad_fn).__name__) == (m is not theirs)
    assert type(made) is final and type(converted[0]) is final and type(theirs) is getattr(tnn, name.replace("Lazy", ""))
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0])
    grads = []
    for m, y in zip((theirs, made, converted[0]), outs):
        with gpu_nn.backend("reference"):
            y.square().sum().backward()
        grads.append([p.grad for p in m.parameters()])
    for got in grads[1:]:
        assert len(got) == len(grads[0]) == 2
        for a, b in zip(got, grads[0]):
            torch.testing.assert_close(a, b)
    fresh = getattr(gnn, name)(*args)
    fresh.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(fresh(x), outs[0])
    assert type(fresh) is final

    class Mine(getattr(tnn, name)):
        pass

    with pytest.warns(UserWarning, match=f"a lazy module not initialized yet .* makes it a torch.nn.{final.__name__}"):
        gpu_nn.convert(tnn.Sequential(Mine(*args)))


def _not_a_tensor_cases():
    """(name, ours, torch's, same wording?) for a public function given a list or an array where
    a tensor belongs."""
    import torch.nn.functional as TF

    import gpu_nn.functional as G

    a4, a3, a2 = np.ones((1, 2, 5, 5)), np.ones((1, 2, 5)), np.ones((2, 3))
    w4, x2 = torch.ones(3, 2, 3, 3), torch.ones(2, 3)
    h, wi, wh = torch.ones(2, 4), torch.ones(4, 3), torch.ones(4, 4)
    t = torch.zeros(2, dtype=torch.long)
    return [
        ("relu", lambda: G.relu(a2), lambda: TF.relu(a2), True),
        ("relu_", lambda: G.relu([1.0], inplace=True), lambda: TF.relu([1.0], inplace=True), True),
        # torch.nn.functional's sigmoid, tanh, softmax and log_softmax call a method of their input:
        # Python's AttributeError in its words (ours is a TypeError too, KernelInputAttributeError)
        ("sigmoid", lambda: G.sigmoid(a2), lambda: TF.sigmoid(a2), True),
        ("tanh", lambda: G.tanh([1.0]), lambda: TF.tanh([1.0]), True),
        ("softmax", lambda: G.softmax(a2, 1), lambda: TF.softmax(a2, 1), True),
        ("log_softmax", lambda: G.log_softmax(a2, 1), lambda: TF.log_softmax(a2, 1), True),
        ("linear weight", lambda: G.linear(x2, a2), lambda: TF.linear(x2, a2), True),
        ("linear bias", lambda: G.linear(x2, wi, [1.0] * 4), lambda: TF.linear(x2, wi, [1.0] * 4), True),
        ("flatten", lambda: G.flatten(a4), lambda: torch.flatten(a4), True),
        ("cross_entropy", lambda: G.cross_entropy(a2, t), lambda: TF.cross_entropy(a2, t), True),
        ("cross_entropy weight", lambda: G.cross_entropy(x2, t, weight=[1.0] * 3),
         lambda: TF.cross_entropy(x2, t, weight=[1.0] * 3), True),
        ("max_pool2d", lambda: G.max_pool2d(a4, 2), lambda: TF.max_pool2d(a4, 2), True),
        ("avg_pool1d", lambda: G.avg_pool1d(a3, 2), lambda: TF.avg_pool1d(a3, 2), True),
        ("rnn_tanh_cell input", lambda: G.rnn_tanh_cell(a2, h, wi, wh), lambda: torch.rnn_tanh_cell(a2, h, wi, wh), True),
        ("rnn_relu_cell hx", lambda: G.rnn_relu_cell(x2, [1.0], wi, wh), lambda: torch.rnn_relu_cell(x2, [1.0], wi, wh),
         True),
        ("gru_cell w_ih", lambda: G.gru_cell(x2, h, "w", torch.ones(12, 4)),
         lambda: torch.gru_cell(x2, h, "w", torch.ones(12, 4)), True),
        ("lstm_cell w_hh", lambda: G.lstm_cell(x2, (h, h), torch.ones(16, 3), a2),
         lambda: torch.lstm_cell(x2, (h, h), torch.ones(16, 3), a2), True),
        # torch's own message lists its overloads ("invalid combination of arguments"): ours names
        # the argument instead, still a TypeError
        ("conv2d input", lambda: G.conv2d(a4, w4), lambda: TF.conv2d(a4, w4), False),
        ("conv1d weight", lambda: G.conv1d(torch.ones(1, 2, 5), a3), lambda: TF.conv1d(torch.ones(1, 2, 5), a3), False),
        ("rnn_tanh", lambda: G.rnn_tanh(np.ones((2, 1, 3)), torch.ones(1, 1, 4), [wi, wh], False, 1, 0.0, False, False,
                                        False),
         lambda: torch.rnn_tanh(np.ones((2, 1, 3)), torch.ones(1, 1, 4), [wi, wh], False, 1, 0.0, False, False, False),
         False),
    ]


@pytest.mark.parametrize("case", _not_a_tensor_cases(), ids=lambda c: c[0])
def test_not_a_tensor_is_a_type_error_as_in_torch(case):
    """A list or a NumPy array where a tensor belongs: a TypeError, as torch raises (the
    activations and the recurrent cells raised a plain KernelInputError, which ``except
    TypeError`` misses), before anything runs, naming the type as torch does ('numpy.ndarray');
    also an AttributeError where torch.nn.functional's raises one (it calls the input's method)."""
    _, ours, theirs, same_words = case
    with pytest.raises((TypeError, AttributeError)) as want:
        theirs()
    with pytest.raises(gpu_nn.KernelInputTypeError) as got:
        ours()
    assert isinstance(got.value, type(want.value))
    # torch 2.11's softmax / log_softmax list their overloads where 2.13's name the argument
    if same_words and "invalid combination of arguments" not in str(want.value):
        assert str(got.value) == str(want.value)
    else:
        assert "must be Tensor, not numpy.ndarray" in str(got.value)


def test_type_names_as_torch_prints_them():
    """gpu_nn._errors.type_name against the name torch's argument errors print (CPython's
    tp_name): builtins bare, classes made in Python bare, C types dotted, static or from a
    spec (re.Pattern, a heap type)."""
    import collections
    import decimal
    import re

    from gpu_nn._errors import type_name

    class Mine:
        pass

    for obj in ([1], np.ones(2), np.float64(1), torch.Size([1]), Mine(), "s", None, torch.float32, re.compile("a"),
                collections.OrderedDict(), decimal.Decimal(1), iter([1])):
        with pytest.raises(TypeError) as exc:
            torch.relu(obj)
        assert str(exc.value).rsplit("not ", 1)[1] == type_name(obj)


EMPTY_CASES = {
    "relu": (lambda F: F.relu, [(0, 3)]),
    "sigmoid": (lambda F: F.sigmoid, [(2, 0, 4)]),
    "softmax": (lambda F: (lambda x: F.softmax(x, 1)), [(0, 5)]),
    "log_softmax": (lambda F: (lambda x: F.log_softmax(x, -1)), [(3, 0, 2)]),
    "conv1d": (lambda F: F.conv1d, [(0, 3, 8), (4, 3, 3)]),
    "conv2d": (lambda F: F.conv2d, [(0, 3, 8, 8), (4, 3, 3, 3)]),
    "max_pool2d": (lambda F: (lambda x: F.max_pool2d(x, 2)), [(0, 2, 4, 4)]),
    "avg_pool1d": (lambda F: (lambda x: F.avg_pool1d(x, 2)), [(0, 2, 6)]),
    "linear": (lambda F: F.linear, [(0, 5), (4, 5)]),
    "cross_entropy": (lambda F: (lambda x: F.cross_entropy(x, torch.zeros(0, dtype=torch.long), reduction="none")),
                      [(0, 5)]),
}


@pytest.mark.parametrize("name", sorted(EMPTY_CASES))
def test_empty_results_have_torchs_strides(name):
    """Results and input gradients with no element have torch's (contiguous) strides: NumPy gives
    an empty array zero strides, which the reference's results kept ((0, 0) for relu of [0, 3],
    torch (3, 1)): a layout check, an ``as_strided`` or a view by stride saw another tensor."""
    import gpu_nn.functional as GF
    import torch.nn.functional as TF

    make, shapes = EMPTY_CASES[name]
    got = []
    for F in (GF, TF):
        leaves = [torch.ones(s, dtype=torch.float64, requires_grad=True) for s in shapes]
        with gpu_nn.backend("reference"):
            y = make(F)(*leaves)
            grads = torch.autograd.grad(y, leaves, torch.ones_like(y), allow_unused=True)
        got.append([y.stride()] + [None if g is None else g.stride() for g in grads])
    assert got[0] == got[1]


def _state_dtype_cases():
    """(name, run(x_dtype, h_dtype) -> results) for the recurrent cells, sequences and modules
    torch's CPU autocast treats by their state's dtype."""
    import gpu_nn.functional as GF

    R = torch.randn
    sizes = {"gru": 3, "lstm": 4, "rnn_tanh": 1}
    cases = []
    for mode, g in sizes.items():
        def cell(f, xd, hd, mode=mode, g=g):
            h = R(2, 4, dtype=hd)
            return f(R(2, 3, dtype=xd), (h, h * 0.5) if mode == "lstm" else h, R(g * 4, 3), R(g * 4, 4), R(g * 4), R(g * 4))

        def seq(f, xd, hd, mode=mode, g=g):
            h = R(1, 2, 4, dtype=hd)
            return f(R(5, 2, 3, dtype=xd), (h, h * 0.5) if mode == "lstm" else h,
                     [R(g * 4, 3), R(g * 4, 4), R(g * 4), R(g * 4)], True, 1, 0.0, False, False, False)

        cases.append((f"{mode}_cell", getattr(GF, mode + "_cell"), getattr(torch, mode + "_cell"), cell))
        cases.append((mode, getattr(GF, mode), getattr(torch, mode), seq))
    for name in ("GRU", "LSTM", "RNN", "GRUCell", "LSTMCell"):
        torch.manual_seed(0)
        theirs = getattr(tnn, name)(3, 4)
        ours = gpu_nn.convert(copy.deepcopy(theirs))

        def module(m, xd, hd, cell=name.endswith("Cell"), lstm="LSTM" in name):
            h = R(*((2, 4) if cell else (1, 2, 4)), dtype=hd)
            return m(R(*((2, 3) if cell else (5, 2, 3)), dtype=xd), (h, h * 0.5) if lstm else h)

        cases.append((f"nn.{name}", ours, theirs, module))
    return cases


def _dtypes_of(out):
    flat = out if isinstance(out, tuple) else (out,)
    return [str(t.dtype) for f in flat for t in (f if isinstance(f, tuple) else (f,))]


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_cpu_autocast_recurrent_results_take_the_states_dtype_as_torch(autocast_dtype):
    """In a CPU autocast region torch's GRU and LSTM cells (and its GRU sequence, and its native
    LSTM) run only their matmuls autocast, then combine the gates with the state: results in the
    autocast dtype promoted with the state's (the GRU's h, the LSTM's c), whatever the input's.
    Ours promoted with the input's (a bfloat16 input with a float32 state gave bfloat16: an
    autocast decoder's state dropped to bfloat16 after one step), and the modules refused a
    state of another dtype than the input's, which torch casts there (a dtype audit). Every
    input / state dtype pair where torch runs: the result dtypes."""
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    compared = 0
    for name, ours, theirs, run in _state_dtype_cases():
        for xd in dtypes:
            for hd in dtypes:
                torch.manual_seed(1)
                with torch.autocast("cpu", dtype=autocast_dtype), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        want = _dtypes_of(run(theirs, xd, hd))
                    except RuntimeError:  # torch's oneDNN LSTM in a dtype this CPU lacks, say
                        continue
                    torch.manual_seed(1)
                    got = _dtypes_of(run(ours, xd, hd))
                assert got == want, (name, xd, hd)
                compared += 1
    assert compared >= 80


def test_functional_names_take_torchs_parameters():
    """Every name of gpu_nn.functional that torch.nn.functional has, where torch's has a Python
    signature, takes the same parameters in the same order with the same defaults and kinds (a
    changed import keeps every call working); torch's in-place and with-indices names exist."""
    import inspect

    import gpu_nn.functional as G
    import torch.nn.functional as TF

    compared = 0
    for name in G.__all__:
        theirs = getattr(TF, name, None)
        try:
            sig = inspect.signature(theirs) if theirs is not None else None
        except ValueError:  # a builtin (torch.relu_, conv2d): no Python signature to compare
            sig = None
        if sig is None or list(sig.parameters) == ["args", "kwargs"]:  # boolean_dispatch (max_pool)
            continue
        ours = inspect.signature(getattr(G, name))
        assert [(p.name, p.default, p.kind) for p in ours.parameters.values()] == \
            [(p.name, p.default, p.kind) for p in sig.parameters.values()], name
        compared += 1
    assert compared >= 8
    assert {"relu_", "max_pool1d_with_indices", "max_pool2d_with_indices"} <= set(G.__all__)


class _CE(tnn.Module):
    def __init__(self, lib):
        super().__init__()
        self.lib = lib

    def forward(self, x, t):
        return self.lib.cross_entropy(x, t)


class _WithCell(tnn.Module):
    """An LSTM's output plus its cell state (so that the backward gets a gradient of c too)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        if isinstance(self.layer, tnn.LSTMCell):
            h, c = self.layer(x)
            return h + c
        y, (_, c) = self.layer(x)
        return y + c.transpose(0, 1).sum(1, keepdim=True)


_UNBACKED = {  # name: (torch's model, ours, inputs of batch n)
    "conv2d": (lambda: tnn.Conv2d(2, 3, 3, padding=1, stride=2), lambda: gnn.Conv2d(2, 3, 3, padding=1, stride=2),
               lambda n: (torch.randn(n, 2, 7, 8, dtype=torch.float64),)),
    "conv1d": (lambda: tnn.Conv1d(2, 3, 3), lambda: gnn.Conv1d(2, 3, 3), lambda n: (torch.randn(n, 2, 9, dtype=torch.float64),)),
    "cross_entropy": (lambda: _CE(torch.nn.functional), lambda: _CE(__import__("gpu_nn.functional").functional),
                      lambda n: (torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 4, (n,)))),
    "lstm": (lambda: _WithCell(tnn.LSTM(3, 4, batch_first=True)), lambda: _WithCell(gnn.LSTM(3, 4, batch_first=True)),
             lambda n: (torch.randn(n, 5, 3, dtype=torch.float64),)),
    "lstm_cell": (lambda: _WithCell(tnn.LSTMCell(3, 4)), lambda: _WithCell(gnn.LSTMCell(3, 4)),
                  lambda n: (torch.randn(n, 3, dtype=torch.float64),)),
}


@pytest.mark.parametrize("name", sorted(_UNBACKED))
def test_unbacked_batch_sizes_compile_as_torchs(name):
    """torch.compile(fullgraph) with the batch marked unbacked (mark_unbacked: no size hint, no
    guard possible): our size checks become the traced program's assertions (torch's own way)
    where they asked Python for a yes / no (conv's kernel-fits and empty-input checks, cross
    entropy's batch sizes, the LSTM backwards' empty-gradient tests: a compile audit found them
    failing where torch's layers compile); values and input gradients as eager's, one graph for
    three batch sizes."""
    from torch._dynamo.testing import CompileCounterWithBackend

    make_theirs, make_ours, inputs = _UNBACKED[name]
    torch.manual_seed(0)
    theirs, ours = make_theirs().double(), make_ours().double()
    ours.load_state_dict(theirs.state_dict())
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(ours, backend=counter, fullgraph=True)
    with torch._dynamo.config.patch(allow_rnn=True):  # (README: recurrent modules under Dynamo, as torch's)
        _run_unbacked(compiled, theirs, inputs)
    assert counter.frame_count == 1


def _run_unbacked(compiled, theirs, inputs):
    for n in (3, 5, 2):
        args = inputs(n)
        x = args[0].requires_grad_()
        for a in args:
            torch._dynamo.decorators.mark_unbacked(a, 0)
        got = compiled(*args)
        want = theirs(*args)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(got)
        torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0],
                                   rtol=1e-12, atol=1e-12)


class _Checkpointed(tnn.Module):
    """A CNN block and a two-layer LSTM with dropout between its layers, each under
    ``torch.utils.checkpoint`` when ``reentrant`` is not None (saved tensors dropped, the forward
    run again in the backward: our ops must save the same tensors again, and the dropout masks
    must come out of torch's RNG state as checkpoint restores it)."""

    def __init__(self, ns, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.cnn = ns.Sequential(ns.Conv2d(3, 4, 3, padding=1), ns.ReLU(), ns.MaxPool2d(2), ns.Flatten(),
                                 ns.Linear(4 * 3 * 3, 5), ns.Tanh())
        self.lstm = ns.LSTM(5, 6, num_layers=2, dropout=0.5)

    def _run(self, fn, x):
        if self.reentrant is None:
            return fn(x)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(fn, x, use_reentrant=self.reentrant)

    def forward(self, x):
        z = self._run(self.cnn, x)  # [T * B, 5]
        return self._run(lambda s: self.lstm(s)[0], z.view(3, 2, 5))


def _checkpoint_params():
    """Both checkpoint modes on the reference; the GPU backends in the non-reentrant one (the
    modes differ in autograd's machinery, not in what our kernels see: one mode each keeps the
    interpreter's time down)."""
    out = []
    for p in backend_params():
        for reentrant in ((False, True) if p.values[0] == "reference" else (False,)):
            out.append(pytest.param(*p.values, reentrant, marks=p.marks,
                                    id=f"{p.id}-{'reentrant' if reentrant else 'non-reentrant'}"))
    return out


@pytest.mark.parametrize("backend,device,reentrant", _checkpoint_params())
def test_activation_checkpointing_recomputes_our_layers_as_torchs(backend, device, reentrant):
    """torch.utils.checkpoint around our layers (both of its modes), training mode with dropout:
    the same output and gradients as without checkpointing on the same backend, and, on the
    reference in float64, as torch's layers under checkpoint."""
    dtype = torch.float64 if backend == "reference" else torch.float32

    def run(ns, ckpt):
        torch.manual_seed(0)
        net = _Checkpointed(ns, ckpt).to(device=device, dtype=dtype)
        if ns is gnn:  # torch's initial values in both
            torch.manual_seed(0)
            net.load_state_dict(_Checkpointed(tnn, None).to(device=device, dtype=dtype).state_dict())
        x = torch.randn(6, 3, 7, 7, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(5),
                        requires_grad=True)
        torch.manual_seed(1)  # the dropout masks
        with gpu_nn.backend(backend):
            y = net(x)
            (y * torch.linspace(-1, 2, y.numel(), device=device, dtype=dtype).view_as(y)).sum().backward()
        return y.detach(), [x.grad] + [p.grad for p in net.parameters()]

    y0, g0 = run(gnn, None)
    y1, g1 = run(gnn, reentrant)
    tol = dict(rtol=0, atol=0) if backend == "reference" else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y1, y0, **tol)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, **tol)
    assert g0[0].abs().sum() > 0 and y0.eq(0).float().mean() < 0.9  # the dropout left something to compare
    if backend == "reference":
        yt, gt = run(tnn, reentrant)
        torch.testing.assert_close(y1, yt, rtol=1e-12, atol=1e-12)
        for a, b in zip(g1, gt, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_full_backward_hooks_see_torchs_gradients(backend, device):
    """Module full backward hooks and pre-hooks (torch wraps a module's inputs and outputs in its
    BackwardHook Function) on each of our layers, under detect_anomaly: called in torch's order
    with torch's grad_input / grad_output, None where torch gives None."""
    dtype = torch.float64 if backend == "reference" else torch.float32

    def run(ns):
        torch.manual_seed(0)
        net = ns.Sequential(ns.Conv2d(3, 4, 3, padding=1), ns.ReLU(), ns.MaxPool2d(2), ns.Flatten(),
                            ns.Linear(4 * 4 * 4, 5), ns.Sigmoid()).to(device=device, dtype=dtype)
        seen = []
        for mod in net:
            mod.register_full_backward_pre_hook(lambda m, go: seen.append(("pre", type(m).__name__, go)))
            mod.register_full_backward_hook(lambda m, gi, go: seen.append(("post", type(m).__name__, gi + go)))
        x = torch.randn(2, 3, 8, 8, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(3),
                        requires_grad=True)
        with gpu_nn.backend(backend if ns is gnn else "auto"), torch.autograd.detect_anomaly():
            net(x).pow(2).sum().backward()
        return seen, x.grad

    (ours, dx), (theirs, dx_t) = run(gnn), run(tnn)
    assert [s[:2] for s in ours] == [s[:2] for s in theirs] and len(ours) == 12
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for (_, name, a), (_, _, b) in zip(ours, theirs):
        assert [t is None for t in a] == [t is None for t in b], name
        for u, v in zip(a, b):
            if u is not None:
                torch.testing.assert_close(u, v, **tol)
    torch.testing.assert_close(dx, dx_t, **tol)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_compile_fullgraph_of_recurrent_layers_under_cpu_autocast(kind):
    """torch.compile(fullgraph=True) of our recurrent layers inside CPU autocast compiles as
    torch's do and computes what ours compute eagerly (the LSTM's check for torch's oneDNN path
    called torch.backends.mkldnn.is_available(), which Dynamo refuses: 'Attempted to call
    function marked as skipped', a graph break per call without fullgraph; a training-loop
    parity audit)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = getattr(gnn, kind)(3, 4)
    x = torch.randn(5, 2, 3)
    with torch._dynamo.config.patch(allow_rnn=True), torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.compile(layer, backend="eager", fullgraph=True)(x)
        want = layer(x)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["LSTM", "GRU-bi", "RNN", "GRUCell", "LSTMCell", "max_pool1d"])
def test_compile_fullgraph_of_vmap_over_recurrent_layers_and_pooling(kind):
    """torch.compile(vmap(f), fullgraph=True), which README says works, of our recurrent layers,
    cells and pooling: one graph, values and input gradients as eager's (float64). Their checks
    for an active jvp / grad transform read torch.func's interpreter stack, which Dynamo cannot
    trace (an audit: 'does not know how to trace ... get_interpreter_stack' with fullgraph, 2-4
    graph breaks without); under compile they read the innermost transform (_transform_kinds)."""
    from torch._dynamo.utils import counters
    from torch.func import vmap

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    make = {"LSTM": lambda: gnn.LSTM(3, 4), "GRU-bi": lambda: gnn.GRU(3, 4, bidirectional=True),
            "RNN": lambda: gnn.RNN(3, 4), "GRUCell": lambda: gnn.GRUCell(3, 4), "LSTMCell": lambda: gnn.LSTMCell(3, 4)}
    if kind == "max_pool1d":
        def one(x):  # x [5, 3]: one element's [C, L]
            return gpu_nn.functional.max_pool1d(x, 2)
    else:
        layer = make[kind]().double()
        if kind.endswith("Cell"):
            def one(x):  # x [5, 3]: one element's batch of 5
                out = layer(x)
                return out[0] if isinstance(out, tuple) else out
        else:
            def one(x):  # x [5, 3]: one element's sequence of 5 steps
                return layer(x.unsqueeze(1))[0]
    xs = torch.randn(6, 5, 3, dtype=torch.float64, requires_grad=True)
    with torch._dynamo.config.patch(allow_rnn=True):
        got = torch.compile(lambda v: vmap(one)(v), backend="aot_eager", fullgraph=True)(xs)
    want = vmap(one)(xs)
    assert sum(counters["graph_break"].values()) == 0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, xs, g)[0], torch.autograd.grad(want, xs, g)[0],
                               rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()


@pytest.mark.parametrize("kind,kw", [("LSTM", {}), ("GRU", dict(bidirectional=True)), ("RNN", dict(num_layers=2)),
                                     ("LSTMCell", {}), ("Conv2d", {})], ids=["LSTM", "GRU-bi", "RNN-2", "LSTMCell",
                                                                             "Conv2d"])
def test_compiled_autograd_backward_equals_eager(kind, kw):
    """A backward run by compiled autograd (Dynamo tracing every node's backward, ours
    included) gives the eager backward's gradients: the recurrent sequence layers' backward
    hands the op a view of ctx, whose attribute lookup recursed without end under Dynamo
    (RecursionError; a compile-contract audit; torch's own layers pass)."""
    from torch._dynamo import compiled_autograd

    torch._dynamo.reset()
    torch.manual_seed(0)
    if kind == "Conv2d":
        layer, shape = gnn.Conv2d(2, 3, 3, padding=1).double(), (2, 2, 5, 5)
    else:
        layer = getattr(gnn, kind)(3, 4, **kw).double()
        shape = (5, 2, 3) if not kind.endswith("Cell") else (2, 3)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    def grads(compiled):
        x.grad = None
        layer.zero_grad()
        y = layer(x)
        y = y[0] if isinstance(y, tuple) else y
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)).sum()
        if compiled:
            with compiled_autograd._enable(torch.compile(backend="aot_eager", fullgraph=True)):
                loss.backward()
        else:
            loss.backward()
        return [x.grad] + [p.grad for p in layer.parameters()]

    want = grads(False)
    got = grads(True)
    assert all(g is not None for g in got)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch._dynamo.reset()


class _EveryLayer(tnn.Module):
    """MixedCNN and Recurrent together, with a projected LSTM, the cells and a loss."""

    def __init__(self):
        super().__init__()
        self.cnn, self.rnn = MixedCNN(), Recurrent()
        self.proj = tnn.LSTM(5, 6, proj_size=3)
        self.cells = tnn.ModuleList([tnn.LSTMCell(5, 4), tnn.RNNCell(5, 4, nonlinearity="relu")])
        self.loss = tnn.CrossEntropyLoss(label_smoothing=0.1)

    def forward(self, x, s, r):
        z = self.cnn(x, s)
        p = self.proj(r)[0].sum() + self.cells[0](r[0])[0].sum() + self.cells[1](r[0]).sum()
        return self.loss(z, torch.tensor([1, 3])) + self.rnn(r.transpose(0, 1)).sum() + p


def test_revert_gives_torchs_layers_back():
    """gpu_nn.revert undoes convert: every layer of torch's class again (the same objects and
    tensors: state_dict keys and optimizer untouched), computing what the torch model computed,
    scriptable (what torch.jit.script, ONNX export and quantization need: a converted model
    could not give its layers back)."""
    torch.manual_seed(0)
    model = _EveryLayer().double()
    x, s = _inputs()
    r = torch.randn(3, 2, 5, dtype=torch.float64)
    want = model(x, s, r)
    classes = {n: type(m) for n, m in model.named_modules()}
    objects = {n: m for n, m in model.named_modules()}
    params = dict(model.named_parameters())
    opt = gpu_nn.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left behind, either way
        gpu_nn.convert(model)
        assert sum(type(m).__module__.startswith("gpu_nn.nn") for m in model.modules()) == 23
        assert gpu_nn.revert(model) is model
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert all(m is objects[n] for n, m in model.named_modules())
    assert all(p is params[n] for n, p in model.named_parameters())
    assert not any("_gpu_nn_activation" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(model(x, s, r), want, rtol=0, atol=0)
    scripted = torch.jit.script(model.cnn)
    torch.testing.assert_close(scripted(x, s), model.cnn(x, s), rtol=0, atol=0)
    model(x, s, r).backward()
    opt.step()  # the optimizer built on the converted model steps the reverted one's tensors
    assert all(p.grad is not None for p in opt.param_groups[0]["params"])


def test_revert_of_layers_built_as_ours_and_not_inplace():
    """Layers made with gpu_nn.nn directly revert too (a model written with our import), a
    lazy one to torch's lazy layer, which becomes torch's layer at its first call; inplace=False
    reverts a copy and leaves the model as it was."""
    model = tnn.Sequential(gnn.Conv2d(2, 3, 3), gnn.ReLU(), gnn.Flatten(), gnn.LazyLinear(4), gnn.GRU(4, 2))
    x = torch.randn(2, 2, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's lazy-module warning)
        copy_ = gpu_nn.revert(model, inplace=False)
    assert copy_ is not model and type(model[0]) is gnn.Conv2d and type(copy_[0]) is tnn.Conv2d
    assert [type(m) for m in copy_] == [tnn.Conv2d, tnn.ReLU, tnn.Flatten, tnn.LazyLinear, tnn.GRU]
    assert "_gpu_nn_activation" not in copy_[0].__dict__ and fused_activation(model[0]) is None  # (ours: None, kept)
    y = copy_[:4](x)
    assert type(copy_[3]) is tnn.Linear
    twin = tnn.GRU(4, 2)
    twin.load_state_dict(copy_[4].state_dict())
    torch.testing.assert_close(copy_[4](y)[0], twin(y)[0], rtol=0, atol=0)
    with pytest.raises(TypeError, match="revert\\(\\) expects a torch.nn.Module"):
        gpu_nn.revert(lambda t: t)


def test_revert_leaves_what_torch_has_no_layer_for():
    """A layer fusing an activation (activation=, gpu_nn.fuse), MinPool2d and a subclass of one
    of ours stay ours, named in one warning; the rest revert."""
    class MyLinear(gnn.Linear):
        pass

    model = tnn.Sequential(gnn.Conv2d(2, 3, 3, activation="relu"), gnn.MinPool2d(2), gnn.Flatten(), MyLinear(3, 2),
                           gnn.Tanh())
    with pytest.warns(UserWarning) as got:
        gpu_nn.revert(model)
    message = str(got[0].message)
    assert len(got) == 1 and message.startswith("gpu_nn.revert left these layers as gpu_nn layers")
    assert "0 (Conv2d): fuses activation='relu'" in message
    assert "1 (MinPool2d): torch has no such layer" in message
    assert "3 (MyLinear): a subclass of gpu_nn.nn.Linear" in message
    assert [type(m) for m in model] == [gnn.Conv2d, gnn.MinPool2d, tnn.Flatten, MyLinear, tnn.Tanh]
    fused = gpu_nn.fuse(tnn.Sequential(tnn.Linear(3, 4), tnn.ReLU(), tnn.Linear(4, 2)))
    with pytest.warns(UserWarning, match="fuses activation='relu'"):
        gpu_nn.revert(fused)
    assert type(fused.get_submodule("2")) is tnn.Linear
    # a traced converted model: our modules' forwards traced into calls of our functions
    traced = torch.fx.symbolic_trace(gpu_nn.convert(tnn.Sequential(tnn.Linear(3, 4), tnn.ReLU())))
    with pytest.warns(UserWarning, match=r"2 call\(s\) of gpu_nn functions in a torch.fx graph \(linear, relu\)"):
        gpu_nn.revert(traced)


@pytest.mark.parametrize("how", ["weight_norm", "custom"])
def test_revert_takes_parametrized_layers(how):
    """A parametrized layer of ours reverts to parametrize's generated class over torch's layer;
    remove_parametrizations then leaves torch's layer (convert's mirror)."""
    class Double(tnn.Module):
        def forward(self, X):
            return 2 * X

    layer = gnn.Linear(4, 3)
    if how == "custom":
        torch.nn.utils.parametrize.register_parametrization(layer, "weight", Double())
    else:
        torch.nn.utils.parametrizations.weight_norm(layer, "weight")
    x = torch.randn(5, 4)
    want = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gpu_nn.revert(layer)
    assert type(layer).__bases__ == (tnn.Linear,) and torch.nn.utils.parametrize.is_parametrized(layer, "weight")
    torch.testing.assert_close(layer(x), want)
    torch.nn.utils.parametrize.remove_parametrizations(layer, "weight")
    assert type(layer) is tnn.Linear


def test_revert_gives_a_converted_parametrized_layer_its_own_class_back():
    """convert then revert of a parametrized torch layer gives back the very class parametrize
    made (type() and isinstance() as before: a new look-alike class was made); a tensor
    parametrized in between (torch adds its property to the class over ours) gets a class
    with both properties instead."""
    class Double(tnn.Module):
        def forward(self, X):
            return 2 * X

    layer = tnn.Linear(4, 3)
    torch.nn.utils.parametrizations.weight_norm(layer, "weight")
    before = type(layer)
    gpu_nn.convert(layer)
    assert type(layer) is not before and isinstance(layer, gnn.Linear)
    gpu_nn.revert(layer)
    assert type(layer) is before
    gpu_nn.convert(layer)
    torch.nn.utils.parametrize.register_parametrization(layer, "bias", Double())
    bias = layer.bias.clone()
    gpu_nn.revert(layer)
    assert type(layer) is not before and type(layer).__bases__ == (tnn.Linear,)
    torch.testing.assert_close(layer.bias, bias, rtol=0, atol=0)
    assert torch.nn.utils.parametrize.is_parametrized(layer, "weight")


def test_scripting_error_names_revert_only_where_it_helps():
    """ScriptingNotSupportedError points to gpu_nn.revert for a layer revert gives torch's
    (a parametrized one too), not for one it leaves: a layer fusing an activation (its class
    alone decided: the hint sent a fused layer's user round in a loop)."""
    def message(module):
        with pytest.raises(gpu_nn.ScriptingNotSupportedError) as info:
            torch.jit.script(module)
        return str(info.value)

    assert "gpu_nn.revert" in message(gnn.Linear(4, 4))
    assert "gpu_nn.revert" not in message(gnn.Linear(4, 4, activation="relu"))
    assert "gpu_nn.revert" not in message(gnn.Conv2d(2, 2, 1, activation="tanh"))
    weighted = torch.nn.utils.parametrizations.weight_norm(gnn.Linear(4, 4), "weight")
    assert "gpu_nn.revert" in message(weighted)


@pytest.mark.parametrize("op", ["conv2d", "linear"])
@pytest.mark.parametrize("how", ["grad-w", "backward-inputs-w", "grad-x", "grad-b", "grad-x-w", "backward"])
@pytest.mark.parametrize("leaf", [True, False], ids=["leaf-x", "nonleaf-x"])  # (leaf x: a non-leaf weight)
def test_backward_computes_only_the_gradients_asked_for(op, how, leaf, monkeypatch):
    """autograd.grad(loss, [w]) / backward(inputs=[w]) through an input that requires grad: our
    conv and linear computed the input's gradient for nobody (a Function's needs_input_grad is
    fixed at the forward; torch's nodes ask the engine per call: an autograd audit; a whole
    input-gradient kernel, 2-50x the weight gradient's time on the CPU), and linear a bias
    gradient whatever was asked. The backward now asks the engine too (_dispatch.wanted); what is
    asked for is computed (input, weight, bias), with torch's values. Under autograd.grad the
    engine answers for a requested leaf with an exception (13 us): an op whose inputs are all
    leaves is not asked about (it computes what needs_input_grad says), nor are later leaves once
    one raised."""
    import gpu_nn.ops.conv as oc
    import gpu_nn.ops.dense as od

    computed = []
    if op == "conv2d":
        orig = oc.conv_backward
        monkeypatch.setattr(oc, "conv_backward", lambda *a: (computed.append(tuple(a[-1])), orig(*a))[1])
        ours, theirs = gpu_nn.functional.conv2d, torch.nn.functional.conv2d
        x0, w, b = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(4)
    else:
        orig = od.linear_backward
        # (has_bias, need_input, need_weight) -> (input, weight, bias) as conv's mask
        monkeypatch.setattr(od, "linear_backward", lambda *a: (computed.append((a[-2], a[-1], a[-3])), orig(*a))[1])
        ours, theirs = gpu_nn.functional.linear, torch.nn.functional.linear
        x0, w, b = torch.randn(5, 3), torch.randn(4, 3), torch.randn(4)
    base, w, b = (t.double().requires_grad_() for t in (x0, w, b))  # (values: float64)
    want = {"grad-w": (False, True, False), "backward-inputs-w": (False, True, False), "grad-x": (True, False, False),
            "grad-b": (False, False, True), "grad-x-w": (True, True, False), "backward": (True, True, True)}[how]
    results = []
    for fn in (ours, theirs):
        for t in (base, w, b):
            t.grad = None
        x, weight = (base, w * 1) if leaf else (base * 1, w)
        loss = (fn(x, weight, b) ** 2).sum()
        if how.startswith("grad"):
            results.append(torch.autograd.grad(loss, [t for t, k in zip((x, weight, b), want) if k]))
        else:
            loss.backward(inputs=[weight] if how == "backward-inputs-w" else None)
            results.append((base.grad, w.grad, b.grad))
    # under autograd.grad, once the engine raised for a requested leaf (x here when it is a leaf
    # and asked for, else the weight when asked for), later leaves of that backward count as
    # wanted: the bias, computed for nobody then (its column sum; no second exception)
    raised = how.startswith("grad") and ((leaf and want[0]) or (not leaf and want[1]))
    assert computed == [(want[0], want[1], want[2] or raised)]
    for a, b_ in zip(*results):
        if a is None or b_ is None:
            assert a is None and b_ is None
        else:
            torch.testing.assert_close(a, b_)
    if how == "grad-w":  # every input a leaf: needs_input_grad as it is
        computed.clear()
        torch.autograd.grad((ours(base, w, b) ** 2).sum(), [w])
        assert computed == [(True, True, True)]
