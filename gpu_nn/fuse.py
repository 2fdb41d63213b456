"""``gpu_nn.fuse``: a model's convolution / linear -> activation pairs as one fused layer each.

Our Conv1d, Conv2d and Linear compute an activation in their epilogue (``activation='relu'``,
'sigmoid' or 'tanh'): one kernel and one autograd node where the unfused pair has two of each,
and forward one pass less over the activation's tensor. ``fuse`` finds those pairs in a model
by tracing it with ``torch.fx`` and returns a ``torch.fx.GraphModule`` that computes the same
function with each pair fused. Nothing of ``model`` changes: the fused layers are shallow
copies of its layers that share their parameter tensors (so an optimizer built on
``model.parameters()`` trains both, and ``state_dict`` keys stay those of ``model``), and every
other layer is ``model``'s own object.

A pair is fused when the layer's output goes to the activation alone and nothing observes it
in between: no hooks (forward or backward, the modules' own or global) on either module, the
layer not already fused and called only there, a convolution with ``padding_mode='zeros'``.
The layer may be a module, torch's (it becomes ours in the copy) or ours, or a call of
``conv1d`` / ``conv2d`` / ``linear`` from ``torch.nn.functional`` or ``gpu_nn.functional`` (it
becomes a call of ours with ``activation=``); the activation a module (``nn.ReLU``,
``nn.Sigmoid``, ``nn.Tanh``, torch's or ours), a function (``torch.relu`` / ``sigmoid`` /
``tanh``, ``torch.nn.functional``'s, ``gpu_nn.functional``'s) or a tensor method (``x.relu()``,
in place ones included). Everything else stays as it was.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.fx

from . import functional as _F
from . import nn as _gnn

__all__ = ["fuse"]

_ACT_MODULES = {torch.nn.ReLU: "relu", torch.nn.Sigmoid: "sigmoid", torch.nn.Tanh: "tanh",
                _gnn.ReLU: "relu", _gnn.Sigmoid: "sigmoid", _gnn.Tanh: "tanh"}
_ACT_FUNCTIONS = {torch.relu: "relu", torch.relu_: "relu", torch.nn.functional.relu: "relu",
                  torch.sigmoid: "sigmoid", torch.nn.functional.sigmoid: "sigmoid",
                  torch.tanh: "tanh", torch.nn.functional.tanh: "tanh",
                  _F.relu: "relu", _F.sigmoid: "sigmoid", _F.tanh: "tanh"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                "tanh": "tanh", "tanh_": "tanh"}
# torch's functional layers and ours -> ours (same positional arguments; ours take activation=)
_FUNCTIONAL_LAYERS = {torch.nn.functional.conv1d: _F.conv1d, torch.nn.functional.conv2d: _F.conv2d,
                      torch.nn.functional.linear: _F.linear, _F.conv1d: _F.conv1d, _F.conv2d: _F.conv2d,
                      _F.linear: _F.linear}
# torch layer -> ours (exact classes: a subclass may compute something else)
_LAYERS = {torch.nn.Conv1d: _gnn.Conv1d, torch.nn.Conv2d: _gnn.Conv2d, torch.nn.Linear: _gnn.Linear,
           _gnn.Conv1d: _gnn.Conv1d, _gnn.Conv2d: _gnn.Conv2d, _gnn.Linear: _gnn.Linear}


_OURS = tuple(getattr(_gnn, n) for n in _gnn.__all__ if isinstance(getattr(_gnn, n), type))


class _Tracer(torch.fx.Tracer):
    """torch's tracer, with our modules (and subclasses of them) kept as leaves, as torch's own
    are, and so is any module with hooks (traced through, it would lose them; called as a
    module, the graph runs them); every ``gpu_nn.functional`` function is recorded as one call
    (their argument checks cannot take a Proxy)."""

    def __init__(self):
        super().__init__(autowrap_modules=(math, _F))

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, _OURS) or _own_hooks(m) or _state_rules(m) or super().is_leaf_module(m, qualname)


def _own_hooks(m: torch.nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


_STATE_METHODS = ("state_dict", "_save_to_state_dict", "_load_from_state_dict", "load_state_dict")


def _state_rules(m: torch.nn.Module) -> bool:
    """Whether ``m`` saves or loads its state its own way (state_dict / load hooks, or a class
    that overrides how): traced through, it would be rebuilt as a plain module without them."""
    if m._state_dict_hooks or m._state_dict_pre_hooks or m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks:
        return True
    cls = type(m)
    return any(getattr(cls, n) is not getattr(torch.nn.Module, n) for n in _STATE_METHODS
               if not cls.__module__.startswith("torch.nn."))


def _hooked(m: torch.nn.Module) -> bool:
    """Whether a hook may observe ``m``'s input, output or gradients (its own, or global ones)."""
    g = torch.nn.modules.module
    return bool(_own_hooks(m) or g._global_forward_hooks or g._global_forward_pre_hooks
                or g._global_backward_hooks or g._global_backward_pre_hooks)


def _activation_of(node: torch.fx.Node, module):
    """The activation ``node`` applies to its first argument ('relu', 'sigmoid', 'tanh'), or None
    when it is not one of them or takes anything beyond its input (and ``inplace``)."""
    extra_args = node.args[1:]
    kw = dict(node.kwargs)
    if node.op == "call_module":
        m = module(node.target)
        act = _ACT_MODULES.get(type(m))
        return act if act is not None and not extra_args and not kw and not _hooked(m) else None
    if node.op == "call_function":
        act = _ACT_FUNCTIONS.get(node.target)
        inplace = kw.pop("inplace", extra_args[0] if extra_args else False)
        ok = not kw and len(extra_args) <= 1 and isinstance(inplace, bool)
        if node.target not in (torch.nn.functional.relu, _F.relu):
            ok = ok and not extra_args and "inplace" not in node.kwargs
        return act if ok else None
    if node.op == "call_method":
        act = _ACT_METHODS.get(node.target)
        return act if act is not None and not extra_args and not kw else None
    return None


def _fusable_layer(node: torch.fx.Node, module):
    """The layer module ``node`` calls, when an activation can be fused after it; else None."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    m = module(node.target)
    if type(m) not in _LAYERS or _hooked(m) or getattr(m, "activation", None) is not None:
        return None
    # a forward of the instance's own (or Module.compile's) would run the layer without its
    # activation in the copy
    if "forward" in m.__dict__ or "__call__" in m.__dict__ or m.__dict__.get("_compiled_call_impl") is not None:
        return None
    if isinstance(m, torch.nn.modules.conv._ConvNd) and m.padding_mode != "zeros":
        return None
    return m


def _fusable_function(node: torch.fx.Node):
    """Our functional layer for ``node``, a call of torch's or our conv1d / conv2d / linear
    without an activation; else None."""
    if node.op != "call_function":
        return None
    ours = _FUNCTIONAL_LAYERS.get(node.target)
    if ours is None or node.kwargs.get("activation") is not None:
        return None
    return ours


def _fused_copy(layer: torch.nn.Module, act: str) -> torch.nn.Module:
    """A shallow copy of ``layer`` as our class with ``activation=act``: the same parameter and
    buffer tensors in containers of its own (pruning or a parametrization of one leaves the
    other alone), the same state_dict hooks, no forward / backward hooks (``layer`` has none)."""
    new = copy.copy(layer)
    d = new.__dict__ = dict(layer.__dict__)
    for name in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
                 "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                 "_load_state_dict_post_hooks"):
        if name in d:
            d[name] = copy.copy(d[name])
    for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                 "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
        if name in d:
            d[name] = type(d[name])()
    new.__class__ = _LAYERS[type(layer)]
    new.activation = act
    return new


def _parent(root: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    path, _, name = target.rpartition(".")
    return (root.get_submodule(path) if path else root), name


def _restore_state(gm: torch.fx.GraphModule, model: torch.nn.Module, originals: set) -> None:
    """Give ``gm`` every parameter and buffer ``model`` has, under the same names: torch.fx's
    GraphModule keeps only what its graph uses (an unused head, a second name of a tied layer,
    a root parameter nothing reads would be missing from its state_dict) and registers the
    buffers it keeps as persistent. Modules holding state that ``gm`` lacks are put back as the
    model's own objects (the graph does not call them); tensors straight on modules ``gm`` made
    anew are registered there, a non-persistent buffer kept non-persistent."""
    for path, mod in model.named_modules(remove_duplicate=False):
        try:
            own = gm.get_submodule(path) if path else gm
        except AttributeError:
            if next(mod.parameters(), None) is not None or next(mod.buffers(), None) is not None:
                parent, name = _parent(gm, path)  # parents come first: present by now
                if id(parent) not in originals:
                    setattr(parent, name, mod)
            continue
        if id(own) in originals:  # the model's own object: all there
            continue
        for name, t in mod._parameters.items():
            if t is not None and name not in own._parameters and not hasattr(own, name):
                own.register_parameter(name, t)
        for name, t in mod._buffers.items():
            keep = name not in mod._non_persistent_buffers_set
            if t is not None and name not in own._buffers and not hasattr(own, name):
                own.register_buffer(name, t, persistent=keep)
            elif name in own._buffers and not keep:
                own._non_persistent_buffers_set.add(name)


def fuse(model: torch.nn.Module) -> torch.fx.GraphModule:
    """``model`` traced by ``torch.fx``, each convolution / linear -> activation pair replaced by
    one of our layers with the activation fused in its epilogue (see the module docstring).

    Returns a new ``torch.fx.GraphModule`` with ``model``'s parameters and buffers under their
    names (the same tensors); ``model`` is left as it was. Modules with hooks are called as they
    are (their layers not fused). Raises ``TypeError`` for a non-module or a model that is one of
    our layers itself (nothing to fuse: set its ``activation=``), ``ValueError`` for a model
    with forward / backward hooks of its own (the GraphModule returned could not run them), and
    torch.fx's own error, with a note, for a model it cannot trace (data-dependent control
    flow).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fuse() expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, _OURS):
        raise TypeError(f"fuse() expects a model of layers; {type(model).__name__} is a gpu_nn layer itself "
                        "(nothing to fuse: Conv1d / Conv2d / Linear take activation=)")
    if _own_hooks(model) or _state_rules(model):
        raise ValueError(f"fuse(): the model ({type(model).__name__}) has forward / backward / state_dict hooks or "
                         "state_dict methods of its own, which the GraphModule fuse returns would not have; fuse its "
                         "submodules, or register the hooks on the result")
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        exc.add_note("gpu_nn.fuse traces the model with torch.fx: fuse the layers by hand (Conv1d / Conv2d / "
                     "Linear(..., activation='relu')) where the model cannot be traced")
        raise
    gm = torch.fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    originals = {id(m) for m in model.modules()}
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fused = 0
    for node in list(graph.nodes):
        act = _activation_of(node, gm.get_submodule)
        if act is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        src = node.args[0]
        if len(src.users) != 1:
            continue
        function = _fusable_function(src)
        if function is not None:  # a functional layer: ours, with the activation
            src.target = function
            src.kwargs = {**src.kwargs, "activation": act}
        else:
            layer = _fusable_layer(src, gm.get_submodule)
            # a layer called elsewhere too stays (a fused copy beside it would give the state_dict
            # a second name for its parameters), and so does one whose parent is the model's own
            # object (a leaf module's child: the copy would land in the model)
            if layer is None or calls[src.target] != 1:
                continue
            parent, name = _parent(gm, src.target)
            if id(parent) in originals:
                continue
            setattr(parent, name, _fused_copy(layer, act))  # the layer's own name: state_dict keys kept
        node.replace_all_uses_with(src)
        graph.erase_node(node)
        fused += 1
    if fused:
        gm.delete_all_unused_submodules()
        graph.lint()
        gm.recompile()
    _restore_state(gm, model, originals)
    return gm
