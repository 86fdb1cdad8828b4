"""benchmarks/bench_train_step.py against the real dictionary_learning and sparsify trainers, at a tiny shape."""

from __future__ import annotations

import pytest

pytest.importorskip("dictionary_learning", reason="dictionary-learning is not installed (run .ci/interop)")
pytest.importorskip("sparsify", reason="eai-sparsify is not installed (run .ci/interop)")
import bench_train_step


def test_every_framework_steps_at_a_tiny_shape():
    records = bench_train_step.main(["--d", "16", "--n", "64", "--k", "4", "--batch-size", "32", "--repeat", "2",
                                     "--threads", "1", "--models", "topk", "batchtopk"])
    got = {(r["framework"], r["model"]) for r in records if "p50_ms" in r}
    assert got == {(f, m) for f in ("softsae", "reference", "dictionary_learning") for m in ("topk", "batchtopk")} \
        | {("sparsify", "topk")}
    assert not any("skipped" in r for r in records)
    versions = {r["framework"]: r["version"] for r in records}
    assert versions["dictionary_learning"] and versions["sparsify"]


@pytest.mark.parametrize("framework,model", [("dictionary_learning", "topk"), ("dictionary_learning", "batchtopk"),
                                             ("sparsify", "topk")])
def test_the_timed_step_updates_the_weights(framework, model):
    """The closure is a real optimizer step: every parameter moves; dictionary_learning renormalises the
    decoder rows after its step (sparsify before its forward, so only the former is checked)."""
    import torch

    s = bench_train_step.Shape(d=16, n=64, k=4, B=32)
    torch.manual_seed(0)
    step, _ = bench_train_step.make_step(framework, model, s, torch.randn(s.B, s.d), 3e-3, 0.1)
    before = {k: v.detach().clone() for k, v in step.module.named_parameters()}
    step()
    after = dict(step.module.named_parameters())
    assert all(not torch.equal(before[k], after[k]) for k in before), "a parameter did not move"
    if framework == "dictionary_learning":
        W_dec = after["decoder.weight"].detach().T
        torch.testing.assert_close(W_dec.norm(dim=1), torch.ones(s.n), atol=1e-5, rtol=0)
