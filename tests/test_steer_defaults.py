"""The default CLI pipeline (train -> search -> apply) on the tiny model: the search's guard is on
unless ``--guard 0``, and what it records is what ``--steer VEC`` / ``steer:VEC`` apply."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tokensteer.cli import app
from tokensteer.steering import Pair, PairSet, load_vector, save_vector, train_vector
from tokensteer.steering.apply import SteerGuard, controls_for, steer_from_spec
from tokensteer.steering.cli import DEFAULT_AIM, DEFAULT_GUARD

PAIRS = PairSet("toy", tuple(Pair(p, n) for p, n in [
    ("good great happy kind", "bad awful sad rude"), ("the cat is happy", "the cat is sad"),
    ("a great day", "an awful day"), ("hello good world", "hello bad world")]), "test")
QUICK = ("--backend", "torch", "--prompts", "2", "--tokens", "2", "--bisect-steps", "0", "--factor", "100",
         "--kl-max", "100", "--min-distinct", "0", "--max-strength", "0.2", "--layers", "1")


@pytest.fixture()
def vec_file(tiny, tmp_path):
    return save_vector(train_vector(tiny, PAIRS, "diffmean", layers=[1]), tmp_path / "v.safetensors")


def search(tiny_dir, vec, *extra):
    r = CliRunner().invoke(app, ["steer", "search", str(vec), "--model", str(tiny_dir), *QUICK, *extra])
    assert r.exit_code == 0, r.output
    return load_vector(vec).meta["recommended"]


def test_default_search_is_guarded_and_the_file_applies_its_guard(tiny, tiny_dir, vec_file):
    rec = search(tiny_dir, vec_file)
    assert rec["guard"] == DEFAULT_GUARD and rec["criteria"]["guard"] == DEFAULT_GUARD
    # the estimate of the perplexity ratio is held to the aim, a margin below the budget
    assert rec["criteria"]["aim"] == DEFAULT_AIM < rec["criteria"]["factor"] and rec["criteria"]["confidence"] == 0.5
    s = steer_from_spec(str(vec_file), tiny)
    assert s.guard == DEFAULT_GUARD and s.strength == rec["strength"]
    assert any(isinstance(c, SteerGuard) and c.p == DEFAULT_GUARD for c in controls_for([s]))
    assert steer_from_spec(f"{vec_file}:0.1:guard=0.9", tiny).guard == 0.9  # an explicit guard still wins


def test_guard_zero_searches_without_a_guard(tiny, tiny_dir, vec_file):
    rec = search(tiny_dir, vec_file, "--guard", "0")
    assert rec["guard"] is None
    assert not any(isinstance(c, SteerGuard) for c in controls_for([steer_from_spec(str(vec_file), tiny)]))


@pytest.mark.parametrize("bad", ["-0.1", "1.5", "nan"])
def test_bad_guard_is_a_one_line_user_error(tiny_dir, vec_file, bad):
    r = CliRunner().invoke(app, ["steer", "search", str(vec_file), "--model", str(tiny_dir), *QUICK, "--guard", bad])
    assert r.exit_code == 2 and "--guard" in r.output and "Traceback" not in r.output
