"""CUDA graphs (issue 14 item 3): our launches go to torch's current stream, never synchronise
with the host and allocate only through torch, so a whole training step built from our layers,
loss, clipping and optimizers can be captured once with ``torch.cuda.graph`` and replayed, and
``torch.compile(mode="reduce-overhead")`` can run a model built from our layers.

Every test here needs a CUDA device: capture and replay exist nowhere else. On a CPU machine
the module is skipped with that reason; ``benchmarks/gpu_run.sh`` runs it on the GPU.
"""

import contextlib
import copy

import pytest
import torch

import gpu_nn
from gpu_nn import nn, optim

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")


def _cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 7 * 7, 10),
    ).cuda()


class _Rnn(torch.nn.Module):
    """``inner``: the backend the recurrent layer runs under (None: the surrounding one)."""

    def __init__(self, cell, inner=None):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = getattr(nn, cell)(7, 16, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(32, 10)
        self.inner = inner

    def forward(self, x):
        with gpu_nn.backend(self.inner) if self.inner else contextlib.nullcontext():
            out, _ = self.rnn(x)
        return self.head(out[:, -1])


class _CupyCnn(torch.nn.Module):
    """_cnn's model with its max pooling on the cupy backend (the rest on the surrounding one)."""

    def __init__(self):
        super().__init__()
        self.net = _cnn()

    def forward(self, x):
        conv, relu, pool, *rest = self.net
        h = relu(conv(x))
        with gpu_nn.backend("cupy"):
            h = pool(h)
        for m in rest:
            h = m(h)
        return h


class _StepUnder:
    """An optimizer whose step runs under ``backend`` (the cupy backend has Adam and RMSprop;
    clipping and the model run under the surrounding backend)."""

    def __init__(self, opt, backend):
        self.opt, self.backend = opt, backend

    def zero_grad(self, set_to_none=True):
        self.opt.zero_grad(set_to_none=set_to_none)

    def step(self):
        with gpu_nn.backend(self.backend):
            return self.opt.step()


def _cupy_or_skip():
    if not gpu_nn._backend.status("cupy")[0]:
        pytest.skip(f"cupy backend unavailable: {gpu_nn._backend.status('cupy')[1]}")


def _train_step(model, opt, x, y, clip):
    loss = nn.CrossEntropyLoss()(model(x), y)
    loss.backward()
    if clip:
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


def _eager_and_graphed(make_model, make_opt, x, y, steps=4, clip=False):
    """Parameters after ``steps`` eager steps, and after warm-up + the same steps replayed from
    one captured graph, starting from the same weights and optimizer state."""
    eager = make_model()
    graphed = copy.deepcopy(eager)
    opt_e, opt_g = make_opt(eager.parameters()), make_opt(graphed.parameters())
    # Warm up on a side stream (compiles kernels, builds optimizer state and launch tables),
    # as torch's whole-network capture recipe does; the eager twin takes the same steps.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            for m, o in ((eager, opt_e), (graphed, opt_g)):
                o.zero_grad(set_to_none=True)
                _train_step(m, o, x, y, clip)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    opt_g.zero_grad(set_to_none=True)
    with torch.cuda.graph(g):
        static_loss = _train_step(graphed, opt_g, x, y, clip)
    # capture records the step without running it: replay `steps` times
    losses_g = []
    for _ in range(steps):
        g.replay()
        losses_g.append(static_loss.clone())
    losses_e = []
    for _ in range(steps):
        opt_e.zero_grad(set_to_none=False)
        losses_e.append(_train_step(eager, opt_e, x, y, clip).detach())
    torch.cuda.synchronize()
    return eager, graphed, losses_e, losses_g


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("opt_name", ["Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adadelta"])
def test_cnn_training_step_replays_as_a_cuda_graph(backend, opt_name):
    kw = {"SGD": dict(lr=0.05, momentum=0.9)}.get(opt_name, dict(lr=1e-3))
    x = torch.randn(8, 1, 14, 14, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    with gpu_nn.backend(backend):
        eager, graphed, le, lg = _eager_and_graphed(_cnn, lambda p: getattr(optim, opt_name)(p, **kw), x, y, clip=True)
    for a, b in zip(le, lg):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for pe, pg in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(pe, pg, rtol=1e-5, atol=1e-6)
    assert le[-1] != le[0]  # the replays really stepped


@pytest.mark.parametrize("opt_name", ["Adam", "RMSprop"])
def test_cupy_pooling_and_optimizer_replay_as_a_cuda_graph(opt_name):
    """The cupy backend's launches captured: the CNN's max pooling and the optimizer step on
    cupy, the rest on triton (a launch that synchronised, allocated outside torch or made a
    stream wait on captured work would fail the capture or the replayed values)."""
    _cupy_or_skip()
    x = torch.randn(8, 1, 14, 14, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    with gpu_nn.backend("triton"):
        eager, graphed, le, lg = _eager_and_graphed(
            lambda: _CupyCnn().cuda(), lambda p: _StepUnder(getattr(optim, opt_name)(p, lr=1e-3), "cupy"), x, y,
            clip=True)
    for a, b in zip(le, lg):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for pe, pg in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(pe, pg, rtol=1e-5, atol=1e-6)
    assert le[-1] != le[0]


@pytest.mark.parametrize("backend", ["triton", "cupy"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_recurrent_training_step_replays_as_a_cuda_graph(backend, cell):
    """``cupy``: the recurrent layer (its device time loop) and Adam on the cupy backend, the
    head, loss and clipping on triton (the cupy backend has no linear or loss)."""
    _recurrent_replays_like_eager(_Rnn, backend, cell)


def _recurrent_replays_like_eager(model_cls, backend, cell):
    """A training step of ``model_cls(cell, inner)`` (its recurrent layer and Adam on
    ``backend``, the rest on triton) replayed from one graph equals the same steps run eagerly."""
    if backend == "cupy":
        _cupy_or_skip()
    x = torch.randn(5, 9, 7, device="cuda")
    y = torch.randint(0, 10, (5,), device="cuda")
    inner = "cupy" if backend == "cupy" else None
    with gpu_nn.backend("triton"):
        eager, graphed, le, lg = _eager_and_graphed(
            lambda: model_cls(cell, inner).cuda(),
            lambda p: _StepUnder(optim.Adam(p, lr=1e-3), backend), x, y, clip=True)
    for a, b in zip(le, lg):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for pe, pg in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(pe, pg, rtol=1e-5, atol=1e-6)
    assert le[-1] != le[0]  # the replays really stepped


class _PackedRnn(torch.nn.Module):
    """A recurrent layer over a PackedSequence of fixed lengths (sorted, so that packing makes no
    device copy of its own), the head on the last layer's final state."""

    def __init__(self, cell, inner=None):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = getattr(nn, cell)(7, 16, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(16, 10)
        self.inner = inner
        self.lengths = torch.tensor([9, 7, 7, 4, 1])

    def forward(self, x):
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, self.lengths, batch_first=True, enforce_sorted=True)
        with gpu_nn.backend(self.inner) if self.inner else contextlib.nullcontext():
            _, h = self.rnn(packed)
        return self.head((h[0] if isinstance(h, tuple) else h)[-1])


@pytest.mark.parametrize("backend", ["triton", "cupy"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_packed_sequence_training_step_replays_as_a_cuda_graph(backend, cell):
    """Per-sequence lengths reach the kernels through a pinned, non-blocking copy: a copy from
    pageable memory synchronises the stream, which a capture forbids (and costs a host wait at
    every packed call outside one)."""
    _recurrent_replays_like_eager(_PackedRnn, backend, cell)


def test_reduce_overhead_compile_runs_our_layers():
    """torch.compile(mode="reduce-overhead") (CUDA graphs under inductor) through our custom
    ops: same loss and gradients as eager over a few iterations."""
    from torch._dynamo.utils import counters

    counters["inductor"]["cudagraph_skips"] = 0
    model = _cnn()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(8, 1, 14, 14, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    for _ in range(3):
        for m in (compiled, twin):
            for p in m.parameters():
                p.grad = None
        lc = nn.CrossEntropyLoss()(compiled(x), y)
        lc.backward()
        le = nn.CrossEntropyLoss()(twin(x), y)
        le.backward()
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
        for pc, pe in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-6)
    # inductor falls back to running without CUDA graphs with a log line only (a custom op it
    # will not capture, a CPU tensor in the graph): the values alone would pass that way
    assert counters["inductor"]["cudagraph_skips"] == 0, "inductor ran the graphs without CUDA graphs"
