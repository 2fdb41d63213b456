"""Our GPU work runs on its tensors' device, whatever device is current (torch's ops run under a
device guard; Triton launches, and our tuning's events, go to the current device and its
stream). No second GPU here: a CPU tensor posing as a CUDA one on device 1, with device 0
"current", shows which block the op runs in."""

import contextlib

import pytest
import torch

import gpu_nn
import gpu_nn.optim as go
from gpu_nn.nn.utils import clip_grad_norm_
from gpu_nn.ops import _dispatch


class _OnDevice1(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1."""

    @property
    def is_cuda(self):
        return True

    @property
    def is_cpu(self):
        return False

    def get_device(self):
        return 1


@pytest.fixture
def devices(monkeypatch):
    """torch.cuda.device replaced by a recorder; device ``current[0]`` current."""
    entered, current = [], [0]

    @contextlib.contextmanager
    def device(index):
        entered.append(index)
        old, current[0] = current[0], index
        try:
            yield
        finally:
            current[0] = old

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(_dispatch, "_get_device", lambda: current[0])
    return entered, current


def test_on_device_runs_the_op_on_its_first_tensors_device(devices):
    entered, current = devices
    seen = []

    @_dispatch.on_device
    def op(x: torch.Tensor, k: int) -> torch.Tensor:
        seen.append(current[0])
        return x

    x = torch.zeros(3).as_subclass(_OnDevice1)
    op(x, 2)
    assert entered == [1] and seen == [1] and current == [0]  # run on cuda:1, cuda:0 current again after
    current[0] = 1
    op(x, 2)
    op(x=x, k=2)
    assert entered == [1] and seen == [1, 1, 1]  # already current: no block
    current[0] = 0
    op(torch.zeros(3), 2)  # a CPU tensor: no device read at all
    assert entered == [1] and seen == [1, 1, 1, 0]


def test_on_device_keeps_the_schema_and_every_custom_op_has_it():
    """The decorator leaves each op's inferred schema as it was (annotations evaluated in the
    op's module), and every gpu_nn custom op runs through it."""
    assert str(torch.ops.gpu_nn.linear.default._schema) == (
        "gpu_nn::linear(Tensor input, Tensor weight, Tensor? bias, str? activation) -> Tensor")
    assert str(torch.ops.gpu_nn.max_pool.default._schema) == (
        "gpu_nn::max_pool(Tensor input, SymInt[] kernel_size, SymInt[] stride, SymInt[] padding, SymInt[] dilation, "
        "bool ceil_mode, bool minimum, bool need_indices=True) -> (Tensor, Tensor)")
    from gpu_nn.ops import activation, conv, dense, pool, rnn

    routed = [v for m in (activation, conv, dense, pool, rnn) for v in vars(m).values() if isinstance(v, _dispatch.Routed)]
    names = {r._op._name for r in routed}
    assert len(names) == 20 and {"activation", "rnn_seq", "cross_entropy_backward", "log_softmax"} <= names
    for r in routed:
        # the dispatcher's path runs the wrapper; the eager route the function, checking inline
        assert r._op._init_fn.__wrapped__ is r._impl and r._op._init_fn.__name__ == r._impl.__name__


def test_the_eager_route_runs_on_the_first_tensors_device(devices, monkeypatch):
    """Routed's eager route (which calls the op's function without the wrapper) checks the
    device itself: a plain call and one that records a backward both run in device 1's block."""
    entered, current = devices
    seen = []

    @_dispatch.routed
    @torch.library.custom_op("gpu_nn_test::device_probe", mutates_args=())
    @_dispatch.on_device
    def probe(x: torch.Tensor) -> torch.Tensor:
        seen.append(current[0])
        return x.clone()

    @probe.register_fake
    def _(x):
        return torch.empty_like(x)

    probe.register_autograd(lambda ctx, g: g)
    monkeypatch.setattr(_dispatch, "_eager_ok", lambda args: True)  # the stand-in is a tensor subclass
    x = torch.zeros(3).as_subclass(_OnDevice1)
    probe(x)
    probe(x.requires_grad_())
    assert seen == [1, 1] and entered == [1, 1] and current == [0]
    current[0] = 1
    probe(x)
    assert seen == [1, 1, 1] and entered == [1, 1]


def test_device_guard_switches_only_to_another_cuda_device(devices):
    entered, current = devices
    with _dispatch.device_guard(torch.device("cpu")):
        pass
    with _dispatch.device_guard(torch.device("cuda", 0)):
        pass
    assert entered == []
    with _dispatch.device_guard(torch.device("cuda", 1)):
        assert current == [1]
    assert entered == [1] and current == [0]


def test_optimizer_steps_and_clipping_run_on_their_parameters_device(monkeypatch):
    """Each part of an optimizer step (and clipping) runs in device_guard(its device)."""
    from gpu_nn.optim import _dispatch as optim_dispatch

    ok, why = gpu_nn._backend.status("triton")
    if not ok:
        pytest.skip(f"triton backend unavailable here: {why}")
    guarded = []

    def guard(device):
        guarded.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(optim_dispatch, "device_guard", guard)
    monkeypatch.setattr(_dispatch, "device_guard", guard)
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    opt = go.Adam([p], lr=0.1)
    with gpu_nn.backend("triton"):
        clip_grad_norm_([p], 1.0)
        # (clipping guards each of its phases per device: the partial norms, the total, the scale,
        # so that gradients on several devices each run on theirs)
        assert guarded == [p.device] * 3
        opt.step()
        opt.step()  # the kept plan's path too
    assert guarded == [p.device] * 5
