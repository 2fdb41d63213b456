"""Double backward by recomputation, for backward ops whose second derivative has no short
closed form (cross_entropy, the recurrent cells and sequences).

The backward op ``B(cotangents, primals) = J_f(primals)^T cotangents`` of a forward ``f`` is
differentiated by rebuilding ``f`` as a differentiable composition of our own custom ops (each
with its own backward and double backward) and torch elementwise math, taking its first
derivative with ``create_graph=True`` and then the vector-Jacobian product of that with the
gradients flowing into ``B``'s results. Only runs under ``create_graph=True`` (or a direct
differentiation of a backward op): the first-order path never reaches this module.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor


def leaf(t: Optional[Tensor], create: bool) -> Optional[Tensor]:
    """A tensor to differentiate with respect to, standing for ``t``: an alias of ``t`` where
    its graph must be kept (higher-order derivatives), else a fresh leaf. The alias (not ``t``
    itself) makes ``autograd.grad`` count only the paths through this use of ``t``: were ``hx``
    computed from ``input``, differentiating with respect to ``input`` itself would also take
    the path through ``hx`` and count it twice. Integer tensors (targets, lengths) pass as they
    are."""
    if t is None or not t.is_floating_point():
        return t
    if create and t.requires_grad:
        return t.view_as(t)
    return t.detach().requires_grad_()


def recompute_double_backward(compose: Callable[..., Sequence[Optional[Tensor]]], primals: Sequence[Optional[Tensor]],
                              wrt: Sequence[int], cotangents: Sequence[Optional[Tensor]],
                              upstream: Sequence[Optional[Tensor]]) -> tuple[list, list]:
    """Gradients of ``B = d compose(*primals) / d primals[wrt] . cotangents`` (the first
    backward) given ``upstream``, the gradients flowing into ``B``'s results (one per ``wrt``
    entry, None where none flows).

    ``compose`` returns the forward's outputs (None for outputs without a cotangent). Returns
    ``(d_cotangents, d_primals)``, None where there is no dependence. The result carries a
    graph (third derivatives) exactly when grad mode is on, i.e. under ``create_graph=True``.
    """
    if torch._C._are_functorch_transforms_active():
        return _recompute_functional(compose, primals, wrt, cotangents, upstream)
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        P = [leaf(p, create) for p in primals]
        G = [leaf(g, create) for g in cotangents]
        outs = compose(*P)
        pairs = [(o, g) for o, g in zip(outs, G) if o is not None and g is not None and o.requires_grad]
        firsts = torch.autograd.grad([o for o, _ in pairs], [P[i] for i in wrt], [g for _, g in pairs],
                                     create_graph=True, allow_unused=True)
        fu = [(f, u) for f, u in zip(firsts, upstream) if f is not None and u is not None and f.requires_grad]
        targets = [t for t in (*G, *P) if t is not None and t.is_floating_point() and t.requires_grad]
        if not fu or not targets:
            return [None] * len(G), [None] * len(P)
        seconds = torch.autograd.grad([f for f, _ in fu], targets, [u for _, u in fu], allow_unused=True,
                                      create_graph=create)
    found = dict(zip(map(id, targets), seconds))
    return [found.get(id(g)) if g is not None else None for g in G], [found.get(id(p)) if p is not None else None for p in P]


def _recompute_functional(compose, primals, wrt, cotangents, upstream) -> tuple[list, list]:
    """:func:`recompute_double_backward` under a torch.func transform (grad of grad, vmap of a
    Hessian-vector product): the same two derivatives as nested ``torch.func.vjp`` calls, since a
    transformed function may not make leaves (``requires_grad_``) or call ``autograd.grad``.
    Gradients with no dependence come back as zeros, where the autograd path gives None."""
    def floating(t):
        return t is not None and t.is_floating_point()

    gi = [i for i, g in enumerate(cotangents) if floating(g)]
    pi = [i for i, p in enumerate(primals) if floating(p)]

    def first(gs, ps):
        P = list(primals)
        for i, p in zip(pi, ps):
            P[i] = p

        def f(*w):
            Q = list(P)
            for i, t in zip(wrt, w):
                Q[i] = t
            outs = compose(*Q)
            return tuple(outs[i] for i in gi)

        _, pull = torch.func.vjp(f, *[P[i] for i in wrt])
        return pull(tuple(gs))

    _, pull = torch.func.vjp(first, tuple(cotangents[i] for i in gi), tuple(primals[i] for i in pi))
    ups = tuple(torch.zeros_like(primals[w]) if u is None else u for u, w in zip(upstream, wrt))
    dg, dp = pull(ups)
    d_cot, d_prim = [None] * len(cotangents), [None] * len(primals)
    for i, d in zip(gi, dg):
        d_cot[i] = d
    for i, d in zip(pi, dp):
        d_prim[i] = d
    return d_cot, d_prim
