"""Nothing lost, nothing crashes (issue 19): a trained model survives a failed final evaluation, every bad
input of the list exits 2 with a message naming the file or flag, a full disk is a clear error."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_files import (
    D,
    change_softsae_config,
    copy_model,
    edit_json,
    make_models,
    rewrite_st,
)

import softsae
from softsae.cli import main
from softsae.trainer import STATE_FILE

TRAIN = ["--arch", "topk", "--dict-size", "16", "--k", "2", "--steps", "3", "--batch-size", "32", "--no-progress",
         "--backend", "reference"]


@pytest.fixture(scope="module")
def acts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "acts.npy"
    np.save(path, np.random.default_rng(0).standard_normal((300, D)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return make_models(tmp_path_factory.mktemp("models"))


def _main(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------- the final evaluation


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), MemoryError("out of memory"),
                                     RuntimeError("CUDA out of memory"), ValueError("bad rows")])
def test_a_failed_final_evaluation_keeps_the_trained_model(tmp_path, capsys, monkeypatch, acts, failure):
    import softsae.metrics

    def evaluate(*args, **kwargs):
        raise failure

    monkeypatch.setattr(softsae.metrics, "evaluate", evaluate)
    out = tmp_path / "run"
    argv = ["train", "--data", str(acts), "--out", str(out), *TRAIN]
    if isinstance(failure, (KeyboardInterrupt, ValueError)):
        code, err = _main(capsys, *argv)
        assert code == (130 if isinstance(failure, KeyboardInterrupt) else 2)
    else:  # not an input error: it propagates, but only after the model is safe
        with pytest.raises(type(failure)):
            main(argv)
        err = capsys.readouterr().err
    assert f"the trained model is saved in {out}/" in err
    assert (out / "model.safetensors").is_file() and not (out / STATE_FILE).exists()
    model = softsae.load_sae(out)
    assert model.arch == "topk" and model.n == 16


def test_eval_rows_0_skips_the_evaluation(tmp_path, capsys, acts):
    out = tmp_path / "run"
    code, _ = _main(capsys, "train", "--data", str(acts), "--out", str(out), "--eval-rows", "0", *TRAIN)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl", "model.safetensors",
                                                     "train_config.json"]
    softsae.load_sae(out)


def test_an_interrupted_training_still_leaves_nothing(tmp_path, capsys, monkeypatch, acts):
    import softsae.trainer

    def step(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(softsae.trainer, "train_step", step)
    out = tmp_path / "run"
    code, _ = _main(capsys, "train", "--data", str(acts), "--out", str(out), *TRAIN)
    assert code == 130 and not out.exists()  # no model was written: the half-made folder goes


def test_a_rerun_removes_what_a_killed_run_left(tmp_path, capsys, acts):
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / ".trainer_state.pt.a1b2c3d4.tmp", out / ".model.safetensors.zz_9abcd.tmp"]
    keep = [out / "notes.txt", out / ".other.x1y2z3w4.tmp"]
    for p in stale + keep:
        p.write_text("x")
    code, _ = _main(capsys, "train", "--data", str(acts), "--out", str(out), "--resume", *TRAIN)
    assert code == 0
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)


# ----------------------------------------------------------------------------- every bad input exits 2


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _model_case(name: str, breaks):
    """A case that breaks a copy of model ``name`` and evaluates it: (argv, what the message must name)."""
    def case(tmp: Path, models: dict[str, Path], acts: Path):
        path = copy_model(models[name], tmp / models[name].name)
        named = breaks(path)
        return ["eval", "--model", str(path), "--data", str(acts)], str(named)
    return case


def _cfg(change):
    def breaks(path: Path) -> Path:
        edit_json(path / "cfg.json", change)
        return path / "cfg.json"
    return breaks


def _write(name: str, text: str):
    def breaks(path: Path) -> Path:
        (path / name).write_text(text)
        return path / name
    return breaks


def _weights(file: str, change):
    def breaks(path: Path) -> Path:
        rewrite_st(path / file, change_tensors=change)
        return path / file
    return breaks


def _truncated(file: str):
    def breaks(path: Path) -> Path:
        _truncate(path / file)
        return path / file
    return breaks


def _softsae_cfg(change):
    def breaks(path: Path) -> Path:
        change_softsae_config(path / "model.safetensors", change)
        return path / "model.safetensors"
    return breaks


def _reference(change):
    def breaks(path: Path) -> Path:
        sd = torch.load(path, weights_only=True)
        change(sd)
        torch.save(sd, path)
        return path
    return breaks


def _train_case(*flags: str, named: str, data: str | None = None):
    def case(tmp: Path, models: dict[str, Path], acts: Path):
        d = str(acts) if data is None else data(tmp)
        src = ["--data", d] if "--text" not in flags else []
        return ["train", *src, "--out", str(tmp / "run"), *TRAIN, *flags], named
    return case


def _data_file(kind: str):
    def make(tmp: Path) -> str:
        path = tmp / f"{kind}.npy"
        if kind == "empty":
            path.write_bytes(b"")
        else:
            np.savez(tmp / "arrays.npz", a=np.zeros((4, 4), np.float32))
            os.replace(tmp / "arrays.npz", path)
        return str(path)
    return make


def _resume_case(content: bytes):
    def case(tmp: Path, models: dict[str, Path], acts: Path):
        out = tmp / "run"
        out.mkdir()
        (out / STATE_FILE).write_bytes(content)
        return ["train", "--data", str(acts), "--out", str(out), "--resume", *TRAIN], str(out / STATE_FILE)
    return case


def _text_case(tmp: Path, models: dict[str, Path], acts: Path):
    bad = tmp / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n\nsecond paragraph".encode("latin-1"))
    return ["train", "--text", str(bad), "--out", str(tmp / "run"), *TRAIN], str(bad)


def _del(key):
    return lambda d: d.pop(key)


BAD_INPUTS = {
    "saelens_truncated_weights": _model_case("saelens_topk", _truncated("sae_weights.safetensors")),
    "sparsify_truncated_weights": _model_case("sparsify", _truncated("sae.safetensors")),
    "saelens_cfg_without_k": _model_case("saelens_topk", _cfg(_del("k"))),
    "sparsify_cfg_without_k": _model_case("sparsify", _cfg(_del("k"))),
    "jumprelu_without_threshold": _model_case("saelens_jumprelu", _weights("sae_weights.safetensors",
                                                                           _del("threshold"))),
    "cfg_is_a_list": _model_case("saelens_topk", _write("cfg.json", "[1, 2]")),
    "cfg_is_a_string": _model_case("sparsify", _write("cfg.json", '"topk"')),
    "cfg_metadata_is_a_list": _model_case("saelens_topk", _cfg(lambda c: c.update(metadata=[1]))),
    "cfg_metadata_is_a_string": _model_case("saelens_topk", _cfg(lambda c: c.update(metadata="x"))),
    "cfg_invalid_json": _model_case("saelens_topk", _write("cfg.json", '{"k": 3,')),
    "dl_config_invalid_json": _model_case("dl_topk", _write("config.json", "{trainer")),
    "softsae_config_unknown_key": _model_case("softsae", _softsae_cfg(lambda m: m.update(bogus=1))),
    "softsae_config_missing_key": _model_case("softsae", _softsae_cfg(_del("n"))),
    "softsae_config_nan_k_max": _model_case("softsae", _softsae_cfg(lambda m: m.update(k_max=float("nan")))),
    "weights_do_not_match_config": _model_case("softsae", _softsae_cfg(lambda m: m.update(d=m["d"] + 1))),
    "huge_declared_size": _model_case("softsae", _softsae_cfg(lambda m: m.update(d=10**6, n=10**6))),
    "W_enc_3d": _model_case("saelens_topk", _weights("sae_weights.safetensors",
                                                     lambda t: t.update(W_enc=t["W_enc"][..., None]))),
    "reference_k_inf": _model_case("reference_pt", _reference(lambda sd: sd.update(k=torch.tensor(float("inf"))))),
    "reference_k_empty": _model_case("reference_pt", _reference(lambda sd: sd.update(k=torch.tensor([])))),
    "reference_broadcast_bias": _model_case("reference_pt",
                                            _reference(lambda sd: sd.update({"encoder.bias": torch.ones(1)}))),
    "empty_npy": _train_case(named="empty.npy", data=_data_file("empty")),
    "npz_named_npy": _train_case(named="npz.npy", data=_data_file("npz")),
    "device_bogus": _train_case("--device", "bogus", named="--device"),
    "log_every_0": _train_case("--log-every", "0", named="--log-every"),
    "batch_size_1e11": _train_case("--batch-size", "100000000000", named="--batch-size"),
    "batch_size_0": _train_case("--batch-size", "0", named="--batch-size"),
    "k_max_nan": _train_case("--k-max", "nan", named="--k-max"),
    "eval_rows_negative": _train_case("--eval-rows", "-1", named="--eval-rows"),
    "non_utf8_text": _text_case,
    "resume_corrupt_state": _resume_case(b"PK\x03\x04 this is not a torch file"),
    "resume_empty_state": _resume_case(b""),
}
if not torch.cuda.is_available():
    BAD_INPUTS["device_cuda_without_cuda"] = _train_case("--device", "cuda", named="--device")


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_every_bad_input_exits_2_naming_the_file_or_flag(tmp_path, capsys, models, acts, case):
    argv, named = BAD_INPUTS[case](tmp_path, models, acts)
    code, err = _main(capsys, *argv)
    assert code == 2, err
    assert err.startswith(f"softsae {argv[0]}: error:") and named in err, err
    assert len(err.strip().splitlines()) == 1, err
    if argv[0] == "train" and "--resume" not in argv:
        assert not (tmp_path / "run").exists()
    if case.startswith("resume"):
        assert (tmp_path / "run" / STATE_FILE).exists()  # the user's file is not deleted


@pytest.mark.parametrize("flags,named", [(["--batch-size", "0"], "--batch-size"), (["--max-rows", "0"], "--max-rows"),
                                         (["--device", "nowhere"], "--device"),
                                         (["--diagnostics", "--diag-rows", "0"], "--diag-rows")])
def test_eval_flags_are_checked(capsys, models, acts, flags, named):
    code, err = _main(capsys, "eval", "--model", str(models["softsae"]), "--data", str(acts), *flags)
    assert code == 2 and named in err, err


def test_huge_declared_size_fails_fast_without_allocating(tmp_path, models):
    path = copy_model(models["softsae"], tmp_path / "m")
    change_softsae_config(path / "model.safetensors", lambda m: m.update(d=10**6, n=10**6))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=str(path / "model.safetensors")):
        softsae.load_sae(path)
    assert time.perf_counter() - t0 < 5.0  # checked on the meta device: no 4 TB allocation attempted


def test_config_file_errors_name_the_file(tmp_path, capsys, acts):
    for text, want in (('{"batch_size": 1e11}', "batch_size"), ('{"log_every": 0}', "log_every"),
                       ('{"k_max": NaN}', "k_max"), ("[1, 2]", "mapping")):
        cfg = tmp_path / "run.json"
        cfg.write_text(text)
        code, err = _main(capsys, "train", "--data", str(acts), "--out", str(tmp_path / "run"), "--config", str(cfg),
                          "--dict-size", "16", "--k", "2", "--steps", "3")
        assert code == 2 and str(cfg) in err and want in err, err


# ----------------------------------------------------------------------------- a full disk


def test_full_disk_during_activation_extraction_is_an_error_and_a_rerun_works(tmp_path, capsys, monkeypatch):
    from softsae import activations as act_mod
    from softsae.corpus import Document

    docs = [Document(f"doc/{i}", "test", f"Paragraph {i} about sparse autoencoders and tokens.") for i in range(4)]
    out = tmp_path / "acts.npy"

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match="acts.npy") as info:
        act_mod.extract_corpus(out, docs, heldout_frac=0.0, seq_len=16, batch_size=4, shard_docs=2)
    assert info.value.errno == errno.ENOSPC
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden temporary
    # the command line says it in one line (exit 1: not an input error), no traceback
    code = main(["activations", "--out", str(tmp_path / "cli.npy"), "--text", str(_text(tmp_path)), "--seq-len", "16",
                 "--no-progress"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (transformers prints its loading bars before)
    assert code == 1 and last.startswith("softsae activations: error: writing") and "cli.npy" in last
    assert "No space left on device" in last and "Traceback" not in err
    monkeypatch.undo()
    meta = act_mod.extract_corpus(out, docs, heldout_frac=0.0, seq_len=16, batch_size=4, shard_docs=2)
    assert np.load(out).shape == (meta["rows"]["train"], 384)


def test_kill_9_leftovers_of_extraction_are_removed_by_the_rerun(tmp_path):
    from softsae import activations as act_mod
    from softsae.corpus import Document
    from softsae.fileio import temp_path

    docs = [Document(f"doc/{i}", "test", f"Paragraph {i} about tokens.") for i in range(2)]
    out = tmp_path / "acts.npy"
    leftovers = [temp_path(out, ".raw"), temp_path(out), temp_path(tmp_path / "acts.meta.json")]
    act_mod.extract_corpus(out, docs, heldout_frac=0.0, seq_len=16, batch_size=4, shard_docs=2)
    assert not any(Path(p).exists() for p in leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts.meta.json", "acts.npy"]


def _text(tmp: Path) -> Path:
    p = tmp / "doc.txt"
    p.write_text("A short paragraph of text.\n\nAnother one, also short.")
    return p


def test_json_results_are_plain_objects(tmp_path, capsys, acts):
    out = tmp_path / "run"
    code, _ = _main(capsys, "train", "--data", str(acts), "--out", str(out), *TRAIN)
    assert code == 0 and isinstance(json.loads((out / "eval.json").read_text()), dict)


@pytest.mark.parametrize("content", ['{"rows": 3', "[1, 2]", '{"rows": "many", "docs": []}', '{"rows": 5, "docs": []}'])
def test_a_corrupt_shard_listing_is_an_error_naming_it(tmp_path, content):
    from softsae import activations as act_mod
    from softsae.corpus import Document

    docs = [Document(f"doc/{i}", "test", f"Paragraph {i} about tokens.") for i in range(4)]
    kw = dict(heldout_frac=0.0, seq_len=16, batch_size=4, shard_docs=2, keep_shards=True)
    out = tmp_path / "acts.npy"
    act_mod.extract_corpus(out, docs, **kw)
    listing = out.with_suffix(".shards") / "shard_00000.json"
    listing.write_text(content)
    out.unlink()
    with pytest.raises(ValueError, match=str(listing)):
        act_mod.extract_corpus(out, docs, **kw)


def test_resume_skips_foreign_lines_of_metrics(tmp_path, capsys, monkeypatch, acts):
    import softsae.trainer

    out = tmp_path / "run"
    args = ["train", "--data", str(acts), "--out", str(out), "--checkpoint-every", "2", "--log-every", "1",
            *TRAIN[:6], "--steps", "5", *TRAIN[8:]]
    real = softsae.trainer.train_step
    calls = {"n": 0}

    def step(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(softsae.trainer, "train_step", step)
    assert main(args) == 130
    monkeypatch.undo()
    assert (out / STATE_FILE).exists()
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'[1, 2]\n"text"\n\xff\xfe\n{"step": "x"}\n')
    assert main([*args, "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5))


def test_export_removes_its_stale_temporaries(tmp_path, models):
    from softsae.fileio import temp_path
    from softsae.interop import export_sae

    out = tmp_path / "exp"
    out.mkdir()
    stale = temp_path(out / "sae_weights.safetensors")
    (out / "mine.tmp").write_text("x")
    export_sae(softsae.load_sae(models["softsae_topk"]), out, "saelens")
    assert not Path(stale).exists() and (out / "mine.tmp").exists()


def test_a_truncated_shard_is_an_error_naming_it(tmp_path):
    from softsae import activations as act_mod
    from softsae.corpus import Document

    docs = [Document(f"doc/{i}", "test", f"Paragraph {i} about tokens.") for i in range(4)]
    kw = dict(heldout_frac=0.0, seq_len=16, batch_size=4, shard_docs=2, keep_shards=True)
    out = tmp_path / "acts.npy"
    act_mod.extract_corpus(out, docs, **kw)
    shard = out.with_suffix(".shards") / "shard_00001.npy"
    shard.write_bytes(shard.read_bytes()[:200])
    out.unlink()
    with pytest.raises(ValueError, match=str(shard)):
        act_mod.extract_corpus(out, docs, **kw)
