"""``gpu_nn.convert``: swap the supported torch.nn layers of a model for ours, in place."""

from __future__ import annotations

import copy
import warnings

import torch

from .nn.dense import ACTIVATION_ATTR, fused_activation

# the torch.nn classes converted (ours has the same name in gpu_nn.nn), every option of theirs
# taken (a convolution's padding_mode too: gpu_nn.nn.Conv1d / Conv2d pad as torch's)
_SUPPORTED = frozenset({
    "Conv1d", "Conv2d", "MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d", "ReLU", "Sigmoid", "Tanh",
    "Flatten", "Linear", "Softmax", "LogSoftmax", "CrossEntropyLoss", "RNN", "LSTM", "GRU", "RNNCell",
    "LSTMCell", "GRUCell", "LazyLinear", "LazyConv1d", "LazyConv2d",
})


# ours that fuse an activation in their epilogue (``activation=``, kept as ``ACTIVATION_ATTR``)
_FUSING = frozenset({"Linear", "Conv1d", "Conv2d", "LazyLinear", "LazyConv1d", "LazyConv2d"})


# torch's own subclasses of a layer we convert whose owner never calls them, so that converting
# them would change nothing and a warning about them would be noise: MultiheadAttention's
# out_proj (every Transformer has one) is read by F.multi_head_attention_forward as weights
_NEVER_CALLED = {"torch.nn.modules.linear.NonDynamicallyQuantizableLinear"}


def _our_class(torch_cls):
    """Our drop-in class for an exact torch.nn class, or None."""
    from . import nn as gnn

    name = torch_cls.__name__
    if name not in _SUPPORTED or getattr(torch.nn, name, None) is not torch_cls:
        return None
    return getattr(gnn, name)


def _parametrized_layer(module: torch.nn.Module) -> bool:
    """A layer we convert, parametrized by torch.nn.utils.parametrize (its class is generated
    over the layer's: ``ParametrizedLinear``, whose base is torch.nn.Linear)."""
    cls = type(module)
    return (torch.nn.utils.parametrize.is_parametrized(module) and cls.__name__.startswith("Parametrized")
            and len(cls.__bases__) == 1 and _our_class(cls.__bases__[0]) is not None)


def _parametrized_class(generated: type, ours: type) -> type:
    """parametrize's generated class rebuilt over ``ours``: the same attributes (a property per
    parametrized tensor, its serialization rules), so that ``remove_parametrizations``, which
    restores ``__bases__[0]``, leaves our layer."""
    body = {k: v for k, v in generated.__dict__.items() if k not in ("__dict__", "__weakref__", "_gpu_nn_torchs")}
    if ours.__module__.startswith("gpu_nn."):
        body["_gpu_nn_torchs"] = generated  # the class revert gives back (the same class object)
    return type(f"Parametrized{ours.__name__}", (ours,), body)


def _swap(module: torch.nn.Module, ours: type) -> torch.nn.Module:
    """Turn ``module`` into an instance of ``ours`` (a subclass of its torch class) in place:
    the same object, parameter and buffer tensors (no copies), hooks, training flag and
    options; only the forward changes."""
    module.__class__ = ours
    init = getattr(module, "_gpu_nn_after_convert", None)
    if init is not None:
        init()
    return module


def convert(model: torch.nn.Module, *, inplace: bool = True) -> torch.nn.Module:
    """Replace every supported torch.nn layer of ``model`` by gpu-nn's drop-in module.

    Parameters and buffers are kept (the same tensors, so optimizers built before the
    conversion keep working), and the converted model computes the same function (torch's lazy
    layers become our lazy layers). Layers left as torch's (a subclass of a supported layer, a
    lazy subclass not initialised yet) are named with the reason in one warning. Layers are converted in place (their class changes, the objects stay), so the
    same model object is returned, ``model`` itself included when it is a supported layer.
    With ``inplace=False`` a deep copy is converted and ``model`` is left alone.
    """
    from . import nn as gnn

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert() expects a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    skipped: list[str] = []

    def visit(mod: torch.nn.Module, prefix: str) -> torch.nn.Module:
        for name, child in list(mod._modules.items()):
            if child is None:
                continue
            mod._modules[name] = visit(child, f"{prefix}.{name}" if prefix else name)
        cls = type(mod)
        # ours already, parametrized or not (parametrize's generated class names its own module:
        # such a layer of ours was reported as a torch subclass left alone)
        if torch.nn.utils.parametrize.type_before_parametrizations(mod).__module__.startswith(gnn.__name__):
            return mod
        ours = _our_class(cls)
        if ours is None and _parametrized_layer(mod):
            # torch.nn.utils.parametrize's generated subclass (weight_norm, spectral_norm, ...):
            # the same generated class over ours (its properties give the parametrized tensors)
            cls = cls.__bases__[0]
            ours = _parametrized_class(type(mod), _our_class(cls))
        if ours is None:
            base = next((b for b in cls.__mro__[1:] if _our_class(b) is not None), None)
            if isinstance(mod, torch.nn.modules.lazy.LazyModuleMixin) and mod.has_uninitialized_params():
                becomes = getattr(mod, "cls_to_become", None) or base
                skipped.append(f"{prefix or '<model>'} ({cls.__name__}): a lazy module not initialized yet (convert "
                               f"after its first forward, which makes it a torch.nn.{becomes.__name__ if becomes else 'layer'})")
            elif base is not None and f"{cls.__module__}.{cls.__qualname__}" not in _NEVER_CALLED:
                skipped.append(f"{prefix or '<model>'} ({cls.__name__}): a subclass of torch.nn.{base.__name__}, left as "
                               "it is (a subclass may change what the layer does)")
            return mod
        return _swap(mod, ours)

    model = visit(model, "")
    if skipped:
        warnings.warn(
            "gpu_nn.convert left these layers as torch layers: " + "; ".join(skipped),
            UserWarning,
            stacklevel=2,
        )
    return model


def _torch_class(our_cls):
    """torch's class for exactly one of our drop-in classes (the one ``convert`` swaps for it),
    or None (a subclass of ours, a layer torch has no twin of: MinPool1d / MinPool2d)."""
    from . import nn as gnn

    name = our_cls.__name__
    theirs = getattr(torch.nn, name, None)
    if name not in _SUPPORTED or getattr(gnn, name, None) is not our_cls or theirs is None:
        return None
    return theirs


def revert(model: torch.nn.Module, *, inplace: bool = True) -> torch.nn.Module:
    """The inverse of :func:`convert`: every gpu-nn layer of ``model`` becomes torch's, in place.

    For what needs torch's own layers after training with ours: ``torch.onnx.export``,
    ``torch.jit.script``, quantization, a machine without gpu-nn. The same objects, parameter
    and buffer tensors, hooks and options (so the state_dict and an optimizer built on the
    model are unchanged); only the forward changes, to torch's. Layers with no torch
    equivalent are left as ours and named in one warning: a layer with a fused ``activation``
    (``activation=``, :func:`gpu_nn.fuse`: torch's layer has no place for it), ``MinPool1d`` /
    ``MinPool2d``, a subclass of one of our layers. Calls of ``gpu_nn.functional`` in a model's
    own forward (or in a :func:`gpu_nn.fuse` graph) stay ours: only modules are reverted. With
    ``inplace=False`` a deep copy is reverted and ``model`` is left alone.
    """
    from .nn._jit import NotScriptable

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"revert() expects a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    left: list[str] = []
    seen: set = set()  # (a module registered at two paths is reverted, or named, once)

    def visit(mod: torch.nn.Module, prefix: str) -> None:
        if id(mod) in seen:
            return
        seen.add(id(mod))
        for name, child in mod._modules.items():
            if child is not None:
                visit(child, f"{prefix}.{name}" if prefix else name)
        cls = type(mod)
        ours = torch.nn.utils.parametrize.type_before_parametrizations(mod)
        if not issubclass(ours, NotScriptable):  # (every module of gpu_nn.nn, and only those)
            return
        why = _left_as_ours(mod, ours)
        if why is not None:
            left.append(f"{prefix or '<model>'} ({ours.__name__}): {why}")
            return
        theirs = _torch_class(ours)
        generated = ours is not cls  # parametrize's class over ours
        if generated:
            # the class convert replaced, where it did and nothing was parametrized since (torch
            # adds a property to the generated class for each tensor parametrized later)
            before = cls.__dict__.get("_gpu_nn_torchs")
            same = before is not None and before.__bases__ == (theirs,) and _properties(before) == _properties(cls)
            mod.__class__ = before if same else _parametrized_class(cls, theirs)
        else:
            mod.__class__ = theirs
        if ours.__name__ in _FUSING:
            mod.__dict__.pop(ACTIVATION_ATTR, None)  # (None: torch's layer has no such attribute)

    visit(model, "")
    calls = [n.name for gm in model.modules() if isinstance(gm, torch.fx.GraphModule) for n in gm.graph.nodes
             if n.op == "call_function" and _ours(n.target)]
    if calls:  # a traced model's calls of our functions (its modules' forwards, traced through)
        left.append(f"{len(calls)} call(s) of gpu_nn functions in a torch.fx graph ({', '.join(calls[:5])}"
                    f"{', ...' if len(calls) > 5 else ''}): revert the model before tracing it")
    if left:
        warnings.warn("gpu_nn.revert left these layers as gpu_nn layers: " + "; ".join(left), UserWarning,
                      stacklevel=2)
    return model


def _left_as_ours(module: torch.nn.Module, ours: type) -> str | None:
    """Why :func:`revert` leaves ``module`` (of our class ``ours``, parametrized or not) as ours,
    or None where it gives torch's layer (ScriptingNotSupportedError asks it too)."""
    from . import nn as gnn

    theirs = _torch_class(ours)
    if theirs is None:
        base = next((b for b in ours.__mro__ if b.__module__.startswith(gnn.__name__ + ".")), ours)
        return ("torch has no such layer" if base is ours else
                f"a subclass of gpu_nn.nn.{base.__name__}, left as it is (a subclass may change what the layer does)")
    if ours.__name__ in _FUSING and fused_activation(module) is not None:
        return f"fuses activation={fused_activation(module)!r}, which torch's {theirs.__name__} has no place for"
    return None


def _properties(cls: type) -> set:
    """The names of the properties a class itself defines (parametrize's: one per tensor)."""
    return {k for k, v in vars(cls).items() if isinstance(v, property)}


def _ours(target) -> bool:
    """A call target of gpu_nn's: one of its Python functions or one of its gpu_nn:: ops."""
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace == "gpu_nn"
    return (getattr(target, "__module__", None) or "").startswith("gpu_nn.")
