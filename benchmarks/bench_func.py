"""torch.func workloads: per-sample gradients, Hessians, Hessian-vector products.

Where our ops meet torch.func's transforms (each op an ``autograd.Function`` under them, batched
by a fold rule into one call or by a loop over vmap's batch), the whole transformed computation
against the same computation on torch's layers, in the same process:

* per-sample gradients of an MLP classifier, of a small CNN and of an LSTM classifier,
  ``vmap(grad(loss))`` over ``functional_call`` (differentially private training's inner step;
  torch's LSTM, which vmap refuses, as a loop over the samples; ours also with
  ``GPU_NN_RNN_VMAP_COMPOSE=1``, ``-compose``);
* ``vmap(hessian(...))`` of a 3-layer tanh MLP over a batch of points (physics-informed networks'
  Laplacians);
* a Hessian-vector product of a classifier's loss in its parameters, ``jvp(grad(loss))``;
* ``jacfwd`` of an LSTM's last state in its input (forward mode through the recurrent layers'
  composition);
* a training step of an ensemble of B MLPs / CNNs on one minibatch, ``vmap(grad(loss))`` over
  the models' weights stacked by ``stack_module_state`` (model ensembling).

Not part of ``gpu-nn bench``'s default families (name it: ``--family func``): a GPU session
runs it from ``benchmarks/gpu_measure.sh``.
"""

from __future__ import annotations

import copy

import torch

from gpu_nn.benchmarks import harness


def _ours(device: str):
    return ("triton", "cupy") if device.startswith("cuda") else ("reference",)


def _models(lib, kind: str):
    if kind == "mlp":
        return lib.Sequential(lib.Linear(784, 128), lib.ReLU(), lib.Linear(128, 10))
    if kind == "cnn":
        return lib.Sequential(lib.Conv2d(1, 16, 3, padding=1), lib.ReLU(), lib.MaxPool2d(2),
                              lib.Conv2d(16, 32, 3, padding=1), lib.ReLU(), lib.MaxPool2d(2), lib.Flatten(),
                              lib.Linear(32 * 7 * 7, 10))
    if kind == "pinn":
        return lib.Sequential(lib.Linear(3, 32), lib.Tanh(), lib.Linear(32, 32), lib.Tanh(), lib.Linear(32, 1))
    return lib.LSTM(16, 32)


def _setup(kind: str, work: str, B: int, device: str, backend, compose: bool = False):
    """setup() for one provider: ``backend`` None is torch's layers, else ours on that backend
    (``compose``: with GPU_NN_RNN_VMAP_COMPOSE=1, the recurrent layers' composition under vmap)."""
    def setup():
        import gpu_nn
        import gpu_nn.nn as gnn
        from torch.func import functional_call, grad, hessian, jacfwd, jvp, stack_module_state, vmap

        torch.manual_seed(0)
        lib = torch.nn if backend is None else gnn
        m = _models(lib, kind).to(device)
        ce = torch.nn.functional.cross_entropy if backend is None else gpu_nn.functional.cross_entropy
        params = {k: v.detach() for k, v in m.named_parameters()}
        g = torch.Generator().manual_seed(1)
        if kind == "cnn":
            x = torch.randn(B, 1, 28, 28, generator=g).to(device)
        elif kind == "pinn":
            x = torch.randn(B, 3, generator=g).to(device)
        elif kind == "lstm":
            x = torch.randn(B, 20, 1, 16, generator=g).to(device)  # B sequences of 20 steps, batch 1
            head = (torch.nn.Linear if backend is None else gnn.Linear)(32, 10).to(device)
        else:
            x = torch.randn(B, 784, generator=g).to(device)
        y = torch.randint(0, 10, (B,), generator=g).to(device)

        if work == "ensemble":  # B models, one minibatch of 64
            x = torch.randn(64, *x.shape[1:], generator=g).to(device)
            y = torch.randint(0, 10, (64,), generator=g).to(device)
            # (detached, as the other workloads' parameters: no outer graph built around the transform)
            stacked = tuple({k: v.detach() for k, v in d.items()}
                            for d in stack_module_state([_models(lib, kind).to(device) for _ in range(B)]))
            base = copy.deepcopy(m).to("meta")
            f = vmap(grad(lambda p, b, a: ce(functional_call(base, (p, b), (a,)), y)), in_dims=(0, 0, None))

            def call():
                return f(*stacked, x)
        elif work == "per-sample" and kind == "lstm" and backend is None:
            # torch's LSTM has no vmap batching rule: a loop over the samples, as its users write
            names = [k for k, _ in m.named_parameters()]

            def call():
                per = [torch.autograd.grad(ce(head(m(a)[0][-1]), c[None]), list(m.parameters())) for a, c in zip(x, y)]
                return {k: torch.stack([g[i] for g in per]) for i, k in enumerate(names)}
        elif work == "per-sample" and kind == "lstm":
            f = vmap(grad(lambda p, a, c: ce(head(functional_call(m, p, (a,))[0][-1]), c[None])), in_dims=(None, 0, 0))

            def call():
                return f(params, x, y)
        elif work == "per-sample":
            f = vmap(grad(lambda p, a, c: ce(functional_call(m, p, (a[None],)), c[None])), in_dims=(None, 0, 0))

            def call():
                return f(params, x, y)
        elif work == "vmap-hessian":
            f = vmap(hessian(lambda a: m(a[None])[0, 0]))

            def call():
                return f(x)
        elif work == "hvp":
            v = {k: torch.randn(p.shape, generator=g).to(device) for k, p in params.items()}
            loss = grad(lambda p: ce(functional_call(m, p, (x,)), y))

            def call():
                return jvp(loss, (params,), (v,))[1]
        else:  # jacfwd of an LSTM's last state in its input, per sequence
            f = vmap(jacfwd(lambda a: m(a)[1][0][0, 0]))

            def call():
                return f(x)

        if backend is None:
            return call

        def ours():
            with gpu_nn.backend(backend), harness.env_var("GPU_NN_RNN_VMAP_COMPOSE", "1" if compose else harness.UNSET):
                return call()

        return ours

    return setup


# (model, work, batch on a CPU, batch on a GPU)
CASES = (("mlp", "per-sample", 64, 256), ("cnn", "per-sample", 32, 128), ("lstm", "per-sample", 8, 64),
         ("pinn", "vmap-hessian", 64, 1024), ("mlp", "hvp", 256, 4096), ("lstm", "jacfwd", 8, 32),
         ("mlp", "ensemble", 8, 32), ("cnn", "ensemble", 4, 16))

# --quick on a GPU (gpu_measure.sh's func step, 45 s with compilation): the per-sample gradients
# and the MLP ensemble
QUICK_GPU = (("mlp", "per-sample"), ("cnn", "per-sample"), ("lstm", "per-sample"), ("mlp", "ensemble"))


def cases(device: str, quick: bool) -> list[harness.Case]:
    out = []
    gpu = device.startswith("cuda")
    for kind, work, b_cpu, b_gpu in ([c for c in CASES if c[:2] in QUICK_GPU] if quick and gpu else CASES):
        B = b_gpu if gpu else b_cpu
        providers = {"torch": _setup(kind, work, B, device, None)}
        for b in _ours(device):
            providers[b] = _setup(kind, work, B, device, b)
            if kind == "lstm" and work == "per-sample":  # the composition's folds against the loop
                providers[f"{b}-compose"] = _setup(kind, work, B, device, b, compose=True)
        out.append(harness.Case(family="func", name=f"{work} {kind}", shape=f"B={B}", providers=providers,
                                device=device))
    return out


if __name__ == "__main__":
    harness.main_for(cases)
