"""Test-session setup.

Where no GPU is present the Triton kernels run in the interpreter on CPU tensors; that has to
be decided before any kernel module is imported, so it happens here, first. On a GPU machine
the same tests run the compiled kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GPU_NN_POISON", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

import gpu_nn  # noqa: E402,F401  (imports kernels after the variables above are set)

if os.environ.get("GPU_NN_VARIANT_CENSUS") and os.environ.get("TRITON_INTERPRET") == "1":
    # which compiled variants the run would ask a GPU for (gpu_nn/benchmarks/variant_census.py)
    from gpu_nn.benchmarks import variant_census

    variant_census.install(os.environ["GPU_NN_VARIANT_CENSUS"])
from gpu_nn import _precision  # noqa: E402


@pytest.fixture(autouse=True)
def _exact_float32():
    """Every test starts with TF32 off for matmul, convolutions and recurrent layers (torch's
    defaults are matmul off, cuDNN on), so float32 checks on a GPU hold our float32 tolerances;
    the tests of the TF32 path switch it on themselves and derive their bound from TF32's
    precision. Put back afterwards (gpu_nn._precision.exact_float32: either of torch's APIs)."""
    with _precision.exact_float32():
        yield


@pytest.fixture(autouse=True)
def _environment_put_back():
    """Every test ends with the process environment it started with (helpers.environment_kept:
    a variable a test left set stayed for the rest of its worker's tests, and sent every later
    sm_90 script of the worker to a fresh Python)."""
    from helpers import environment_kept

    with environment_kept():
        yield


@pytest.fixture(scope="session", autouse=True)
def _private_tuning_cache(tmp_path_factory):
    """Measured configurations (gpu_nn._tuning, GPU only) go to a file of this session, not the
    user's ~/.cache."""
    if "GPU_NN_TUNE_CACHE" not in os.environ:
        os.environ["GPU_NN_TUNE_CACHE"] = str(tmp_path_factory.mktemp("tuning") / "tuning.json")
    yield


@pytest.fixture(scope="session", autouse=True)
def _server_base_environment(_private_tuning_cache):
    """The test servers (helpers.run_uninterpreted, run_fresh) start from the session's
    environment, as the session fixtures left it, not from whatever test first used them."""
    from helpers import set_base_env

    set_base_env(os.environ)
    yield


@pytest.fixture
def rng(request):
    """A fresh NumPy generator per test, seeded from the test's id so failures reproduce."""
    import zlib

    import numpy as np

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


THREAD_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def pytest_configure(config):
    """In the session's first process (xdist's controller, or the only one): under xdist (``-n
    N``, ``--tx``) each worker runs its tests on one thread: the workers take a core each, and
    torch's OpenMP pool (MKL's, NumPy's OpenBLAS) otherwise starts as many threads as the machine
    has cores in every worker, which spin-wait for work and take the other workers' cores (on
    CI's 2 cores with ``-n 2``, runs interleaved: test_conv + test_dense 107 s -> 91 s, test_pool
    + test_optim 110-113 s -> 89-93 s, test_double_backward 94 s -> 81 s). Set before the
    controller starts its workers, which inherit it, as do the processes tests start; a value
    already set is kept. Then :func:`_compile_sources`."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if getattr(config.option, "numprocesses", None) or getattr(config.option, "tx", None):
        for name in THREAD_ENVS:
            os.environ.setdefault(name, "1")
    _compile_sources()


def _compile_sources() -> None:
    """Where Python writes no bytecode (PYTHONDONTWRITEBYTECODE, as on this project's machines),
    every process the session starts -- the xdist workers, the uninterpreted server, each test's
    own Python, `gpu-nn check`'s workers -- compiled gpu-nn's 68,000 lines of source again on
    import (about a second of each). They are compiled once here, into the __pycache__ folders
    Python itself would write (git ignores them); a tree that cannot be written is left as it is."""
    import compileall
    import sys

    if not sys.dont_write_bytecode:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder in ("gpu_nn", "kernels", "reference", "benchmarks", "tests"):
        if os.path.isdir(os.path.join(root, folder)):
            try:
                compileall.compile_dir(os.path.join(root, folder), quiet=2)
            except OSError:
                return


ORDER_ENV = "GPU_NN_TEST_ORDER"


def _gpu_only(item) -> bool:
    """A test that runs only on a GPU machine: a cupy-backend case, or one marked skipif with a
    reason naming CUDA or a GPU. CI (no GPU) never runs these."""
    cs = getattr(item, "callspec", None)
    if cs is not None and cs.params.get("backend") == "cupy":
        return True
    return any("CUDA" in str(m.kwargs.get("reason", "")) or "GPU" in str(m.kwargs.get("reason", ""))
               for m in item.iter_markers("skipif"))


def _order(item) -> int:
    """0: the sm_90 compile checks (tests/test_compile.py: one test per kernel family, the conv
    family alone several minutes of one core; started last, one of them would run alone on one
    worker after the other had finished everything else). With GPU_NN_TEST_ORDER=gpu-first (the
    GPU run, benchmarks/gpu_run.sh, whose time limit may cut the suite): 1 the tests only a GPU
    runs (never run by CI), 2 the rest, 3 the CUDA-graph captures last (a capture that fails
    leaves its worker's graph state broken, failing every later test there)."""
    if item.path.name == "test_compile.py" and item.name.startswith("test_triton_kernels_compile"):
        return 0
    if os.environ.get(ORDER_ENV) != "gpu-first":
        return 2
    if item.path.name == "test_cuda_graphs.py":
        return 3
    return 1 if _gpu_only(item) else 2


@pytest.fixture(autouse=True)
def _fresh_conv_candidates():
    """Each test starts without the conv launchers' remembered candidate lists
    (kernels/triton/conv.py ``_CANDIDATES``, keyed by a problem's facts): a test that patches
    what the lists are made of (tma_device, TMA_FWD_SUSPECT) must not be served another test's."""
    import sys

    mod = sys.modules.get("gpu_nn.kernels.triton.conv")
    if mod is not None:
        mod._CANDIDATES.clear()
    yield


FAIL_LOG_ENV = "GPU_NN_FAIL_LOG"


def pytest_runtest_logreport(report):
    """With GPU_NN_FAIL_LOG=PATH, every failure is appended to PATH as it is reported (its phase,
    node id and the end of its traceback): a GPU run that its time limit kills before pytest's
    closing summary (benchmarks/gpu_run.sh; a SIGINT to an xdist run whose workers sit in kernels
    may not reach the summary) still names what failed. Runs in the xdist controller too."""
    path = os.environ.get(FAIL_LOG_ENV)
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):  # the controller writes
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"=== FAILED ({report.when}) {report.nodeid}\n{report.longreprtext[-4000:]}\n\n")


def _spread(item) -> int:
    """A fixed pseudo-random rank of a test (CRC-32 of its node id: the same in every xdist worker,
    which must collect one order, and in every run)."""
    import zlib

    return zlib.crc32(item.nodeid.encode())


def pytest_collection_modifyitems(config, items):
    """Items sorted by :func:`_order` (stable: collection order within each group). With
    GPU_NN_TEST_ORDER=gpu-first, groups 1 and 2 are spread (:func:`_spread`) instead: xdist deals
    tests to its workers in runs of consecutive ones, and in collection order a run is one test's
    parametrisations, whose kernel variants a GPU compiles one after another on that worker while
    the others finish (compile-bound on the H200). A model of that scheduler over the suite's
    variant census (``variant_census --schedule``: 16 workers, each variant compiled at its sampled
    time x 1.8, the H200's per-variant factor, 0.05-0.2 s per test besides, the GPU run's tests and
    ids; benchmarks/results/census/) finished the collection order in 304-384 s and this one in
    236-260 s against bounds of 174-216 s at 91f1d25 (the other compile sample: 205-264 against
    135-171, bounds 111-154); later figures are in that folder. A model, which the next GPU run's
    suite time checks."""
    if os.environ.get(ORDER_ENV) == "gpu-first":
        def key(item):
            group = _order(item)
            return group, _spread(item) if group in (1, 2) else 0

        items.sort(key=key)
    else:
        items.sort(key=_order)
