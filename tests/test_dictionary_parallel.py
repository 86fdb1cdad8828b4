"""Dictionary-sharded training (``TrainConfig(parallel="dictionary")``) on 2 and 3 gloo CPU processes.

Each rank holds n/W latents (n = 50: 25 + 25 and 17 + 17 + 16). After 8 steps of the global batch the
gathered weights, buffers and the logged terms equal the single-process ``train()`` with the same seed,
for softsae (soft and hard phases, k-loss), topk and batchtopk (global selection and threshold), with
dead latents and aux-k active and mid-run checkpoints written. Adam hides gradient-scale errors, so
one ``train_step`` of the sharded model (``shard_model_``) with plain SGD and no clipping must also give
the single-process gradients of every parameter (gathered). Also: data parallel on 3 ranks, the state slicing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_spawn import acts, cfg, grad_model, join, spawn

from softsae.distributed.placement import shard_model_
from softsae.distributed.process import shutdown
from softsae.distributed.state import SHARD_DIM, gather_full, shard_full
from softsae.losses import DeadLatentTracker
from softsae.trainer import new_model, train, train_step

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

ARCHS = ("softsae", "topk", "batchtopk")
TOL = 2e-5


def _grad_setup(arch: str):
    """A model, SGD(lr=0), a tracker with half the latents dead, the batch and the step's config."""
    x = torch.from_numpy(acts(31, 16, seed=1))
    model, c = grad_model(arch, x)
    tracker = DeadLatentTracker(model.n, 1)
    tracker.tokens_since_fired[::2] = 5
    return model, tracker, x, c


def _one_process_grads(arch: str) -> dict[str, torch.Tensor]:
    model, tracker, x, c = _grad_setup(arch)
    terms = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), tracker, x, 0, c)
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    out.update({f"term.{k}": v.detach().clone() for k, v in terms.items()})
    return out


def _sharded_grads(arch: str) -> dict[str, torch.Tensor] | None:
    model, tracker, x, c = _grad_setup(arch)
    sm = shard_model_(model)
    local_tracker = DeadLatentTracker(sm.n_local, 1)
    local_tracker.tokens_since_fired.copy_(tracker.tokens_since_fired[sm.latents.lo:sm.latents.hi])
    terms = train_step(sm, torch.optim.SGD(sm.parameters(), lr=0.0), local_tracker, x, 0, c)
    grads = gather_full({n: p.grad for n, p in sm.named_parameters() if p.grad is not None}, sm.n)
    if grads is None:
        return None
    grads.update({f"term.{k}": v.detach().clone() for k, v in terms.items()})
    return grads


def _rank_main(rank: int, world: int, store: str, tmp: str) -> None:
    join(rank, world, store)
    try:
        results = {}
        data = acts()
        for arch in ARCHS:
            res = train(data, cfg(arch, parallel="dictionary", checkpoint_every=3), out_dir=Path(tmp) / f"run_{arch}")
            results[arch] = {"state": res.model.state_dict() if res.model is not None else None, "last": res.last}
            results[f"grad_{arch}"] = _sharded_grads(arch)
            if world == 3:  # data parallel on 3 ranks too (uneven rows 11 + 11 + 10; 2 ranks: test_data_parallel.py)
                res = train(data, cfg(arch, parallel="data"))
                results[f"data_{arch}"] = {"state": res.model.state_dict(), "last": res.last}
        torch.save(results, Path(tmp) / f"rank{rank}.pt")
    finally:
        shutdown()


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def ranks(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"dict{world}")
    failures = spawn(_rank_main, world, tmp, str(tmp))
    assert not failures, failures
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dict_ref")
    torch.set_num_threads(1)
    return {arch: train(acts(), cfg(arch), out_dir=tmp / arch) for arch in ARCHS}, tmp


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    err = float((got - want).abs().max()) if got.numel() else 0.0
    assert err <= TOL * max(1.0, float(want.abs().max()) if want.numel() else 1.0), f"{what}: max err {err:.3g}"


@pytest.mark.parametrize("arch", ARCHS)
def test_sharded_run_equals_one_process(ranks, reference, arch):
    tmp, results = ranks
    refs, ref_dir = reference
    ref = refs[arch]
    want = ref.model.state_dict()
    got = results[0][arch]["state"]
    assert all(res[arch]["state"] is None for res in results[1:])  # only rank 0 holds the full model
    assert set(got) == set(want)
    for name in want:
        _assert_close(got[name], want[name], f"{arch} {len(results)} ranks {name}")
    keys = ("loss", "recon", "l0", "fvu", "dead", "auxk") + (("mean_k", "k_loss") if arch == "softsae" else ())
    for r, res in enumerate(results):
        for key in keys:
            if key in ref.last:
                assert res[arch]["last"][key] == pytest.approx(ref.last[key], rel=1e-4, abs=1e-6), (arch, r, key)
    assert ref.last["dead"] > 0 and ref.last["auxk"] > 0  # aux-k's global selection was exercised
    if arch == "softsae":
        assert ref.last["hard"]
    if arch == "batchtopk":
        assert float(want["threshold"]) > 0
    written = tmp / f"run_{arch}"  # rank 0 wrote the run like one process: model, metrics, no leftover state
    assert (written / "model.safetensors").exists() and not (written / "trainer_state.pt").exists()
    lines = (written / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == (ref_dir / arch / "metrics.jsonl").read_text().count("\n") == 8


@pytest.mark.parametrize("arch", ARCHS)
def test_data_parallel_on_three_ranks_equals_one_process(ranks, reference, arch):
    _, results = ranks
    if len(results) != 3:
        pytest.skip("data parallel is run by the 3-rank group here")
    ref = reference[0][arch]
    want = ref.model.state_dict()
    for r, res in enumerate(results):
        got = res[f"data_{arch}"]["state"]
        assert set(got) == set(want)
        for name in want:
            _assert_close(got[name], want[name], f"data {arch} rank {r} {name}")
        assert res[f"data_{arch}"]["last"]["loss"] == pytest.approx(ref.last["loss"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_sharded_gradients_are_the_one_process_gradients(ranks, arch):
    _, results = ranks
    want = _one_process_grads(arch)
    got = results[0][f"grad_{arch}"]
    assert all(res[f"grad_{arch}"] is None for res in results[1:])
    assert float(want["term.auxk"]) > 0
    if arch == "softsae":
        assert float(want["term.k_loss"]) > 0 and float(want["k_estimator.2.weight"].abs().max()) > 0
    assert set(got) == set(want), arch
    for name in want:
        _assert_close(got[name], want[name], f"{arch} {len(results)} ranks {name}")


def test_shard_full_splits_by_name():
    torch.manual_seed(0)
    model = new_model(cfg("softsae").resolved(16), 16)
    state = model.state_dict()
    parts = [shard_full(state, r, 3, model.n) for r in range(3)]
    for name, t in state.items():
        if name in SHARD_DIM:
            axis = SHARD_DIM[name]
            assert [p[name].shape[axis] for p in parts] == [17, 17, 16]
            torch.testing.assert_close(torch.cat([p[name] for p in parts], dim=axis), t, rtol=0, atol=0)
        else:
            assert all(torch.equal(p[name], t) for p in parts), name
    with pytest.raises(ValueError, match="W_enc"):
        shard_full({"W_enc": torch.zeros(49, 16)}, 0, 2, 50)
