"""PyTorch's own test samples against gpu-nn (issue 18.4).

The OpInfo generators of ``torch.testing._internal.common_methods_invocations.op_db``
(``reference_inputs``, which include ``sample_inputs``, and ``error_inputs``) and the
ModuleInfo ``module_inputs`` / ``module_error_inputs`` of
``torch.testing._internal.common_modules.module_db`` are run through gpu-nn and through torch:

* every sample: the same output values, and the same gradients of every floating-point tensor
  argument (and module parameter) for a random cotangent;
* every error input: gpu-nn raises an exception of torch's type whose message matches torch's
  regex.

The reference backend runs every sample in float64. The Triton backend (the interpreter where
no GPU is present) runs a fixed, evenly spaced subset of each op's float32 samples, so the module
stays within about a minute on one core; its error bound is the project's (DESIGN section 4):
at most twice torch's own float32 error against float64, plus a floor for a reduction as long as
the input (one term's for the elementwise ops: relu, sigmoid, tanh, max pooling, flatten), for the
outputs and every input gradient. A sample gpu-nn cannot run is a failure: none is out of gpu-nn's scope today, LSTM's
proj_size samples included.
"""

from __future__ import annotations

import re

import pytest
import torch

import gpu_nn
import gpu_nn.functional as F
import gpu_nn.nn as gnn
from gpu_nn import _backend
from helpers import max_rel_err, tol

# torch's test utilities import the expecttest package, which torch does not install: where it
# is missing the whole module skips (an environment without torch's test dependencies)
pytest.importorskip("expecttest", reason="torch's OpInfo / ModuleInfo samples (torch.testing._internal) "
                    "import the expecttest package, which is not installed here")

# imported after gpu_nn (conftest sets the interpreter up first)
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db  # noqa: E402

# torch's test utilities call torch.backends.disable_global_flags() when imported, which makes
# every later `torch.backends.cudnn.allow_tf32 = ...` raise. pytest imports this module while
# collecting, in every worker, so the other modules' TF32 tests failed (38 errors in one run).
# Give the flags back: nothing here relies on them being frozen.
# (the module object torch.backends is not the namespace its functions read: go through theirs)
torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
assert not torch.backends.flags_frozen()

# OpInfo name -> gpu_nn.functional name (the 'with_dtype' variants of softmax / log_softmax too)
OPS = {
    "nn.functional.conv1d": "conv1d",
    "nn.functional.conv2d": "conv2d",
    "nn.functional.max_pool1d": "max_pool1d",
    "nn.functional.max_pool2d": "max_pool2d",
    "nn.functional.avg_pool1d": "avg_pool1d",
    "nn.functional.avg_pool2d": "avg_pool2d",
    "nn.functional.relu": "relu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "nn.functional.linear": "linear",
    "softmax": "softmax",
    "log_softmax": "log_softmax",
    "nn.functional.cross_entropy": "cross_entropy",
    "flatten": "flatten",
}
MODULES = ("Conv1d", "Conv2d", "MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d", "Linear", "ReLU", "Sigmoid", "Tanh",
           "Softmax", "LogSoftmax", "CrossEntropyLoss", "RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell")

OP_INFOS = [op for op in op_db if op.name in OPS]
MODULE_INFOS = [m for m in module_db if m.module_cls.__name__ in MODULES]
assert {op.name for op in OP_INFOS} == set(OPS), "an OpInfo named in OPS is missing from this torch"
assert {m.module_cls.__name__ for m in MODULE_INFOS} == set(MODULES), "a ModuleInfo named in MODULES is missing"

TRITON_SAMPLES_PER_OP = 6  # evenly spaced over each op's samples: about a minute for the module on one core


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The samples are tiny: torch's intra-op thread pool costs more than it saves (4x here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _op_id(op) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


def _tensors(obj):
    """The tensors of a (nested) output or argument list, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, torch.nn.utils.rnn.PackedSequence):
        return [obj.data, obj.batch_sizes]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _clone(obj):
    """Fresh leaves with the same values and requires_grad (each side gets its own graph)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone().requires_grad_(obj.requires_grad)
    if isinstance(obj, torch.nn.utils.rnn.PackedSequence):
        return torch.nn.utils.rnn.PackedSequence(_clone(obj.data), obj.batch_sizes, obj.sorted_indices, obj.unsorted_indices)
    if isinstance(obj, tuple):
        return tuple(_clone(o) for o in obj)
    if isinstance(obj, list):
        return [_clone(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj


def _leaves(args, params=()):
    return [t for t in _tensors(args) if t.requires_grad and t.is_leaf] + list(params)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _compare(ours_out, theirs_out, ours_leaves, theirs_leaves, bound, seed: int) -> str | None:
    """None if values and gradients agree (``bound(ours, theirs) -> str | None``), else why."""
    a, b = _tensors(ours_out), _tensors(theirs_out)
    if len(a) != len(b):
        return f"{len(a)} output tensors, torch {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"output {i}: {tuple(x.shape)} {x.dtype}, torch {tuple(y.shape)} {y.dtype}"
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return f"output {i} (integer) differs"
            continue
        why = bound(x, y)
        if why:
            return f"output {i}: {why}"
    diff = [(x, y) for x, y in zip(a, b) if y.requires_grad and y.is_floating_point()]
    if not diff or not theirs_leaves:
        return None
    gen = torch.Generator().manual_seed(seed)
    cots = [torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device, y.dtype) for _, y in diff]
    gt = torch.autograd.grad([y for _, y in diff], theirs_leaves, cots, allow_unused=True)
    try:
        go = torch.autograd.grad([x for x, _ in diff], ours_leaves, cots, allow_unused=True)
    except Exception as e:  # noqa: BLE001
        return f"backward raised {_describe(e)}"
    for i, (x, y, leaf) in enumerate(zip(go, gt, theirs_leaves)):
        x = torch.zeros_like(leaf) if x is None else x
        y = torch.zeros_like(leaf) if y is None else y
        why = bound(x, y)
        if why:
            return f"gradient {i} ({tuple(leaf.shape)}): {why}"
    return None


def _err(x, y) -> float:
    """helpers.max_rel_err over the finite entries; NaN and +-inf must sit at the same places
    (inf with the same sign), else the error is inf."""
    x, y = x.detach().to("cpu", torch.float64), y.detach().to("cpu", torch.float64)
    if x.shape != y.shape:
        return float("inf")
    fin_x, fin_y = torch.isfinite(x), torch.isfinite(y)
    if not torch.equal(fin_x, fin_y) or not torch.equal(torch.isnan(x), torch.isnan(y)):
        return float("inf")
    inf = torch.isinf(y)
    if not torch.equal(x[inf], y[inf]):
        return float("inf")
    return max_rel_err(x[fin_y], y[fin_y])


def _bound_float64(k: int):
    """float64 round-off of a reduction up to ``k`` long: ``k`` is the number of elements of all
    the sample's tensors and parameters, an upper bound of every reduction length (a recurrent
    gradient sums over steps, layers and gates)."""
    def bound(x, y):
        err = _err(x, y)
        return None if err <= tol(torch.float64, k) else f"max relative error {err:.3e}"

    return bound


def _numel(*objs) -> int:
    return max(sum(t.numel() for o in objs for t in _tensors(o)), 1)


# --------------------------------------------------------------------------- OpInfo samples


def _run_op_samples(op, backend: str, dtype, limit: int | None = None, device: str = "cpu"):
    fn = getattr(F, OPS[op.name])
    samples = list(op.reference_inputs(device, dtype, requires_grad=True))
    if limit is not None and len(samples) > limit:
        step = len(samples) / limit
        samples = [samples[int(i * step)] for i in range(limit)]
    bad = []
    for i, s in enumerate(samples):
        sid = f"{_op_id(op)}[{i}]"
        t_in, t_args, t_kw = _clone(s.input), _clone(s.args), _clone(s.kwargs)
        theirs_leaves = _leaves((t_in, t_args, t_kw))
        try:
            theirs = op.op(t_in, *t_args, **t_kw)
        except Exception as e:  # noqa: BLE001
            bad.append(f"{sid}: torch itself raised {_describe(e)}")
            continue
        o_in, o_args, o_kw = _clone(s.input), _clone(s.args), _clone(s.kwargs)
        ours_leaves = _leaves((o_in, o_args, o_kw))
        try:
            with gpu_nn.backend(backend):
                ours = fn(o_in, *o_args, **o_kw)
                if dtype == torch.float64:
                    why = _compare(ours, theirs, ours_leaves, theirs_leaves, _bound_float64(_numel(s.input, s.args, s.kwargs)), i)
                else:
                    why = _compare_low(ours, theirs, ours_leaves, theirs_leaves, s, op, i)
        except Exception as e:  # noqa: BLE001
            why = f"raised {_describe(e)}"
        if why:
            bad.append(f"{sid} {s.summary() if hasattr(s, 'summary') else ''}: {why}")
    return len(samples), bad


# elementwise ops: each output and input-gradient element one rounding of its own input, no sum
_ELEMENTWISE = ("relu", "sigmoid", "tanh", "flatten", "max_pool1d", "max_pool2d")


def _compare_low(ours, theirs, ours_leaves, theirs_leaves, s, op, seed):
    """float32 (Triton): at most twice torch's float32 error against float64, plus the floor of
    a reduction as long as the whole input (an upper bound of every reduction in these ops), of
    one term's for the elementwise ones (max pooling selects; its gradient scatters sums of at
    most a window's few terms, within tol's 12 eps); every gradient torch gives, given by ours too."""
    k = 1 if OPS[op.name] in _ELEMENTWISE else max(s.input.numel(), 1)
    t64_in, t64_args, t64_kw = (_clone(_to64(a)) for a in (s.input, s.args, s.kwargs))
    leaves64 = _leaves((t64_in, t64_args, t64_kw))
    ref = op.op(t64_in, *t64_args, **t64_kw)
    # gradients of the float64 result for the same cotangents, to measure both errors against
    exact = _grads_like(ref, leaves64, theirs, seed)
    torch_grads = _grads_like(theirs, theirs_leaves, theirs, seed)
    ours_grads = _grads_like(ours, ours_leaves, theirs, seed)
    a, b, r = _tensors(ours), _tensors(theirs), _tensors(ref)
    if len(a) != len(b):
        return f"{len(a)} output tensors, torch {len(b)}"
    if not (len(ours_grads) == len(torch_grads) == len(exact)):  # ours with no graph gives none
        return f"{len(ours_grads)} gradients, torch {len(torch_grads)}"
    pairs = list(zip(a, b, r)) + list(zip(ours_grads, torch_grads, exact))
    for i, (x, y, e) in enumerate(pairs):
        if x.shape != y.shape:
            return f"tensor {i}: shape {tuple(x.shape)}, torch {tuple(y.shape)}"
        if not y.is_floating_point():
            if not torch.equal(x, y):
                return f"tensor {i} (integer) differs"
            continue
        ours_err, torch_err = _err(x, e), _err(y, e)
        if ours_err > 2 * torch_err + tol(torch.float32, k):
            return f"tensor {i}: error {ours_err:.3e} > 2 x torch's {torch_err:.3e} + floor"
    return None


def _to64(obj):
    """float64 copies keeping requires_grad (the float64 gradients are what both sides' errors are
    measured against: without it the gradients' comparison had nothing to zip with)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().double().requires_grad_(obj.requires_grad) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_to64(o) for o in obj)
    if isinstance(obj, list):
        return [_to64(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _to64(v) for k, v in obj.items()}
    return obj


def _grads_like(out, leaves, theirs, seed):
    outs = [t for t in _tensors(out) if t.is_floating_point() and t.requires_grad]
    shapes = [t for t in _tensors(theirs) if t.is_floating_point() and t.requires_grad]
    if not outs or not leaves:
        return []
    gen = torch.Generator().manual_seed(seed)
    # on the outputs' device (CUDA on a GPU: autograd refuses a CPU gradient for a CUDA output)
    cots = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for t, o in zip(shapes, outs)]
    grads = torch.autograd.grad(outs, leaves, cots, allow_unused=True)
    return [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]


@pytest.mark.parametrize("op", OP_INFOS, ids=_op_id)
def test_opinfo_samples_on_reference(op):
    n, bad = _run_op_samples(op, "reference", torch.float64)
    assert n > 0
    assert not bad, f"{len(bad)} of {n} samples differ from torch:\n" + "\n".join(bad[:12])


def _triton_param():
    ok, why = _backend.status("triton")
    return pytest.param("triton", marks=() if ok else pytest.mark.skip(reason=f"triton backend unavailable: {why}"))


@pytest.mark.parametrize("backend", [_triton_param()])
@pytest.mark.parametrize("op", OP_INFOS, ids=_op_id)
def test_opinfo_samples_on_triton(op, backend):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors run in the interpreter
    n, bad = _run_op_samples(op, backend, torch.float32, limit=TRITON_SAMPLES_PER_OP, device=device)
    assert n > 0
    assert not bad, f"{len(bad)} of {n} samples differ from torch:\n" + "\n".join(bad[:12])


@pytest.mark.parametrize("op", [op for op in OP_INFOS if op.error_inputs_func is not None], ids=_op_id)
def test_opinfo_error_inputs(op):
    fn = getattr(F, OPS[op.name])
    bad, n = [], 0
    for i, e in enumerate(op.error_inputs("cpu")):
        s = e.sample_input
        try:
            op.op(s.input, *s.args, **s.kwargs)
        except e.error_type:
            pass
        else:
            continue  # this error input does not fail on this torch build / device: nothing to mirror
        n += 1
        try:
            with gpu_nn.backend("reference"):
                fn(s.input, *s.args, **s.kwargs)
        except Exception as ours:  # noqa: BLE001
            if not isinstance(ours, e.error_type) or not re.search(e.error_regex, str(ours)):
                bad.append(f"[{i}] torch {e.error_type.__name__} /{e.error_regex}/, ours {_describe(ours)}")
        else:
            bad.append(f"[{i}] torch raises {e.error_type.__name__} /{e.error_regex}/, ours returned")
    assert n > 0
    assert not bad, f"{len(bad)} of {n} error inputs:\n" + "\n".join(bad[:12])


# --------------------------------------------------------------------------- ModuleInfo samples


def _module_samples(info, dtype):
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True)


def _module_params():
    """One pytest param per ModuleInfo sample, id "<Module>[<index>]"."""
    params = []
    for info in MODULE_INFOS:
        name = info.module_cls.__name__
        for i, mi in enumerate(_module_samples(info, torch.float64)):
            sid = f"{name}[{i}]"
            params.append(pytest.param(info, i, id=sid))
    return params


@pytest.mark.parametrize("info,index", _module_params())
def test_module_inputs_on_reference(info, index):
    name = info.module_cls.__name__
    mi = _module_samples(info, torch.float64)[index]  # fresh tensors (the generator is seeded)
    c_args, c_kw = mi.constructor_input.args, mi.constructor_input.kwargs
    torch.manual_seed(0)
    theirs_m = info.module_cls(*c_args, **c_kw).to(torch.float64)
    ours_m = getattr(gnn, name)(*c_args, **c_kw).to(torch.float64)
    ours_m.load_state_dict(theirs_m.state_dict())
    f_args, f_kw = mi.forward_input.args, mi.forward_input.kwargs
    t_args, t_kw = _clone(f_args), _clone(f_kw)
    theirs = theirs_m(*t_args, **t_kw)
    o_args, o_kw = _clone(f_args), _clone(f_kw)
    with gpu_nn.backend("reference"):
        ours = ours_m(*o_args, **o_kw)
        k = _numel(f_args, f_kw, list(theirs_m.parameters()))
        why = _compare(ours, theirs, _leaves((o_args, o_kw), ours_m.parameters()),
                       _leaves((t_args, t_kw), theirs_m.parameters()), _bound_float64(k), index)
    assert why is None, f"{name}({c_kw}) {mi.desc}: {why}"


@pytest.mark.parametrize("info", [m for m in MODULE_INFOS if m.module_error_inputs_func is not None],
                         ids=lambda m: m.module_cls.__name__)
def test_module_error_inputs(info):
    ours_cls = getattr(gnn, info.module_cls.__name__)
    bad, n = [], 0
    inputs = info.module_error_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=False, training=True)
    for i, e in enumerate(inputs):
        mi = e.module_error_input
        c_args, c_kw = mi.constructor_input.args, mi.constructor_input.kwargs
        n += 1
        try:
            with gpu_nn.backend("reference"):
                m = ours_cls(*c_args, **c_kw).to(torch.float64)
                if e.error_on == ModuleErrorEnum.FORWARD_ERROR:
                    m(*mi.forward_input.args, **mi.forward_input.kwargs)
        except Exception as ours:  # noqa: BLE001
            if not isinstance(ours, e.error_type) or not re.search(e.error_regex, str(ours)):
                bad.append(f"[{i}] {c_kw}: torch {e.error_type.__name__} /{e.error_regex}/, ours {_describe(ours)}")
        else:
            bad.append(f"[{i}] {c_kw}: torch raises {e.error_type.__name__} /{e.error_regex}/, ours did not")
    assert n > 0
    assert not bad, f"{len(bad)} of {n} error inputs:\n" + "\n".join(bad[:12])
