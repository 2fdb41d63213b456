"""Reading a cubin without a GPU: ``cuobjdump``'s resource usage and disassembly, a listing's
functions' instructions, and the straight path.

Shared by the CUDA C report (``kernels/cuda``'s ``sass_report``, ``gpu-nn sass --cuda``) and the
Triton one (``kernels/triton/_aot``, ``gpu-nn sass``).
"""

from __future__ import annotations

import bisect
import os
import re
import struct
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


def _code_sections(cubin: bytes):
    """``[(function, code), ...]`` of a cubin's ``.text.<function>`` sections, or None where
    :func:`disassemble` must leave the cubin to :func:`cuobjdump`: not a little-endian ELF64 it
    can read, not sm_90, code the linker patches (a non-empty relocation section of a text
    section: a call into another section reads as a branch to 0 in the bare code), or code not
    whole 16-byte instructions."""
    if cubin[:6] != b"\x7fELF\x02\x01":
        return None
    try:
        flags, = struct.unpack_from("<I", cubin, 0x30)
        # the SM: bits 8-15 of e_flags from ABI version 8 (CUDA 12.8 on), bits 0-7 before
        if (flags >> 8 if cubin[8] >= 8 else flags) & 0xFF != 90:
            return None
        shoff, = struct.unpack_from("<Q", cubin, 0x28)
        entsize, count, names = struct.unpack_from("<HHH", cubin, 0x3A)
        heads = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * entsize) for i in range(count)]
        base = heads[names][4]
        out = []
        for h in heads:
            n = cubin[base + h[0]:cubin.index(b"\0", base + h[0])].decode()
            if n.startswith((".rel.text.", ".rela.text.")) and h[5]:
                return None
            if n.startswith(".text."):
                code = cubin[h[4]:h[4] + h[5]]
                if len(code) != h[5] or len(code) % 16:
                    return None
                out.append((n[len(".text."):], code))
    except (struct.error, IndexError, ValueError):  # (a truncated or malformed ELF: cuobjdump says what)
        return None
    return out or None


# the instructions whose hexadecimal operand is a code address (branch targets, reconvergence
# points, calls, relative returns, a collective warp sync's target): in one file of many
# functions these are the file's, made the function's again
_CODE_ADDRESS = re.compile(r"^((?:@!?U?P[T0-9]+\s+)?(?:BRA|BSSY|CALL|JMP|RET|WARPSYNC\.COLLECTIVE)\b[^;]*?)(0x[0-9a-f]+)(\s*)$")


def _nvdisasm(blob: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as f:
        f.write(blob)
        path = f.name
    try:
        return subprocess.run([tool("nvdisasm"), "-b", "SM90a", path], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(path)


def disassemble(cubins: list, run_bytes: int = 16 << 20) -> list:
    """The ``cuobjdump -sass`` listing of each of ``cubins`` (each function as ``Function : name``
    and its ``/*address*/ instruction ;`` lines, addresses from the function's start, in the
    ELF's section order), read with one disassembler run for all of them. cuobjdump starts
    nvdisasm once per ELF, and that start (about 0.7 s of CPU on CI's machine, a 50 KB cubin or a
    1 MB one) was nearly all of a SASS read: here every function's code is taken out of its ELF,
    the pieces laid end to end in one file that ``nvdisasm -b SM90a`` decodes at once (a new run
    after ``run_bytes`` of code, so that one run's output stays bounded), and each function's
    lines cut back out, their addresses and code-address operands made relative to the
    function's start again. A cubin this cannot read (:func:`_code_sections`) goes through
    :func:`cuobjdump` alone. The instructions are cuobjdump's, line for line
    (tests/test_compile.py compares them)."""
    pieces = [_code_sections(c) for c in cubins]
    runs, size, listed = [[]], 0, {}
    for i, fns in enumerate(pieces):
        for fn, code in fns or ():
            if runs[-1] and size + len(code) > run_bytes:
                runs.append([])
                size = 0
            runs[-1].append((i, fn, code))
            size += len(code)
    for run in runs:
        if not run:
            continue
        blob, spans = bytearray(), []
        for i, fn, code in run:  # (whole 16-byte instructions: each piece starts on one)
            spans.append((len(blob), len(blob) + len(code), i, fn))
            blob += code
        starts = [s[0] for s in spans]
        for a, ins in _SASS_LINE.findall(_nvdisasm(bytes(blob))):
            addr = int(a, 16)
            start, end, i, fn = spans[bisect.bisect_right(starts, addr) - 1]
            m = _CODE_ADDRESS.match(ins)
            if m and start <= int(m.group(2), 16) <= end:
                ins = f"{m.group(1)}{int(m.group(2), 16) - start:#x}{m.group(3)}"
            listed.setdefault((i, fn), []).append(f"        /*{addr - start:04x}*/ {ins} ;")
    out = []
    for i, fns in enumerate(pieces):
        if fns is None:
            out.append(cuobjdump(cubins[i])[1])
            continue
        out.append("".join(f"\n\tcode for sm_90a\n\t\tFunction : {fn}\n" + "\n".join(listed.get((i, fn), ())) + "\n"
                           for fn, _ in fns))
    return out


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
    each function's closing padding left out: the self-branch after its last instruction and the
    NOPs to the section's 128-byte end (the branch was kept, the NOPs after it hiding it, until
    stop 79)."""
    out = {}
    for chunk in re.split(r"\n\s*Function : ", text)[1:]:
        name, body = chunk.split("\n", 1)
        ins = [(int(a, 16), t.strip()) for a, t in _SASS_LINE.findall(body)]
        while ins and (ins[-1][1].startswith("NOP") or (
                _BRANCH.match(ins[-1][1]) and int(_BRANCH.match(ins[-1][1]).group(2), 16) == ins[-1][0])):
            ins.pop()
        out[name.strip()] = ins
    return out
