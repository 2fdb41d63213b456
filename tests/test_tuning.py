"""Measured configuration choice (gpu_nn._tuning): timing, caching in memory and on disk,
and the cases where the heuristic must be used instead. A fake timer stands in for CUDA
events, so these run on any machine."""

import json
import os
import statistics
import time

import pytest
import torch

from gpu_nn import _tuning


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv(_tuning.CACHE_ENV, str(path))
    _tuning.clear()
    yield path
    _tuning.clear()


def _fake(costs, calls):
    """A timer that 'measures' candidate cfg at costs[cfg] and records which it timed."""
    def timer(fn):
        fn()
        return costs[calls[-1]]
    return timer


def test_fastest_candidate_wins_and_is_cached_in_memory_and_on_disk(cache):
    calls = []
    costs = {(64, 4): 3.0, (128, 8): 1.0, (32, 2): 2.0}
    run = calls.append
    got = _tuning.choose("conv_fwd", (32, 64, "fp16"), list(costs), run, default=(32, 2),
                         device=torch.device("cpu"), timer=_fake(costs, calls), force=True)
    assert got == (128, 8) and sorted(calls) == sorted(costs)
    calls.clear()
    again = _tuning.choose("conv_fwd", (32, 64, "fp16"), list(costs), run, default=(32, 2),
                           device=torch.device("cpu"), timer=_fake(costs, calls), force=True)
    assert again == (128, 8) and calls == []  # no second measurement
    data = json.loads(cache.read_text())
    assert list(data["test"].values()) == [[128, 8]]
    # a new process (memory cleared) reads the file instead of measuring
    _tuning.clear()
    assert _tuning.choose("conv_fwd", (32, 64, "fp16"), list(costs), run, default=(32, 2),
                          device=torch.device("cpu"), timer=_fake(costs, calls), force=True) == (128, 8)
    assert calls == []


def test_other_keys_measure_separately(cache):
    calls = []
    costs = {(1,): 2.0, (2,): 1.0}
    _tuning.choose("op", ("a",), list(costs), calls.append, (1,), torch.device("cpu"), _fake(costs, calls), force=True)
    n = len(calls)
    _tuning.choose("op", ("b",), list(costs), calls.append, (1,), torch.device("cpu"), _fake(costs, calls), force=True)
    assert len(calls) == 2 * n


def test_failing_candidates_are_skipped_and_all_failing_gives_the_default(cache):
    def run(cfg):
        if cfg == (1,):
            raise RuntimeError("out of resources")
    assert _tuning.choose("op", ("k",), [(1,), (2,)], run, (9,), torch.device("cpu"), lambda fn: (fn(), 1.0)[1],
                          force=True) == (2,)

    tried = []

    def bad(cfg):
        tried.append(cfg)
        raise RuntimeError("no")
    for _ in range(3):  # measured once: the key takes the default from then on
        assert _tuning.choose("op", ("k2",), [(1,), (2,)], bad, (9,), torch.device("cpu"),
                              lambda fn: (fn(), 1.0)[1], force=True) == (9,)
    assert tried == [(1,), (2,)]


def _never(timed):
    """A timer that records each call in ``timed`` (a timer that raised would be taken by
    choose() for a candidate that cannot run, and the default come back all the same)."""
    def timer(fn):
        timed.append(fn)
        return 1.0
    return timer


def test_no_measurement_where_it_cannot_or_must_not_happen(cache, monkeypatch):
    timed = []
    # CPU tensors (the interpreter): the heuristic
    assert _tuning.choose("op", ("k",), [(1,), (2,)], lambda c: None, (1,), torch.device("cpu"), _never(timed)) == (1,)
    assert not _tuning.enabled(torch.device("cpu"))
    # switched off
    monkeypatch.setenv(_tuning.ENV, "0")
    assert not _tuning.enabled(torch.device("cuda"))
    # a single candidate has nothing to choose between
    assert _tuning.choose("op", ("k",), [(3,)], lambda c: None, (3,), torch.device("cpu"), _never(timed),
                          force=True) == (3,)
    assert timed == []


def test_deterministic_algorithms_take_the_heuristic_unless_cudnn_benchmarks(cache, monkeypatch):
    """torch.use_deterministic_algorithms(True), or torch.backends.cudnn.deterministic: no
    measuring and no cached choice (a measured choice may differ from one process to the next,
    and with it a sum's order), unless torch.backends.cudnn.benchmark is set (torch's cuDNN measures its algorithms then too). On a
    CPU machine choose() must return the default before it asks CUDA anything."""
    from gpu_nn.ops import _dispatch

    timed = []
    cuda = torch.device("cuda")
    monkeypatch.delenv(_tuning.ENV, raising=False)
    assert _tuning.applies(cuda) and _dispatch.chooser(cuda) is not None
    was_benchmark = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True)
    try:
        torch.backends.cudnn.benchmark = False
        assert not _tuning.applies(cuda) and not _tuning.enabled(cuda)
        assert _dispatch.chooser(cuda) is None
        assert _tuning.choose("op", ("k",), [(1,), (2,)], lambda c: None, (2,), cuda, _never(timed)) == (2,)
        torch.backends.cudnn.benchmark = True
        assert _tuning.applies(cuda) and _dispatch.chooser(cuda) is not None
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = was_benchmark
    assert _tuning.applies(cuda) and timed == []
    # PyTorch's reproducibility recipe: cudnn.deterministic = True, cudnn.benchmark = False
    was_deterministic = torch.backends.cudnn.deterministic
    try:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        assert not _tuning.applies(cuda) and _dispatch.chooser(cuda) is None
        torch.backends.cudnn.benchmark = True
        assert _tuning.applies(cuda)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = was_deterministic, was_benchmark


def test_measured_problems_per_op_are_bounded(cache, monkeypatch):
    """GPU_NN_TUNE_MAX_SHAPES=3: an op measures its first three problems; a fourth and fifth new
    one take the default without a timed launch, with one RuntimeWarning naming the variable;
    a measured problem keeps its choice; another op has its own count; a recording run measures
    everything; 0 removes the bound; clear() starts the count again; a bad value is refused."""
    import warnings

    costs = {(1,): 2.0, (2,): 1.0}
    calls = []
    monkeypatch.setenv(_tuning.MAX_SHAPES_ENV, "3")

    def pick(op, key):
        return _tuning.choose(op, (key,), list(costs), calls.append, (1,), torch.device("cpu"),
                              _fake(costs, calls), force=True)

    assert [pick("a", k) for k in range(3)] == [(2,)] * 3 and len(calls) == 6
    calls.clear()
    with pytest.warns(RuntimeWarning, match="GPU_NN_TUNE_MAX_SHAPES"):
        assert pick("a", 3) == (1,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per op
        assert pick("a", 4) == (1,) and pick("a", 0) == (2,)
    assert calls == []
    assert pick("b", 0) == (2,) and len(calls) == 2
    calls.clear()
    monkeypatch.setenv(_tuning.RECORD_ENV, str(cache.parent / "rec.jsonl"))
    assert pick("a", 5) == (2,) and len(calls) == 2
    monkeypatch.delenv(_tuning.RECORD_ENV)
    calls.clear()
    monkeypatch.setenv(_tuning.MAX_SHAPES_ENV, "0")
    assert pick("a", 6) == (2,) and len(calls) == 2
    monkeypatch.setenv(_tuning.MAX_SHAPES_ENV, "3")
    _tuning.clear()
    cache.unlink()
    calls.clear()
    assert pick("a", 7) == (2,) and len(calls) == 2
    monkeypatch.setenv(_tuning.MAX_SHAPES_ENV, "many")
    with pytest.raises(ValueError, match="GPU_NN_TUNE_MAX_SHAPES"):
        pick("a", 8)


def test_a_problem_whose_candidates_all_fail_counts_once_against_the_bound(cache, monkeypatch):
    """A problem whose every candidate fails is one measured problem, however often it is met
    (it was counted at each call, and three calls of it used up a bound of 3: the review of the
    bound)."""
    monkeypatch.setenv(_tuning.MAX_SHAPES_ENV, "2")
    costs = {(1,): 2.0, (2,): 1.0}
    calls = []

    def bad(cfg):
        raise RuntimeError("no")
    for _ in range(3):
        assert _tuning.choose("op", ("bad",), list(costs), bad, (1,), torch.device("cpu"), lambda fn: fn(),
                              force=True) == (1,)
    assert _tuning.choose("op", ("good",), list(costs), calls.append, (1,), torch.device("cpu"), _fake(costs, calls),
                          force=True) == (2,)


def test_cache_file_keeps_the_newest_entries(cache, monkeypatch):
    """The cache file holds at most DISK_MAX_KEYS entries per device, the newest: an op fed ever
    new sizes no longer grows it (and the rewrite each new entry costs) without bound."""
    monkeypatch.setattr(_tuning, "DISK_MAX_KEYS", 3)
    costs = {(1,): 2.0, (2,): 1.0}
    calls = []
    for k in range(5):
        _tuning.choose("op", (k,), list(costs), calls.append, (1,), torch.device("cpu"), _fake(costs, calls),
                       force=True)
    section = json.loads(cache.read_text())["test"]
    assert list(section) == [_tuning._encode(("op", k)) for k in (2, 3, 4)]
    # sections (one per GPU, versions and kernel sources): the ones written last are kept
    monkeypatch.setattr(_tuning, "DISK_MAX_SECTIONS", 2)
    for dev in ("old", "mid", "new"):
        _tuning._save_disk(dev, "k", (1,))
    assert list(json.loads(cache.read_text())) == ["mid", "new"]
    _tuning._save_disk("mid", "k2", (2,))
    assert list(json.loads(cache.read_text())) == ["new", "mid"]


def test_stale_cache_entry_not_among_candidates_is_ignored(cache):
    cache.write_text(json.dumps({"test": {_tuning._encode(("op", "k")): [99]}}))
    calls = []
    costs = {(1,): 2.0, (2,): 1.0}
    assert _tuning.choose("op", ("k",), list(costs), calls.append, (1,), torch.device("cpu"),
                          _fake(costs, calls), force=True) == (2,)


def test_unwritable_cache_keeps_the_choice_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # a file where the cache folder should be: no root privilege helps
    monkeypatch.setenv(_tuning.CACHE_ENV, str(blocker / "tuning.json"))
    _tuning.clear()
    try:
        calls = []
        costs = {(1,): 2.0, (2,): 1.0}
        assert _tuning.choose("op", ("k",), list(costs), calls.append, (1,), torch.device("cpu"),
                              _fake(costs, calls), force=True) == (2,)
        calls.clear()
        assert _tuning.choose("op", ("k",), list(costs), calls.append, (1,), torch.device("cpu"),
                              _fake(costs, calls), force=True) == (2,)
        assert calls == [] and not (blocker / "tuning.json").exists()
    finally:
        _tuning.clear()


def test_record_keeps_every_timing_as_json_rows(cache, tmp_path, monkeypatch):
    """GPU_NN_TUNE_RECORD: every candidate's time for every key measured, one JSON row each,
    appended; a candidate that fails is a row with ms null and its error; while recording the
    disk cache is not read (so a cached key is measured and recorded again), only written."""
    rec = tmp_path / "sub" / "tuning.jsonl"
    monkeypatch.setenv(_tuning.RECORD_ENV, str(rec))
    cache.write_text(json.dumps({"test": {_tuning._encode(("matmul", 8, "fp16")): [1]}}))
    calls = []
    costs = {(1,): 2.0, (2,): 0.5, (3,): 1.0}

    def run(cfg):
        if cfg == (3,):
            raise RuntimeError("out of resources: shared memory")
        calls.append(cfg)

    got = _tuning.choose("matmul", (8, "fp16"), list(costs), run, (1,), torch.device("cpu"),
                         _fake(costs, calls), force=True)
    assert got == (2,) and calls == [(1,), (2,)]  # measured despite the cached (1,)
    _tuning.choose("conv_fwd", (5, True), [(1,), (2,)], calls.append, (1,), torch.device("cpu"),
                   _fake(costs, calls), force=True)
    # a repeated key is served from memory: nothing more measured, nothing more recorded
    _tuning.choose("matmul", (8, "fp16"), list(costs), run, (1,), torch.device("cpu"), _fake(costs, calls), force=True)
    with open(rec, "a") as f:
        f.write('{"cut short by a kil')  # a killed process: the reader skips the broken line
    rows = _tuning.read_record(str(rec))
    assert [(r["op"], r["key"], r["config"], r["ms"], r["chosen"]) for r in rows] == [
        ("matmul", [8, "fp16"], [1], 2.0, False), ("matmul", [8, "fp16"], [2], 0.5, True),
        ("matmul", [8, "fp16"], [3], None, False),
        ("conv_fwd", [5, True], [1], 2.0, False), ("conv_fwd", [5, True], [2], 0.5, True)]
    assert all(r["device_key"] == "test" for r in rows)
    assert "shared memory" in rows[2]["error"] and "error" not in rows[0]
    assert json.loads(cache.read_text())["test"][_tuning._encode(("matmul", 8, "fp16"))] == [2]


def test_nothing_recorded_without_the_variable(cache, tmp_path, monkeypatch):
    monkeypatch.delenv(_tuning.RECORD_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    calls = []
    costs = {(1,): 2.0, (2,): 1.0}
    _tuning.choose("op", ("k",), list(costs), calls.append, (1,), torch.device("cpu"), _fake(costs, calls), force=True)
    assert sorted(tmp_path.iterdir()) == [cache, cache.with_name(cache.name + ".lock")]  # the cache and its lock


def test_graph_capture_uses_a_made_choice_and_never_measures(cache, monkeypatch):
    """During CUDA graph capture a key already measured keeps its choice (a captured graph runs
    the tuned kernel); an unmeasured key gets the heuristic, and nothing is timed."""
    monkeypatch.setenv(_tuning.ENV, "1")  # tuning on, whatever the run's environment says (GPU runs set 0)
    monkeypatch.setattr(_tuning, "device_key", lambda device: "gpu")
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    calls = []
    costs = {(1,): 2.0, (2,): 1.0}
    dev = torch.device("cuda", 0)
    assert _tuning.choose("op", ("a",), list(costs), calls.append, (1,), dev, _fake(costs, calls)) == (2,)
    capturing[0] = True
    timed, calls_before = [], len(calls)
    assert _tuning.choose("op", ("a",), list(costs), calls.append, (1,), dev, _never(timed)) == (2,)
    assert _tuning.choose("op", ("b",), list(costs), calls.append, (1,), dev, _never(timed)) == (1,)
    monkeypatch.setenv(_tuning.ENV, "0")  # switched off: the heuristic, even for a measured key
    assert _tuning.choose("op", ("a",), list(costs), calls.append, (1,), dev, _never(timed)) == (1,)
    assert timed == [] and len(calls) == calls_before  # nothing timed, no candidate run


def test_prepare_runs_once_before_a_measurement_and_its_failure_is_harmless(cache):
    """``prepare(candidates)`` (a launcher compiling every candidate at once) runs before the
    candidates are timed, never for a key already chosen; if it raises, timing goes on."""
    seen = []
    calls = []
    costs = {(1,): 2.0, (2,): 1.0}

    def prepare(cands):
        seen.append((list(cands), list(calls)))
        raise RuntimeError("async compile unavailable")

    for _ in range(2):
        assert _tuning.choose("op", ("k",), list(costs), calls.append, (1,), torch.device("cpu"),
                              _fake(costs, calls), force=True, prepare=prepare) == (2,)
    assert seen == [([(1,), (2,)], [])] and calls == [(1,), (2,)]


def test_a_choice_in_memory_serves_only_calls_that_offer_it(cache):
    """A key that misses a fact which changes the candidates (a launcher's bug, as the pooling
    keys once missed the output size) must not serve a form this call does not offer: the
    memory hit is checked against the candidates, as a disk entry is, and measured again."""
    calls = []
    costs = {("tile",): 1.0, ("flat",): 2.0, ("cltile",): 1.5}
    first = _tuning.choose("op", ("k",), [("flat",), ("tile",)], calls.append, ("flat",), torch.device("cpu"),
                           _fake(costs, calls), force=True)
    calls.clear()
    second = _tuning.choose("op", ("k",), [("flat",), ("cltile",)], calls.append, ("flat",), torch.device("cpu"),
                            _fake(costs, calls), force=True)
    assert first == ("tile",) and second == ("cltile",) and sorted(calls) == [("cltile",), ("flat",)]


@pytest.mark.parametrize("text", ['{"test": []}', '{"test": "x"}', '{"test": {"[\\"op\\", \\"k\\"]": 5}}', "[1, 2]",
                                  '{"test": {"[\\"op\\", \\"k\\"]": "ab"}}'])
def test_a_cache_file_of_another_shape_is_a_miss_and_is_replaced(cache, text):
    cache.write_text(text)
    calls = []
    costs = {(1,): 2.0, (2,): 1.0}
    assert _tuning.choose("op", ("k",), list(costs), calls.append, (1,), torch.device("cpu"),
                          _fake(costs, calls), force=True) == (2,)
    assert sorted(calls) == [(1,), (2,)]
    assert json.loads(cache.read_text())["test"][_tuning._encode(("op", "k"))] == [2]


def test_a_bare_cache_file_name_is_written_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(_tuning.CACHE_ENV, "tuning.json")
    _tuning.clear()
    try:
        calls = []
        costs = {(1,): 2.0, (2,): 1.0}
        _tuning.choose("op", ("k",), list(costs), calls.append, (1,), torch.device("cpu"), _fake(costs, calls), force=True)
        assert json.loads((tmp_path / "tuning.json").read_text()) == {"test": {_tuning._encode(("op", "k")): [2]}}
    finally:
        _tuning.clear()


def _save_many(path, worker, n):
    import os

    os.environ[_tuning.CACHE_ENV] = path
    for i in range(n):
        _tuning._save_disk("dev", f"w{worker}-{i}", [i])


def test_processes_sharing_a_cache_file_keep_every_entry(tmp_path):
    """Writers in several processes (test workers, the bench's warm-up processes) each merge
    into one file; under the lock none renames its read over entries another added since."""
    import multiprocessing

    path = str(tmp_path / "shared.json")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_save_many, args=(path, w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert len(json.loads(open(path).read())["dev"]) == 100


def test_cuda_timer_times_the_device_with_the_host_queued_ahead(monkeypatch):
    """A warm-up launch, one untimed launch to read the host's time, then every timed launch
    queued behind its own GPU sleep long enough for the host to queue it: the events time the
    kernels (2 ms), not the host's 3 ms launches (which one event pair on an idle stream would
    have timed as 5 ms)."""
    from helpers import FakeDevice

    dev = FakeDevice().install(monkeypatch)
    ms = _tuning.cuda_timer(dev.call(host=3e-3, kernel=2e-3), reps=3)
    sleep = int((3e-3 * _tuning.SLEEP_MARGIN + _tuning.SLEEP_SLACK_S) / dev.CYCLE_S)
    assert dev.log == ["run", "run"] + [("sleep", sleep), "record", "run", "record"] * 3
    assert ms == pytest.approx(2.0)


def test_queued_times_measure_again_behind_a_longer_sleep_when_the_host_fell_behind(monkeypatch):
    """A host-time hint far too small: the host did not queue the first call before its sleep
    ended, so that call is timed again behind a sleep sized from the queuing it measured, and the
    calls after it get that sleep at once; a call that synchronises with the device can never be
    queued ahead, and says so."""
    from helpers import FakeDevice

    dev = FakeDevice().install(monkeypatch)
    times, queued = _tuning.queued_times(dev.call(host=1e-3, kernel=0.5e-3), reps=4, host_s=1e-5)
    sleeps = [e[1] for e in dev.log if isinstance(e, tuple)]
    assert len(sleeps) == 5 and sleeps[1] > 10 * sleeps[0] and len(set(sleeps[1:])) == 1
    assert dev.log.count("run") == 5 and queued and times == pytest.approx([0.5e-3] * 4)
    dev.log.clear()
    times, queued = _tuning.queued_times(dev.call(host=1e-3, kernel=0.5e-3, sync=True), reps=2, host_s=1e-3)
    sleeps = [e[1] for e in dev.log if isinstance(e, tuple)]
    # the first call behind the sleep and a longer one, both waited out; the next behind the shortest
    assert not queued and len(sleeps) == 3 and sleeps[1] > sleeps[0] > sleeps[2]
    assert sleeps[2] == int(_tuning.SLEEP_SLACK_S / dev.CYCLE_S)
    assert min(times) > 0.5e-3  # the host's time shows: a loop of such calls runs at the host's pace


def test_queued_times_of_a_call_that_waits_for_the_device_stay_short(monkeypatch):
    """A call that reads the device back (the Triton cross-entropy's target check) is waited out
    behind any sleep: after the one retry behind a longer sleep, the calls are timed behind the
    shortest, not behind a sleep tripled at every call up to SLEEP_MAX_S (25 such calls of 0.35 ms
    took 88 s of sleeping in a simulation of the former rule); not queued, and each figure the
    call's own time."""
    from helpers import FakeDevice

    dev = FakeDevice().install(monkeypatch)
    times, queued = _tuning.queued_times(dev.call(host=0.3e-3, kernel=0.05e-3, sync=True), reps=25, host_s=0.35e-3)
    assert not queued and len(times) == 25
    assert dev.now < 0.1, f"{dev.now:.3f} s for 25 calls of 0.35 ms"
    assert max(times[2:]) < 1e-3


def test_sleep_calibration_takes_the_clock_after_it_has_risen(monkeypatch):
    """The GPU sleep's cycle time is measured after a long untimed sleep, as the shortest of a
    few: an idle GPU's clock is low and rises under load (here 5x slower for the first 5 ms of
    device time). The former calibration (one 1,000-cycle warm-up, one 2M-cycle measure) read
    the slow clock (5 ns a cycle), so every later sleep lasted a fifth of what was asked and a
    host-bound call (1 ms of host, 0.1 ms of kernel) passed as queued with the host's time in its
    figure; now the fast clock's 1 ns, and that call times as its kernel. The clock rises 0.5 ms
    after the warm sleep's 100 ms, once the first timed sleep has started (slow), so one timed
    sleep after the warm one, or the longest of three, would read the slow clock."""
    from helpers import FakeDevice

    dev = FakeDevice().install(monkeypatch)
    monkeypatch.setattr(_tuning, "_cycle_s", [])
    slow = 5.0
    ramp_s = _tuning.SLEEP_WARM_CYCLES * dev.CYCLE_S * slow + 0.5e-3

    def _sleep(cycles):  # a sleep's cycles at the clock of when it starts on the device
        dev.log.append(("sleep", cycles))
        dev._queue(cycles * dev.CYCLE_S * (slow if max(dev.free_at, dev.now) < ramp_s else 1.0))

    monkeypatch.setattr(torch.cuda, "_sleep", _sleep)
    assert _tuning.sleep_cycle_seconds() == pytest.approx(dev.CYCLE_S)
    assert [e[1] for e in dev.log if isinstance(e, tuple)] == [_tuning.SLEEP_WARM_CYCLES] + [
        _tuning.SLEEP_CAL_CYCLES] * _tuning.SLEEP_CAL_REPS
    times, queued = _tuning.queued_times(dev.call(host=1e-3, kernel=0.1e-3), reps=3, host_s=1e-3)
    assert queued and times == pytest.approx([0.1e-3] * 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events and torch.cuda._sleep need a GPU")
def test_queued_times_on_a_gpu_time_the_kernel_not_the_host():
    """On a real GPU: a call that spends 2 ms on the host before launching a tiny kernel times as
    that kernel (well under the 2 ms), queued; the same call ending in a device-to-host copy
    (a synchronising call) is reported not queued and times at least its host share."""
    x = torch.zeros(1 << 16, device="cuda")

    def host_heavy():
        time.sleep(2e-3)
        x.add_(1)

    def syncing():
        time.sleep(2e-3)
        x.add_(1)
        x[:1].cpu()

    host_heavy()
    torch.cuda.synchronize()
    times, queued = _tuning.queued_times(host_heavy, 5, 2e-3)
    assert queued and statistics.median(times) < 1e-3, times
    times, queued = _tuning.queued_times(syncing, 3, 2e-3)
    assert not queued


def test_device_key_names_the_kernel_sources(tmp_path, monkeypatch):
    """The disk cache's device key carries a digest of the kernel sources, so that a choice timed
    before a kernel changed is measured again after it (gpu_nn's version string does not move
    between commits); the digest follows every .py / .cu / .cuh file's path and content, and
    nothing else (compiled caches beside them)."""
    root = tmp_path / "kernels"
    (root / "triton").mkdir(parents=True)
    (root / "cuda").mkdir()
    (root / "__init__.py").write_text("")
    (root / "triton" / "conv.py").write_text("BLOCK = 64\n")
    (root / "cuda" / "pool.cu").write_text("// pool\n")
    first = _tuning.sources_digest(str(root))
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\x00")
    (root / "notes.txt").write_text("not a source")
    assert _tuning.sources_digest(str(root)) == first
    (root / "triton" / "conv.py").write_text("BLOCK = 128\n")
    changed = _tuning.sources_digest(str(root))
    assert changed != first
    (root / "triton" / "conv.py").rename(root / "triton" / "conv2.py")  # same content, another file
    assert _tuning.sources_digest(str(root)) not in (first, changed)
    (root / "cuda" / "pool.cuh").write_text("")
    assert len({_tuning.sources_digest(str(root)), first, changed}) == 3

    _tuning._device_key.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda idx: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx: (9, 0))
    try:
        key = _tuning.device_key(torch.device("cuda", 0))
    finally:
        _tuning._device_key.cache_clear()
    assert key.startswith("NVIDIA H200|sm_90|") and key.endswith(f"|kernels {_tuning.kernels_digest()}")
    import gpu_nn.kernels as kernels_pkg
    assert _tuning.kernels_digest() == _tuning.sources_digest(os.path.dirname(os.path.abspath(kernels_pkg.__file__)))
