"""Trainer: schedules, one step across backends, a short run, resumption; data sources; synthetic data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import softsae
from softsae import trainer as trainer_mod
from softsae.data import DataError, IteratorSource, load_activations, normalization_stats
from softsae.losses import DeadLatentTracker
from softsae.synthetic import make_synthetic
from softsae.trainer import (
    TrainConfig,
    alpha_at,
    geometric_median,
    is_hard_phase,
    is_st_phase,
    k_target_at,
    lr_at,
    new_model,
    train,
    train_step,
)

D = 16


@pytest.fixture(scope="module")
def synth():
    return make_synthetic(n_samples=3000, d=D, n_true=32, k_min=1, k_max=6, seed=1)


def test_schedules():
    c = TrainConfig(dict_size=2**14, k=8, steps=100, warmup_steps=10, decay_start=60, k_anneal_steps=20,
                    alpha=1e-3, alpha_start=1.0, alpha_anneal_steps=30, hard_topk_steps=25).resolved(d=64)
    assert c.lr == pytest.approx(2e-4)
    assert lr_at(0, c) == pytest.approx(2e-5) and lr_at(9, c) == pytest.approx(2e-4)
    assert lr_at(59, c) == pytest.approx(2e-4) and lr_at(80, c) == pytest.approx(1e-4)
    assert lr_at(99, c) == pytest.approx(2e-4 / 40)
    assert k_target_at(0, c, 64) == 64 and k_target_at(10, c, 64) == 36 and k_target_at(50, c, 64) == 8
    assert alpha_at(0, c) == pytest.approx(1.0) and alpha_at(15, c) == pytest.approx(math.sqrt(1e-3))
    assert alpha_at(30, c) == pytest.approx(1e-3) and alpha_at(99, c) == pytest.approx(1e-3)
    assert not is_hard_phase(74, c) and is_hard_phase(75, c)
    assert TrainConfig(arch="topk", steps=100).resolved(8).hard_topk_steps == 0


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="smaller than k"):
        TrainConfig(dict_size=8, k=16).resolved(4)
    with pytest.raises(ValueError, match="arch"):
        TrainConfig(arch="relu").resolved(4)
    with pytest.raises(ValueError, match="integer k"):
        TrainConfig(arch="topk", k=2.5).resolved(4)


def test_geometric_median_is_robust():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [100.0, 100.0]])
    gm = geometric_median(pts, iters=100)
    assert torch.all((gm > 0.3) & (gm < 0.8))  # the mean would be ~20
    sym = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert torch.allclose(geometric_median(sym), torch.zeros(2), atol=1e-6)


def _one_step(backend: str, arch: str, x: torch.Tensor, hard: bool):
    c = TrainConfig(arch=arch, dict_size=48, k=4, steps=10, batch_size=len(x), backend=backend, alpha=0.02,
                    warmup_steps=0, hard_topk_steps=10 if hard else 0, dead_feature_threshold=1).resolved(D)
    torch.manual_seed(0)
    model = new_model(c, D)
    model.set_normalization(None, float(x.pow(2).sum(-1).mean().sqrt()))
    model.b_dec.data.copy_(geometric_median(model.normalize(x)))
    opt = torch.optim.Adam(model.parameters(), lr=c.lr)
    tracker = DeadLatentTracker(model.n, 1)
    tracker.tokens_since_fired[::2] = 5  # half the latents dead: exercises the auxk path
    terms = train_step(model, opt, tracker, x, 0, c)
    return {k: float(v) for k, v in terms.items()}, model


FAST_CPU = [b for b in softsae.available_backends("cpu") if b not in ("reference", "triton")]


@pytest.mark.skipif(not FAST_CPU, reason="no compiled CPU backend in this install")
@pytest.mark.parametrize("arch,hard", [("softsae", False), ("softsae", True), ("topk", False), ("batchtopk", False)])
def test_train_step_fast_backend_matches_reference(synth, arch, hard):
    x = torch.from_numpy(synth.x[:256])
    t_ref, m_ref = _one_step("reference", arch, x, hard)
    t_fast, m_fast = _one_step(FAST_CPU[0], arch, x, hard)
    assert t_ref.keys() == t_fast.keys()
    for k in t_ref:
        assert t_fast[k] == pytest.approx(t_ref[k], rel=1e-4, abs=1e-6), k
    for (name, p_ref), (_, p_fast) in zip(m_ref.named_parameters(), m_fast.named_parameters(), strict=True):
        assert torch.allclose(p_ref, p_fast, atol=2e-5, rtol=1e-4), name


def test_short_run_learns_and_logs(tmp_path, synth):
    c = TrainConfig(arch="softsae", dict_size=48, k=3, steps=60, batch_size=128, backend="reference",
                    alpha=0.02, log_every=10, checkpoint_every=0, progress=False, lr=5e-3)
    res = train(synth.x, c, out_dir=tmp_path / "run")
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 10, 20, 30, 40, 50, 59]
    assert lines[-1]["fvu"] < 0.8 * lines[0]["fvu"]
    assert lines[-1]["hard"] and not lines[0]["hard"]
    assert {"loss", "recon", "fvu", "mean_k", "l0", "dead", "k_loss", "lr", "alpha"} <= set(lines[0])
    assert torch.allclose(res.model.W_dec.norm(dim=1), torch.ones(48), atol=1e-5)
    assert (tmp_path / "run" / "model.safetensors").exists() and not (tmp_path / "run" / "trainer_state.pt").exists()
    assert not list((tmp_path / "run").glob(".*tmp"))


def test_resume_gives_the_same_model(tmp_path, synth, monkeypatch):
    base = dict(arch="batchtopk", dict_size=32, k=3, steps=24, batch_size=64, backend="reference",
                log_every=4, checkpoint_every=8, progress=False)
    full = train(synth.x, TrainConfig(**base), out_dir=tmp_path / "full").model

    real_step = trainer_mod.train_step

    def crashing_step(model, opt, tracker, x, step, c, engine=None):
        if step == 13:
            raise KeyboardInterrupt
        return real_step(model, opt, tracker, x, step, c, engine)

    monkeypatch.setattr(trainer_mod, "train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train(synth.x, TrainConfig(**base), out_dir=tmp_path / "cut")
    assert (tmp_path / "cut" / "trainer_state.pt").exists()
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    monkeypatch.setattr(trainer_mod, "train_step", real_step)
    with pytest.raises(ValueError, match="different settings"):
        train(synth.x, TrainConfig(**{**base, "dict_size": 40}), out_dir=tmp_path / "cut", resume=True)
    resumed = train(synth.x, TrainConfig(**base), out_dir=tmp_path / "cut", resume=True).model
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    steps = [json.loads(s)["step"] for s in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(s)["step"] for s in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- data sources


def test_sources_agree(tmp_path, synth):
    from safetensors.numpy import save_file

    x = synth.x[:500]
    np.save(tmp_path / "a.npy", x)
    save_file({"acts": x, "other": x[:3]}, str(tmp_path / "a.safetensors"))
    torch.save({"acts": torch.from_numpy(x)}, tmp_path / "a.pt")
    srcs = [load_activations(tmp_path / "a.npy"), load_activations(f"{tmp_path / 'a.safetensors'}:acts"),
            load_activations(tmp_path / "a.pt"), load_activations(torch.from_numpy(x)), load_activations(x)]
    assert isinstance(srcs[0].data, np.memmap)
    assert isinstance(srcs[1].data, np.memmap)
    for s in srcs:
        assert (s.n_rows, s.d) == (500, D)
        rng = np.random.default_rng(5)
        assert torch.equal(s.sample(7, rng), srcs[0].sample(7, np.random.default_rng(5)))
        assert torch.equal(torch.cat(list(s.iter_batches(128))), torch.from_numpy(x))
    it = IteratorSource(iter([x[:100], x[100:250], x[250:]]))
    assert torch.equal(it.peek(120), torch.from_numpy(x[:120]))
    assert torch.equal(torch.cat([it.sample(200), it.sample(200)]), torch.from_numpy(x[:400]))


def test_bad_data_raises_clear_errors(tmp_path):
    np.save(tmp_path / "cube.npy", np.zeros((4, 5, 6), np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((4, 5), np.int64))
    nan = np.ones((300, 5), np.float32)
    nan[211, 2] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    (tmp_path / "junk.npy").write_bytes(b"not an npy file")
    with pytest.raises(DataError, match="2-D"):
        load_activations(tmp_path / "cube.npy")
    with pytest.raises(DataError, match="floating point"):
        load_activations(tmp_path / "ints.npy")
    with pytest.raises(DataError, match="NaN.*row 211"):
        load_activations(tmp_path / "nan.npy")
    with pytest.raises(DataError, match="no such file"):
        load_activations(tmp_path / "missing.npy")
    with pytest.raises(DataError, match="cannot read"):
        load_activations(tmp_path / "junk.npy")
    with pytest.raises(DataError, match="unsupported"):
        load_activations(tmp_path / "cube.txt") if (tmp_path / "cube.txt").write_text("1") else None
    with pytest.raises(DataError, match="inf"):
        IteratorSource(iter([np.full((3, 2), np.inf, np.float32)]))


def test_normalization_stats(synth):
    src = load_activations(synth.x)
    _, scale = normalization_stats(src, "scale")
    assert float((torch.from_numpy(synth.x).double() / scale).pow(2).sum(1).mean()) == pytest.approx(1.0, rel=1e-6)
    shift, scale = normalization_stats(src, "center_scale")
    xn = (torch.from_numpy(synth.x).double() - shift.double()) / scale
    assert torch.allclose(xn.mean(0), torch.zeros(D, dtype=torch.float64), atol=1e-5)


def test_synthetic_structure():
    s = make_synthetic(n_samples=2000, d=D, n_true=24, k_min=2, k_max=9, noise=0.0, seed=3)
    assert s.x.shape == (2000, D) and s.x.dtype == np.float32
    assert np.allclose(np.linalg.norm(s.dictionary, axis=1), 1.0, atol=1e-5)
    assert s.counts.min() == 2 and s.counts.max() == 9
    # log-uniform: small counts more frequent than large ones
    assert (s.counts == 2).sum() > (s.counts == 9).sum()
    # more active factors, more energy: mean squared norm grows with the count
    sq = (s.x.astype(np.float64) ** 2).sum(1)
    by_count = [sq[s.counts == c].mean() for c in range(2, 10)]
    assert all(a < b for a, b in zip(by_count, by_count[1:], strict=False))
    with pytest.raises(ValueError):
        make_synthetic(k_min=0)


@pytest.mark.parametrize("arch", ["softsae", "topk", "batchtopk"])
def test_bf16_autocast_step_runs(synth, arch):
    # autocast is what CUDA runs use by default (amp="auto"); on CPU it has to be asked for
    c = TrainConfig(arch=arch, dict_size=48, k=3, steps=12, batch_size=128, amp="bf16", progress=False,
                    backend="reference", hard_topk_steps=4, checkpoint_every=0, log_every=1)
    res = train(synth.x, c)
    assert math.isfinite(res.last["loss"]) and res.model.W_dec.dtype == torch.float32


def test_fractional_schedules_and_phases():
    c = TrainConfig(dict_size=64, k=4, steps=200, k_anneal_frac=0.1, alpha=1e-4, alpha_start=1.0,
                    alpha_anneal_frac=0.25, alpha_schedule="linear", hard_frac=0.05, st_frac=0.1).resolved(d=16)
    assert (c.k_anneal_steps, c.alpha_anneal_steps, c.hard_topk_steps, c.st_steps) == (20, 50, 10, 20)
    assert alpha_at(25, c) == pytest.approx(0.5 * (1 + 1e-4)) and alpha_at(50, c) == pytest.approx(1e-4)
    assert k_target_at(0, c, 16) == 16 and k_target_at(10, c, 16) == 10 and k_target_at(20, c, 16) == 4
    phases = [(is_st_phase(s, c), is_hard_phase(s, c)) for s in (169, 170, 189, 190, 199)]
    assert phases == [(False, False), (True, False), (True, False), (False, True), (False, True)]
    # absolute overrides win over fractions; baselines get no SoftSAE phases
    c2 = TrainConfig(steps=200, hard_frac=0.5, hard_topk_steps=7, st_steps=3).resolved(16)
    assert (c2.hard_topk_steps, c2.st_steps) == (7, 3)
    c3 = TrainConfig(arch="topk", k=4, steps=200, st_frac=0.3, k_anneal_frac=0.1).resolved(16)
    assert (c3.hard_topk_steps, c3.st_steps, c3.k_anneal_steps) == (0, 0, 20)


@pytest.mark.parametrize("kw, match", [
    ({"hard_frac": 1.5}, "hard_frac"), ({"st_frac": -0.1}, "st_frac"), ({"alpha_schedule": "cos"}, "alpha_schedule"),
    ({"k_round": "ceil"}, "k_round"), ({"hard_frac": 0.7, "st_frac": 0.5}, "exceed steps"),
    ({"st_mode": "x"}, "st_mode"),
    ({"hard_topk_steps": 500}, "hard_topk_steps"), ({"alpha": 0.0}, "alpha"),
])
def test_new_knobs_reject_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(steps=100, **kw).resolved(8)


def test_topk_k_annealing_and_softsae_phases_in_a_run(synth):
    c = TrainConfig(arch="topk", dict_size=48, k=3, steps=20, batch_size=64, backend="reference", k_anneal_frac=0.5,
                    log_every=1, checkpoint_every=0, progress=False)
    seen = []
    orig = trainer_mod.train_step

    def spy(model, opt, tracker, x, step, cfg, engine=None):
        terms = orig(model, opt, tracker, x, step, cfg, engine)
        seen.append((model.k_train, float(terms["l0"])))
        return terms

    trainer_mod.train_step = spy
    try:
        res = train(synth.x, c)
    finally:
        trainer_mod.train_step = orig
    assert seen[0][0] == D and seen[0][1] == pytest.approx(D, abs=0.5)  # starts at d
    assert [k for k, _ in seen[10:]] == [3] * 10 and res.model.k_train is None
    c = TrainConfig(arch="softsae", dict_size=48, k=3, steps=20, batch_size=64, backend="reference", alpha=0.05,
                    st_frac=0.25, hard_frac=0.25, hard_encoder_grad=False, k_round="round", log_every=1,
                    checkpoint_every=0, progress=False)
    res = train(synth.x, c)
    assert res.model.k_round == "round" and not res.model.straight_through and res.model.hard_encoder_grad


def test_unseen_generator_structure_and_errors():
    from softsae.synthetic import make_synthetic_unseen

    d = make_synthetic_unseen(n_samples=4000, d=24, n_true=64, mean_count=6.0, seed=3)
    assert d.x.shape == (4000, 24) and d.x.dtype == np.float32 and d.dictionary.shape == (64, 24)
    assert np.allclose(np.linalg.norm(d.dictionary, axis=1), 1, atol=1e-5)
    assert abs(d.counts.mean() - 6.0) < 0.4 and d.counts.min() >= 1 and d.counts.max() <= 32
    assert d.counts.var() > 2 * d.counts.mean()  # over-dispersed (negative binomial), unlike Poisson
    # the sample norm grows with the number of active factors
    assert np.corrcoef(np.linalg.norm(d.x, axis=1), d.counts)[0, 1] > 0.5
    assert not np.array_equal(make_synthetic_unseen(n_samples=50, d=8, n_true=16, seed=1).x,
                              make_synthetic_unseen(n_samples=50, d=8, n_true=16, seed=2).x)
    with pytest.raises(ValueError, match="mean_count"):
        make_synthetic_unseen(n_samples=10, d=8, n_true=16, mean_count=9.0)
