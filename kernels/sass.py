"""Reading a cubin without a GPU: ``cuobjdump``'s resource usage and disassembly, a listing's
functions' instructions, and the straight path.

Shared by the CUDA C report (``kernels/cuda``'s ``sass_report``, ``gpu-nn sass --cuda``) and the
Triton one (``kernels/triton/_aot``, ``gpu-nn sass``).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile


def tool(name: str) -> str:
    """The path of one of the CUDA tools Triton's wheel ships (``cuobjdump``, ``ptxas``)."""
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin", name)


def cuobjdump(cubin: bytes, sass: bool = True) -> tuple:
    """``(resource usage, disassembly)`` of ``cubin``: ``cuobjdump -res-usage`` and, with ``sass``,
    ``cuobjdump -sass`` (the slow part; None without)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        def run(flag):
            return subprocess.run([tool("cuobjdump"), flag, path], capture_output=True, text=True, check=True).stdout

        return run("-res-usage"), (run("-sass") if sass else None)
    finally:
        os.unlink(path)

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"^(@!?U?P[T0-9]+\s+)?BRA(?:\.\w+)*\s+(?:`\()?(0x[0-9a-f]+)")


def straight_path(instructions) -> int:
    """Instructions one thread issues along the path where no predicated branch is taken (an
    element whose every guard holds: every tap of a pooling window inside the input, one element
    per thread), from the entry to ``EXIT``; unconditional branches are followed, and an
    unconditional backward one ends the path. A loop closed by a predicated branch runs once
    along it: the grid-stride loop's one element, a run-time loop's first iteration. So it is a
    per-element cost (prologue included) for straight-line kernels such as a pooling window
    compiled in (POOL_FIXED), and a lower bound for kernels with run-time loops.
    ``instructions``: (address, text) pairs in order."""
    where = {a: i for i, (a, _) in enumerate(instructions)}
    i, n, seen = 0, 0, set()
    while i < len(instructions) and i not in seen:
        seen.add(i)
        addr, text = instructions[i]
        if text.startswith("NOP"):
            i += 1
            continue
        n += 1
        if text == "EXIT":
            break
        m = _BRANCH.match(text)
        if m and not m.group(1):  # unconditional
            target = int(m.group(2), 16)
            if target <= addr or target not in where:
                break
            i = where[target]
            continue
        i += 1
    return n


def functions(text: str) -> dict:
    """``{function name: [(address, instruction text), ...]}`` of a ``cuobjdump -sass`` listing,
    each function's trailing self-branch (the padding after its last instruction) left out."""
    out = {}
    for chunk in re.split(r"\n\s*Function : ", text)[1:]:
        name, body = chunk.split("\n", 1)
        ins = [(int(a, 16), t.strip()) for a, t in _SASS_LINE.findall(body)]
        while ins and _BRANCH.match(ins[-1][1]) and int(_BRANCH.match(ins[-1][1]).group(2), 16) == ins[-1][0]:
            ins.pop()
        out[name.strip()] = ins
    return out
