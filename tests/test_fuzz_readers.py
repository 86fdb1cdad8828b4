"""Fuzzing every reader of untrusted files (issue 19), seeded and fast.

Readers: softsae model directories, SAELens / sparsify / dictionary_learning directories, the reference
format (.pt and .safetensors), activation files (.npy, .safetensors incl. bf16, .pt), run config files
(.json, .yaml) and the resume state (trainer_state.pt). Mutations: truncations, byte flips (header region
and anywhere), appended bytes, every JSON value replaced by every wrong type, tensors reshaped, retyped,
removed, added, made NaN / inf, huge declared sizes.

The property: the reader returns a valid object (all numbers finite, shapes consistent) or raises
ValueError naming the path (the command line turns that into exit 2), never another exception, a hang
(each call runs under an alarm) or a large allocation (the process's peak memory is checked). A byte
flip inside tensor data can give a valid model with other weights: without a checksum in the formats no
reader can tell, so that counts as valid.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import signal
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_files import D, N, copy_model, good_activations, make_models, raw_safetensors, read_st, rewrite_st
from safetensors.torch import save_file

from softsae.checkpoint import load_sae, load_trainer_state
from softsae.config import load_config
from softsae.data import ArraySource, load_activations
from softsae.trainer import STATE_FILE, TrainConfig, model_from_state, train

SEED = 19
CALL_LIMIT_S = 20
PEAK_GROWTH_MB = 400  # a 10^6 x 10^6 model would need 4 TB; one 4096 x 32768 matrix 512 MB
WRONG_JSON = [None, "x", [1], {"a": 1}, True, -1, 0, 1e308, float("nan"), float("inf"), 10**30, 2.5]


class Hang(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: int = CALL_LIMIT_S) -> Iterator[None]:
    def fire(*_):
        raise Hang(f"a reader ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module", autouse=True)
def no_large_allocation():
    before = _peak_mb()
    yield
    grown = _peak_mb() - before
    assert grown < PEAK_GROWTH_MB, f"peak memory grew by {grown:.0f} MB while fuzzing the readers"


def expect(call: Callable[[], object], named: Path | str, valid: Callable[[object], None] | None = None) -> str:
    """Run ``call``: a valid result ("ok") or a ValueError naming ``named`` ("error"); anything else fails."""
    with alarm():
        try:
            result = call()
        except ValueError as err:
            assert str(named) in str(err), f"the error does not name {named}: {err}"
            return "error"
    if valid is not None:
        valid(result)
    return "ok"


def valid_model(model) -> None:
    for name, t in model.state_dict().items():
        assert torch.isfinite(t).all(), f"{name} is not finite"
    assert model.W_enc.shape == model.W_dec.shape == (model.n, model.d)
    assert 0 < model.k <= model.n and math.isfinite(float(model.k))
    x = torch.randn(4, model.d)
    out = model(x)
    assert torch.isfinite(out if isinstance(out, torch.Tensor) else out.x_hat).all()


def valid_source(src) -> None:
    assert src.n_rows >= 1 and src.d >= 1
    for b in src.iter_batches(64):
        assert b.dtype == torch.float32 and b.shape[1] == src.d and torch.isfinite(b).all()
    assert src.sample(8, np.random.default_rng(0)).shape == (8, src.d)


def byte_mutants(data: bytes, rng: np.random.Generator, flips: int = 10) -> Iterator[tuple[str, bytes]]:
    """Truncations, single and multiple byte flips (half of them in the first 512 bytes), appended bytes."""
    n = len(data)
    for cut in sorted({0, 1, 7, 8, 9, 64, n // 4, n // 2, n - 1, *rng.integers(0, n, 3).tolist()}):
        if cut < n:
            yield f"truncate@{cut}", data[:cut]
    for i in range(flips):
        b = bytearray(data)
        for _ in range(1 if i % 3 else 4):
            pos = int(rng.integers(0, min(n, 512))) if i % 2 == 0 else int(rng.integers(0, n))
            b[pos] = int(rng.integers(0, 256))
        yield f"flip{i}", bytes(b)
    yield "append", data + b"\x00\xff garbage"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return make_models(tmp_path_factory.mktemp("good"))


MODEL_FILES = {  # model -> the files of its directory (or the file itself) that get mutated
    "softsae": ["model.safetensors"], "softsae_topk": ["model.safetensors"],
    "saelens_topk": ["cfg.json", "sae_weights.safetensors"], "saelens_jumprelu": ["sae_weights.safetensors"],
    "saelens_softsae": ["cfg.json", "sae_weights.safetensors"], "sparsify": ["cfg.json", "sae.safetensors"],
    "dl_topk": ["ae.pt", "config.json"], "dl_batchtopk": ["ae.pt"], "dl_softsae": ["ae.pt"],
    "reference_pt": [""], "reference_st": [""],
}


def _target(path: Path, file: str) -> Path:
    return path / file if file else path


# ----------------------------------------------------------------------------- model readers


@pytest.mark.parametrize("name", sorted(MODEL_FILES))
def test_model_readers_survive_byte_mutations(tmp_path, models, name):
    rng = np.random.default_rng([SEED, sorted(MODEL_FILES).index(name)])
    outcomes = []
    for file in MODEL_FILES[name]:
        good = _target(models[name], file).read_bytes()
        for i, (how, data) in enumerate(byte_mutants(good, rng)):
            path = copy_model(models[name], tmp_path / f"{file or 'f'}_{i}" / models[name].name)
            _target(path, file).write_bytes(data)
            cut_off = good[len(data):] if how.startswith("truncate") else b""
            outcomes.append((how, cut_off.strip(), expect(lambda p=path: load_sae(p), path, valid_model)))
    assert any(o == "error" for *_, o in outcomes)
    # a short file is never trusted (a JSON file may lose its trailing newline)
    assert all(o == "error" for how, cut_off, o in outcomes if how.startswith("truncate") and cut_off)


def _json_files() -> list[tuple[str, str]]:
    return [("saelens_topk", "cfg.json"), ("saelens_softsae", "cfg.json"), ("saelens_jumprelu", "cfg.json"),
            ("sparsify", "cfg.json"), ("dl_topk", "config.json"), ("dl_batchtopk", "config.json")]


def _json_paths(obj, prefix=()) -> Iterator[tuple]:
    """Every key path of a JSON object (nested objects included)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield (*prefix, k)
            yield from _json_paths(v, (*prefix, k))


def _set(obj, keys: tuple, value) -> None:
    for k in keys[:-1]:
        obj = obj[k]
    if value is _DELETE:
        del obj[keys[-1]]
    else:
        obj[keys[-1]] = value


_DELETE = object()


@pytest.mark.parametrize("name,file", _json_files())
def test_foreign_configs_with_wrong_json_types(tmp_path, models, name, file):
    good = json.loads((models[name] / file).read_text())
    outcomes = []
    for i, keys in enumerate(_json_paths(good)):
        for j, value in enumerate([_DELETE, *WRONG_JSON]):
            path = copy_model(models[name], tmp_path / f"{i}_{j}" / name)
            obj = json.loads(json.dumps(good))
            _set(obj, keys, value)
            (path / file).write_text(json.dumps(obj))
            outcomes.append(expect(lambda p=path: load_sae(p), path, valid_model))
    for k, doc in enumerate(["[]", '"cfg"', "3", "null", "{", "", '{"k": 3} trailing', "\ufeff{}"]):
        path = copy_model(models[name], tmp_path / f"doc{k}" / name)
        (path / file).write_text(doc)
        assert expect(lambda p=path: load_sae(p), path, valid_model) == "error"
    assert outcomes.count("error") > len(outcomes) // 4


TENSOR_CHANGES: dict[str, Callable[[torch.Tensor], torch.Tensor | None]] = {
    "extra_dim": lambda t: t[..., None], "drop_row": lambda t: t[:-1] if t.dim() and t.shape[0] > 1 else t[None],
    "transpose": lambda t: t.t() if t.dim() == 2 else t.reshape(-1, 1), "flat": lambda t: t.reshape(-1)[:1],
    "int32": lambda t: t.to(torch.int32), "float16": lambda t: t.half(), "bf16": lambda t: t.bfloat16(),
    "nan": lambda t: t.float().reshape(-1).index_fill(0, torch.tensor([0]), float("nan")).reshape(t.shape),
    "inf": lambda t: t.float().reshape(-1).index_fill(0, torch.tensor([0]), float("inf")).reshape(t.shape),
    "scalar": lambda t: torch.tensor(1.0), "empty": lambda t: torch.zeros(0), "remove": lambda t: None,
}
ST_MODELS = {"softsae": "model.safetensors", "saelens_topk": "sae_weights.safetensors",
             "saelens_jumprelu": "sae_weights.safetensors", "saelens_softsae": "sae_weights.safetensors",
             "sparsify": "sae.safetensors", "reference_st": ""}
PT_MODELS = {"dl_topk": "ae.pt", "dl_batchtopk": "ae.pt", "dl_softsae": "ae.pt", "reference_pt": ""}


def _change(tensors: dict, key: str, how: str) -> None:
    new = TENSOR_CHANGES[how](tensors[key])
    if new is None:
        del tensors[key]
    else:
        tensors[key] = new.contiguous()


@pytest.mark.parametrize("name", sorted({**ST_MODELS, **PT_MODELS}))
def test_model_readers_with_wrong_tensors(tmp_path, models, name):
    file = {**ST_MODELS, **PT_MODELS}[name]
    src = _target(models[name], file)
    tensors = read_st(src)[0] if name in ST_MODELS else torch.load(src, weights_only=True)
    errors = 0
    for i, key in enumerate(sorted(tensors)):
        for how in TENSOR_CHANGES:
            path = copy_model(models[name], tmp_path / f"{i}_{how}" / models[name].name)
            target = _target(path, file)
            if name in ST_MODELS:
                rewrite_st(target, change_tensors=lambda t, k=key, h=how: _change(t, k, h))
            else:
                sd = torch.load(target, weights_only=True)
                _change(sd, key, how)
                torch.save(sd, target)
            errors += expect(lambda p=path: load_sae(p), path, valid_model) == "error"
    path = copy_model(models[name], tmp_path / "extra" / models[name].name)
    if name in ST_MODELS:
        rewrite_st(_target(path, file), change_tensors=lambda t: t.update(surprise=torch.ones(3)))
        expect(lambda p=path: load_sae(p), path, valid_model)
    assert errors >= len(tensors) * 6  # shapes, dtypes, NaN and removals are refused for every tensor


def test_huge_declared_sizes_fail_fast(tmp_path, models):
    from bad_files import change_softsae_config

    for i, (d, n) in enumerate([(10**6, 10**6), (4096, 32768), (2**62, 2)]):
        path = copy_model(models["softsae"], tmp_path / f"m{i}")
        change_softsae_config(path / "model.safetensors", lambda m, d=d, n=n: m.update(d=d, n=n))
        assert expect(lambda p=path: load_sae(p), path / "model.safetensors") == "error"
    # headers declaring a huge tensor over a few bytes of data, for every safetensors reader
    header = {"W_enc": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}
    for name, file in (("saelens_topk", "sae_weights.safetensors"), ("sparsify", "sae.safetensors"),
                       ("softsae", "model.safetensors")):
        path = copy_model(models[name], tmp_path / f"h_{name}")
        raw_safetensors(path / file, header, b"\0" * 64)
        assert expect(lambda p=path: load_sae(p), path) == "error"
    big = raw_safetensors(tmp_path / "big.safetensors", {"acts": header["W_enc"]}, b"\0" * 64)
    assert expect(lambda: load_activations(big), big) == "error"
    huge_len = raw_safetensors(tmp_path / "hl.safetensors", b"{}", header_len=2**63)
    assert expect(lambda: load_activations(huge_len), huge_len) == "error"
    assert expect(lambda: load_sae(huge_len), huge_len) == "error"
    npy = tmp_path / "huge.npy"
    hdr = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000, 1000000), }"
    hdr += " " * (118 - len(hdr)) + "\n"
    npy.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr)) + hdr.encode() + b"\0" * 64)
    assert expect(lambda: load_activations(npy), npy) == "error"


def test_reference_format_numbers(tmp_path, models):
    sd = torch.load(models["reference_pt"], weights_only=True)
    errors = 0
    cases = [(k, v) for k in ("k", "k_max", "alpha", "norm_factor", "shift_factor")
             for v in (float("nan"), float("inf"), -1.0, 0.0, torch.tensor([]), torch.ones(2), "3", None, 1e30)]
    for i, (key, value) in enumerate(cases):
        bad = dict(sd)
        bad[key] = torch.tensor(value) if isinstance(value, float) else value
        if value is None:
            del bad[key]
        path = tmp_path / f"r{i}.pt"
        torch.save(bad, path)
        errors += expect(lambda p=path: load_sae(p), path, valid_model) == "error"
    assert errors >= 25


# ----------------------------------------------------------------------------- activation files


@pytest.fixture(scope="module")
def activations(tmp_path_factory) -> dict[str, Path]:
    return good_activations(tmp_path_factory.mktemp("acts"))


@pytest.mark.parametrize("kind", ["npy", "safetensors", "safetensors_bf16", "pt"])
def test_activation_files_survive_byte_mutations(tmp_path, activations, kind):
    rng = np.random.default_rng([SEED, 100 + ["npy", "safetensors", "safetensors_bf16", "pt"].index(kind)])
    good = activations[kind].read_bytes()
    outcomes = []
    for i, (how, data) in enumerate(byte_mutants(good, rng, flips=16)):
        path = tmp_path / f"m{i}{activations[kind].suffix}"
        path.write_bytes(data)
        outcomes.append((how, expect(lambda p=path: load_activations(p), path, valid_source)))
    assert all(o == "error" for how, o in outcomes if how.startswith("truncate"))


SAFETENSORS_HEADERS = {
    "negative_offset": {"acts": {"dtype": "F32", "shape": [2, 4], "data_offsets": [-16, 16]}},
    "other_tensors_bytes": {"acts": {"dtype": "F32", "shape": [50, 4], "data_offsets": [0, 32]},
                            "b": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}},
    "overlap": {"acts": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
                "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 32]}},
    "past_the_end": {"acts": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}},
    "no_dtype": {"acts": {"shape": [2, 4], "data_offsets": [0, 32]}},
    "dtype_list": {"acts": {"dtype": ["F32"], "shape": [2, 4], "data_offsets": [0, 32]}},
    "unknown_dtype": {"acts": {"dtype": "F128", "shape": [2, 4], "data_offsets": [0, 32]}},
    "shape_str": {"acts": {"dtype": "F32", "shape": "2x4", "data_offsets": [0, 32]}},
    "shape_negative": {"acts": {"dtype": "F32", "shape": [-2, -4], "data_offsets": [0, 32]}},
    "shape_float": {"acts": {"dtype": "F32", "shape": [2.0, 4], "data_offsets": [0, 32]}},
    "offsets_short": {"acts": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0]}},
    "offsets_reversed": {"acts": {"dtype": "F32", "shape": [2, 4], "data_offsets": [32, 0]}},
    "entry_list": {"acts": [1, 2]},
    "header_list": [1, 2],
    "int_dtype": {"acts": {"dtype": "I32", "shape": [2, 4], "data_offsets": [0, 32]}},
    "one_dim": {"acts": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}},
    "zero_rows": {"acts": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]}},
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_HEADERS))
def test_safetensors_activation_headers_are_checked(tmp_path, case):
    path = raw_safetensors(tmp_path / "a.safetensors", SAFETENSORS_HEADERS[case], np.ones(8, np.float32).tobytes())
    assert expect(lambda: load_activations(path), path) == "error"
    assert expect(lambda: load_activations(f"{path}:acts"), path) == "error"


def test_activation_arrays_with_wrong_contents(tmp_path):
    arrays = {"int": np.ones((4, 3), np.int64), "complex": np.ones((4, 3), np.complex64), "3d": np.ones((2, 2, 2)),
              "1d": np.ones(5, np.float32), "empty": np.zeros((0, 3), np.float32), "nan": np.full((4, 3), np.nan),
              "inf": np.full((4, 3), np.inf, np.float32), "bool": np.ones((4, 3), bool)}
    for name, arr in arrays.items():
        for kind in ("npy", "safetensors", "pt"):
            path = tmp_path / f"{name}.{kind}"
            if kind == "npy":
                np.save(path, arr)
            elif kind == "safetensors":
                if arr.dtype == np.complex64:
                    continue
                save_file({"x": torch.from_numpy(np.ascontiguousarray(arr))}, str(path))
            else:
                torch.save({"x": torch.from_numpy(arr)}, path)
            assert expect(lambda p=path: load_activations(p), path) == "error", (name, kind)
    np.savez(tmp_path / "z.npy", a=np.ones((3, 3), np.float32))
    assert expect(lambda: load_activations(tmp_path / "z.npy"), tmp_path / "z.npy") == "error"
    (tmp_path / "e.npy").write_bytes(b"")
    assert expect(lambda: load_activations(tmp_path / "e.npy"), tmp_path / "e.npy") == "error"
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert expect(lambda: load_activations(tmp_path / "list.pt"), tmp_path / "list.pt") == "error"


# ----------------------------------------------------------------------------- config files


GOOD_CONFIG = {"arch": "softsae", "dict_size": 32, "k": 4, "steps": 10, "batch_size": 64, "lr": 1e-3,
               "k_max": 8.0, "device": "cpu", "log_every": 5, "normalize": "scale", "alpha_relative": False}


def _resolves(values: dict) -> None:
    """A config file that reads is a valid TrainConfig, or fails a cross-field check with a ValueError."""
    with contextlib.suppress(ValueError):
        TrainConfig(**values).resolved(8)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_files_with_wrong_types_and_bytes(tmp_path, suffix):
    import yaml

    def dump(obj) -> str:
        return json.dumps(obj) if suffix == ".json" else yaml.safe_dump(obj)

    outcomes = []
    for i, key in enumerate(GOOD_CONFIG):
        for j, value in enumerate(WRONG_JSON):
            obj = dict(GOOD_CONFIG, **{key: value})
            path = tmp_path / f"c{i}_{j}{suffix}"
            path.write_text(dump(obj))
            outcomes.append(expect(lambda p=path: load_config(p), path, _resolves))
    assert outcomes.count("error") > len(outcomes) // 2
    rng = np.random.default_rng([SEED, 200 + (suffix == ".yaml")])
    good = dump(GOOD_CONFIG).encode()
    for i, (_, data) in enumerate(byte_mutants(good, rng, flips=20)):
        path = tmp_path / f"b{i}{suffix}"
        path.write_bytes(data)
        expect(lambda p=path: load_config(p), path, _resolves)
    for i, doc in enumerate(["[1, 2]", '"text"', "3", "{bad", "{'a': !!python/object:os.system ls}",
                             "a: &x [*x]", "{" * 5000]):
        path = tmp_path / f"d{i}{suffix}"
        path.write_text(doc)
        assert expect(lambda p=path: load_config(p), path) == "error", doc


# ----------------------------------------------------------------------------- resume state


class _StopAt(ArraySource):
    """Stops the run (an exception) at its ``at``-th sample: a checkpoint written before stays."""

    def __init__(self, data: np.ndarray, at: int) -> None:
        super().__init__(data, "stop")
        self.at, self.calls = at, 0

    def sample(self, batch_size, rng):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return super().sample(batch_size, rng)


def _cfg(**kw) -> TrainConfig:
    base = dict(arch="softsae", dict_size=N, k=3, steps=6, batch_size=16, device="cpu", progress=False,
                checkpoint_every=2, log_every=1, backend="reference")
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def state_file(tmp_path_factory) -> tuple[Path, np.ndarray]:
    out = tmp_path_factory.mktemp("state")
    data = np.random.default_rng(1).standard_normal((200, D)).astype(np.float32)
    with pytest.raises(KeyboardInterrupt):
        train(_StopAt(data, at=5), _cfg(), out_dir=out)
    assert (out / STATE_FILE).exists()
    return out / STATE_FILE, data


def _resume(path: Path, data: np.ndarray):
    """What ``train --resume`` does with the state: read it, rebuild the model, and run to the end."""
    state = load_trainer_state(path)
    model_from_state(state, path, _cfg().resolved(D))
    return train(data, _cfg(), out_dir=path.parent, resume=True)


def _state_mutations(state: dict) -> Iterator[tuple[str, dict]]:
    def copy() -> dict:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in state.items()}

    for key in state:
        s = copy()
        del s[key]
        yield f"no_{key}", s
        for value in (None, "x", [1], 1.5, -1, torch.ones(2)):
            s = copy()
            s[key] = value
            yield f"{key}={value!r}"[:40], s
    for key in state["model"]:
        for how in ("drop_row", "extra_dim", "nan", "int32", "remove"):
            s = copy()
            _change(s["model"], key, how)
            yield f"model.{key}.{how}", s
    for key in ("d", "n", "k", "k_max", "alpha", "k_hidden", "arch"):
        for value in (10**6, -1, float("nan"), "x", None):
            s = copy()
            s["model_config"] = {**state["model_config"], key: value}
            yield f"model_config.{key}={value!r}", s
    opt = state["optimizer"]
    for i in list(opt["state"])[:3]:
        for field in ("exp_avg", "exp_avg_sq"):
            for how in ("drop_row", "nan", "scalar"):
                s = copy()
                st = {j: dict(v) for j, v in opt["state"].items()}
                st[i][field] = TENSOR_CHANGES[how](st[i][field])
                s["optimizer"] = {"state": st, "param_groups": opt["param_groups"]}
                yield f"optimizer.{i}.{field}.{how}", s
    s = copy()
    s["optimizer"] = {"state": opt["state"], "param_groups": []}
    yield "optimizer.no_groups", s
    for field, value in (("tokens_since_fired", torch.zeros(3, dtype=torch.int64)),
                         ("tokens_since_fired", torch.zeros(N)), ("threshold", "x")):
        s = copy()
        s["tracker"] = {**state["tracker"], field: value}
        yield f"tracker.{field}", s
    for field, value in (("dict_size", N + 1), ("steps", 10**9), ("arch", "topk")):
        s = copy()
        s["train_config"] = {**state["train_config"], field: value}
        yield f"train_config.{field}", s
    s = copy()
    s["rng"] = {"bit_generator": "PCG64", "state": "nope"}
    yield "rng", s
    s = copy()
    s["torch_rng"] = torch.zeros(3, dtype=torch.uint8)
    yield "torch_rng", s


# valid: the position of a stream (not read for a file source); a k_max above n (the model clamps it to n),
# None for k_max / k_hidden (their defaults, 2k and n = this model's), a large alpha
BENIGN = ("no_source", "source=", "model_config.k_max=1000000", "model_config.k_max=None",
          "model_config.k_hidden=None", "model_config.alpha=1000000")


def test_resume_state_mutations(tmp_path, state_file):
    src, data = state_file
    state = torch.load(src, weights_only=True)
    accepted = []
    for i, (how, bad) in enumerate(_state_mutations(state)):
        run = tmp_path / f"s{i}"
        run.mkdir()
        torch.save(bad, run / STATE_FILE)
        if expect(lambda r=run: _resume(r / STATE_FILE, data), run / STATE_FILE, lambda res: valid_model(res.model)) \
                == "ok":
            accepted.append(how)
    assert [how for how in accepted if not how.startswith(BENIGN)] == []


def test_resume_state_byte_mutations(tmp_path, state_file):
    src, data = state_file
    rng = np.random.default_rng([SEED, 300])
    for i, (_, raw) in enumerate(byte_mutants(src.read_bytes(), rng, flips=12)):
        run = tmp_path / f"b{i}"
        run.mkdir()
        (run / STATE_FILE).write_bytes(raw)
        expect(lambda r=run: _resume(r / STATE_FILE, data), run / STATE_FILE, lambda res: valid_model(res.model))
