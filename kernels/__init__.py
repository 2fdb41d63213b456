"""gpu-nn's GPU code: ``triton/<family>.py`` and ``cuda/<family>.cu``.

Installed as ``gpu_nn.kernels``. Kernels never import the rest of ``gpu_nn``; launchers in
``gpu_nn.ops`` own every check and allocation.
"""

import os
import tempfile


def replace_file(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file beside it, renamed over it (a
    reader, or another process writing the same path, sees the old file or the new one, never
    half of one); the temporary is removed if anything fails. Raises OSError as ``open`` does."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def env_switch(name: str, value: str | None = None, read: bool = True) -> bool | None:
    """An on / off environment variable ``name`` (its value ``value``, read from the environment
    where ``read`` and ``value`` is None): True for 1 / true / yes / on, False for 0 / false / no /
    off (any case, spaces around ignored), None where unset or empty (the default applies).
    Anything else raises ValueError naming the variable, so a value gpu-nn cannot read is never
    taken silently for either (GPU_NN_TUNE=off left tuning on; GPU_NN_EAGER=false the eager route;
    a CLI audit). Every gpu-nn switch reads through this."""
    if value is None and read:
        value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    v = value.strip().lower()
    if v in _ON:
        return True
    if v in _OFF:
        return False
    raise ValueError(f"{name} must be 0 or 1 (or false / true, no / yes, off / on) or unset, got {value!r}")


def memo(table: dict, limit: int, key, fn, *args):
    """``fn(*args)``, remembered in ``table`` under ``key`` (bounded: cleared when it holds
    ``limit`` entries). Only results are kept: a call that raises is never remembered, so bad
    arguments raise every time. (Here for the kernel modules, which never import the rest of
    gpu_nn; ``gpu_nn.ops._dispatch`` uses it too.)"""
    got = table.get(key)
    if got is None:
        got = fn(*args)
        if len(table) >= limit:
            table.clear()
        table[key] = got
    return got
