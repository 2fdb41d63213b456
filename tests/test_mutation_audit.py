"""benchmarks/mutation_audit.py: its mutations still apply to the sources, and a run in a copy of
the tree kills a mutant the suite catches and leaves the copy's file as it was."""

from __future__ import annotations

import os

from gpu_nn.benchmarks import mutation_audit as ma


def test_every_mutation_applies_to_the_current_sources():
    """Each mutation's text is found at its occurrence (a kernel edited since would leave an
    entry that mutates nothing: the audit reports it BADSPEC, this test names it first), ids are
    unique and every known equivalent is one of them."""
    ids = [m[0] for m in ma.MUTATIONS]
    assert len(ids) == len(set(ids))
    assert set(ma.EQUIVALENT) <= set(ids)
    missing = []
    for mid, rel, old, new, occurrence, tests in ma.MUTATIONS:
        with open(os.path.join(ma.ROOT, rel)) as f:
            if ma.find(f.read(), old, occurrence) < 0:
                missing.append(mid)
        assert old != new and tests and all(os.path.exists(os.path.join(ma.ROOT, t)) for t in tests if t.endswith(".py"))
    assert not missing, missing


def test_a_caught_mutant_is_killed_in_a_copy_and_its_file_restored(tmp_path):
    """The CUDA C amsgrad maximum without its NaN test, in a copy of the tree, against the host
    build's tests: KILLED (the copy's headers are the ones compiled: the checkout's would pass),
    and the copy's header is the original again afterwards."""
    tree = str(tmp_path / "tree")
    ma.copy_tree(tree)
    mutation = next(m for m in ma.MUTATIONS if m[0] == "cu-opt-ams-nan")
    path = os.path.join(tree, mutation[1])
    with open(path) as f:
        before = f.read()
    rec = ma.run_one(tree, mutation, timeout=600)
    assert rec["status"] == "KILLED", rec
    assert any("amsgrad" in line for line in rec["failed"]), rec
    with open(path) as f:
        assert f.read() == before
