"""torch's names beside ours. ``gpu_nn.nn``, ``gpu_nn.functional``, ``gpu_nn.nn.utils`` and
``gpu_nn.optim`` answer a public name they do not define with their torch namesake's
(``nn.Module``, ``nn.Sequential``, ``nn.BatchNorm2d``, ``F.dropout``, ``nn.utils.rnn``,
``optim.lr_scheduler``), so that changing an import (``import gpu_nn.nn as nn``) keeps a torch
script working: our layers where gpu-nn has them, torch's everywhere else. The same holds for
their submodules: ``from gpu_nn.optim.lr_scheduler import StepLR`` and ``from gpu_nn.nn.utils.rnn
import pack_sequence`` import torch's modules of those names (so a script's imports can be changed
by replacing ``torch.nn`` / ``torch.optim`` with ``gpu_nn.nn`` / ``gpu_nn.optim`` throughout).
Private names (a leading underscore) are never taken from torch."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types


def fall_back_to(namespace: dict, theirs: types.ModuleType, redirect: dict | None = None) -> None:
    """Give the module whose globals are ``namespace`` a ``__getattr__`` (PEP 562: called only for
    names it lacks) that returns ``theirs``' public attribute of that name, and a ``__dir__``
    that lists both. ``redirect`` maps a name to one of our modules (imported when first asked
    for) where torch's attribute of that name is a namespace we mirror (``nn.functional``)."""
    name = namespace["__name__"]
    redirect = redirect or {}

    def __getattr__(attr: str):
        if attr in redirect:
            return importlib.import_module(redirect[attr])
        if not attr.startswith("_"):
            try:
                return getattr(theirs, attr)
            except AttributeError:
                pass
        raise AttributeError(f"module {name!r} has no attribute {attr!r}")

    def __dir__():
        return sorted(set(namespace) | set(redirect) | {n for n in dir(theirs) if not n.startswith("_")})

    namespace["__getattr__"] = __getattr__
    namespace["__dir__"] = __dir__
    if "__path__" in namespace:  # a package: its submodules too
        _FINDER.packages[name] = (theirs.__name__, redirect, True)
        _FINDER.pin(name, theirs, ours=set(namespace) | set(redirect))
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)


class _TheirSubmodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """An import finder for the packages given :func:`fall_back_to`: ``import
    gpu_nn.optim.lr_scheduler``, where gpu-nn has no such submodule of its own, is torch's module
    of that name -- the same module object, so classes, ``isinstance`` and pickles are torch's --
    or the redirected module of ours (``gpu_nn.nn.functional`` is ``gpu_nn.functional``); below
    such an alias every name is torch's too (``gpu_nn.nn.modules.conv`` is ``torch.nn.modules.conv``,
    never a second copy of it). A private name directly under one of our packages, or one torch
    lacks too, is not found (ModuleNotFoundError naming ours). First on ``sys.meta_path`` (so that the path finder does not
    load torch's files a second time under our names); any other import costs it one dict lookup."""

    def __init__(self):
        # our package -> (torch's, redirect, whether it is ours: then our own submodules win)
        self.packages: dict[str, tuple[str, dict, bool]] = {}

    def _target(self, fullname: str, path):
        parent, _, child = fullname.rpartition(".")
        if parent not in self.packages:
            return None
        theirs, redirect, ours = self.packages[parent]
        if ours and child.startswith("_"):
            return None  # (below an alias every name is torch's, private ones too)
        if child in redirect:
            return redirect[child]
        if ours and importlib.machinery.PathFinder.find_spec(fullname, path) is not None:
            return None  # gpu-nn's own submodule
        target = f"{theirs}.{child}"
        try:
            return target if importlib.util.find_spec(target) is not None else None
        except (ImportError, ValueError):
            return None

    def find_spec(self, fullname, path=None, target=None):
        their_name = self._target(fullname, path)
        if their_name is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, loader_state=their_name)

    def create_module(self, spec):
        module = importlib.import_module(spec.loader_state)
        spec.gn_their_spec = module.__spec__  # (the import system overwrites it: exec_module restores it)
        if hasattr(module, "__path__") and spec.name not in self.packages:
            self.packages[spec.name] = (module.__name__, {}, False)
            self.pin(spec.name, module)
        return module

    def exec_module(self, module):
        # already run as torch's (or ours); give it its own spec back, which the import system
        # replaced with the alias's
        module.__spec__ = module.__spec__.gn_their_spec

    @staticmethod
    def pin(package: str, theirs: types.ModuleType, ours=None) -> None:
        """Put in ``sys.modules``, under ``package``'s name, each loaded submodule of ``theirs``
        that its package's attribute of the same name is not (``torch.nn.parallel.data_parallel``
        is a function there, ``torch.nn.utils.weight_norm`` too): importing it through our name
        then finds it there, and the import system does not set the parent's attribute to the
        module, which would replace torch's function on torch's own package (an alias is that
        package) or shadow it in ours. ``ours``: for one of our packages, the names it has itself
        (left alone, as its private names are: :meth:`_target`'s rules); None for an alias."""
        prefix = theirs.__name__ + "."
        for name, module in list(sys.modules.items()):
            child = name[len(prefix):]
            if not name.startswith(prefix) or "." in child or getattr(theirs, child, None) is module:
                continue
            if ours is not None and (child in ours or child.startswith("_")):
                continue
            sys.modules.setdefault(f"{package}.{child}", module)


_FINDER = _TheirSubmodules()
