"""torch's names beside ours. ``gpu_nn.nn``, ``gpu_nn.functional``, ``gpu_nn.nn.utils`` and
``gpu_nn.optim`` answer a public name they do not define with their torch namesake's
(``nn.Module``, ``nn.Sequential``, ``nn.BatchNorm2d``, ``F.dropout``, ``nn.utils.rnn``,
``optim.lr_scheduler``), so that changing an import (``import gpu_nn.nn as nn``) keeps a torch
script working: our layers where gpu-nn has them, torch's everywhere else. Private names
(a leading underscore) are never taken from torch."""

from __future__ import annotations

import importlib
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
