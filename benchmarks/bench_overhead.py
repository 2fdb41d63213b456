"""Host overhead: wall time per call with tiny inputs (issue 14.5).

Every public op (``gpu_nn.functional``), every module (``gpu_nn.nn``) and every optimizer step
(``gpu_nn.optim``, plus ``clip_grad_norm_``), forward without grad and forward+backward, ours
against torch in the same process. Inputs are a handful of elements (conv 1x2x5x5), so the
time is what a call costs on the host: argument checks, backend resolution, the custom-op
and autograd machinery, the launch. On a CPU machine ours runs through the reference backend;
on a GPU through each GPU backend that implements the op.

Floors: torch's own Python-level machinery costs something whatever the op does. Each case
also times two bare wrappers around the same torch op on the same inputs -- a
``torch.library.custom_op`` with ``register_autograd`` (``floor-custom-op``) and a
``torch.autograd.Function`` (``floor-function``) -- so that ``ours / floor`` shows how much
we add on top of the mechanism we use. Each timed call runs the op ``CALLS`` times in a loop;
the harness divides, so the figures are seconds per call.

On a shared, loaded CPU machine wall time measures the neighbours as much as the call (seen: a
2-core box at load 6 tripled every figure, torch's included); ``gpu-nn bench --family overhead
--clock thread`` times the calling thread's CPU seconds instead, the host cost proper.
"""

from __future__ import annotations

import torch

import gpu_nn
import gpu_nn.functional as F
import gpu_nn.nn as gnn
import gpu_nn.optim as goptim
from gpu_nn.benchmarks import harness

CALLS = 20  # calls per timed sample: one call is a few microseconds, below the timer's noise


REPS = 15  # samples per provider at least, also under --quick: the figures are small and noisy


class _one_thread:
    """torch on one intra-op thread while a sample runs (every provider alike): inputs this
    small never gain from threads, and on a loaded machine an OpenMP barrier can wait a whole
    scheduler slice (16 ms for a 1x2x5x5 conv2d seen on a busy 2-core box), which measures the
    neighbours, not the call."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


# ----------------------------------------------------------------------------- floors

@torch.library.custom_op("gpu_nn_bench::floor", mutates_args=())
def _floor_op(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_floor_op.register_fake
def _(x):
    return torch.empty_like(x)


def _floor_setup(ctx, inputs, output):
    pass


def _floor_backward(ctx, grad):
    return grad


_floor_op.register_autograd(_floor_backward, setup_context=_floor_setup)


class _FloorFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


def floor_custom_op(x):
    """A bare custom op with register_autograd around a trivial op (a clone of ``x``)."""
    return _floor_op(x)


def floor_function(x):
    """A bare torch.autograd.Function around the same trivial op."""
    return _FloorFunction.apply(x)


# ----------------------------------------------------------------------------- inputs

def _r(*shape, grad=False, device="cpu", dtype=torch.float32):
    return torch.randn(shape, device=device, dtype=dtype).requires_grad_(grad)


def _functional_ops(device):
    """name -> (make(grad) -> args, ours(*args), torch(*args)). Tiny shapes, odd sizes."""
    def x4(grad):
        return (_r(4, grad=grad, device=device),)

    def conv1(grad):
        return (_r(1, 2, 5, grad=grad, device=device), _r(3, 2, 3, grad=grad, device=device), _r(3, grad=grad, device=device))

    def conv2(grad):
        return (_r(1, 2, 5, 5, grad=grad, device=device), _r(3, 2, 3, 3, grad=grad, device=device),
                _r(3, grad=grad, device=device))

    def img(grad):
        return (_r(1, 2, 5, 5, grad=grad, device=device),)

    def seq(grad):
        return (_r(1, 2, 7, grad=grad, device=device),)

    def lin(grad):
        return (_r(2, 4, grad=grad, device=device), _r(3, 4, grad=grad, device=device), _r(3, grad=grad, device=device))

    def logits(grad):
        return (_r(2, 5, grad=grad, device=device),)

    def ce(grad):
        return (_r(2, 5, grad=grad, device=device), torch.tensor([1, 3], device=device))

    def cell(mode):
        G = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}[mode]

        def make(grad):
            args = [_r(2, 3, grad=grad, device=device), _r(2, 4, grad=grad, device=device)]
            if mode == "lstm":
                args[1] = (args[1], _r(2, 4, grad=grad, device=device))
            return (*args, _r(G * 4, 3, grad=grad, device=device), _r(G * 4, 4, grad=grad, device=device),
                    _r(G * 4, grad=grad, device=device), _r(G * 4, grad=grad, device=device))
        return make

    def seqf(mode):
        G = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}[mode]

        def make(grad):
            h = _r(1, 2, 4, grad=grad, device=device)
            hx = (h, _r(1, 2, 4, grad=grad, device=device)) if mode == "lstm" else h
            params = [_r(G * 4, 3, grad=grad, device=device), _r(G * 4, 4, grad=grad, device=device),
                      _r(G * 4, grad=grad, device=device), _r(G * 4, grad=grad, device=device)]
            return (_r(3, 2, 3, grad=grad, device=device), hx, params)
        return make

    tf = torch.nn.functional
    ops = {
        "relu": (x4, F.relu, tf.relu),
        "sigmoid": (x4, F.sigmoid, torch.sigmoid),
        "tanh": (x4, F.tanh, torch.tanh),
        "conv1d": (conv1, lambda x, w, b: F.conv1d(x, w, b, padding=1), lambda x, w, b: tf.conv1d(x, w, b, padding=1)),
        "conv2d": (conv2, lambda x, w, b: F.conv2d(x, w, b, padding=1), lambda x, w, b: tf.conv2d(x, w, b, padding=1)),
        "max_pool1d": (seq, lambda x: F.max_pool1d(x, 3, 2, 1), lambda x: tf.max_pool1d(x, 3, 2, 1)),
        "max_pool2d": (img, lambda x: F.max_pool2d(x, 3, 2, 1), lambda x: tf.max_pool2d(x, 3, 2, 1)),
        "min_pool1d": (seq, lambda x: F.min_pool1d(x, 3, 2, 1), lambda x: -tf.max_pool1d(-x, 3, 2, 1)),
        "min_pool2d": (img, lambda x: F.min_pool2d(x, 3, 2, 1), lambda x: -tf.max_pool2d(-x, 3, 2, 1)),
        "avg_pool1d": (seq, lambda x: F.avg_pool1d(x, 3, 2, 1), lambda x: tf.avg_pool1d(x, 3, 2, 1)),
        "avg_pool2d": (img, lambda x: F.avg_pool2d(x, 3, 2, 1), lambda x: tf.avg_pool2d(x, 3, 2, 1)),
        "flatten": (img, lambda x: F.flatten(x, 1), lambda x: torch.flatten(x, 1)),
        "linear": (lin, F.linear, tf.linear),
        "softmax": (logits, lambda x: F.softmax(x, 1), lambda x: tf.softmax(x, 1)),
        "log_softmax": (logits, lambda x: F.log_softmax(x, 1), lambda x: tf.log_softmax(x, 1)),
        "cross_entropy": (ce, F.cross_entropy, tf.cross_entropy),
        "rnn_tanh_cell": (cell("rnn_tanh"), F.rnn_tanh_cell, torch.rnn_tanh_cell),
        "rnn_relu_cell": (cell("rnn_relu"), F.rnn_relu_cell, torch.rnn_relu_cell),
        "lstm_cell": (cell("lstm"), F.lstm_cell, torch.lstm_cell),
        "gru_cell": (cell("gru"), F.gru_cell, torch.gru_cell),
    }
    for mode in ("rnn_tanh", "rnn_relu", "lstm", "gru"):
        ours, theirs = getattr(F, mode), getattr(torch, mode)
        ops[mode] = (seqf(mode), (lambda o: lambda x, hx, p: o(x, hx, p, True, 1, 0.0, True, False, False))(ours),
                     (lambda t: lambda x, hx, p: t(x, hx, p, True, 1, 0.0, True, False, False))(theirs))
    return ops


def _modules(device):
    """name -> (make(grad) -> args, constructor kwargs..., module class name). Twins share weights."""
    def x(*shape):
        return lambda grad: (_r(*shape, grad=grad, device=device),)

    def ce(grad):
        return (_r(2, 5, grad=grad, device=device), torch.tensor([1, 3], device=device))

    return {
        "Conv1d": (x(1, 2, 5), (2, 3, 3), {"padding": 1}),
        "Conv2d": (x(1, 2, 5, 5), (2, 3, 3), {"padding": 1}),
        "MaxPool1d": (x(1, 2, 7), (3, 2, 1), {}),
        "MaxPool2d": (x(1, 2, 5, 5), (3, 2, 1), {}),
        "MinPool1d": (x(1, 2, 7), (3, 2, 1), {}),
        "MinPool2d": (x(1, 2, 5, 5), (3, 2, 1), {}),
        "AvgPool1d": (x(1, 2, 7), (3, 2, 1), {}),
        "AvgPool2d": (x(1, 2, 5, 5), (3, 2, 1), {}),
        "Flatten": (x(1, 2, 5, 5), (), {}),
        "Linear": (x(2, 4), (4, 3), {}),
        "ReLU": (x(4), (), {}),
        "Sigmoid": (x(4), (), {}),
        "Tanh": (x(4), (), {}),
        "Softmax": (x(2, 5), (1,), {}),
        "LogSoftmax": (x(2, 5), (1,), {}),
        "CrossEntropyLoss": (ce, (), {}),
        "RNNCell": (x(2, 3), (3, 4), {}),
        "LSTMCell": (x(2, 3), (3, 4), {}),
        "GRUCell": (x(2, 3), (3, 4), {}),
        "RNN": (x(3, 2, 3), (3, 4), {}),
        "LSTM": (x(3, 2, 3), (3, 4), {}),
        "GRU": (x(3, 2, 3), (3, 4), {}),
    }


class _MinPoolTwin(torch.nn.Module):
    """torch's twin of MinPool: -MaxPool(-x)."""

    def __init__(self, pool):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        return -self.pool(-x)


def _torch_module(name, args, kwargs):
    if name.startswith("MinPool"):
        return _MinPoolTwin(getattr(torch.nn, name.replace("Min", "Max"))(*args, **kwargs))
    return getattr(torch.nn, name)(*args, **kwargs)


OPTIMIZERS = {
    "SGD": {"lr": 0.1, "momentum": 0.9},
    "Adagrad": {"lr": 0.1},
    "Adadelta": {},
    "RMSprop": {"lr": 0.01},
    "Adam": {"lr": 0.01},
    "AdamW": {"lr": 0.01},
}


# ----------------------------------------------------------------------------- timed callables

def _first(y):
    """The tensor a backward starts from: the first output (a sequence op's output)."""
    while isinstance(y, (tuple, list)):
        y = y[0]
    return y


def _loop(fn, make, backward: bool, backend: str | None, params=()):
    """setup(): CALLS calls of ``fn`` on rotating inputs; with ``backward`` each call also runs
    ``autograd.grad`` (no ``.grad`` accumulation) with respect to the inputs and ``params``, all
    inside ``gpu_nn.backend(backend)``."""

    def setup():
        def inputs():
            args = make(backward)
            leaves = [t for t in _flat(args) if t.requires_grad] + list(params)
            return args, leaves

        nxt = harness.rotating(inputs)

        def call():
            args, leaves = nxt()
            with _one_thread():
                _calls(fn, args, leaves, backward)

        return _on_backend(call, backend)

    return setup


def _calls(fn, args, leaves, backward, calls=CALLS, allow_unused=False):
    """``calls`` calls of ``fn(*args)``: with ``backward`` each also takes the gradient of its
    first output with respect to ``leaves``; else under no_grad."""
    if backward:
        for _ in range(calls):
            y = _first(fn(*args))
            torch.autograd.grad(y, leaves, torch.ones_like(y), allow_unused=allow_unused)
    else:
        with torch.no_grad():
            for _ in range(calls):
                fn(*args)


def _flat(args):
    for a in args:
        if isinstance(a, (tuple, list)):
            yield from _flat(a)
        elif isinstance(a, torch.Tensor):
            yield a


def _params_with_grads(device):
    ps = [torch.nn.Parameter(_r(*s, device=device)) for s in ((3, 4), (3,), (5,))]
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps


def _on_backend(call, backend):
    """``call`` as is (torch), or inside ``gpu_nn.backend(backend)`` after one untimed run (which
    fails here, at setup, when the backend cannot run the op)."""
    if backend is None:
        return call

    def on_backend():
        with gpu_nn.backend(backend):
            call()

    on_backend()
    return on_backend


def _optim_setup(cls, kw, device, backend):
    def setup():
        opt = cls(_params_with_grads(device), **kw)

        def call():
            with _one_thread():
                for _ in range(CALLS):
                    opt.step()

        return _on_backend(call, backend)

    return setup


def _clip_setup(fn, device, backend):
    def setup():
        ps = _params_with_grads(device)

        def call():
            with _one_thread():
                for _ in range(CALLS):
                    fn(ps, 1e6)  # a max_norm that never scales: the figure is the call, not the data

        return _on_backend(call, backend)

    return setup


def _launch_setup(device: str, fast: bool | None):
    """setup(): CALLS launches of the relu forward kernel on 4 elements straight through the
    Triton launcher function (no op machinery): ``fast`` False through ``kernel[grid]`` (the
    JIT's binder on every call), True through the cached launch plan (``kernels/triton/_launch``);
    None is torch's ``clamp_min(out=)`` for scale."""

    def setup():
        x = _r(4, device=device)
        y = torch.empty_like(x)
        if fast is None:
            def call():
                for _ in range(CALLS):
                    torch.clamp_min(x, 0, out=y)
            return call
        from gpu_nn.kernels.triton import _launch, activation

        def call():
            prev = _launch.set_enabled(fast)
            try:
                for _ in range(CALLS):
                    activation.act_forward(x, y, "relu", False)
            finally:
                _launch.set_enabled(prev)

        call()  # compiles, and makes the plan
        return call

    return setup


def _launch_case(device: str) -> harness.Case | None:
    """Triton launch cost per call, JIT path against the cached launch plan (GPU only)."""
    if not device.startswith("cuda"):
        return None
    from gpu_nn.kernels.triton import _launch

    providers = {"torch": _launch_setup(device, None), "triton-jit": _launch_setup(device, False)}
    prev = _launch.set_enabled(True)
    if _launch.enabled():  # a verified Triton version: the fast path exists here
        providers["triton-fast"] = _launch_setup(device, True)
    _launch.set_enabled(prev)
    return harness.Case(family="overhead", name="launch relu fwd kernel", shape="4",
                        providers=providers, device=device, calls=CALLS, min_reps=REPS)


def _ours(device: str):
    return ("triton", "cupy") if device.startswith("cuda") else ("reference",)


def _floors(make, backward: bool):
    """The two floors, on the first tensor argument of this case (1-in, 1-out wrappers)."""
    def first(grad):
        return (next(_flat(make(grad))),)

    return {
        "floor-custom-op": _loop(floor_custom_op, first, backward, None),
        "floor-function": _loop(floor_function, first, backward, None),
    }


# --quick on a GPU: one op of each kind (the full family is about 100 cases, each of whose
# providers compiles its kernels on first use, which a quick GPU run cannot afford)
QUICK_GPU = ("relu", "sigmoid", "conv2d", "max_pool2d", "avg_pool2d", "linear", "softmax", "cross_entropy",
             "lstm_cell", "lstm", "gru", "Linear", "Conv2d", "LSTM", "SGD", "Adam", "clip_grad_norm_", "launch")


class _Resolved(Exception):
    """Raised by :func:`_implemented`'s probe once a call has resolved its backend."""


def _implemented(providers: dict, device: str) -> dict:
    """On a GPU, drop the providers of ours whose backend lacks the op (relu has no CUDA C
    kernel, say): one call each, stopped where it first resolves its backend
    (``gpu_nn._backend.resolve``, which raises BackendUnavailableError where the op is not
    there), before any kernel. The call ran whole before: this runs in the bench's parent
    process ahead of the warm phase, so on a fresh GPU every overhead provider's kernels
    compiled here one after another (about 70 under --quick) before the parallel warm phase
    started its clock. Any other error stays for the timed run to report."""
    if not device.startswith("cuda"):
        return providers
    from gpu_nn import _backend
    from gpu_nn._errors import BackendUnavailableError

    real = _backend.resolve

    def probe(*args, **kwargs):
        real(*args, **kwargs)  # (BackendUnavailableError where the backend lacks the op)
        raise _Resolved

    keep = {}
    for name, setup in providers.items():
        if name in ("triton", "cupy"):
            _backend.resolve = probe
            try:
                setup()()
            except BackendUnavailableError:
                continue
            except Exception:  # noqa: BLE001 - _Resolved: it is there; else reported by the timed run
                pass
            finally:
                _backend.resolve = real
        keep[name] = setup
    return keep


def cases(device: str, quick: bool, only=None) -> list[harness.Case]:
    """One case per (op | module | optimizer, fwd | fwd+bwd); ``only`` restricts to those names
    (``--quick`` on a GPU: ``QUICK_GPU``)."""
    if only is None and quick and device.startswith("cuda"):
        only = QUICK_GPU
    out = []
    ours = _ours(device)

    def add(name, kind, make, ours_fn, torch_fn, shape):
        for backward in (False, True):
            tp = list(torch_fn.parameters()) if isinstance(torch_fn, torch.nn.Module) else []
            op = list(ours_fn.parameters()) if isinstance(ours_fn, torch.nn.Module) else []
            providers = {"torch": _loop(torch_fn, make, backward, None, tp)}
            for b in ours:
                providers[b] = _loop(ours_fn, make, backward, b, op)
            providers = _implemented(providers, device)
            providers.update(_floors(make, backward))
            out.append(harness.Case(family="overhead", name=f"{name} {'fwd+bwd' if backward else 'fwd'}",
                                    shape=shape, providers=providers, device=device, calls=CALLS, min_reps=REPS))

    for name, (make, f_ours, f_torch) in _functional_ops(device).items():
        if only and name not in only:
            continue
        shape = " ".join("x".join(map(str, t.shape)) for t in _flat(make(False)))
        add(f"F.{name}", "op", make, f_ours, f_torch, shape)
    for name, (make, args, kwargs) in _modules(device).items():
        if only and name not in only:
            continue
        torch.manual_seed(0)
        m_torch = _torch_module(name, args, kwargs).to(device)
        m_ours = vars(gnn)[name](*args, **kwargs).to(device)  # (ours only: vars, not the torch fallback)
        if list(m_torch.parameters()):
            m_ours.load_state_dict(m_torch.state_dict())
        shape = " ".join("x".join(map(str, t.shape)) for t in _flat(make(False)))
        add(f"nn.{name}", "module", make, m_ours, m_torch, shape)
    for name, kw in OPTIMIZERS.items():
        if only and name not in only:
            continue
        # torch's optimizer as its users get it: its default implementation for the device
        # (per tensor on a CPU, foreach on CUDA; forcing per tensor there slowed the baseline)
        providers = {"torch": _optim_setup(getattr(torch.optim, name), kw, device, None)}
        for b in _ours(device):
            providers[b] = _optim_setup(vars(goptim)[name], kw, device, b)
        providers = _implemented(providers, device)
        out.append(harness.Case(family="overhead", name=f"optim.{name} step", shape="3 params, 20 elements",
                                providers=providers, device=device, calls=CALLS, min_reps=REPS))
    if not only or "clip_grad_norm_" in only:
        providers = {"torch": _clip_setup(torch.nn.utils.clip_grad_norm_, device, None)}
        for b in _ours(device):
            providers[b] = _clip_setup(gnn.utils.clip_grad_norm_, device, b)
        providers = _implemented(providers, device)
        out.append(harness.Case(family="overhead", name="clip_grad_norm_", shape="3 params, 20 elements",
                                providers=providers, device=device, calls=CALLS, min_reps=REPS))
    if (not only or "launch" in only) and (case := _launch_case(device)) is not None:
        out.append(case)
    return out


def summary(rows) -> list[dict]:
    """Per row and backend of ours: ratio to torch, to each floor, and whether the goal holds
    (fwd <= 3x torch, fwd+bwd and optimizer steps <= 2x torch, or <= 1.3x the custom-op floor).

    The figure is what a loop of calls costs per call: on a GPU the larger of host and device time
    (``loop_seconds``; a GPU row's ``seconds`` are device time, about equal for every side at these
    sizes, which would read every goal as met), on a CPU the call's time."""
    res = []
    for r in rows:
        s = r.get("loop_seconds") or r["seconds"]
        for b in harness.OUR_BACKENDS:
            if b not in s or "torch" not in s:
                continue
            limit = 3.0 if r["name"].endswith(" fwd") else 2.0
            item = {"name": r["name"], "backend": b, "vs_torch": s[b] / s["torch"]}
            for f in ("floor-custom-op", "floor-function"):
                if f in s:
                    item[f"vs_{f}"] = s[b] / s[f]
            floor_ok = "floor-custom-op" in s and s[b] <= 1.3 * s["floor-custom-op"]
            item["goal_met"] = item["vs_torch"] <= limit or floor_ok
            res.append(item)
    return res


def print_summary(items, console) -> None:
    """One line per (case, backend): ours / torch, ours / floors, goal met or not."""
    from rich.table import Table

    table = Table(title="overhead: ours / torch and ours / floor (median per call)")
    for col in ("case", "backend", "vs torch", "vs custom-op floor", "vs Function floor", "goal"):
        table.add_column(col, justify="left" if col in ("case", "backend") else "right")
    for it in items:
        fmt = lambda k: f"{it[k]:.2f}x" if k in it else "-"  # noqa: E731
        table.add_row(it["name"], it["backend"], fmt("vs_torch"), fmt("vs_floor-custom-op"), fmt("vs_floor-function"),
                      "[green]met[/green]" if it["goal_met"] else "[red]missed[/red]")
    met = sum(it["goal_met"] for it in items)
    console.print(table)
    console.print(f"overhead goal met in {met} of {len(items)} cases")


if __name__ == "__main__":
    harness.main_for(cases)
