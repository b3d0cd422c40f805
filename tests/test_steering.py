"""Activation steering on the tiny random model: training, files, GGUF interchange, application."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokensteer as ts
from tokensteer.controls import RequestControls
from tokensteer.errors import UserError
from tokensteer.hooks import ResidualEdit
from tokensteer.steering import (
    Pair,
    PairSet,
    SteeringVector,
    export_gguf,
    import_gguf,
    load_pairs,
    load_vector,
    required_capabilities,
    save_vector,
    shipped_names,
    steer,
    steering_controls,
    train_vector,
)
from tokensteer.steering.apply import gcav_fn, dose, parse_spec
from tokensteer.steering.pairs import parse_jsonl
from tokensteer.steering.train import parse_layers, pca
from tokensteer.steering.vecfile import MISMATCH_ENV, model_signature

POS = ["good great happy kind", "the cat is happy and kind", "a great day in the park", "hello good world",
       "the dog is kind", "one happy fox", "good good great", "a kind cat sat"]
NEG = ["bad awful sad rude", "the cat is sad and rude", "an awful day in the park", "hello bad world",
       "the dog is rude", "one sad fox", "bad bad awful", "a rude cat sat"]
PAIRS = PairSet("toy", tuple(Pair(p, n) for p, n in zip(POS, NEG)), "test")


@pytest.fixture(scope="module")
def vec(tiny):
    return train_vector(tiny, PAIRS, "diffmean", layers=[1])


def greedy(lm, prompts, controls=(), n=8):
    return ts.generate(lm, prompts, controls=controls, max_tokens=n, ignore_eos=True)


# ---- pairs -------------------------------------------------------------------------------------

def test_shipped_pair_sets_have_at_least_64_pairs():
    names = shipped_names()
    assert {"sentiment", "formality", "french"} <= set(names)
    for name in names:
        ps = load_pairs(name)
        assert len(ps.pairs) >= 64, name
        assert len({p.positive for p in ps.pairs}) == len(ps.pairs)


def test_pair_file_errors_name_the_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"positive": "a", "negative": "b"}\n{"positive": "a"}\n')
    with pytest.raises(UserError, match="line 2"):
        load_pairs(str(f))
    with pytest.raises(UserError, match="shipped"):
        load_pairs("no-such-set")
    f.write_text('{"positive": "a", "negative": "b"}\n\n{"positive": "c", "negative": "d"}\n')
    assert len(load_pairs(str(f)).pairs) == 2


@given(st.lists(st.tuples(st.text(min_size=1).filter(str.strip), st.text(min_size=1).filter(str.strip)), min_size=1, max_size=8))
def test_pair_jsonl_round_trip(rows):
    text = "\n".join(json.dumps({"positive": p, "negative": n}) for p, n in rows)
    assert [(p.positive, p.negative) for p in parse_jsonl(text, "x")] == rows


# ---- training ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["diffmean", "pca", "probe"])
def test_planted_direction_is_recovered(tiny, method):
    """Plant a known direction in the tiny model's residual features of the positive side; recover it.

    Both sides hold the same texts (paired in shifted order), so the content is pure noise around
    the plant, with the spread of real hidden states.
    """
    from tokensteer.steering.train import direction, read_features

    texts = POS + NEG + [
        "the cat sat on the mat", "a quick brown fox jumps", "one two three four five", "the dog ran to the park",
        "hello world good day", "seven eight nine ten", "the lazy dog every day", "a kind dog and a rude cat",
    ]
    feats, median = read_features(tiny, texts, [0, 1])
    g = torch.Generator().manual_seed(0)
    planted = torch.randn(tiny.hidden_size, generator=g, dtype=torch.float64)
    planted /= planted.norm()
    shift = torch.roll(torch.arange(len(texts)), 5)
    for li in (0, 1):
        x = feats[:, li]
        spread = float((x - x.mean(0)).norm(dim=1).mean())
        pos, neg = x + 2 * spread * planted, x[shift]
        v = direction(method, pos, neg)
        cos = float(v @ planted)
        assert cos > (0.98 if method != "probe" else 0.9), (method, li, cos)


@pytest.mark.parametrize("method", ["diffmean", "pca", "probe"])
def test_training_is_deterministic_bit_for_bit(tiny, method):
    a = train_vector(tiny, PAIRS, method, layers=[1])
    b = train_vector(tiny, PAIRS, method, layers=[1])
    for i in a.vectors:
        assert torch.equal(a.vectors[i], b.vectors[i])
        assert torch.equal(a.probes[i], b.probes[i])
    assert a.meta["pairs"]["sha256"] == b.meta["pairs"]["sha256"]


def test_pca_is_pair_centred_and_sign_fixed():
    g = torch.Generator().manual_seed(1)
    d = torch.randn(16, dtype=torch.float64, generator=g)
    mid = torch.randn(40, 16, dtype=torch.float64, generator=g) * 5  # large offsets a global centring would see
    noise = torch.randn(40, 16, dtype=torch.float64, generator=g) * 0.1
    pos, neg = mid + d + noise, mid - d - noise
    v = pca(pos, neg)
    assert float(v @ d) / float(d.norm()) > 0.99
    assert torch.allclose(pca(neg, pos), -v)


def test_vector_is_scaled_to_median_residual_norm(vec):
    for i, u in vec.vectors.items():
        assert math.isclose(float(u.norm()), vec.meta["stats"][str(i)]["median_norm"], rel_tol=1e-5)


def test_parse_layers():
    assert parse_layers("auto", 18) is None
    assert parse_layers("6-8", 18) == [6, 7, 8]
    assert parse_layers("5,7", 18) == [5, 7]
    with pytest.raises(UserError, match="out of range"):
        parse_layers("17-18", 18)
    with pytest.raises(UserError, match="bad layer"):
        parse_layers("x", 18)


# ---- files -------------------------------------------------------------------------------------

# keys whose types load_vector checks (they are exercised by the adversarial-file tests instead)
RESERVED = ("path", "format", "format_version", "model", "recommended", "pairs", "method", "stats", "units")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**9, 10**9) | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=10,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(meta=st.dictionaries(st.text(max_size=10).filter(lambda k: k not in RESERVED), json_values, max_size=5),
       seed=st.integers(0, 2**31 - 1), layers=st.sets(st.integers(0, 30), min_size=1, max_size=4))
def test_vector_file_round_trip(tmp_path, meta, seed, layers):
    g = torch.Generator().manual_seed(seed)
    vectors = {i: torch.randn(24, generator=g) for i in layers}
    probes = {i: torch.randn(25, generator=g) for i in layers}
    path = save_vector(SteeringVector(vectors, dict(meta), probes), tmp_path / "v.safetensors")
    back = load_vector(path)
    assert set(back.vectors) == set(vectors)
    assert all(torch.equal(back.vectors[i], vectors[i]) and torch.equal(back.probes[i], probes[i]) for i in layers)
    for k, v in meta.items():
        assert back.meta[k] == v
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]  # no temp files left


def test_failed_write_leaves_old_file_intact(tmp_path, vec, monkeypatch):
    path = save_vector(vec, tmp_path / "v.safetensors")
    before = path.read_bytes()
    import safetensors.torch

    def boom(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(UserError, match="cannot write .*disk full"):  # one line on the CLI, not a traceback
        save_vector(vec, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_vector(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a file")
    with pytest.raises(UserError, match="not a readable"):
        load_vector(bad)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="without tokensteer metadata"):
        load_vector(tmp_path / "other.safetensors")


def test_metadata_records_provenance(vec, tiny):
    m = vec.meta
    assert m["model"] == model_signature(tiny)
    assert m["pairs"]["n"] == len(POS) and len(m["pairs"]["sha256"]) == 64
    assert m["method"]["name"] == "diffmean"
    assert set(m["stats"]) == {"0", "1"} and "median_norm" in m["stats"]["1"]
    assert m["recommended"]["layers"] == [1]


def test_loading_into_a_different_model_fails_clearly(vec, tiny, monkeypatch):
    monkeypatch.delenv(MISMATCH_ENV, raising=False)
    vec.check_model(tiny)
    small = SteeringVector({1: torch.zeros(16)}, {"model": {"id": "other", "hidden_size": 16}})
    with pytest.raises(UserError, match="hidden size 16"):
        small.check_model(tiny)
    other = SteeringVector(vec.vectors, {**vec.meta, "model": {**vec.meta["model"], "id": "gemma-3-270m", "config_hash": "abc"}})
    with pytest.raises(UserError, match="trained on model 'gemma-3-270m'"):
        other.check_model(tiny)
    monkeypatch.setenv(MISMATCH_ENV, "1")
    other.check_model(tiny)
    far = SteeringVector({40: torch.zeros(tiny.hidden_size)}, {})
    with pytest.raises(UserError, match="layers"):
        far.check_model(tiny)


# ---- GGUF interchange --------------------------------------------------------------------------

def test_gguf_round_trip_is_exact(vec, tmp_path):
    out = export_gguf(vec, tmp_path / "v.gguf", strength=0.37, layers=[1])
    back = import_gguf(out)
    assert set(back.vectors) == set(vec.vectors)
    for i in vec.vectors:
        assert torch.equal(back.vectors[i], vec.vectors[i])
        assert torch.equal(back.probes[i], vec.probes[i])
    assert back.meta["pairs"] == vec.meta["pairs"] and back.meta["stats"] == vec.meta["stats"]
    import gguf

    r = gguf.GGUFReader(str(out))
    names = {t.name: np.array(t.data) for t in r.tensors}
    assert list(names) == ["direction.1"]  # 0-based layer 1 is llama.cpp's direction.1
    assert np.array_equal(names["direction.1"], dose(vec.vectors[1], 0.37).numpy())  # strength folded in
    # exporting the import again gives the same tensors byte for byte
    again = export_gguf(back, tmp_path / "w.gguf", strength=0.37, layers=[1])
    assert np.array_equal(np.array(gguf.GGUFReader(str(again)).tensors[0].data), names["direction.1"])


def test_gguf_export_refuses_layer_0(vec, tmp_path):
    with pytest.raises(UserError, match="layer 0"):
        export_gguf(vec, tmp_path / "v.gguf", layers=[0])


def write_foreign_gguf(path, directions, hint="gemma3"):
    """A control vector as repeng and llama.cpp's cvector-generator write it."""
    import gguf

    w = gguf.GGUFWriter(str(path), "controlvector")
    w.add_string("controlvector.model_hint", hint)
    w.add_uint32("controlvector.layer_count", len(directions))
    for layer, d in directions.items():
        w.add_tensor(f"direction.{layer}", d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_foreign_gguf_imports_with_raw_numbers_and_same_layers(tmp_path, tiny):
    rng = np.random.default_rng(0)
    dirs = {1: rng.standard_normal(tiny.hidden_size).astype(np.float32)}
    write_foreign_gguf(tmp_path / "r.gguf", dirs)
    v = import_gguf(tmp_path / "r.gguf")
    assert v.units == "raw" and v.recommended_layers == [1] and v.recommended_strength == 1.0
    assert np.array_equal(v.vectors[1].numpy(), dirs[1])
    out = export_gguf(v, tmp_path / "again.gguf")
    import gguf

    t = gguf.GGUFReader(str(out)).tensors[0]
    assert t.name == "direction.1" and np.array_equal(np.array(t.data), dirs[1])
    # applied at strength 1 it adds exactly the raw vector, as llama.cpp would
    (e,) = steer(v).residual_edits(1, 1)
    assert e.layer == 1 and torch.equal(e.vector, torch.from_numpy(dirs[1]))


def test_repeng_in_memory_vector_converts():
    from types import SimpleNamespace

    from tokensteer.steering import from_repeng

    cv = SimpleNamespace(model_type="gemma3", directions={3: np.ones(8, dtype=np.float32), 5: np.arange(8, dtype=np.float32)})
    v = from_repeng(cv)
    assert v.layers == [3, 5] and v.units == "raw" and v.meta["model"]["id"] == "gemma3"
    assert torch.equal(v.vectors[5], torch.arange(8, dtype=torch.float32))


# ---- application -------------------------------------------------------------------------------

def test_strength_zero_is_exactly_unsteered(tiny, vec):
    prompts = ["the cat", "a quick brown fox"]
    base = greedy(tiny, prompts)
    zero = greedy(tiny, prompts, [steer(vec, 0.0)])
    for a, b in zip(base, zero):
        assert a.tokens == b.tokens and a.logprobs == b.logprobs
    # the hook path with an explicit zero vector is exact too
    class Zero(ts.Control):
        stages = frozenset({"edits"})

        def residual_edits(self, n_rows, rows_per_prompt):
            return [ResidualEdit(1, vector=torch.zeros(tiny.hidden_size))]

    for a, b in zip(base, greedy(tiny, prompts, [Zero()])):
        assert a.tokens == b.tokens and a.logprobs == b.logprobs
    strong = greedy(tiny, prompts, [steer(vec, 1.0)])
    assert any(a.logprobs != b.logprobs for a, b in zip(base, strong))


def test_per_row_strengths_match_single_runs(tiny, vec):
    prompts = ["the cat", "a quick brown fox", "hello world"]
    mixed = greedy(tiny, prompts, [steer(vec, [0.0, 0.8, -0.5])])
    for p, s, g in zip(prompts, [0.0, 0.8, -0.5], mixed):
        single = greedy(tiny, [p], [steer(vec, s)])[0]
        assert g.tokens == single.tokens
        assert np.allclose(g.logprobs, single.logprobs, atol=1e-4)


def test_several_vectors_sum_per_layer(vec):
    other = SteeringVector({i: torch.ones_like(u) for i, u in vec.vectors.items()}, {"recommended": {"layers": [1]}})
    from tokensteer.steering import Steer, SteeringControl

    ctl = SteeringControl([Steer(vec, 0.5, [1]), Steer(other, 2.0, [1]), Steer(vec, 0.25, [0])])
    edits = ctl.residual_edits(4, 2)
    assert [e.layer for e in edits] == [0, 1]
    assert torch.allclose(edits[1].vector, dose(vec.vectors[1], 0.5) + dose(other.vectors[1], 2.0))
    per_row = SteeringControl([Steer(vec, [0.5, 0.0], [1]), Steer(other, 1.0, [1])]).residual_edits(4, 2)
    assert per_row[0].vector.shape == (4, vec.hidden_size)
    assert torch.allclose(per_row[0].vector[2], other.vectors[1])


def test_generated_only_leaves_the_prompt_unsteered(tiny, vec):
    base = greedy(tiny, ["the cat sat"])[0]
    gen = greedy(tiny, ["the cat sat"], [steer(vec, 1.0, positions="generated")])[0]
    allpos = greedy(tiny, ["the cat sat"], [steer(vec, 1.0)])[0]
    assert gen.logprobs[0] == base.logprobs[0]  # first token comes from the unsteered prefill
    assert allpos.logprobs[0] != base.logprobs[0]


def test_gcav_pushes_to_the_target_probability_and_no_further():
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(16, generator=g), 0.3
    h = torch.randn(2, 5, 16, generator=g) * 3
    p0 = torch.tensor([0.9, 0.9])
    out = gcav_fn(w, b, p0)(h, None)
    p_before, p_after = torch.sigmoid(h @ w + b), torch.sigmoid(out @ w + b)
    assert bool((p_after >= 0.9 - 1e-4).all())
    keep = p_before >= 0.9
    assert torch.allclose(out[keep], h[keep])  # already there: untouched


def test_gcav_mode_runs_in_generation(tiny, vec):
    g = greedy(tiny, ["the cat"], [steer(vec, 0.95, mode="gcav")])[0]
    assert len(g.tokens) == 8
    with pytest.raises(UserError, match="target probability"):
        steer(vec, 2.0, mode="gcav")


def test_spec_parsing_and_capabilities(tmp_path, vec):
    path = str(save_vector(vec, tmp_path / "v.safetensors"))
    assert parse_spec(f"{path}:0.3:layers=0-1:at=generated") == (path, {"strength": 0.3, "layers": "0-1", "at": "generated"})
    assert parse_spec(f"{path}@0.5") == (path, {"strength": 0.5})
    assert parse_spec(path) == (path, {})
    with pytest.raises(UserError, match="bad strength"):
        parse_spec(f"{path}:strong")
    with pytest.raises(UserError, match="unknown steering option"):
        parse_spec(f"{path}:0.1:where=x")
    assert required_capabilities(RequestControls(steer=[f"{path}:0.3"])) == {"residual_add"}
    assert required_capabilities(RequestControls(steer=[f"{path}:0.3:at=generated"])) == {"residual_fn"}
    assert required_capabilities(RequestControls(steer=[f"{path}:0.9:mode=gcav"])) == {"residual_fn"}
    # llama.cpp control vectors start at layer 1: a layer-0 vector must steer `auto` to torch
    assert required_capabilities(RequestControls(steer=[f"{path}:0.3:layers=0"])) == {"residual_add", "residual_first_layer"}


def test_request_controls_build_steering(tiny, vec, tmp_path):
    path = str(save_vector(vec, tmp_path / "v.safetensors"))
    (ctl,) = steering_controls(tiny, RequestControls(steer=[f"{path}:0.5", f"{path}:0.25:layers=0"]))
    assert [s.strength for s in ctl.steers] == [0.5, 0.25]
    assert [list(s.layers) for s in ctl.steers] == [[1], [0]]
    from tokensteer.controls import build_controls

    assert len(build_controls(tiny, RequestControls(steer=[path]))) == 1


def test_eval_method_plugin(tiny, vec, tmp_path):
    path = str(save_vector(vec, tmp_path / "v.safetensors"))
    from tokensteer.eval.methods import make_method

    m = make_method(f"steer:{path}@0.4")
    c1 = m.controls(tiny, None, None)
    assert c1 is m.controls(tiny, None, None)  # one shared list: items batch together
    assert c1[0].steers[0].strength == 0.4
    assert m.needs() == {"residual_add"}


# ---- CLI ---------------------------------------------------------------------------------------

def test_cli_train_info_export_import(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from tokensteer.cli import app

    pairs = tmp_path / "p.jsonl"
    pairs.write_text("\n".join(json.dumps({"positive": p, "negative": n}) for p, n in zip(POS, NEG)))
    vec = tmp_path / "v.safetensors"
    r = CliRunner().invoke(app, ["steer", "train", "--pairs", str(pairs), "--out", str(vec), "--model", str(tiny_dir), "--layers", "1", "--method", "pca"])
    assert r.exit_code == 0, r.output
    info = json.loads(CliRunner().invoke(app, ["steer", "info", str(vec)]).stdout)
    assert info["method"]["name"] == "pca" and info["recommended"]["layers"] == [1]
    r = CliRunner().invoke(app, ["steer", "export", str(vec), "--gguf", str(tmp_path / "v.gguf"), "--strength", "0.2"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["steer", "import", str(tmp_path / "v.gguf"), "--out", str(tmp_path / "w.safetensors")])
    assert r.exit_code == 0, r.output
    assert torch.equal(load_vector(tmp_path / "w.safetensors").vectors[1], load_vector(vec).vectors[1])
    r = CliRunner().invoke(app, ["generate", "the cat", "--model", str(tiny_dir), "-n", "4", "--steer", f"{vec}:0.3", "--no-stream"])
    assert r.exit_code == 0, r.output
    for t, warned in (("0", True), ("1", False)):  # a guard with greedy decoding gets a warning to sample
        r = CliRunner().invoke(app, ["generate", "the cat", "--model", str(tiny_dir), "-n", "4", "--steer", f"{vec}:0.3:guard=0.8", "-t", t, "--no-stream"])
        assert r.exit_code == 0 and ("guard" in r.stderr and "-t 1" in r.stderr) == warned, r.output
    r = CliRunner().invoke(app, ["steer", "train", "--pairs", "nope", "--out", str(vec)])
    assert r.exit_code == 2 and "nope" in r.output
    r = CliRunner().invoke(app, ["steer", "export", str(vec), "--gguf", str(tmp_path / "x.gguf"), "--layers", "0"])
    assert r.exit_code == 2 and "layer 0" in r.output
    for bad, word in ((["--positions", "middle"], "positions"), (["--prompts", "1"], "prompts"), (["--confidence", "1.5"], "confidence"),
                      (["--min-distinct", "1.5"], "min-distinct"), (["--layer-trials", "0"], "layer-trials"), (["--aim", "0"], "aim")):
        r = CliRunner().invoke(app, ["steer", "search", str(vec), "--model", str(tiny_dir), *bad])
        assert r.exit_code == 2 and word in r.output, r.output


def test_search_records_curve_and_plot(tiny, vec, tmp_path):
    from tokensteer.sampling import SamplingConfig
    from tokensteer.steering import search as S

    cfg = SamplingConfig(max_tokens=4, temperature=1.0, seed=3, ignore_eos=True)
    scorer = lambda texts: [float("good" in t or "great" in t or "happy" in t) for t in texts]
    res = S.search(tiny, vec, scorer, prompts=["the cat", "the dog", "hello"], layers=[1], factor=1e9, kl_max=1e9,
                   probe_strength=0.5, max_strength=1.0, bisect_steps=1, cfg=cfg)
    strengths = [p.strength for p in res.curve]
    assert strengths == sorted(strengths) and strengths[0] == 0.0 and 0.25 in strengths and 1.0 in strengths
    assert res.strength in strengths[1:] and all(p.feasible for p in res.curve)
    assert all(p.kl >= 0 for p in res.curve) and res.curve[0].kl == 0.0
    assert all(0.0 <= p.distinct2 <= 1.0 for p in res.curve)  # repetition, shown beside perplexity
    S.record(vec, res)
    path = save_vector(vec, tmp_path / "v.safetensors")
    back = load_vector(path)
    assert back.recommended_strength == res.strength and back.recommended_layers == [1]
    assert len(back.meta["recommended"]["curve"]) == len(res.curve)
    png = S.plot(res, tmp_path / "v.curve.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    guarded = S.search(tiny, vec, scorer, prompts=["the cat", "the dog"], layers=[1], factor=1e9, kl_max=1e9,
                       probe_strength=0.5, max_strength=0.5, bisect_steps=0, cfg=cfg, guard=0.9)
    S.record(vec, guarded)
    assert load_vector(save_vector(vec, tmp_path / "g.safetensors")).meta["recommended"]["guard"] == 0.9
    S.record(vec, res)  # the module's shared vector goes back to its unguarded recommendation


def test_search_respects_the_coherence_bound(tiny, vec):
    from tokensteer.sampling import SamplingConfig
    from tokensteer.steering import search as S

    cfg = SamplingConfig(max_tokens=4, temperature=1.0, seed=3, ignore_eos=True)
    scorer = lambda texts: [1.0 for _ in texts]
    with pytest.raises(UserError, match=r"no strength kept the text coherent: the weakest dose, 0\.125, failed on KL .* > 1e-09"):
        S.search(tiny, vec, scorer, prompts=["the cat", "the dog"], layers=[1], factor=1e9, kl_max=1e-9,
                 probe_strength=0.5, max_strength=1.0, bisect_steps=1, cfg=cfg)


def test_repetitive_doses_fail_the_search(tiny, vec, monkeypatch):
    """Text that loops ("jewel jewel jewel") has a low perplexity; distinct-2 against the uncontrolled
    text's is what rejects it."""
    from tokensteer.sampling import SamplingConfig
    from tokensteer.steering import search as S
    from tokensteer.steering.search import Point, failed

    looping = Point(11, 0.5, 0.94, 15.0, 1.1, 1.0, True, 1.2, [11], distinct2=0.40)
    varied = Point(11, 0.25, 0.88, 15.0, 1.1, 1.0, True, 1.2, [11], distinct2=0.62)
    assert failed(varied, 0.88, 1.5, 2.0, 0.6) == []
    assert failed(looping, 0.88, 1.5, 2.0, 0.6) == ["distinct-2 0.40 < 0.6 × uncontrolled 0.88 (repetitive)"]
    assert failed(looping, 0.88, 1.5, 2.0, 0.0) == []  # 0 turns the criterion off
    assert len(failed(looping, 0.88, 1.1, 0.5, 0.6)) == 3

    cfg = SamplingConfig(max_tokens=4, temperature=1.0, seed=3, ignore_eos=True)
    kw = dict(prompts=["the cat", "the dog", "hello"], layers=[1], factor=1e9, kl_max=1e9, probe_strength=0.5,
              max_strength=1.0, bisect_steps=0, cfg=cfg)
    res = S.search(tiny, vec, lambda t: [1.0] * len(t), **kw)
    d = {p.strength: p.distinct2 for p in res.curve}
    # the same search, with the steered texts made to repeat themselves from strength 0.5 on
    real = S.evaluate_dose
    monkeypatch.setattr(S, "evaluate_dose", lambda *a, **k: (p := real(*a, **k), setattr(p, "distinct2", 0.1 if p.strength >= 0.5 else p.distinct2))[0])
    res2 = S.search(tiny, vec, lambda t: [1.0] * len(t), **kw)
    assert res.strength == 1.0 and d[0.25] >= 0.6 * d[0.0]
    assert res2.strength == 0.25 and [p.feasible for p in res2.curve if p.strength >= 0.5] == [False]
    assert res2.baseline["min_distinct"] == 0.6 and res2.baseline["distinct2"] == d[0.0]


def test_search_measures_the_eval_suites_perplexity(tiny):
    from tokensteer.eval.scorers import perplexity
    from tokensteer.steering.scoring import coherence, continuation_ids

    prompts = ["the cat", "hello", "a kind dog"]
    texts = [g.text for g in ts.generate(tiny, prompts, max_tokens=6, temperature=1.0, seed=5, ignore_eos=True)]
    texts[1] = ""  # an empty continuation is left out by both, as nan
    ours = coherence(tiny, prompts, continuation_ids(tiny, prompts, texts)).perplexity
    theirs = perplexity(tiny, prompts, texts)
    assert math.isnan(ours[1]) and math.isnan(theirs[1])
    for a, b in [(ours[0], theirs[0]), (ours[2], theirs[2])]:
        assert a == pytest.approx(b, rel=1e-4)


def test_ratio_upper_bound_is_a_deterministic_bound_on_the_ratio_of_means():
    from tokensteer.steering.scoring import ratio_upper_bound

    g = torch.Generator().manual_seed(0)
    base = (torch.rand(40, generator=g) * 20 + 5).tolist()
    steered = [b * (1.2 + 0.8 * float(torch.rand(1, generator=g))) for b in base]
    steered[3] = float("nan")  # skipped with its base partner, as the eval skips empty texts
    est, bound = ratio_upper_bound(steered, base, 0.9)
    keep = [i for i in range(40) if i != 3]
    assert est == pytest.approx(sum(steered[i] for i in keep) / sum(base[i] for i in keep))
    assert bound > est and (est, bound) == ratio_upper_bound(steered, base, 0.9)
    assert ratio_upper_bound(steered, base, 0.5) == (est, est)
    assert ratio_upper_bound(steered, base, 0.99)[1] > bound
    assert ratio_upper_bound([float("nan")], [1.0]) == (float("inf"), float("inf"))


def test_search_rejects_doses_whose_bound_exceeds_the_factor(tiny, vec):
    """With a factor between a dose's estimate and its bound, only the bound decides feasibility."""
    from tokensteer.sampling import SamplingConfig
    from tokensteer.steering import search as S

    cfg = SamplingConfig(max_tokens=4, temperature=1.0, seed=3, ignore_eos=True)
    scorer = lambda texts: [0.5 for _ in texts]
    kw = dict(prompts=["the cat", "the dog", "hello", "a bird", "one fox", "my hat"], layers=[1], kl_max=1e9,
              probe_strength=0.5, max_strength=1.0, bisect_steps=1, cfg=cfg)
    res = S.search(tiny, vec, scorer, factor=1e9, **kw)
    for p in res.curve[1:]:
        assert p.ppl_ratio_bound >= p.ppl_ratio and p.layers == [1]
    first = next(p for p in res.curve if p.strength == 0.25)  # the first dose any search tries
    assert first.ppl_ratio_bound > first.ppl_ratio
    try:
        res2 = S.search(tiny, vec, scorer, factor=(first.ppl_ratio + first.ppl_ratio_bound) / 2, **kw)
    except UserError:
        return  # every dose rejected, this one included (the estimate alone would have passed it)
    again = next(p for p in res2.curve if p.strength == 0.25)
    assert again.ppl_ratio == first.ppl_ratio and not again.feasible


def test_search_chooses_the_strongest_coherent_dose():
    from tokensteer.steering.search import Point, choose

    pt = lambda s, score, ok: Point(11, s, score, 10.0, 1.0, 0.1, ok, 1.0, [11])
    curve = [pt(0.0, 0.4, True), pt(0.0625, 0.62, True), pt(0.094, 0.79, True), pt(0.109, 0.69, True), pt(0.125, 0.85, False)]
    assert choose(curve).strength == 0.109  # a noisy dip in score does not pull the choice back
    with pytest.raises(UserError, match="no strength kept the text coherent"):
        choose([pt(0.0, 0.4, True), pt(0.125, 0.85, False)])


def test_search_prompts_are_held_out_from_the_eval_suite():
    from tokensteer.eval.tasks import get_task
    from tokensteer.steering.search_prompts import SEARCH_PROMPTS

    words = lambda s: tuple(s.lower().replace(",", "").split())
    task = get_task("sentiment-positive")
    evals = [words(it.prompt) for name in (None, "openings_dev", "openings_test") for it in task.items(name)]
    assert len(evals) > 300 and len(set(SEARCH_PROMPTS)) == len(SEARCH_PROMPTS) >= 96
    for p in map(words, SEARCH_PROMPTS):
        for e in evals:
            assert p != e and p[:5] != e[:5], (p, e)  # no copy, and no opener that paraphrases one (the old list had both)


def test_the_first_search_prompts_are_varied():
    """The search takes the first N (48 by default): they hold questions, dialogue, instructions and
    fragments short and long, not only narrative openers, as users' prompts do."""
    from tokensteer.steering.search_prompts import SEARCH_PROMPTS

    for head, k in ((SEARCH_PROMPTS[:16], 1), (SEARCH_PROMPTS[:48], 2)):  # the layer trials' share, the default
        lengths = [len(p.split()) for p in head]
        assert sum(p.startswith('"') for p in head) >= k
        assert sum(p.split()[0] in ("How", "Why", "What", "Which", "Where") for p in head) >= k
        assert min(lengths) <= 3 and max(lengths) >= 5 * k


# ---- regressions found by fuzzing (session 7) ---------------------------------------------------

def _write_raw(path, tensors, meta):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"tokensteer": json.dumps(meta)})
    return path


@pytest.mark.parametrize("case", ["rec_layers_int", "rec_layers_nested", "rec_strength_str", "rec_strength_none",
                                  "n_layers_str", "nan_vector", "inf_vector", "probe_size", "probe_2d", "probe_nan",
                                  "layer_name"])
def test_adversarial_vector_files_are_refused_in_one_line(vec, tmp_path, case):
    meta = {k: v for k, v in vec.meta.items() if k != "path"} | {"format": "tokensteer-steering-vector", "format_version": 1}
    H = vec.hidden_size
    tensors = {"layer.1": vec.vectors[1].clone(), "probe.1": vec.probes[1].clone()}
    rec = dict(meta["recommended"])
    if case == "rec_layers_int":
        meta["recommended"] = rec | {"layers": 1}
    elif case == "rec_layers_nested":
        meta["recommended"] = rec | {"layers": [[1]]}
    elif case == "rec_strength_str":
        meta["recommended"] = rec | {"strength": "x"}
    elif case == "rec_strength_none":
        meta["recommended"] = rec | {"strength": None}
    elif case == "n_layers_str":
        meta["model"] = meta["model"] | {"n_layers": "2"}
    elif case == "nan_vector":
        tensors["layer.1"][3] = float("nan")
    elif case == "inf_vector":
        tensors["layer.1"][0] = float("inf")
    elif case == "probe_size":
        tensors["probe.1"] = torch.zeros(3)
    elif case == "probe_2d":
        tensors["probe.1"] = torch.zeros(2, H + 1)
    elif case == "probe_nan":
        tensors["probe.1"] = torch.full((H + 1,), float("nan"))
    elif case == "layer_name":
        tensors["layer.01"] = -tensors["layer.1"]  # two tensors claiming layer 1
    path = _write_raw(tmp_path / "v.safetensors", tensors, meta)
    with pytest.raises(UserError, match="corrupt"):
        load_vector(path)


def _gguf(path, tensors, kv=None, raw_dtype=None):
    import gguf

    w = gguf.GGUFWriter(str(path), "controlvector")
    for k, v in (kv or {}).items():
        w.add_string(k, v) if isinstance(v, str) else w.add_array(k, v)
    for name, t in tensors.items():
        w.add_tensor(name, t, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kv", [{"tokensteer.metadata": "{"}, {"tokensteer.metadata": "[1]"},
                                {"tokensteer.metadata": "{}"},  # our metadata without the vectors it promises
                                {"tokensteer.metadata": "{}", "tokensteer.layer.1": "abc"},
                                {"tokensteer.metadata": '{"recommended": {"layers": 7}}', "tokensteer.layer.1": [0.5] * 8}])
def test_gguf_with_corrupt_tokensteer_metadata_is_refused_in_one_line(tmp_path, kv):
    path = _gguf(tmp_path / "v.gguf", {"direction.1": np.ones(8, np.float32)}, kv)
    with pytest.raises(UserError):
        import_gguf(path)


def test_gguf_with_nan_direction_is_refused(tmp_path):
    path = _gguf(tmp_path / "v.gguf", {"direction.1": np.full(8, np.nan, np.float32)})
    with pytest.raises(UserError, match="NaN"):
        import_gguf(path)


def test_quantized_gguf_direction_is_dequantized(tmp_path):
    import gguf

    z = np.random.default_rng(0).standard_normal(32).astype(np.float32)
    q = gguf.quants.quantize(z.reshape(1, 32), gguf.GGMLQuantizationType.Q8_0)
    path = _gguf(tmp_path / "q.gguf", {"direction.1": q}, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    back = import_gguf(path)
    assert back.hidden_size == 32  # not the 34 bytes of the quantized block
    assert float((back.vectors[1] - torch.from_numpy(z)).abs().max()) < 0.02


def test_pair_file_with_bom_and_unicode_line_separators(tmp_path):
    rows = [("good\u2028day", "bad\x85day"), ("kind\u2029cat", "rude cat")]
    text = "\ufeff" + "\r\n".join(json.dumps({"positive": p, "negative": n}, ensure_ascii=False) for p, n in rows)
    f = tmp_path / "p.jsonl"
    f.write_text(text, encoding="utf-8")
    assert [(p.positive, p.negative) for p in load_pairs(str(f)).pairs] == rows


@given(st.lists(st.tuples(st.text(min_size=1).filter(str.strip), st.text(min_size=1).filter(str.strip)), min_size=1, max_size=8))
def test_pair_jsonl_round_trip_unescaped(rows):
    text = "\n".join(json.dumps({"positive": p, "negative": n}, ensure_ascii=False) for p, n in rows)
    assert [(p.positive, p.negative) for p in parse_jsonl(text, "x")] == rows


def test_training_works_when_the_contrast_is_only_in_held_out_pairs(tiny):
    # pairs 0-2 carry no contrast; pair 3 (the held-out one) does: the vector is trainable
    same = [Pair(p, p) for p in POS[:3]]
    ps = PairSet("toy", (*same, Pair(POS[3], NEG[3])), "test")
    v = train_vector(tiny, ps, "diffmean", layers=[1])
    assert torch.isfinite(v.vectors[1]).all() and float(v.vectors[1].norm()) > 0


def test_train_cli_refuses_a_bad_method_or_read_before_loading_the_model(tmp_path):
    from typer.testing import CliRunner

    from tokensteer.cli import app

    for flag, value in (("--method", "PCA"), ("--read", "first")):
        r = CliRunner().invoke(app, ["steer", "train", "--pairs", "sentiment", "--out", str(tmp_path / "v.safetensors"),
                                     "--model", str(tmp_path / "no-such-model"), flag, value])
        assert r.exit_code == 2 and flag in r.output and "no-such-model" not in r.output, r.output


def test_steer_spec_paths_may_hold_colons_and_at_signs(tmp_path, vec):
    for name in ("a:b.safetensors", "c:0.5.safetensors", "x@y.safetensors", "d:ir/w.safetensors"):
        path = save_vector(vec, tmp_path / name)
        p = str(path)
        assert parse_spec(p) == (p, {})
        assert parse_spec(f"{p}:0.3") == (p, {"strength": 0.3})
        assert parse_spec(f"{p}@0.3") == (p, {"strength": 0.3})
        assert parse_spec(f"{p}:-0.2:layers=1:at=generated") == (p, {"strength": -0.2, "layers": "1", "at": "generated"})
        assert parse_spec(f"{p}@0.3:layers=1") == (p, {"strength": 0.3, "layers": "1"})


def test_vector_files_get_ordinary_permissions(tmp_path, vec):
    path = save_vector(vec, tmp_path / "v.safetensors")
    assert path.stat().st_mode & 0o777 == 0o644  # mkstemp's 0600 would hide a file meant to be shared
    out = export_gguf(vec, tmp_path / "v.gguf", strength=0.2, layers=[1])
    assert out.stat().st_mode & 0o777 == 0o644


def test_search_tries_a_max_strength_below_the_first_dose(tiny, vec):
    from tokensteer.sampling import SamplingConfig
    from tokensteer.steering import search as S

    cfg = SamplingConfig(max_tokens=3, temperature=1.0, seed=3, ignore_eos=True)
    res = S.search(tiny, vec, lambda t: [1.0] * len(t), prompts=["the cat", "the dog"], layers=[1], factor=1e9,
                   kl_max=1e9, probe_strength=0.5, max_strength=0.1, bisect_steps=0, cfg=cfg)
    assert res.strength == 0.1 and [p.strength for p in res.curve] == [0.0, 0.1]


def test_search_works_on_a_vector_without_the_middle_layers(tiny):
    from tokensteer.sampling import SamplingConfig
    from tokensteer.steering import search as S

    # like an imported llama.cpp vector: only layer 1, outside the tiny model's middle band [0]
    v = SteeringVector({1: torch.ones(tiny.hidden_size)}, {"units": "raw"})
    cfg = SamplingConfig(max_tokens=3, temperature=1.0, seed=3, ignore_eos=True)
    res = S.search(tiny, v, lambda t: [1.0] * len(t), prompts=["the cat", "the dog"], factor=1e9, kl_max=1e9,
                   max_strength=0.5, bisect_steps=0, cfg=cfg)
    assert res.layers == [1]


def test_search_without_a_way_to_score_fails_before_generating(tiny, monkeypatch):
    from tokensteer.steering import search as S

    v = SteeringVector({1: torch.ones(tiny.hidden_size)}, {"units": "raw"})
    monkeypatch.setattr("tokensteer.engine.generate", lambda *a, **k: pytest.fail("generated before refusing"))
    with pytest.raises(UserError, match="no probe weights"):
        S.search(tiny, v, prompts=["the cat", "the dog"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(alphabet="ab:@.-_ é0", min_size=1, max_size=12).filter(lambda n: n not in (".", "..")),
       strength=st.floats(-10, 10, allow_nan=False), at=st.booleans())
def test_steer_spec_finds_any_existing_file_name(tmp_path, name, strength, at):
    path = tmp_path / name
    path.write_bytes(b"")
    p = str(path)
    assert parse_spec(p) == (p, {})
    assert parse_spec(f"{p}{'@' if at else ':'}{strength!r}") == (p, {"strength": strength})
    assert parse_spec(f"{p}:{strength!r}:at=prompt") == (p, {"strength": strength, "at": "prompt"})
    path.unlink()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_steer_spec_parsing_never_crashes(spec):
    try:
        parse_spec(spec)
    except UserError:
        pass


def test_tilde_of_an_unknown_user_is_a_one_line_error(tmp_path, vec):
    from typer.testing import CliRunner

    from tokensteer.cli import app

    bad = "~no-such-user-xyz/v"
    with pytest.raises(UserError, match="cannot expand"):
        load_vector(bad + ".safetensors")
    with pytest.raises(UserError, match="cannot expand"):
        load_pairs(bad + ".jsonl")
    with pytest.raises(UserError, match="cannot expand"):
        save_vector(vec, bad + ".safetensors")
    for args in (["steer", "info", bad + ".safetensors"], ["steer", "import", bad + ".gguf", "--out", str(tmp_path / "o.safetensors")],
                 ["steer", "train", "--pairs", bad + ".jsonl", "--out", str(tmp_path / "o.safetensors")],
                 ["steer", "train", "--pairs", "sentiment", "--out", bad + ".safetensors"],
                 ["eval", "--task", "count", "--prompts", bad + ".jsonl", "--out", str(tmp_path / "e")]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and "cannot expand" in r.output, (args, r.output)
    assert not (tmp_path / "o.safetensors").exists()


def test_export_refuses_a_strength_that_generate_would_refuse(vec, tmp_path):
    for bad in (1e38, -11.0, float("nan")):  # 1e38 folded into float32 tensors gave llama.cpp infinite directions
        with pytest.raises(UserError, match="strength"):
            export_gguf(vec, tmp_path / "v.gguf", strength=bad, layers=[1])
        with pytest.raises(UserError, match="out of range"):
            steer(vec, bad)
    assert not (tmp_path / "v.gguf").exists()


def test_gcav_and_search_refuse_layers_without_a_probe(tiny, vec):
    from tokensteer.steering import search as S

    partial = SteeringVector(dict(vec.vectors), dict(vec.meta), {0: vec.probes[0]})  # no probe for layer 1
    with pytest.raises(UserError, match=r"probe weights.*\[1\]"):
        steer(partial, 0.5, layers=[1], mode="gcav")
    with pytest.raises(UserError, match="no probe weights"):
        S.search(tiny, partial, prompts=["the cat", "the dog"], layers=[1])


def test_unwritable_outputs_are_one_line_errors(tmp_path, vec, monkeypatch):
    import errno

    from tokensteer.eval.cache import atomic_write

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    with pytest.raises(UserError, match="Read-only file system"):
        save_vector(vec, tmp_path / "v.safetensors")
    with pytest.raises(UserError, match="Read-only file system"):
        export_gguf(vec, tmp_path / "v.gguf", strength=0.1, layers=[1])
    with pytest.raises(UserError, match="Read-only file system"):
        atomic_write(tmp_path / "results.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_eval_strength_sweep_keeps_the_vector_path_and_options(tmp_path, vec):
    from tokensteer.eval.methods import make_method

    at = str(save_vector(vec, tmp_path / "x@y.safetensors"))
    plain = str(save_vector(vec, tmp_path / "v.safetensors"))
    cases = {f"steer:{at}": f"steer:{at}:0.2",  # an '@' in the path is not the strength
             f"steer:{plain}@0.3": f"steer:{plain}@0.2",
             f"steer:{plain}@0.3:layers=1": f"steer:{plain}@0.2:layers=1",  # the options are kept
             f"steer:{plain}:0.3:at=generated": f"steer:{plain}:0.2:at=generated",
             f"steer:{plain}": f"steer:{plain}:0.2"}
    for spec, want in cases.items():
        assert make_method(spec).vary("strength", "0.2").name == want


# ---- guard: sample within the unsteered model's nucleus ---------------------------------------

def test_guard_keeps_every_token_in_the_unsteered_nucleus(tiny, vec):
    """With guard p, each generated token lies in the top-p nucleus of the *unsteered* model at
    that point (checked by teacher-forcing a plain session); without it, strong steering leaves it."""
    from tokensteer.sampling import nucleus_mask
    from tokensteer.steering.apply import Steer, controls_for

    prompts = ["the cat", "a quick brown fox", "hello"]

    def outside(gens, p):
        s = tiny.session(())
        lp = torch.log_softmax(s.prefill([tiny.tokenizer.encode(q) for q in prompts]), -1)
        n = 0
        for t in range(6):
            tok = torch.tensor([g.tokens[t] for g in gens])
            n += int((~nucleus_mask(lp, p).gather(1, tok[:, None])).sum())
            lp = torch.log_softmax(s.step(tok), -1)
        s.close()
        return n

    for seed in range(3):
        kw = dict(max_tokens=6, ignore_eos=True, temperature=1.0, seed=seed)
        guarded = ts.generate(tiny, prompts, controls=controls_for([Steer(vec, 3.0, guard=0.5)]), **kw)
        assert outside(guarded, 0.5) == 0
    free = [ts.generate(tiny, prompts, controls=controls_for([Steer(vec, 3.0)]), max_tokens=6, ignore_eos=True, temperature=1.0, seed=s)
            for s in range(3)]
    assert sum(outside(g, 0.5) for g in free) > 0  # the test can fail: unguarded steering does leave it


def test_guard_of_one_changes_nothing_and_specs_carry_it(tiny, vec, tmp_path):
    from tokensteer.steering.apply import Steer, SteerGuard, controls_for

    prompts = ["the cat", "hello"]
    a = greedy(tiny, prompts, controls_for([Steer(vec, 1.0)]))
    b = greedy(tiny, prompts, controls_for([Steer(vec, 1.0, guard=1.0)]))
    assert [g.tokens for g in a] == [g.tokens for g in b]
    path = str(save_vector(vec, tmp_path / "v.safetensors"))
    assert parse_spec(f"{path}:0.3:guard=0.8") == (path, {"strength": 0.3, "guard": 0.8})
    for bad in ("guard=x", "guard=0", "guard=1.5", "guard=nan"):
        with pytest.raises(UserError, match="guard"):
            steering_controls(tiny, RequestControls(steer=[f"{path}:0.3:{bad}"]))
    ctls = steering_controls(tiny, RequestControls(steer=[f"{path}:0.3:guard=0.9", f"{path}:0.1:guard=0.7"]))
    assert isinstance(ctls[-1], SteerGuard) and ctls[-1].p == 0.7  # the tightest guard
    saved = vec.meta.get("recommended")
    vec.meta["recommended"] = {"layers": [1], "strength": 0.2, "guard": 0.8}  # as a guarded search records it
    try:
        path = str(save_vector(vec, tmp_path / "g.safetensors"))
        ctls = steering_controls(tiny, RequestControls(steer=[path]))
        assert isinstance(ctls[-1], SteerGuard) and ctls[-1].p == 0.8
    finally:
        if saved is None:
            vec.meta.pop("recommended")
        else:
            vec.meta["recommended"] = saved
