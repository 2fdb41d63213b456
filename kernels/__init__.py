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
