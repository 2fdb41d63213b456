"""What Triton's on-disk cache holds after a GPU run: compiled kernels per kernel name.

The test suite on a fresh H200 is bound by kernel compilation (its slowest tests are the ones
that compile many specialisations of the recurrent and convolution kernels); how many variants
of which kernel a run compiled is what a CPU-only session needs to cut that, and the cache says
it: one folder per compiled variant, holding ``<kernel>.cubin``::

    python -m gpu_nn.benchmarks.triton_cache [CACHE_DIR] [--json PATH]

``CACHE_DIR`` defaults to ``TRITON_CACHE_DIR`` or ``~/.triton/cache``. Prints the total and the
kernels with the most variants; ``--json`` keeps every count.

A GPU session is short, and on a fresh machine most of it went to compiling (at a331102: 68 % of
``gpu-nn check``, the whole of the bench's first-call phase, the demo's 50 s limit). What one GPU
run compiled can serve the next one on the same image, so a run can leave its compiled kernels
behind and the next carry them in::

    python -m gpu_nn.benchmarks.triton_cache pack OUT.tar.xz [--max-mib 15]
    python -m gpu_nn.benchmarks.triton_cache unpack ARCHIVE [--force]
    python -m gpu_nn.benchmarks.triton_cache stamp

``pack`` writes what a cache hit reads and nothing else: per compiled variant its metadata
``.json``, its ``.cubin`` and its group file (child paths relative), the compiled launcher
modules (``.so``: Triton builds one per kernel signature with the host's C compiler), and the
CUDA C modules of ``kernels/cuda`` (``GPU_NN_CUDA_CACHE``); the IR files (ttir, ttgir, llir, ptx,
source) stay behind, about seven eighths of the bytes (a sample of 12 activation and pooling
variants: 229 of 2,000 KB kept). Most recently used or written first (a file's later of mtime and
atime: unpacked files keep the times they were packed with, and a cache hit reads the cubin),
until the archive reaches ``--max-mib`` (one file the device tool returns: 16 MiB at most) or
``--max-s`` seconds have gone; what did not fit is counted in its ``STAMP.json``, with the Triton
version, a digest of ``triton_key()`` (Triton's sources and its ``libtriton`` build: the first
part of every kernel's cache key) and one of the sm_90 backend's hash (the ptxas version: another
part). ``unpack`` writes the entries into this process's caches
(Triton's ``knobs.cache.dir``, absolute child paths in the group files as Triton writes them) only
where those two digests match this Triton's: another build's entries could never be read (their
keys differ), and ``--force`` is for tests. A kernel whose source changed since the pack has
another key: it compiles as before, and only the unchanged kernels are served. Nothing here reads
a key Triton would not have computed itself: the entries are the files Triton wrote.
``benchmarks/steps.sh`` unpacks ``.gpu_cache/triton-cache.tar.xz`` (or ``GPU_NN_CARRIED_CACHE``)
before a GPU run, and says so in its summary: figures of a run that used one are not a fresh
machine's.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import sys
import tarfile
import time

from ..kernels.cuda import cache_dir as cuda_cache_dir  # (GPU_NN_CUDA_CACHE: where the CUDA C modules are)


def cache_dir() -> str:
    """Where this process's Triton reads and writes its cache (``knobs.cache.dir``: where
    ``TRITON_CACHE_DIR`` points, else ``~/.triton/cache``); the same without Triton."""
    try:
        from triton import knobs

        return knobs.cache.dir
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")


def summary(path: str) -> dict:
    """``{"dir", "variants", "kernels": {name: count}}``: one variant per cache folder holding a
    ``.cubin`` (a folder without one is a group file or an unfinished compile), largest first.
    Where :func:`unpack` wrote into the cache, also ``carried`` (the variants in the folders it
    wrote) and ``compiled_here`` (those written after it: unpacked files keep the times they were
    packed with)."""
    counts: collections.Counter = collections.Counter()
    mark = carried(path)
    since = mark.get("at") if isinstance(mark, dict) else None
    folders = set(mark.get("folders") or ()) if isinstance(mark, dict) else set()
    carried_n = newer = 0
    if os.path.isdir(path):
        for entry in os.scandir(path):
            if not entry.is_dir():
                continue
            for f in os.listdir(entry.path):
                if f.endswith(".cubin"):
                    counts[f[:-len(".cubin")]] += 1
                    if entry.name in folders:
                        carried_n += 1
                    elif since is not None and os.path.getmtime(os.path.join(entry.path, f)) > since:
                        newer += 1
    out = {"dir": path, "variants": sum(counts.values()), "kernels": dict(counts.most_common())}
    if since is not None:
        out.update(carried=carried_n, compiled_here=newer)
    return out


STAMP = "STAMP.json"
MARKER = ".gpu_nn_unpacked.json"  # in the Triton cache once unpack wrote there: what and when
MAX_MIB = 15.0
PRESET = 1  # xz: cubins shrink 6-7x at presets 0-1 (9x at 6, four to eight times slower)


def stamp() -> dict:
    """What decides whether this process's Triton can read another's cache entries: its version,
    a digest of ``triton_key()`` and of the sm_90 backend's hash (the ptxas version), beside the
    Python that runs it."""
    import triton
    from triton.runtime.cache import triton_key

    out = {"triton": triton.__version__, "python": sys.version.split()[0],
           "triton_key": hashlib.sha256(triton_key().encode()).hexdigest()[:24]}
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend

        out["ptxas_sm90"] = hashlib.sha256(make_backend(GPUTarget("cuda", 90, 32)).hash().encode()).hexdigest()[:24]
    except Exception as exc:  # noqa: BLE001 - no CUDA backend: nothing of a cache serves here
        out["ptxas_sm90"] = f"unavailable: {type(exc).__name__}: {exc}"[:200]
    return out


def compatible(theirs: dict, mine: dict) -> bool:
    """Whether entries packed under stamp ``theirs`` can be cache hits under ``mine``."""
    return all(theirs.get(k) == mine.get(k) and mine.get(k) for k in ("triton_key", "ptxas_sm90")) \
        and not str(mine.get("ptxas_sm90", "")).startswith("unavailable")


def _recency(path: str) -> float:
    """When ``path`` was last written or read (the later of its mtime and atime: a Triton cache
    hit reads the cubin, and :func:`unpack` gives a file the times it was packed with, so where
    the file system keeps access times a carried entry this run used counts as this run's)."""
    st = os.stat(path)
    return max(st.st_mtime, st.st_atime)


def _entries(path: str) -> list:
    """``(recency, kind, folder, {name: file path}, group file or None)`` of every usable entry of
    the Triton cache at ``path``: a kernel (its group file names a metadata json and a cubin that
    exist) or compiled launcher / helper modules (a folder of ``.so`` files). Anything else (a
    group file of another form, unreadable, a partial entry) is left out."""
    out = []
    if not os.path.isdir(path):
        return out
    for entry in os.scandir(path):
        if not entry.is_dir():
            continue
        try:
            names = set(os.listdir(entry.path))
            groups = sorted(n for n in names if n.startswith("__grp__") and n.endswith(".json"))
            for g in groups:
                meta = g[len("__grp__"):]
                try:
                    with open(os.path.join(entry.path, g)) as f:
                        children = json.load(f).get("child_paths")
                except (OSError, ValueError, AttributeError):
                    continue
                if not isinstance(children, dict):  # (a remote cache manager's list form)
                    continue
                bins = [os.path.basename(p) for c, p in children.items() if isinstance(p, str) and c.endswith(".cubin")]
                if meta in names and bins and bins[0] in names:
                    files = {meta: os.path.join(entry.path, meta), bins[0]: os.path.join(entry.path, bins[0])}
                    out.append((_recency(files[bins[0]]), "kernel", entry.name, files, g))
            if not groups:
                sos = sorted(n for n in names if n.endswith(".so"))
                if sos:
                    files = {n: os.path.join(entry.path, n) for n in sos}
                    out.append((max(_recency(p) for p in files.values()), "module", entry.name, files, None))
        except OSError:  # (an entry removed while it was read)
            continue
    return out


def _add(tar, name: str, data: bytes, mtime: float | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    info.mtime = int(time.time() if mtime is None else mtime)
    tar.addfile(info, io.BytesIO(data))


def pack(out_path: str, cache: str | None = None, cuda: str | None = None, max_mib: float = MAX_MIB,
         preset: int = PRESET, max_s: float = 30.0) -> dict:
    """Write the archive (see the module docstring); returns its stamp, counts included. Entries
    of every kind go in most recently used or written first (:func:`_recency`) until the archive
    nears ``max_mib`` or ``max_s`` seconds have gone (the rest counted as left out); each file
    keeps its modification time. The archive is built in a temporary folder and moved onto
    ``out_path`` when whole: a pack cut short leaves no archive there rather than a broken one."""
    import shutil
    import tempfile

    t0 = time.monotonic()
    cache = cache or cache_dir()
    cuda = cuda or cuda_cache_dir()
    limit = int(max_mib * 2 ** 20)
    # the compressor holds back up to a block: stop adding this far below the limit
    margin = 2 ** 20
    info = stamp()
    info["commit"] = _commit()
    items = _entries(cache)
    if os.path.isdir(cuda):
        for n in os.listdir(cuda):
            if n.endswith((".cubin", ".ptx")):
                try:
                    items.append((_recency(os.path.join(cuda, n)), "cuda_module", None, {n: os.path.join(cuda, n)}, None))
                except OSError:
                    continue
    items.sort(key=lambda e: -e[0])
    counts = collections.Counter()
    raw = 0
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmpdir = tempfile.mkdtemp(prefix="gpu_nn_pack_")
    tmp = os.path.join(tmpdir, "cache.tar.xz")
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w:xz", preset=preset) as tar:
                for _, kind, folder, files, group in items:
                    if f.tell() + margin > limit or time.monotonic() - t0 > max_s:
                        counts[f"{kind}s_left_out"] += 1
                        continue
                    blobs = {}
                    try:
                        for name, path in files.items():
                            with open(path, "rb") as g:
                                blobs[name] = (g.read(), os.path.getmtime(path))
                    except OSError:
                        continue
                    prefix = "cuda/" if kind == "cuda_module" else f"triton/{folder}/"
                    for name, (data, mtime) in blobs.items():
                        _add(tar, prefix + name, data, mtime)
                        raw += len(data)
                    if group is not None:
                        _add(tar, prefix + group, json.dumps({"child_paths": {n: n for n in blobs}}).encode())
                    counts[f"{kind}s"] += 1
                info.update(counts, packed_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), raw_bytes=raw,
                            cache=cache)
                _add(tar, STAMP, json.dumps(info, indent=1, sort_keys=True).encode())
        shutil.move(tmp, out_path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    info["bytes"] = os.path.getsize(out_path)
    return info


def _commit() -> str | None:
    import subprocess

    try:
        r = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True, timeout=10,
                           cwd=os.path.dirname(os.path.abspath(__file__)))
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _safe(parts: list) -> bool:
    return bool(parts) and all(p not in ("", ".", "..") and "/" not in p and "\\" not in p for p in parts)


def unpack(archive: str, cache: str | None = None, cuda: str | None = None, force: bool = False) -> dict:
    """Write the archive's entries into the caches (see the module docstring), each file with the
    modification time it was packed with. Returns ``{"stamp", "mine", "compatible", "kernels",
    "modules", "cuda_modules", "present", "skipped"}``; an entry already there is left as it is
    (counted in ``present``), one whose group file does not read is skipped. Raises ValueError
    for an archive without a stamp (not one :func:`pack` wrote)."""
    cache = cache or cache_dir()
    cuda = cuda or cuda_cache_dir()
    mine = stamp()
    out = collections.Counter()
    written: list = []
    with tarfile.open(archive, "r:*") as tar:
        try:
            member = tar.getmember(STAMP)
        except KeyError:
            raise ValueError(f"{archive} is not a gpu-nn kernel cache archive (no {STAMP})") from None
        theirs = json.load(tar.extractfile(member))
        ok = force or compatible(theirs, mine)
        folders: dict = {}
        for m in tar.getmembers():
            parts = m.name.split("/")
            if not m.isfile() or m.name == STAMP:
                continue
            if parts[0] == "cuda" and len(parts) == 2 and _safe(parts[1:]):
                target = os.path.join(cuda, parts[1])
                if os.path.exists(target):
                    out["present"] += 1
                    continue
                os.makedirs(cuda, exist_ok=True)
                _write(target, tar.extractfile(m).read(), m.mtime)
                out["cuda_modules"] += 1
            elif parts[0] == "triton" and len(parts) == 3 and _safe(parts[1:]):
                if not ok:
                    out["skipped"] += 1
                    continue
                folders.setdefault(parts[1], []).append((parts[2], m))
            else:
                out["skipped"] += 1
        for folder, members in folders.items():
            d = os.path.join(cache, folder)
            if os.path.isdir(d) and os.listdir(d):
                out["present"] += 1
                continue
            try:  # the group files first: an entry whose group does not read is not written at all
                groups = [(name, json.loads(tar.extractfile(m).read())) for name, m in members if name.startswith("__grp__")]
                for _, grp in groups:
                    if not isinstance(grp.get("child_paths"), dict):
                        raise ValueError("child_paths")
            except (ValueError, AttributeError):
                out["skipped"] += 1
                continue
            os.makedirs(d, exist_ok=True)
            for name, m in members:
                if not name.startswith("__grp__"):
                    _write(os.path.join(d, name), tar.extractfile(m).read(), m.mtime)
            # group files last, child paths absolute (as Triton writes them): an entry is whole
            # before Triton can find it
            for name, grp in groups:
                children = {c: os.path.join(d, os.path.basename(p)) for c, p in grp["child_paths"].items()}
                _write(os.path.join(d, name), json.dumps({"child_paths": children}).encode())
            out["kernels" if groups else "modules"] += 1
            written.append(folder)
    result = {"stamp": theirs, "mine": mine, "compatible": ok, **{k: out[k] for k in
              ("kernels", "modules", "cuda_modules", "present", "skipped")}}
    # the marker: when the first unpack wrote here and every folder the unpacks wrote (summary()
    # counts those as carried)
    if ok and (written or carried(cache) is None):
        before = carried(cache) or {}
        try:
            os.makedirs(cache, exist_ok=True)
            _write(os.path.join(cache, MARKER), json.dumps({
                "archive": os.path.abspath(archive), "at": before.get("at", time.time()),
                "folders": sorted(set(before.get("folders") or ()) | set(written)),
                **{k: v for k, v in result.items() if k not in ("mine", "stamp")}}).encode())
        except OSError:
            pass
    return result


def _write(path: str, data: bytes, mtime: float | None = None) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    if mtime is not None:
        os.utime(tmp, (mtime, mtime))
    os.replace(tmp, path)


def carried(path: str) -> dict | None:
    """What unpack left in the Triton cache at ``path`` (its marker), or None."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _cli(argv: list) -> int:
    p = argparse.ArgumentParser(prog="python -m gpu_nn.benchmarks.triton_cache", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="archive what a cache hit reads")
    pk.add_argument("out")
    pk.add_argument("--cache", default=None)
    pk.add_argument("--cuda-cache", default=None)
    pk.add_argument("--max-mib", type=float, default=MAX_MIB)
    pk.add_argument("--max-s", type=float, default=30.0, help="stop adding entries after this many seconds")
    up = sub.add_parser("unpack", help="write an archive's entries into this process's caches")
    up.add_argument("archive")
    up.add_argument("--cache", default=None)
    up.add_argument("--cuda-cache", default=None)
    up.add_argument("--force", action="store_true", help="unpack whatever the stamps say (tests)")
    sub.add_parser("stamp", help="print this Triton's stamp")
    a = p.parse_args(argv)
    if a.cmd == "stamp":
        print(json.dumps(stamp(), indent=1))
        return 0
    if a.cmd == "pack":
        import signal

        # a time limit's SIGTERM unwinds (pack's temporary folder is removed) instead of ending
        # the process where it stands
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        t0 = time.time()
        info = pack(a.out, a.cache, a.cuda_cache, a.max_mib, max_s=a.max_s)
        left = {k: v for k, v in info.items() if k.endswith("_left_out")}
        print(f"packed {info.get('kernels', 0)} kernels, {info.get('modules', 0)} launcher modules, "
              f"{info.get('cuda_modules', 0)} CUDA C modules into {a.out}: {info['bytes'] / 2 ** 20:.1f} MiB "
              f"({info['raw_bytes'] / 2 ** 20:.1f} MiB raw) in {time.time() - t0:.1f} s"
              + (f"; left out (size or time limit): {left}" if left else ""))
        return 0
    if not os.path.isfile(a.archive):
        print(f"no archive at {a.archive}")
        return 1
    t0 = time.time()
    try:
        r = unpack(a.archive, a.cache, a.cuda_cache, a.force)
    except (tarfile.TarError, EOFError, ValueError, OSError) as exc:  # a truncated or foreign file
        print(f"carried cache {a.archive} not unpacked: {type(exc).__name__}: {exc}")
        return 1
    s = r["stamp"]
    print(f"carried cache {a.archive} (packed {s.get('packed_at')} at commit {s.get('commit')}, Triton "
          f"{s.get('triton')}): {r['kernels']} kernels, {r['modules']} launcher modules, {r['cuda_modules']} CUDA C "
          f"modules unpacked, {r['present']} already there in {time.time() - t0:.1f} s"
          + ("" if r["compatible"] else f"; its Triton entries skipped ({r['skipped']}): packed under another "
             f"Triton build (theirs {s.get('triton')} {s.get('triton_key')} / ptxas {s.get('ptxas_sm90')}, "
             f"this {r['mine'].get('triton')} {r['mine'].get('triton_key')} / ptxas {r['mine'].get('ptxas_sm90')})"))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("pack", "unpack", "stamp"):
        return _cli(argv)
    p = argparse.ArgumentParser(prog="python -m gpu_nn.benchmarks.triton_cache", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", nargs="?", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)
    s = summary(a.dir or cache_dir())
    print(f"triton cache {s['dir']}: {s['variants']} compiled variants of {len(s['kernels'])} kernels"
          + (f" ({s['compiled_here']} compiled since a carried cache was unpacked, {s['carried']} carried)"
             if "carried" in s else ""))
    for name, n in list(s["kernels"].items())[:a.top]:
        print(f"  {n:5d}  {name}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(s, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
