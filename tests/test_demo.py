"""gpu-nn demo: the digits data, and ours against the torch twin step by step.

``test_ours_matches_torch_step_by_step`` runs the real gpu_nn path (gpu_nn.nn / gpu_nn.optim on
the reference backend): it FAILS, deliberately not skipping, while a layer, the loss, an
optimizer or clip_grad_norm_ is missing from gpu_nn.
"""

import json

import numpy as np
import pytest
import torch

import gpu_nn
from gpu_nn import demo
from gpu_nn.cli import main
from gpu_nn.nn.dense import fused_activation

SUBSET = 128  # 4 steps of the default batch of 32


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one torch thread is faster, and steady on a shared machine (as the demo does)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_digits_file():
    images, labels = demo.load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.uint8
    assert images.max() == 16 and images.min() == 0
    assert sorted(np.unique(labels)) == list(range(10))


def test_split_is_fixed_and_disjoint():
    images, labels = demo.load_digits()
    (xa, ya), (ta, tya) = demo.split(images, labels)
    (xb, yb), (tb, tyb) = demo.split(images, labels)
    assert xa.shape == (1437, 8, 8) and ta.shape == (360, 8, 8) and xa.dtype == np.float32
    assert np.array_equal(xa, xb) and np.array_equal(tya, tyb)
    train_rows = {r.tobytes() for r in (xa * 16).astype(np.uint8)}
    # a handful of digits occur twice in the data; the split itself shares no index
    assert sum(r.tobytes() in train_rows for r in (ta * 16).astype(np.uint8)) < 10


@pytest.mark.parametrize("model", demo.MODELS)
def test_twin_machinery_is_exact(model):
    """With torch on both sides, the two runs are bitwise identical: same weights, same batches."""
    r = demo.train_pair(model, epochs=1, subset=SUBSET, ours=demo.torch_impl(), progress=False)
    assert len(r["loss_curve"]) == SUBSET // demo.HYPER[model]["batch_size"]
    assert r["loss_curve"] == r["torch_loss_curve"]
    assert r["test_accuracy"] == r["torch_test_accuracy"]


@pytest.mark.parametrize("model", demo.MODELS)
def test_ours_matches_torch_step_by_step(model):
    """gpu_nn's layers, loss, optimizer and clipping against torch's: one epoch on a subset,
    the loss of every step and the trained weights agree to float32 accuracy."""
    r = demo.train_pair(model, epochs=1, device="cpu", backend="reference", subset=SUBSET,
                        progress=False, keep_models=True)
    ours, theirs = np.array(r["loss_curve"]), np.array(r["torch_loss_curve"])
    assert len(ours) == len(theirs) == SUBSET // demo.HYPER[model]["batch_size"]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    net, twin = r["models"]
    sd, tsd = net.state_dict(), twin.state_dict()
    assert sd.keys() == tsd.keys()
    # Adam and RMSprop divide each gradient element by its running RMS, so an element whose
    # gradient is a near-cancelling sum carries that sum's float32 relative error into a step
    # of size ~lr: weights may differ by a small fraction of lr per step (a wrong layer or
    # update rule would be off by ~lr or more, and would show in the losses above).
    atol = 1e-2 * r["lr"] * len(ours)
    for k in sd:
        torch.testing.assert_close(sd[k], tsd[k], rtol=1e-4, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
    # ours is gpu_nn's (a twin of torch against torch passed all of the above), and its
    # inference (no grad: other kernels than training's) gives the twin's logits
    ours_layers = [m for m in net.modules() if type(m).__module__.startswith("gpu_nn.nn")]
    assert ours_layers and not any(type(m).__module__.startswith("torch.nn.modules") and not list(m.children())
                                   and list(m.parameters(recurse=False)) for m in net.modules()), net
    assert r["backend"].startswith("reference"), r["backend"]
    _, (x_test, _) = demo.split(*demo.load_digits())
    xb = demo._inputs(model, x_test[:64], "cpu")
    net.eval(), twin.eval()
    with torch.no_grad(), gpu_nn.backend("reference"):
        torch.testing.assert_close(net(xb), twin(xb), rtol=1e-3, atol=1e-3)


def test_command_writes_json_and_plot(tmp_path, capsys):
    """The command's output path (table, JSON keys of issue 10, PNG) with torch on both sides."""
    js, png = tmp_path / "demo.json", tmp_path / "loss.png"
    rc = main(["demo", "--model", "gru", "--epochs", "1", "--subset", "64", "--ours-from", "torch",
               "--no-progress", "--json", str(js), "--plot", str(png)])
    assert rc == 0
    out = json.loads(js.read_text())
    assert set(out) == {"gru"}
    for key in ("test_accuracy", "torch_test_accuracy", "seconds", "epochs", "backend", "device"):
        assert key in out["gru"]
    assert out["gru"]["epochs"] == 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gpu-nn demo" in capsys.readouterr().out


def test_warmup_is_reported_apart_from_the_steady_state():
    side = demo._Side(None, None, None, None, None)
    side.epoch_seconds = [5.0, 1.0, 2.0]
    assert side.figures() == (8.0, 5.0, 1.5)
    side.epoch_seconds = [4.0]
    assert side.figures() == (4.0, 4.0, 4.0)  # one epoch: no steady state to tell apart
    r = demo.train_pair("cnn", epochs=3, subset=64, ours=demo.torch_impl(), progress=False)
    assert r["steady_state"] is True and r["compile"] is None
    for who in ("", "torch_"):
        assert r[f"{who}seconds"] == pytest.approx(r[f"{who}warmup_seconds"] + 2 * r[f"{who}seconds_per_epoch"], abs=2e-3)


def test_compile_compiles_both_twins_the_same_way():
    """--compile on the CPU (aot_eager: no C++ build): ours still matches torch step by step,
    through the custom ops under torch.compile."""
    r = demo.train_pair("cnn", epochs=2, subset=64, backend="reference", progress=False,
                        compile=True, compile_backend="aot_eager", keep_models=True)
    assert r["compile"] == {"backend": "aot_eager", "mode": None, "allow_rnn": False} and r["steady_state"] is True
    assert r["backend"] == "reference"  # ours is gpu_nn's (with torch on both sides it reads "self-check")
    np.testing.assert_allclose(r["loss_curve"], r["torch_loss_curve"], rtol=1e-4, atol=1e-6)
    assert r["warmup_seconds"] > 0 and r["seconds_per_epoch"] > 0
    # what each twin's steps compiled, from torch's counters: graphs (64 samples in batches of
    # HYPER's size: a last, smaller batch recompiles), no graph break on either side
    for side in ("ours", "torch"):
        assert set(r["compiled"][side]) == {"graphs", "graph_breaks", "cudagraph_skips"}
        assert r["compiled"][side]["graphs"] >= 1 and r["compiled"][side]["graph_breaks"] == 0, r["compiled"]
    assert r["compiled"]["ours"]["graphs"] == r["compiled"]["torch"]["graphs"]


def test_compile_rnn_lets_dynamo_trace_both_twins_recurrent_layers():
    """--compile-rnn: Dynamo traces the recurrent modules of both twins (torch's allow_rnn, off by
    default, when Dynamo runs torch's recurrent modules and ours, theirs by type, eagerly): the
    GRU demo compiles one graph a side with no break, same losses as eager's; the setting is
    put back after the run and recorded."""
    from torch import _dynamo

    before = _dynamo.config.allow_rnn
    r = demo.train_pair("gru", epochs=1, subset=48, backend="reference", progress=False,
                        compile=True, compile_backend="aot_eager", compile_rnn=True)
    assert _dynamo.config.allow_rnn == before
    assert r["compile"]["allow_rnn"] is True
    for side in ("ours", "torch"):
        assert r["compiled"][side]["graphs"] >= 1 and r["compiled"][side]["graph_breaks"] == 0, r["compiled"]
    np.testing.assert_allclose(r["loss_curve"], r["torch_loss_curve"], rtol=1e-4, atol=1e-6)


def test_compiled_counts_go_to_the_twin_whose_step_made_them(monkeypatch):
    """A CUDA graph skipped (inductor then runs the graph without one, which the compiled-demo
    goal does not measure) or a graph break is counted for the twin whose step met it; eager
    twins count nothing."""
    from torch._dynamo.utils import counters

    def stepper(skips, breaks):
        def step(xb, yb, clip_norm):
            counters["inductor"]["cudagraph_skips"] += skips
            counters["graph_break"]["a test's break"] += breaks
            return torch.zeros(())
        return step

    sides = [demo._Side(None, None, None, None, None, compiled=True) for _ in range(2)]
    eager = demo._Side(None, None, None, None, None)
    for side, (skips, breaks) in zip((*sides, eager), ((2, 0), (0, 1), (5, 5))):
        monkeypatch.setattr(side, "step", stepper(skips, breaks))
        side.epoch_seconds.append(0.0)
        for _ in range(3):
            side.timed_step(None, None, None, "cpu")
    assert sides[0].compiled == {"graphs": 0, "graph_breaks": 0, "cudagraph_skips": 6}
    assert sides[1].compiled == {"graphs": 0, "graph_breaks": 3, "cudagraph_skips": 0}
    assert eager.compiled is None
    r = demo.train_pair("cnn", epochs=1, subset=16, ours=demo.torch_impl(), progress=False)
    assert r["compiled"] is None


def test_compile_flags_reach_both_twins(monkeypatch, tmp_path):
    seen = []

    def fake(model, *args, **kw):
        seen.append(kw)
        return {"test_accuracy": 1.0, "torch_test_accuracy": 1.0, "seconds_per_epoch": 1.0, "torch_seconds_per_epoch": 1.0,
                "backend": "x", "device": "cpu", "epochs": 1, "loss_curve": [1.0], "torch_loss_curve": [1.0]}

    monkeypatch.setattr(demo, "train_pair", fake)
    assert main(["demo", "--model", "cnn", "--compile", "--compile-backend", "aot_eager", "--no-progress"]) == 0
    assert main(["demo", "--model", "cnn", "--no-progress"]) == 0
    assert seen[0]["compile"] is True and seen[0]["compile_backend"] == "aot_eager" and seen[0]["compile_mode"] is None
    assert seen[1]["compile"] is False and seen[0]["compile_rnn"] is False
    assert main(["demo", "--model", "gru", "--compile", "--compile-rnn", "--no-progress"]) == 0
    assert seen[2]["compile_rnn"] is True
    seen.pop()
    with pytest.raises(SystemExit, match="--compile-rnn takes effect with --compile only"):
        main(["demo", "--model", "gru", "--compile-rnn", "--no-progress"])
    assert main(["demo", "--model", "cnn", "--fuse", "--no-progress"]) == 0
    assert seen[1]["fuse"] is False and seen[2]["fuse"] is True


@pytest.mark.skipif(demo._numpy_openblas() is None, reason="NumPy here has no bundled OpenBLAS (another BLAS, left alone)")
def test_threads_cap_numpys_blas_for_the_run(monkeypatch):
    """--threads caps NumPy's BLAS (the reference fallback's matrix products) as well as torch's
    threads for the run, and gives it back after, a run cut short too: with torch's alone capped,
    on a 2-core machine with one core busy the reference LSTM took 2.27 s an epoch against 0.21 s
    capped (3 epochs; an audit saw 10-17x over the whole demo)."""
    get = demo._numpy_openblas()[1]
    seen = []

    def fake(model, *args, **kw):
        seen.append(get())
        if model == "gru":
            raise KeyboardInterrupt
        return {"test_accuracy": 1.0, "torch_test_accuracy": 1.0, "seconds_per_epoch": 1.0,
                "torch_seconds_per_epoch": 1.0, "backend": "x", "device": "cpu", "epochs": 1, "loss_curve": [1.0],
                "torch_loss_curve": [1.0]}

    monkeypatch.setattr(demo, "train_pair", fake)
    before, torch_before = demo.numpy_blas_threads(3), torch.get_num_threads()
    try:
        assert get() == 3
        torch.set_num_threads(2)
        assert main(["demo", "--model", "cnn", "--no-progress"]) == 0
        assert main(["demo", "--model", "lstm", "--threads", "2", "--no-progress"]) == 0
        assert get() == 3 and torch.get_num_threads() == 2  # (torch's given back too)
        with pytest.raises(KeyboardInterrupt):
            main(["demo", "--model", "gru", "--no-progress"])
        assert seen == [1, 2, 1] and get() == 3 and torch.get_num_threads() == 2
    finally:
        demo.numpy_blas_threads(before)
        torch.set_num_threads(torch_before)


def test_json_keeps_the_models_done_when_a_run_is_cut(monkeypatch, tmp_path):
    """A GPU session's demo step runs under a time limit: demo.json holds every model trained so
    far after each one (it was written once, at the end: a cut run kept nothing)."""
    def fake(model, *args, **kw):
        if model == "gru":
            raise KeyboardInterrupt  # the limit's signal, mid-run
        return {"test_accuracy": 1.0, "torch_test_accuracy": 1.0, "seconds_per_epoch": 1.0,
                "torch_seconds_per_epoch": 1.0, "backend": "x", "device": "cpu", "epochs": 1, "loss_curve": [1.0],
                "torch_loss_curve": [1.0]}

    monkeypatch.setattr(demo, "train_pair", fake)
    js = tmp_path / "demo.json"
    with pytest.raises(KeyboardInterrupt):
        main(["demo", "--no-progress", "--json", str(js)])
    assert set(json.loads(js.read_text())) == {"cnn", "lstm"}


def test_fuse_trains_ours_fused_against_the_unfused_twin(monkeypatch):
    """--fuse: our CNN through gpu_nn.fuse (its three layer -> ReLU pairs fused), the twin as
    built; the twin still gets our weights (same state_dict keys) and the two match step by step."""
    r = demo.train_pair("cnn", epochs=1, subset=SUBSET, backend="reference", progress=False, keep_models=True,
                        fuse=True)
    net, twin = r["models"]
    assert r["fused"] is True and isinstance(net, torch.fx.GraphModule)
    assert [fused_activation(net.get_submodule(n)) for n in ("conv1", "conv2", "fc1")] == ["relu"] * 3
    assert not any(isinstance(m, torch.nn.ReLU) for m in net.modules())
    np.testing.assert_allclose(r["loss_curve"], r["torch_loss_curve"], rtol=1e-4, atol=1e-6)
    def reached(model, *a, **kw):  # the refusal comes before any training
        raise AssertionError("train_pair reached despite --fuse with --ours-from torch")

    monkeypatch.setattr(demo, "train_pair", reached)
    with pytest.raises(SystemExit, match="--fuse makes gpu_nn layers"):
        main(["demo", "--model", "cnn", "--fuse", "--ours-from", "torch", "--no-progress"])
