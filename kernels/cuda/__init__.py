"""CUDA C kernels compiled at run time through CuPy (NVRTC).

* :func:`source` / :func:`include_dir` -- the ``.cu`` files and their common header.
* :func:`compile_cubin` -- compile a ``.cu`` for an architecture with NVRTC directly, without a
  GPU or driver (CI compiles every source for sm_90 this way).
* :func:`sass_report` -- per kernel of a compiled ``.cu``: registers, spills, instructions, global
  access widths, read off the cubin with the ``cuobjdump`` that Triton's wheel ships (``gpu-nn
  sass --cuda``).
* :func:`load` -- one ``cupy.RawModule`` per (source, defines, device, cooperative), compiled by
  :func:`compile_binary` (our NVRTC options, not CuPy's) and kept on disk under a key that covers
  every ``.cu`` and ``.cuh`` (:func:`binary_path`).
* :func:`launch` -- launch a kernel on torch's current stream, tensors passed as their addresses
  (:func:`kernel_args`).

Compile-time parameters are injected as ``-D`` defines; every ``.cu`` gives each one a default
under ``#ifndef`` so it compiles standalone.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile

from .. import replace_file

HERE = os.path.dirname(os.path.abspath(__file__))


def include_dir() -> str:
    return HERE


def sources() -> list[str]:
    """Names (without ``.cu``) of every CUDA C source."""
    return sorted(f[:-3] for f in os.listdir(HERE) if f.endswith(".cu"))


def source(name: str) -> str:
    with open(os.path.join(HERE, f"{name}.cu")) as f:
        return f.read()


def _define_options(defines) -> list[str]:
    return [f"-D{k}={v}" for k, v in sorted(dict(defines or {}).items())]


def _library_version(lib):
    """``(major, minor)`` that the NVRTC library ``lib`` (a ctypes handle) reports, or None."""
    import ctypes

    major, minor = ctypes.c_int(), ctypes.c_int()
    try:
        if lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)) != 0:
            return None
    except AttributeError:
        return None
    return major.value, minor.value


def _nvrtc_library(version):
    """A ctypes handle on an NVRTC library of this process whose version is CuPy's ``version``
    (``nvrtc.getVersion()``): the one CuPy's bindings loaded or its twin, found in this process's
    mappings; None where none matches. :func:`compile_cubin` reads the cubin through it: CuPy's
    ``getCUBIN`` drops the cubin's last byte (it strips a string terminator, which a cubin does
    not end with), leaving an ELF file that ``cuobjdump`` refuses. Another version's library is
    never used: a program handle passed to another NVRTC is undefined behaviour (torch's CUDA
    13 builds map their own ``libnvrtc.so.13`` beside a ``cupy-cuda12x``'s 12)."""
    import ctypes

    version = tuple(version)
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libnvrtc.so" in line}
    except OSError:
        paths = set()
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if _library_version(lib) == version:
            return lib
    return None


def _cubin(nvrtc, prog):
    """The compiled program's cubin, whole (see :func:`_nvrtc_library`), or None where no NVRTC
    library of CuPy's version is found to read it (CuPy's reading is one byte short: enough for
    the ELF magic, not for cuobjdump, and not a file to keep)."""
    import ctypes

    lib = _nvrtc_library(nvrtc.getVersion())
    if lib is None:
        return None
    size = ctypes.c_size_t()
    if lib.nvrtcGetCUBINSize(ctypes.c_void_p(prog), ctypes.byref(size)) != 0:
        return None
    buf = ctypes.create_string_buffer(size.value)
    if lib.nvrtcGetCUBIN(ctypes.c_void_p(prog), buf) != 0:
        return None
    return buf.raw


# NVRTC's options for every module, loaded or reported on: no ``-ftz`` (NVRTC's default, and
# nvcc's, which builds torch's kernels: subnormal float32 operands and results are kept, as the
# reference and torch keep them). CuPy appends ``-ftz=true`` to whatever a ``RawModule(code=...)``
# is given, and NVRTC takes the last: so :func:`load` compiles here and CuPy only loads.
OPTIONS = ("-std=c++17", f"-I{HERE}")
# Options of one source's modules besides: the optimizer steps contract no multiply and add into
# an FMA the source does not write as ``fmaf`` (``--fmad=false``). NVRTC's default contracted each
# inlined copy of Adam's ``v * beta2 + (w2 * g) * g`` its own way, fma(v, beta2, g*w2*g) in the
# element-at-a-time path and fma(g, g*w2, v*beta2) in the 16-byte one (about a quarter of the
# elements 1 ulp apart, so a tensor's bits hung on its alignment), neither what the host build
# of the same GN_HD functions computes (g++ -std=c++17 contracts nothing), which the tests run.
# Not the recurrent loop's: its exact-float32 dot is a chain of FMAs (as cuDNN's), a fifth more
# instructions without them, and it has one path.
SOURCE_OPTIONS = {"optim": ("--fmad=false",)}


def options(name: str) -> tuple:
    """NVRTC's options for ``<name>.cu``'s modules (the architecture and defines aside):
    :data:`OPTIONS` and its :data:`SOURCE_OPTIONS`."""
    return OPTIONS + SOURCE_OPTIONS.get(name, ())


def compile_binary(name: str, defines=None, arch: str = "sm_90", extra_options=()) -> bytes:
    """``<name>.cu`` compiled by NVRTC with :func:`options` and ``defines``: a cubin for an
    ``sm_XX`` ``arch``, PTX for a ``compute_XX`` one. Needs no GPU or driver.

    Raises RuntimeError with NVRTC's log on a compile error.
    """
    from cupy_backends.cuda.libs import nvrtc

    opts = [f"-arch={arch}", *options(name), *_define_options(defines), *extra_options]
    prog = nvrtc.createProgram(source(name), f"{name}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"NVRTC failed on {name}.cu ({' '.join(opts)}):\n{nvrtc.getProgramLog(prog)}") from exc
        if arch.startswith("compute_"):
            return nvrtc.getPTX(prog).rstrip(b"\0")
        cubin = _cubin(nvrtc, prog)
        if cubin is None:
            raise CubinUnreadable(f"{name}.cu compiled for {arch}, but no NVRTC library of CuPy's version "
                                  f"{'.'.join(map(str, nvrtc.getVersion()))} is found in this process to read "
                                  "its cubin whole (CuPy's getCUBIN drops the last byte)")
        return cubin
    finally:
        nvrtc.destroyProgram(prog)


class CubinUnreadable(RuntimeError):
    """A program compiled for an ``sm_XX`` whose cubin cannot be read whole (see :func:`_cubin`);
    :func:`binary_path` builds PTX for that architecture instead, which the driver compiles."""


def compile_cubin(name: str, defines=None, arch: str = "sm_90", extra_options=()) -> bytes:
    """``<name>.cu`` compiled to a cubin for ``arch`` (:func:`compile_binary`); needs no GPU."""
    if not arch.startswith("sm_"):
        raise ValueError(f"compile_cubin: a cubin needs an sm_XX architecture, got {arch!r}")
    return compile_binary(name, defines, arch, extra_options)


def target_arch(capability: str, supported) -> str:
    """The ``-arch`` to build for a device of compute ``capability`` (CuPy's form, ``"90"``) with
    an NVRTC that supports the architectures ``supported`` (``nvrtc.getSupportedArchs()``): that
    device's own ``sm_XX`` where NVRTC has it (a cubin, no JIT at load), else PTX for the newest
    architecture NVRTC has below it, which the driver compiles forward (a cubin for another
    architecture would not load)."""
    cap = int(capability)
    supported = sorted(int(a) for a in supported)
    if cap in supported:
        return f"sm_{cap}"
    below = [a for a in supported if a < cap]
    if not below:
        raise RuntimeError(f"this NVRTC supports no architecture at or below the device's sm_{cap} "
                           f"(it has {', '.join(map(str, supported))})")
    return f"compute_{below[-1]}"


@functools.lru_cache(maxsize=None)
def sources_digest() -> str:
    """A digest of every ``.cu`` and ``.cuh`` here, names and text: a cached binary is keyed by
    all of them, since a kernel is mostly its headers (CuPy's own cache keys a module by the text
    it is given, which for ``#include`` leaves the headers out)."""
    h = hashlib.sha256()
    for f in sorted(os.listdir(HERE)):
        if f.endswith((".cu", ".cuh")):
            with open(os.path.join(HERE, f), "rb") as fh:
                h.update(f.encode() + b"\0" + fh.read() + b"\0")
    return h.hexdigest()


CACHE_ENV = "GPU_NN_CUDA_CACHE"


def cache_dir() -> str:
    """Where compiled modules are kept: ``$GPU_NN_CUDA_CACHE``, else ``~/.cache/gpu_nn/cuda``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "gpu_nn", "cuda")


def binary_path(name: str, defines: tuple, arch: str, nvrtc_version) -> str:
    """The file of ``<name>.cu`` built with ``defines`` for ``arch`` by NVRTC ``nvrtc_version``,
    compiled and written there first if it is not (atomically: a concurrent process writes its
    own temporary and the rename keeps one). An ``sm_XX`` cubin that cannot be read whole here
    (:class:`CubinUnreadable`) is built as PTX for that architecture instead (the driver compiles
    it at load)."""
    # the options but the include directory, whose place is not its text (the digest is)
    key = repr((sources_digest(), name, defines, arch, tuple(nvrtc_version), [o for o in options(name) if o[:2] != "-I"]))
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    directory = cache_dir()
    path = os.path.join(directory, f"{name}-{digest}.{'ptx' if arch.startswith('compute_') else 'cubin'}")
    if os.path.isfile(path) and os.path.getsize(path) > 0:  # (an empty file: a write cut short)
        return path
    ptx_instead = arch.startswith("sm_") and _nvrtc_library(nvrtc_version) is None  # (no compile that would only fail)
    if not ptx_instead:
        try:
            binary = compile_binary(name, dict(defines), arch)
        except CubinUnreadable:
            ptx_instead = True
    if ptx_instead:
        return binary_path(name, defines, "compute_" + arch[len("sm_"):], nvrtc_version)
    try:
        os.makedirs(directory, exist_ok=True)
        replace_file(path, binary)
    except OSError:  # an unwritable cache: this process's own temporary directory
        path = os.path.join(_private_dir(), os.path.basename(path))
        replace_file(path, binary)
    return path


@functools.lru_cache(maxsize=None)
def _private_dir() -> str:
    import atexit
    import shutil

    path = tempfile.mkdtemp(prefix="gpu_nn_cuda_")
    atexit.register(shutil.rmtree, path, True)
    return path


def sass_report(cubin: bytes, listing: str | None = None) -> dict:
    """Per kernel of ``cubin``: ``registers``, ``stack_bytes`` (the stack frame: spilled registers,
    and the registers a call to a slow-path subroutine such as a 64-bit division saves), the
    SASS's ``spill_stores`` / ``spill_loads`` (STL / LDL), ``calls``, ``instructions`` (the
    listing, NOPs and the final self-branch left out), ``straight`` (``gpu_nn.kernels.sass.straight_path``) and
    the global and generic-address loads and stores by access width. Reads the cubin with the ``cuobjdump`` of
    Triton's wheel; no GPU needed. ``listing``: the cubin's SASS read already (``gpu_nn.kernels.sass.disassemble``,
    many cubins in one disassembler run)."""
    from ..sass import cuobjdump, functions, straight_path
    from ..triton._aot import access_widths

    usage, text = cuobjdump(cubin, listing is None)
    text = listing if listing is not None else text
    res = {m.group(1): (int(m.group(2)), int(m.group(3)))
           for m in re.finditer(r"Function (\w+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)", usage)}
    out = {}
    for name, ins in functions(text).items():
        listing = "\n".join(t for _, t in ins)
        regs, stack = res.get(name, (-1, -1))
        out[name] = {
            "registers": regs,
            "stack_bytes": stack,
            "spill_stores": len(re.findall(r"\bSTL\b", listing)),
            "spill_loads": len(re.findall(r"\bLDL\b", listing)),
            "calls": len(re.findall(r"\bCALL\b", listing)),
            "instructions": sum(1 for _, t in ins if not t.startswith("NOP")),
            "straight": straight_path(ins),
            "global_loads": access_widths(listing, "LDG"),
            "global_stores": access_widths(listing, "STG"),
            # generic-address loads and stores (LD / ST): pointers read from memory, such as the
            # optimizer's per-tensor tables, are not known to be global
            "generic_loads": access_widths(listing, "LD"),
            "generic_stores": access_widths(listing, "ST"),
        }
    return out


@functools.lru_cache(maxsize=None)
def _load(name: str, defines: tuple, device: int, cooperative: bool = False):
    import cupy
    from cupy_backends.cuda.libs import nvrtc

    arch = target_arch(cupy.cuda.Device(device).compute_capability, nvrtc.getSupportedArchs())
    path = binary_path(name, defines, arch, nvrtc.getVersion())
    with cupy.cuda.Device(device):
        module = cupy.RawModule(path=path, enable_cooperative_groups=cooperative)
        module.compile()
        return module


def load(name: str, defines=None, device: int = 0, cooperative: bool = False):
    """The ``cupy.RawModule`` of ``<name>.cu`` compiled with ``defines`` for ``device`` (cached in
    the process, and on disk by :func:`binary_path`).

    ``cooperative``: its kernels launch through ``cuLaunchCooperativeKernel``, so the whole grid is
    resident at once (kernels with a grid barrier need that guarantee). CuPy first reduces a 1-D
    grid larger than occupancy x SMs to that size, with a warning, rather than have the driver
    refuse it: such kernels must take any grid size (loop over their work by ``gridDim``).
    """
    return _load(name, tuple(sorted(dict(defines or {}).items())), int(device), bool(cooperative))


def kernel_args(args) -> tuple:
    """``args`` as CuPy's launcher packs them: a torch tensor becomes its device address as a
    ``np.uint64`` (the eight bytes of a ``T*`` parameter), everything else (NumPy scalars, whose
    type is the C parameter's type) is passed as it is.

    Not through DLPack (``cupy.from_dlpack``): CuPy hands the producer its own current stream, and
    torch's ``__dlpack__`` then makes that stream wait, through a new CUDA event, for torch's
    current stream whenever the two differ. Inside a CUDA-graph capture (torch's current stream
    capturing, CuPy's the legacy default stream) that wait on captured work invalidates the
    capture; outside one it costs an event per tensor per launch on a side stream, and a CuPy
    array per tensor always. The kernels read plain pointers either way."""
    import numpy as np
    import torch

    return tuple(np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args)


_FUNCTIONS: dict = {}  # (module, kernel name) -> its RawKernel


def function(module, kernel: str):
    """``module.get_function(kernel)``, kept: CuPy's ``RawModule.get_function`` builds a new
    ``RawKernel`` and looks its compiled function up in a cache keyed by the whole source on
    every call, while a RawKernel resolves the device it runs on at launch, so one object per
    (module, kernel) serves every launch (the modules themselves live for the process:
    :func:`load`)."""
    key = (module, kernel)
    fn = _FUNCTIONS.get(key)
    if fn is None:
        fn = _FUNCTIONS[key] = module.get_function(kernel)
    return fn


class _StreamRef:
    """A CUDA stream handle offered through the CUDA stream protocol (``__cuda_stream__``: version
    0, the handle), which CuPy 14's ``Stream.from_external`` takes."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


_STREAMS: dict = {}  # (stream handle, device) -> CuPy's stream object for it
_MAX_STREAMS = 64


def cupy_stream(cupy, ptr: int, device: int):
    """CuPy's stream object for torch's stream ``ptr`` on ``device``, made once per (handle, device)
    and kept: through ``Stream.from_external`` where CuPy has it (14 and later: its
    ``ExternalStream`` warns DeprecationWarning on every construction there), else
    ``ExternalStream`` (CuPy 13). The objects hold nothing but the handle (torch owns the stream);
    the table is cleared past ``_MAX_STREAMS`` entries (a program making streams without end)."""
    key = (ptr, device)
    got = _STREAMS.get(key)
    if got is None:
        from_external = getattr(cupy.cuda.Stream, "from_external", None)
        got = from_external(_StreamRef(ptr)) if from_external is not None else cupy.cuda.ExternalStream(ptr, device)
        if len(_STREAMS) >= _MAX_STREAMS:
            _STREAMS.clear()
        _STREAMS[key] = got
    return got


def launch(module, kernel: str, grid, block, args, shared_mem: int = 0, device: int = 0) -> None:
    """Launch ``kernel`` of ``module`` on torch's current CUDA stream (capturable: no
    synchronisation, no allocation, see :func:`kernel_args`).

    ``args`` may hold CUDA torch tensors (passed as their data pointers), CuPy arrays and NumPy
    scalars (``np.int32``, ``np.int64``, ``np.float32``: their type is the C parameter's type).
    """
    import cupy

    conv = kernel_args(args)
    with cupy.cuda.Device(device), cupy_stream(cupy, current_stream_handle(device), device):
        function(module, kernel)(tuple(grid), tuple(block), conv, shared_mem=shared_mem)


def current_stream_handle(device: int) -> int:
    """torch's current CUDA stream on ``device`` as its raw handle: through
    ``torch._C._cuda_getCurrentRawStream`` where torch has it (its CUDA builds; what Inductor's
    generated code calls), not ``torch.cuda.current_stream``, which builds a Stream object: 7.35
    us a call on the H200's host at 09f2311 (benchmarks/results/2026-12-04_nvidia-h200_09f2311/
    host_split.txt), on every CuPy launch."""
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(device)
    return torch.cuda.current_stream(device).cuda_stream
