"""Configurations chosen by measurement on the device, cached in memory and on disk.

Where one launch configuration cannot serve every shape, a launcher gives :func:`choose` a short
list of candidates (each one compiled ahead of time for sm_90 in the tests), a key that names
the problem (op, shapes, strides, dtypes, options) and a ``run(config)`` that launches the
kernel with that configuration. On the first call with a new key on a CUDA device each candidate
is timed with CUDA events (one warm-up launch, which also compiles it, then the median of a few
timed launches) and the fastest is kept: in memory for this process, and in a JSON file keyed by
GPU and versions so that the next process does not measure again. Afterwards the key costs one
dictionary lookup.

The heuristic (``default``) is used, and nothing is measured, where measuring is impossible or
unwanted: CPU tensors (the Triton interpreter), ``GPU_NN_TUNE=0``, deterministic algorithms
asked for (``torch.use_deterministic_algorithms(True)`` or ``torch.backends.cudnn.deterministic``)
without ``torch.backends.cudnn.benchmark`` (see :func:`applies`), and while a CUDA graph is
being captured (a timed launch would synchronise the host; a choice already made is still used
during capture).
``GPU_NN_TUNE_CACHE`` names the cache file (default ``~/.cache/gpu_nn/tuning.json``; it keeps
the newest :data:`DISK_MAX_KEYS` entries per device section and the :data:`DISK_MAX_SECTIONS`
sections written last). An op measures at most
``GPU_NN_TUNE_MAX_SHAPES`` (default :data:`MAX_SHAPES`) problems per process: a model fed ever new
sizes (variable sequence lengths or image sizes) then runs the heuristic for new ones, with one
warning, rather than measuring every candidate at every size (``0`` removes the bound).

``GPU_NN_TUNE_RECORD=path`` keeps every timing this process measures: one JSON object per line
(``{"device_key", "op", "key", "config", "ms", "chosen"}``; ``ms`` is null and ``error`` says why
for a candidate that could not run), appended to ``path``, so that a scarce GPU session leaves
the time of every candidate of every tuned launcher at every shape it met, from which CPU-only
sessions can fit heuristics. While recording, the disk cache is not read (each key is measured
once per process, so the record is complete); choices are still written to it.

``run(config)`` must be idempotent: each call rewrites the outputs in full (a launcher whose
kernel accumulates zeroes its output inside ``run``), because the candidates are timed on the
real buffers; the caller then launches the returned configuration as usual.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import threading
import time
from typing import Callable, Sequence

import torch

from .kernels import env_switch, replace_file

ENV = "GPU_NN_TUNE"
CACHE_ENV = "GPU_NN_TUNE_CACHE"
RECORD_ENV = "GPU_NN_TUNE_RECORD"
MAX_SHAPES_ENV = "GPU_NN_TUNE_MAX_SHAPES"
REPS = 5
# problems measured per op and process before new ones take the heuristic (a model fed inputs of
# ever new sizes -- variable sequence lengths, image sizes, token counts -- would otherwise pay
# a measurement of every candidate, host synchronisations included, at every new size, where
# torch's heuristics pay nothing; torch measures every new size only under cudnn.benchmark)
MAX_SHAPES = 64
# entries kept per device in the cache file, oldest dropped first (each new entry rewrites it),
# and device sections kept (a section is per GPU, versions and kernel sources: every edit of a
# kernel starts a new one), the least recently written dropped first
DISK_MAX_KEYS = 8192
DISK_MAX_SECTIONS = 8
# problems that took the default (past the bound, or every candidate failed), remembered so that
# their next calls return at once instead of measuring or asking again (cleared when full)
_FALLBACK_MAX = 4096

_lock = threading.Lock()
_memory: dict[tuple, object] = {}
_disk: dict[str, dict] | None = None
_measured: dict[tuple, set] = {}  # (device key, op) -> the problems measured in this process
_capped: set = set()  # (device key, op) already warned about
_fallback: set = set()  # (device key, op, key) that took the default in this process


_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV) if _ENV_DATA is not None and hasattr(os.environ, "encodekey") else None
_ON = (None, b"1", "1")
_OFF = (b"0", "0")


def _tuning_off() -> bool:
    """GPU_NN_TUNE off (0, false, no, off: :func:`gpu_nn.kernels.env_switch`), read on every call
    (a change is seen) from CPython's own store of the environment where it has one (a tenth of
    ``os.environ.get``, as ``_backend`` reads GPU_NN_BACKEND), else through ``os.environ``; unset,
    "1" and "0", the usual values, answered without parsing."""
    raw = os.environ.get(ENV) if _ENV_KEY is None else _ENV_DATA.get(_ENV_KEY)
    if raw in _ON:
        return False
    if raw in _OFF:  # (the GPU scripts' and gpu-nn check's setting: answered as fast)
        return True
    if isinstance(raw, bytes):
        raw = os.fsdecode(raw)
    return env_switch(ENV, raw, read=False) is False


def applies(device: torch.device) -> bool:
    """Whether measured configurations apply to calls on ``device`` at all: a CUDA device, tuning
    not switched off, and no run-to-run reproducibility asked for: under
    ``torch.use_deterministic_algorithms(True)`` or ``torch.backends.cudnn.deterministic = True``
    (PyTorch's reproducibility recipe) the heuristic serves (no measuring, no cached choice)
    unless ``torch.backends.cudnn.benchmark`` is set, as torch's cuDNN then selects its
    algorithms (measured choices differ between processes, and with them the order of a
    convolution's or a matmul's sums, so results would differ in their last bits from run to run;
    our kernels themselves use no atomics, so one configuration gives the same bits every run).
    (During a CUDA graph capture :func:`choose` still serves a choice already made; it only does
    not measure.)"""
    kind = device.type if type(device) is torch.device else torch.device(device).type
    if kind != "cuda" or _tuning_off():
        return False
    return not (_deterministic() or _cudnn_deterministic()) or _cudnn_benchmark()


_deterministic = torch._C._get_deterministic_algorithms  # torch.are_deterministic_algorithms_enabled's body
_cudnn_deterministic = torch._C._get_cudnn_deterministic  # torch.backends.cudnn.deterministic's
_cudnn_benchmark = torch._C._get_cudnn_benchmark  # torch.backends.cudnn.benchmark's


def enabled(device: torch.device) -> bool:
    """Whether a call on ``device`` may measure: :func:`applies`, and no CUDA graph capture in
    progress on the current stream."""
    if not applies(device):
        return False
    return not torch.cuda.is_current_stream_capturing()


def max_shapes() -> int:
    """GPU_NN_TUNE_MAX_SHAPES: problems measured per op and process (default :data:`MAX_SHAPES`;
    0: no bound). Read on a miss only (the hot path never reaches it); anything but a
    non-negative integer raises ValueError naming the variable."""
    raw = os.environ.get(MAX_SHAPES_ENV)
    if raw is None or not raw.strip():
        return MAX_SHAPES
    try:
        n = int(raw.strip())
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"{MAX_SHAPES_ENV} must be a non-negative integer (0: no bound) or unset, got {raw!r}")
    return n


def _room(dev_key: str, op: str) -> bool:
    """Whether ``op`` may measure one more problem in this process (:func:`max_shapes`); the
    first refusal per op warns, naming the variable."""
    cap = max_shapes()
    if cap == 0 or len(_measured.get((dev_key, op), ())) < cap:
        return True
    if (dev_key, op) not in _capped:
        _capped.add((dev_key, op))
        import warnings

        warnings.warn(f"gpu_nn: {op} has measured its configurations for {cap} problem sizes in this process; "
                      f"new sizes take the heuristic configuration from here on (choices already made are kept; "
                      f"{MAX_SHAPES_ENV}=N sets the bound, 0 removes it, GPU_NN_TUNE=0 measures nothing)",
                      RuntimeWarning, stacklevel=4)
    return False


def cache_path() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "gpu_nn", "tuning.json")


def device_key(device: torch.device) -> str:
    """GPU name and compute capability plus the versions whose code generation matters."""
    return _device_key(torch.device(device).index or 0)


@functools.lru_cache(maxsize=None)
def _device_key(idx: int) -> str:
    import triton

    from . import __version__

    name = torch.cuda.get_device_name(idx)
    major, minor = torch.cuda.get_device_capability(idx)
    return (f"{name}|sm_{major}{minor}|torch {torch.__version__}|triton {triton.__version__}|gpu_nn {__version__}"
            f"|kernels {kernels_digest()}")


KERNEL_SOURCES = (".py", ".cu", ".cuh")


def sources_digest(root: str) -> str:
    """A digest of the kernel sources under ``root`` (every ``.py`` / ``.cu`` / ``.cuh`` file, by
    relative path and content, in a fixed order). The package version alone did not key the
    disk cache to the code it measured: ``gpu_nn.__version__`` stays the same across commits, so
    a choice timed before a kernel changed was served after it (as long as the configuration
    was still a candidate), and the change was never measured."""
    import hashlib

    h = hashlib.sha256()
    for dirpath, dirnames, files in os.walk(root):  # top-down, directories in sorted order
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(KERNEL_SOURCES):
                path = os.path.join(dirpath, f)
                h.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\0")
                with open(path, "rb") as fh:
                    h.update(fh.read())
                h.update(b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def kernels_digest() -> str:
    """:func:`sources_digest` of ``gpu_nn.kernels`` (read once per process, on the first tuned
    call of a CUDA device)."""
    from . import kernels

    return sources_digest(os.path.dirname(os.path.abspath(kernels.__file__)))


def _encode(key: tuple) -> str:
    return json.dumps([str(k) if not isinstance(k, (int, float, str, bool, type(None), list, tuple)) else k
                       for k in key])


def _load_disk() -> dict:
    global _disk
    if _disk is None:
        try:
            with open(cache_path()) as f:
                data = json.load(f)
            _disk = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            _disk = {}
    return _disk


def _section(data: dict, dev_key: str) -> dict:
    """The cache's entries for ``dev_key``, a new empty dict in their place where there are none
    or they are not a dict (a file of another shape)."""
    if not isinstance(data.get(dev_key), dict):
        data[dev_key] = {}
    return data[dev_key]


class _file_lock:
    """An exclusive ``flock`` on ``path`` (created if need be) while the block runs; nothing where
    ``fcntl`` is missing (not POSIX)."""

    def __init__(self, path: str):
        self.path, self.fd = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
        return False


def _save_disk(dev_key: str, key: str, config) -> None:
    """Merge one entry into the cache file: under a lock on ``<file>.lock`` (processes sharing
    the file, such as test workers, would otherwise each rename their own read over entries the
    others added since), read what is there, add the entry, write a temporary file beside it and
    rename it over the old one. A file of another shape (not a dict of dicts) is replaced."""
    path = os.path.abspath(cache_path())
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
        with _file_lock(path + ".lock"):
            try:
                with open(path) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                data = None
            if not isinstance(data, dict):
                data = {}
            section = _section(data, dev_key)
            data[dev_key] = data.pop(dev_key)  # (the most recently written section last)
            section.pop(key, None)  # (re-inserted last: the newest)
            section[key] = list(config)
            for old in list(section)[:max(0, len(section) - DISK_MAX_KEYS)]:  # oldest first (JSON keeps the order)
                del section[old]
            for old in list(data)[:max(0, len(data) - DISK_MAX_SECTIONS)]:
                del data[old]
            replace_file(path, json.dumps(data, indent=0).encode())
    except OSError:  # a read-only home: the choice still lives in memory
        pass


def _record(rows: list[dict]) -> None:
    """Append measured rows to the GPU_NN_TUNE_RECORD file (one JSON object per line; one write
    per key, opened in append mode, so processes that record at once do not interleave rows)."""
    path = os.environ.get(RECORD_ENV)
    if not path or not rows:
        return
    try:
        d = os.path.dirname(path)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    except OSError:  # recording is best effort: never fail the call that is being tuned
        pass


def read_record(path: str) -> list[dict]:
    """The rows of a GPU_NN_TUNE_RECORD file (lines that do not parse, e.g. one cut short by a
    killed process, are skipped)."""
    rows = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    except OSError:
        pass
    return rows


# Device time with the host queued ahead. A CUDA event pair around one call on an idle stream
# times the host's launch as well as the kernels: the start event is stamped at once, the kernels
# only once the host has enqueued them (a 1x2x5 conv's candidates all timed ~40 us at 82f8513, a
# host floor; the H200 sweep at a331102 timed every channels_last conv tile at 84-94 us behind
# do_bench's L2 flush, which the host no longer outpaced). So each timed call is queued behind a
# GPU sleep long enough for the host to enqueue it, between its own event pair: the events then
# time the device's work only. The host's queuing time is checked against the sleep; a call the
# host did not queue in time (it synchronises, or its host time grew) is measured again behind a
# longer sleep, and said to be not queued if that fails too.
SLEEP_MARGIN = 3.0        # the sleep lasts this many times the host's expected time for the call
SLEEP_SLACK_S = 250e-6    # plus this (event creation, the first launch)
SLEEP_MAX_S = 2.0         # never longer
# the call counts as queued when the host took at most this share of the sleep's calibrated
# length: the GPU's clock may run faster than when the sleep was calibrated (a shorter sleep)
QUEUED_SHARE = 0.5
_cycle_s: list[float] = []
SLEEP_WARM_CYCLES = 20_000_000  # the calibration's first sleep: about 10 ms at the H200's boost clock
SLEEP_CAL_CYCLES = 2_000_000    # each timed one: about 1 ms there
SLEEP_CAL_REPS = 3


def sleep_cycle_seconds() -> float:
    """GPU seconds one cycle of ``torch.cuda._sleep`` lasts, measured once per process with CUDA
    events (about 0.5 ns at the H200's clock): the shortest of ``SLEEP_CAL_REPS`` timed sleeps
    after an untimed one of ``SLEEP_WARM_CYCLES``. An idle GPU's SM clock is a fraction of its
    boost clock (1,980 MHz on the H200) and rises under load; measured at the low clock,
    every later sleep would last a fraction of what :func:`queued_times` asks, and its check
    (the host's queuing against the length asked) would pass calls the host had not queued in
    time, their figures holding host time. The shortest measurement is the fastest clock's: a
    sleep then lasts at least what was asked."""
    if not _cycle_s:
        torch.cuda._sleep(SLEEP_WARM_CYCLES)
        best = float("inf")
        for _ in range(SLEEP_CAL_REPS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(SLEEP_CAL_CYCLES)
            end.record()
            end.synchronize()
            best = min(best, max(start.elapsed_time(end), 1e-3) / 1e3 / SLEEP_CAL_CYCLES)
        _cycle_s.append(best)
    return _cycle_s[0]


def queued_times(run: Callable[[], object], reps: int, host_s: float,
                 before: Callable[[], object] | None = None, tries: int = 2) -> tuple[list[float], bool]:
    """Device seconds of ``reps`` calls of ``run()``, each queued behind its own GPU sleep and
    between its own CUDA event pair (``before()``, an L2 flush say, queued untimed after the
    sleep and ahead of the start event), and whether the host queued every call before its sleep
    ended. ``host_s`` is the host time one call (with its ``before``) is expected to take; a call
    not queued in time is measured again (``tries`` in all) behind a sleep sized from what its
    queuing took, and the larger figure serves the calls after it. One call per sleep, not a
    batch: a call of hundreds of launches (a recurrent layer's time loop) would fill the
    driver's launch queue behind one long sleep and block the host. Not queued after the tries:
    the figure includes host time (the call synchronises with the device, or holds more launches
    than the driver queues ahead: a loop of such calls runs at the host's pace).

    A call not queued behind the longer sleep either (sized from the queuing just measured)
    waits for the device (a device-to-host read inside it, or a full launch queue; the sleep's
    length sets its queuing): a longer sleep would be waited out too, so the calls after it are
    timed behind the shortest sleep, once each. (Growing the sleep instead tripled
    it at every call up to SLEEP_MAX_S, two such sleeps a call from then on: a minute and more of
    a bench run sleeping for the Triton cross-entropy, whose target check reads the device.)"""
    per_cycle = sleep_cycle_seconds()
    times, queued, waits = [], True, False
    for _ in range(reps):
        for attempt in range(1 if waits else tries):
            want = SLEEP_SLACK_S if waits else min(SLEEP_MAX_S, host_s * SLEEP_MARGIN + SLEEP_SLACK_S)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(max(1, int(want / per_cycle)))
            t0 = time.perf_counter()
            if before is not None:
                before()
            start.record()
            run()
            end.record()
            queuing = time.perf_counter() - t0
            end.synchronize()
            ok = queuing < QUEUED_SHARE * want
            if ok:
                break
            if attempt > 0:  # not queued behind the longer sleep either: the call waits for the device
                waits = True
                break
            host_s = max(2 * host_s, queuing)
        times.append(start.elapsed_time(end) / 1e3)
        queued = queued and ok
    return times, queued


def cuda_timer(run: Callable[[], None], reps: int = REPS) -> float:
    """Median milliseconds of ``run()`` over ``reps`` launches (:func:`queued_times`, the host's
    time per launch taken from one untimed launch after the warm-up, which compiles)."""
    run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    host_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    times, _ = queued_times(run, reps, host_s)
    return statistics.median(times) * 1e3


def choose(op: str, key: tuple, candidates: Sequence[tuple], run: Callable[[tuple], None], default: tuple,
           device: torch.device, timer: Callable[[Callable[[], None]], float] | None = None,
           force: bool = False, prepare: Callable[[Sequence[tuple]], None] | None = None) -> tuple:
    """The configuration to launch ``op`` with for ``key`` (see the module docstring).

    Returns ``default`` untouched where tuning does not apply. ``timer`` and ``force`` exist for
    tests (a fake clock, measuring without a GPU). A candidate that fails to launch (too much
    shared memory, say) is skipped; if all fail, ``default`` is returned (and, for this key, from
    then on in this process, without measuring again). ``prepare(candidates)``,
    when given, is called once before a measurement (never on a cached key): a launcher compiles
    all its candidates there at once (in parallel) instead of one by one in their warm-up
    launches; whatever it raises is ignored (the warm-up launches compile what it did not).
    """
    if len(candidates) <= 1:
        return default
    if not (force or applies(device)):
        return default
    dev_key = device_key(device) if not force else "test"
    mkey = (dev_key, op, key)
    hit = _memory.get(mkey)  # the hot path: one dictionary lookup, and the hit among this call's
    if hit is not None and hit in candidates:  # candidates (a key that missed a fact which
        return hit  # changes them must not serve a form this call does not offer: measure again)
    if mkey in _fallback:
        return default
    if not force and torch.cuda.is_current_stream_capturing():
        return default  # measuring would synchronise the host inside the capture
    recording = bool(os.environ.get(RECORD_ENV))
    ekey = _encode((op, *key))
    with _lock:
        hit = _memory.get(mkey)
        if hit is not None and hit not in candidates:
            hit = None
        if hit is None and not recording:
            section = _load_disk().get(dev_key)
            stored = section.get(ekey) if isinstance(section, dict) else None
            if isinstance(stored, list) and tuple(stored) in {tuple(c) for c in candidates}:
                hit = _memory[mkey] = tuple(stored)
    if hit is not None:
        return hit
    if not recording:  # (a recording run measures every problem it meets: its rows are the point)
        with _lock:
            if not _room(dev_key, op):
                _fall_back(mkey)
                return default
            _measured.setdefault((dev_key, op), set()).add(ekey)
    if prepare is not None:
        try:
            prepare(candidates)
        except Exception:  # best effort: each candidate's warm-up launch compiles it anyway
            pass
    timer = timer or cuda_timer
    best, best_t = None, float("inf")
    rows = []
    for cfg in candidates:
        row = {"device_key": dev_key, "op": op, "key": json.loads(_encode(key)), "config": list(cfg), "ms": None}
        rows.append(row)
        try:
            t = timer(lambda cfg=cfg: run(cfg))
        except Exception as exc:  # this candidate cannot run on this device / shape
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        row["ms"] = float(t)
        if t < best_t:
            best, best_t = tuple(cfg), t
    for row in rows:
        row["chosen"] = best is not None and tuple(row["config"]) == best
    if recording:
        _record(rows)
    if best is None:
        with _lock:
            _fall_back(mkey)
        return default
    with _lock:
        _memory[mkey] = best
        _section(_load_disk(), dev_key)[ekey] = list(best)
    _save_disk(dev_key, ekey, best)
    return best


def _fall_back(mkey) -> None:
    """Remember that ``mkey`` takes the default in this process (under ``_lock``)."""
    if len(_fallback) >= _FALLBACK_MAX:
        _fallback.clear()
    _fallback.add(mkey)


def clear() -> None:
    """Forget every choice held in memory and the per-op counts of measured problems; the disk
    cache is read again on the next miss."""
    global _disk
    with _lock:
        _memory.clear()
        _disk = None
        _measured.clear()
        _capped.clear()
        _fallback.clear()
