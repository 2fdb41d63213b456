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
layer not already fused and called only there (a convolution of any ``padding_mode``: ours
pads as torch's).
The layer may be a module, torch's (it becomes ours in the copy) or ours, or a call of
``conv1d`` / ``conv2d`` / ``linear`` from ``torch.nn.functional`` or ``gpu_nn.functional`` (it
becomes a call of ours with ``activation=``); the activation a module (``nn.ReLU``,
``nn.Sigmoid``, ``nn.Tanh``, torch's or ours), a function (``torch.relu`` / ``sigmoid`` /
``tanh``, ``torch.nn.functional``'s, ``gpu_nn.functional``'s) or a tensor method (``x.relu()``,
in place ones included). Everything else stays as it was.

Buffers are traced as state the graph reads when it runs: one used in arithmetic is read at each
call (not its value when fused), an in-place update of one (``self.steps.add_(1)``) runs at each
call (not once, on the model, while fusing); its sizes, dtype and device are read as they are
when fused (``range(self.buf.shape[0])``, ``if self.buf.dim() == 2:``), as torch.fx's own
tracing reads them, and a forward that branches on a buffer's values cannot be traced. As in
torch.fx's ``symbolic_trace``, a tensor that is neither a parameter nor a buffer (a plain
attribute, or one the forward makes, ``torch.tensor(2.0)``) is a constant of the graph: the
result keeps those as non-persistent buffers, out of its ``state_dict``.

``self.training`` is read at trace time, so ``fuse`` traces the model in both modes: in its own
(each module's flag as it is) and with every module in the other (the flags are put back after).
Where the two graphs differ (``F.dropout(x, p, self.training)``, an ``if self.training:``
branch), the result holds both and is an ordinary GraphModule of the one its own ``training``
flag picks: ``graph``, ``code`` and ``forward`` are that mode's (so ``torch.fx.Interpreter``,
``torch.export``, ``to_folder``, passes and tracing it again see what it runs), and ``.train()`` /
``.eval()`` (or setting the flag) swap in the other (``train_graph`` / ``eval_graph`` name them);
copies, pickles and torch.package keep both. A layer is fused in one graph only where the other
fuses it too or does not call it. A model that traces only in its own mode gives a result that
raises in the other. Modules called whole (dropout, batch norm) follow their own flags there, as
in the model; a model whose forward reads the flag of a module in the other mode than the
model's own is refused (one graph per mode could not follow both).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import threading

import torch
import torch.fx
import torch.fx.graph_module
import torch.package

from . import functional as _F
from . import nn as _gnn
from .nn.dense import fused_activation

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


def _untraced_mode(message: str, *inputs):
    """The forward of a mode ``fuse`` could not trace the model in (``inputs``, the forward's,
    make a trace of the graph's code record the call rather than make it)."""
    raise RuntimeError(message)


class _Tracer(torch.fx.Tracer):
    """torch's tracer, buffers proxied, with our modules (and subclasses of them) kept as
    leaves, as torch's own are, and so is any module with hooks (traced through, it would lose them; called as a
    module, the graph runs them); every ``gpu_nn.functional`` function is recorded as one call
    (their argument checks cannot take a Proxy)."""

    def __init__(self):
        super().__init__(autowrap_modules=(math, _F), autowrap_functions=(_untraced_mode,))
        self._modes = _modes()

    def create_proxy(self, kind, target, args, kwargs, *rest, **kw):
        # a node recorded under another grad / inference / autocast mode than the trace began in
        # (a switch :func:`_switches_refused` does not see: torch.set_autocast_enabled called
        # as a function)
        if kind != "placeholder" and _modes() != self._modes:
            raise _ModeSwitch(_MODE_SWITCH)
        return super().create_proxy(kind, target, args, kwargs, *rest, **kw)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        # buffers as graph inputs (get_attr), not their values at trace time: read, and updated in
        # place, when the graph runs; their sizes, dtype and device as they are (_BufferProxy)
        if isinstance(attr_val, torch.Tensor) and not isinstance(attr_val, torch.nn.Parameter):
            for name, buf in self.root.named_buffers():
                if buf is attr_val:
                    if name not in parameter_proxy_cache:
                        parameter_proxy_cache[name] = self.create_proxy(
                            "get_attr", name, (), {}, proxy_factory_fn=lambda node: _BufferProxy(node, self, buf))
                    return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, _OURS) or _own_hooks(m) or _state_rules(m) or super().is_leaf_module(m, qualname)


class _BufferProxy(torch.fx.Proxy):
    """A buffer in the graph: its values are read when the graph runs, its metadata (shape,
    size, dim, numel, dtype, device, len, iteration over its first dimension) is the buffer's
    as traced, as torch.fx's own tracing of a buffer (its value, not a proxy) gives it: a forward
    may loop over ``range(self.buf.shape[0])`` or branch on ``self.buf.dim()``."""

    def __init__(self, node: torch.fx.Node, tracer, buf: torch.Tensor):
        super().__init__(node, tracer)
        self.buf = buf

    @property
    def shape(self) -> torch.Size:
        return self.buf.shape

    @property
    def ndim(self) -> int:
        return self.buf.ndim

    @property
    def dtype(self) -> torch.dtype:
        return self.buf.dtype

    @property
    def device(self) -> torch.device:
        return self.buf.device

    @property
    def is_cuda(self) -> bool:
        return self.buf.is_cuda

    def size(self, dim=None):
        return self.buf.size() if dim is None else self.buf.size(dim)

    def dim(self) -> int:
        return self.buf.dim()

    def numel(self) -> int:
        return self.buf.numel()

    def nelement(self) -> int:
        return self.buf.nelement()

    def __len__(self) -> int:
        return len(self.buf)

    def __iter__(self):
        return (self[i] for i in range(len(self.buf)))


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


def _own_forward(m: torch.nn.Module) -> bool:
    """Whether ``m`` runs a forward of the instance's own (an assigned ``forward`` or
    ``__call__``, or Module.compile's), not its class's."""
    return "forward" in m.__dict__ or "__call__" in m.__dict__ or m.__dict__.get("_compiled_call_impl") is not None


def _activation_of(node: torch.fx.Node, module):
    """The activation ``node`` applies to its first argument ('relu', 'sigmoid', 'tanh'), or None
    when it is not one of them or takes anything beyond its input (and ``inplace``); a module
    with a forward of its own computes whatever that does (fused, it was relu all the same)."""
    extra_args = node.args[1:]
    kw = dict(node.kwargs)
    if node.op == "call_module":
        m = module(node.target)
        act = _ACT_MODULES.get(type(m))
        return (act if act is not None and not extra_args and not kw and not _hooked(m) and not _own_forward(m)
                else None)
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
    if type(m) not in _LAYERS or _hooked(m) or fused_activation(m) is not None:
        return None
    # a forward of the instance's own (or Module.compile's) would run the layer without its
    # activation in the copy
    if _own_forward(m):
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
    new._gpu_nn_activation = act
    return new


def _parent(root: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    path, _, name = target.rpartition(".")
    return (root.get_submodule(path) if path else root), name


def _restore_state(gm: torch.fx.GraphModule, model: torch.nn.Module, originals: set) -> None:
    """Give ``gm`` every parameter and buffer ``model`` has, under the same names: torch.fx's
    GraphModule keeps only what its graph uses (an unused head, a second name of a tied layer,
    a root parameter nothing reads would be missing from its state_dict) and registers the
    tensors it keeps as persistent buffers. Modules holding state that ``gm`` lacks are put back
    as the model's own objects (the graph does not call them); tensors straight on modules ``gm``
    made anew are registered there; a buffer of ``gm`` that is no persistent buffer of the model
    (a non-persistent one, a plain tensor attribute, a constant of the graph) is non-persistent."""
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
    for path, own in gm.named_modules():
        if id(own) in originals:
            continue
        try:
            mod = model.get_submodule(path) if path else model
        except AttributeError:
            mod = None
        for name in own._buffers:
            if mod is None or name not in mod._buffers or name in mod._non_persistent_buffers_set:
                own._non_persistent_buffers_set.add(name)


def _model_order(gm: torch.fx.GraphModule, model: torch.nn.Module, originals: set) -> None:
    """``gm``'s submodules, parameters and buffers in ``model``'s order, level by level (torch.fx's
    GraphModule makes its containers in the order its graph uses them, and :func:`_restore_state`
    adds what the graph does not use after them): so ``parameters()`` and ``state_dict()`` list
    them as ``model``'s do, and an optimizer state or a checkpoint matched up by position lands
    on the same tensors (a model calling its layers in another order than it made them had its
    moments moved to other layers of the same shapes, silently; an audit). What ``gm`` has that
    ``model`` has not (a fused layer's copy keeps its original's place) stays after, in its order."""
    for path, own in gm.named_modules():
        if id(own) in originals:  # the model's own object: its order already
            continue
        try:
            mod = model.get_submodule(path) if path else model
        except AttributeError:
            continue
        for attr in ("_modules", "_parameters", "_buffers"):
            have, want = getattr(own, attr), getattr(mod, attr)
            order = [k for k in want if k in have] + [k for k in have if k not in want]
            if list(have) != order:
                items = dict(have)
                have.clear()
                have.update((k, items[k]) for k in order)


# ------------------------------------------------------------------ both training modes


def _targets_graph(*graphs: torch.fx.Graph) -> torch.fx.Graph:
    """A graph of the ``get_attr`` / ``call_module`` targets of ``graphs`` (what a GraphModule
    copies from its root, and keeps in ``delete_all_unused_submodules``), nothing computed."""
    union = torch.fx.Graph(tracer_cls=graphs[0]._tracer_cls)
    seen = set()
    for graph in graphs:
        for node in graph.nodes:
            if node.op in ("get_attr", "call_module") and (node.op, node.target) not in seen:
                seen.add((node.op, node.target))
                union.create_node(node.op, node.target)
    union.output(None)
    return union


class _TrainEvalGraphModule(torch.fx.GraphModule):
    """A GraphModule holding two graphs of the same model, one per ``training`` mode, over one
    set of modules, parameters and buffers. It is an ordinary GraphModule of the graph of its
    present mode: ``graph``, ``code``, ``forward`` (and so ``torch.fx.Interpreter``, passes,
    ``to_folder``, ``torch.export``, tracing it again) are that mode's; setting its ``training``
    flag (``.train()`` / ``.eval()``, or the attribute) swaps in the other graph, which waits in
    ``_other_graph`` (``eval_graph`` / ``train_graph`` name them by mode). Copy, deepcopy, pickle
    (torch.save) and torch.package keep both, and all of the module's state."""

    def __init__(self, root: torch.nn.Module, graph: torch.fx.Graph, train_graph: torch.fx.Graph,
                 class_name: str = "GraphModule", training: bool = True):
        self.__dict__["_other_graph"] = None  # no swap while GraphModule.__init__ runs
        super().__init__(root, _targets_graph(graph, train_graph), class_name)  # copies what both use
        self.__dict__["_mode"] = bool(training)
        self.graph = train_graph if training else graph
        other = graph if training else train_graph
        other.owning_module = self
        self.__dict__["_other_graph"] = other
        self._tracer_cls = getattr(graph, "_tracer_cls", None)

    @property
    def training(self) -> bool:
        return self.__dict__.get("_mode", True)

    @training.setter
    def training(self, mode: bool) -> None:
        d = self.__dict__
        old, d["_mode"] = d.get("_mode", True), bool(mode)
        other = d.get("_other_graph")
        if other is not None and bool(mode) != old:
            d["_other_graph"] = d["_graph"]
            compiled = type(self).__dict__.get("_per_mode", {}).get(bool(mode))
            if compiled is not None and compiled[0] is other:
                # the forward generated for that graph before, the same function: torch.compile's
                # cache of it still applies (a new one per switch compiled the model again each time)
                d["_graph"] = other
                type(self).forward, d["_code"], d["_lineno_map"], d["_prologue_start"] = compiled[1:]
            else:
                self.graph = other  # GraphModule's setter: owning module, recompile

    def recompile(self):
        python_code = super().recompile()
        cls = type(self)  # GraphModule's class of this instance alone
        if "_per_mode" not in cls.__dict__:
            cls._per_mode = {}
        cls._per_mode[self.training] = (self._graph, cls.forward, self._code, self._lineno_map, self._prologue_start)
        return python_code

    @property
    def train_graph(self) -> torch.fx.Graph:
        return self._graph if self.training else self._other_graph

    @property
    def eval_graph(self) -> torch.fx.Graph:
        return self._other_graph if self.training else self._graph

    def delete_all_unused_submodules(self) -> None:
        graph = self.__dict__["_graph"]
        self.__dict__["_graph"] = _targets_graph(graph, self._other_graph)  # used by either
        try:
            super().delete_all_unused_submodules()
        finally:
            self.__dict__["_graph"] = graph

    def _adopt(self, state: dict, graph: torch.fx.Graph, other: torch.fx.Graph, name: str):
        """``self`` (new, from ``__new__``) with ``state`` as its ``__dict__`` and the two graphs
        (``graph`` the one of the mode in ``state``)."""
        self.__dict__.update(state)
        self.__dict__["_graph"], self.__dict__["_other_graph"] = graph, other
        graph.owning_module = other.owning_module = self
        type(self).__name__ = name
        self.recompile()
        return self

    def __copy__(self):
        state = dict(self.__dict__)
        for k in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            state[k] = copy.copy(state[k])
        return type(self).__new__(type(self))._adopt(state, self._graph, self._other_graph, type(self).__name__)

    def __deepcopy__(self, memo):
        res = type(self).__new__(type(self))
        memo[id(self)] = res
        state = copy.deepcopy(self.__dict__, memo)
        return res._adopt(state, state["_graph"], state["_other_graph"], type(self).__name__)

    def _sources(self, importer) -> tuple[dict, list[str]]:
        """The state without the graphs, and the two graphs' code (this mode's first)."""
        state = dict(self.__dict__)
        srcs = []
        for key in ("_graph", "_other_graph"):
            code = state.pop(key).python_code(root_module="self")
            srcs.append(torch.fx.graph_module._format_import_block(code.globals, importer) + code.src)
        return state, srcs

    def __reduce__(self):
        # as GraphModule's: the graphs as code, traced again when loaded
        state, srcs = self._sources(torch.package.sys_importer)
        return (_rebuild_train_eval, (state, *srcs, type(self).__name__))

    def __reduce_package__(self, exporter):
        # as GraphModule's: the code saved as modules of the package
        state, srcs = self._sources(exporter.importer)
        names = []
        for src in srcs:
            names.append(f"fx-generated._{exporter.get_unique_id()}")
            exporter.save_source_string(names[-1], src)
        return (_rebuild_train_eval_package, (state, *names, type(self).__name__))

    def __str__(self) -> str:
        other = self._other_graph.python_code(root_module="self").src
        now, then = ("training", "eval") if self.training else ("eval", "training")
        return "\n".join([torch.nn.Module.__str__(self), f"# {now} mode (now):", self._code, f"# {then} mode:", other])


class _CodeTracer(_Tracer):
    """Traces a forward generated from a graph: every module a leaf, as it was in the graph."""

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return True


def _rebuild(state: dict, forwards: list, name: str) -> _TrainEvalGraphModule:
    """A ``_TrainEvalGraphModule`` from its state and its two graphs' forwards (its mode's first)."""
    res = _TrainEvalGraphModule.__new__(_TrainEvalGraphModule)
    res.__dict__.update(state)
    res.__dict__["_other_graph"] = None  # no swap while tracing
    graphs = []
    for forward in forwards:
        type(res).forward = forward
        graph = _CodeTracer().trace(res)
        graph._tracer_cls = _Tracer
        graphs.append(graph)
    return res._adopt({}, graphs[0], graphs[1], name)


def _rebuild_train_eval(state: dict, src: str, other_src: str, name: str) -> _TrainEvalGraphModule:
    """A pickled ``_TrainEvalGraphModule``: its state, both graphs traced again from their code."""
    return _rebuild(state, [torch.fx.graph_module._forward_from_src(s, {}) for s in (src, other_src)], name)


def _rebuild_train_eval_package(importer, state: dict, module: str, other_module: str,
                                name: str) -> _TrainEvalGraphModule:
    """A ``_TrainEvalGraphModule`` loaded from a torch.package: the forwards from its modules."""
    return _rebuild(state, [importer.import_module(m).forward for m in (module, other_module)], name)


def _raising_graph(graph: torch.fx.Graph, message: str) -> torch.fx.Graph:
    """A graph with ``graph``'s inputs that raises RuntimeError(message)."""
    g = torch.fx.Graph(tracer_cls=graph._tracer_cls)
    inputs = [g.node_copy(node) for node in graph.nodes if node.op == "placeholder"]
    g.output(g.call_function(_untraced_mode, (message, *inputs)))
    return g


_PLAIN = (bool, int, str, bytes, type(None), type(...), torch.dtype, torch.device, torch.layout, torch.memory_format)


def _same_graph(a: torch.fx.Graph, b: torch.fx.Graph, root: torch.nn.Module) -> bool:
    """Whether ``a`` and ``b`` compute the same (conservatively: False when unsure). Constants
    the tracer made anew for each (``_tensor_constantN``) count as the same when equal."""
    na, nb = list(a.nodes), list(b.nodes)
    if len(na) != len(nb):
        return False
    ia, ib = {n: i for i, n in enumerate(na)}, {n: i for i, n in enumerate(nb)}

    def same(x, y) -> bool:
        if isinstance(x, torch.fx.Node) or isinstance(y, torch.fx.Node):
            return isinstance(x, torch.fx.Node) and isinstance(y, torch.fx.Node) and ia[x] == ib[y]
        if type(x) is not type(y):
            return False
        if isinstance(x, (tuple, list)):
            return len(x) == len(y) and all(map(same, x, y))
        if isinstance(x, dict):
            return list(x) == list(y) and all(same(x[k], y[k]) for k in x)
        if isinstance(x, slice):
            return same((x.start, x.stop, x.step), (y.start, y.stop, y.step))
        if isinstance(x, (float, complex)):
            return repr(x) == repr(y)  # -0.0 is not 0.0; nan: differs, conservatively
        if isinstance(x, _PLAIN):
            return x == y
        return x is y

    def attr(target):
        return functools.reduce(getattr, target.split("."), root)

    for x, y in zip(na, nb):
        if x.op != y.op or not same(x.args, y.args) or not same(x.kwargs, y.kwargs):
            return False
        if x.op == "get_attr" and x.target != y.target:
            tx, ty = attr(x.target), attr(y.target)
            if not (x.target.startswith("_tensor_constant") and y.target.startswith("_tensor_constant")
                    and isinstance(tx, torch.Tensor) and isinstance(ty, torch.Tensor) and type(tx) is type(ty)
                    and tx.dtype == ty.dtype and tx.device == ty.device and tx.shape == ty.shape
                    and tx.stride() == ty.stride() and torch.equal(tx, ty)):
                return False
        elif isinstance(x.target, str) or isinstance(y.target, str):
            if x.target != y.target:
                return False
        elif x.target is not y.target:
            return False
    return True


class _ModeSwitch(ValueError):
    """A forward that switches a mode torch.fx does not record (:func:`_switches_refused`)."""


_MODE_SWITCH = ("fuse(): the model's forward switches gradient, inference or autocast mode (torch.no_grad, "
                "torch.enable_grad, torch.set_grad_enabled, torch.inference_mode, torch.autocast), which torch.fx "
                "cannot record: the fused model would compute that part in the caller's mode; fuse the submodules "
                "that run inside one mode (model.head = gpu_nn.fuse(model.head)) instead")


@contextlib.contextmanager
def _switches_refused():
    """While the model is traced (in this thread), entering a gradient, inference or autocast mode
    raises :class:`_ModeSwitch`: torch.fx records no switch, so a ``with torch.no_grad():`` block
    inside forward would run with gradients in the fused model, an ``autocast(enabled=False)``
    block under the caller's autocast, an ``enable_grad()`` one under the caller's no_grad.
    Every grad-mode switch goes through ``torch._C._set_grad_enabled`` (no_grad, enable_grad,
    set_grad_enabled in either form); inference_mode and autocast through their ``__enter__``.
    Other threads pass through."""
    me = threading.get_ident()
    grad_mode = torch.autograd.grad_mode
    amp = torch.amp.autocast_mode.autocast
    real = (torch._C._set_grad_enabled, grad_mode.inference_mode.__enter__, amp.__enter__)

    def guard(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            if threading.get_ident() == me:
                raise _ModeSwitch(_MODE_SWITCH)
            return fn(*args, **kwargs)
        return wrapped

    torch._C._set_grad_enabled = guard(real[0])
    grad_mode.inference_mode.__enter__, amp.__enter__ = guard(real[1]), guard(real[2])
    try:
        yield
    finally:
        torch._C._set_grad_enabled = real[0]
        grad_mode.inference_mode.__enter__, amp.__enter__ = real[1], real[2]


def _modes() -> tuple:
    """The modes a forward may switch that torch.fx does not record: gradient, inference, and
    autocast (enabled and dtype) of each device type autocast knows here."""
    amp = tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES)
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled(), amp


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _trace(model: torch.nn.Module) -> torch.fx.Graph:
    with _switches_refused():
        return _Tracer().trace(model)


# ------------------------------------------------------------------ fusing


def _plan(graph: torch.fx.Graph, gm: torch.fx.GraphModule, originals: set) -> list:
    """The pairs of ``graph`` to fuse: (activation node, layer node, our functional layer or None
    for a module, activation)."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    plan = []
    for node in graph.nodes:
        act = _activation_of(node, gm.get_submodule)
        if act is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        src = node.args[0]
        if len(src.users) != 1:
            continue
        function = _fusable_function(src)
        if function is None:
            layer = _fusable_layer(src, gm.get_submodule)
            # a layer called elsewhere too stays (a fused copy beside it would give the state_dict
            # a second name for its parameters), and so does one whose parent is the model's own
            # object (a leaf module's child: the copy would land in the model)
            if layer is None or calls[src.target] != 1 or id(_parent(gm, src.target)[0]) in originals:
                continue
        plan.append((node, src, function, act))
    return plan


def _fuse_graphs(gm: torch.fx.GraphModule, graphs: list, originals: set) -> int:
    """Fuses the pairs of ``graphs`` (those of ``gm``); a layer module only where every graph that
    calls it fuses it with the same activation (the graphs share ``gm``'s modules)."""
    plans = [_plan(g, gm, originals) for g in graphs]
    acts: dict[str, set] = {}
    for graph, plan in zip(graphs, plans):
        fused = {src.target: act for _, src, function, act in plan if function is None}
        for node in graph.nodes:
            if node.op == "call_module":
                acts.setdefault(node.target, set()).add(fused.get(node.target))
    count = 0
    for graph, plan in zip(graphs, plans):
        for node, src, function, act in plan:
            if function is not None:  # a functional layer: ours, with the activation
                src.target = function
                src.kwargs = {**src.kwargs, "activation": act}
            elif acts[src.target] != {act}:
                continue
            elif fused_activation(gm.get_submodule(src.target)) is None:  # not by another graph yet
                parent, name = _parent(gm, src.target)
                # under the layer's own name: state_dict keys kept
                setattr(parent, name, _fused_copy(gm.get_submodule(src.target), act))
            node.replace_all_uses_with(src)
            graph.erase_node(node)
            count += 1
    return count


def _restore_modules(saved: list) -> None:
    """Each module's attributes (its ``training`` flag, what tracing set on it) as in ``saved``."""
    for m, state in saved:
        for k in [k for k in m.__dict__ if k not in state]:
            del m.__dict__[k]
        for k, v in state.items():
            if k not in m.__dict__ or m.__dict__[k] is not v:
                m.__dict__[k] = v


def fuse(model: torch.nn.Module) -> torch.fx.GraphModule:
    """``model`` traced by ``torch.fx``, each convolution / linear -> activation pair replaced by
    one of our layers with the activation fused in its epilogue (see the module docstring).

    Returns a new ``torch.fx.GraphModule`` with ``model``'s parameters and buffers under their
    names (the same tensors); ``model`` is left as it was. Buffers are read (and updated in
    place) when the result runs; it computes what ``model`` computes in either ``training`` mode
    (a model whose forward depends on ``self.training`` gives a GraphModule holding a graph per
    mode, ``graph`` the one of its own ``training`` flag). Modules with hooks are
    called as they are (their layers not fused). Raises ``TypeError`` for a non-module or a model
    that is one of our layers itself (nothing to fuse: set its ``activation=``), ``ValueError``
    for a model with forward / backward hooks of its own (the GraphModule returned could not run
    them), and torch.fx's own error, with a note, for a model it cannot trace (data-dependent
    control flow, a branch on a buffer's value). A model of its own with state_dict hooks or its
    own ``state_dict`` / ``_load_from_state_dict`` is refused (``ValueError``) as one with hooks,
    and so is a forward that switches gradient, inference or autocast mode (a ``torch.no_grad()``
    block: torch.fx records no switch), and a ``torch.compile`` wrapper (``TypeError``: fuse its
    ``_orig_mod``). As under torch.fx, Python runs once, while tracing: a branch on an argument
    (``if mask is not None:``, always taken for the traced one) and a side effect (a counter on
    ``self``) are not repeated at each call. The result lists its
    submodules, parameters and buffers in ``model``'s order.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fuse() expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, _OURS):
        fusing = isinstance(model, (_gnn.Conv1d, _gnn.Conv2d, _gnn.Linear))
        raise TypeError(f"fuse() expects a model of layers; {type(model).__name__} is a gpu_nn layer itself "
                        f"(nothing to fuse{': Conv1d / Conv2d / Linear take activation=' if fusing else ''})")
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        raise TypeError("fuse() expects the model itself, not its torch.compile wrapper (OptimizedModule, which "
                        "torch.fx cannot trace): fuse the model (compiled._orig_mod), then compile the result")
    if _own_hooks(model) or _state_rules(model):
        raise ValueError(f"fuse(): the model ({type(model).__name__}) has forward / backward / state_dict hooks or "
                         "state_dict methods of its own, which the GraphModule fuse returns would not have; fuse its "
                         "submodules, or register the hooks on the result")
    training = model.training
    flags = [(m, m.training) for m in model.modules()]
    saved = [(m, dict(m.__dict__)) for m in model.modules()]
    try:
        try:
            graph = _trace(model)  # the present mode, each module's flag as it is
        except Exception as exc:
            if not isinstance(exc, _ModeSwitch):  # (says what to do already)
                exc.add_note("gpu_nn.fuse traces the model with torch.fx: fuse the layers by hand (Conv1d / Conv2d / "
                             "Linear(..., activation='relu')) where the model cannot be traced")
            raise

        def uniform(mode: bool) -> torch.fx.Graph:  # every module in ``mode``, as model.train(mode) sets them
            for m, _ in flags:
                m.training = mode
            return _trace(model)

        name = {True: "training", False: "eval"}
        if any(flag != training for _, flag in flags):
            # modules in both modes: the result runs one graph per mode of its own, so this one must
            # be the graph of every module in the model's mode
            try:
                same = _same_graph(graph, uniform(training), model)
            except _ModeSwitch:
                raise
            except Exception:
                same = False
            if not same:
                raise ValueError(f"fuse(): the model is in {name[training]} mode with some of its modules in "
                                 f"{name[not training]} mode, and its forward reads the training flag of one of "
                                 "them: the fused model, which follows its own training flag, could not compute "
                                 f"that; fuse it with its modules in one mode (model.train() / model.eval()); modules "
                                 "called whole, such as dropout and batch norm, may be in either")
        try:
            other = uniform(not training)
        except _ModeSwitch:  # a switch in the other mode's forward alone (if self.training: no_grad)
            raise
        except Exception as exc:  # a model that traces only in its present mode: the other raises
            other = _raising_graph(graph, f"gpu_nn.fuse could not trace the model in {name[not training]} mode "
                                          f"({type(exc).__name__}: {exc}); this fused model runs in "
                                          f"{name[training]} mode only")
        for m, flag in flags:
            m.training = flag
        if _same_graph(graph, other, model):
            gm = torch.fx.GraphModule(model, graph, model.__class__.__name__)
            graphs = [graph]
        else:
            eval_graph, train_graph = (other, graph) if training else (graph, other)
            gm = _TrainEvalGraphModule(model, eval_graph, train_graph, model.__class__.__name__, training)
            graphs = [eval_graph, train_graph]
        gm.training = training
        originals = {id(m) for m in model.modules()}
        if _fuse_graphs(gm, graphs, originals):
            gm.delete_all_unused_submodules()
            for g in graphs:
                g.lint()
            gm.recompile()
        _restore_state(gm, model, originals)
        _model_order(gm, model, originals)
    finally:
        for m, flag in flags:  # a fused model's own graph follows its flag (before its state is put back)
            m.training = flag
        _restore_modules(saved)  # the flags as they were, the tracer's constants off the model
    return gm
