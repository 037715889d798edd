"""Rank selection rules and the greedy global-budget allocator."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgecomp.errors import InputError
from edgecomp.passes.rank_selection import (
    RankPolicy,
    effective_rank,
    energy_rank,
    greedy_allocate,
    l1_rank,
    parse_policy,
)


def test_effective_rank_of_flat_and_peaked_spectra():
    assert effective_rank(np.ones(10)) == pytest.approx(10.0)
    assert effective_rank([5.0, 0, 0, 0]) == pytest.approx(1.0)
    # Two equal values among zeros: exp(log 2) = 2, whatever the scale.
    assert effective_rank([3.0, 3.0, 0.0]) == pytest.approx(2.0)
    s = np.array([4.0, 2.0, 1.0, 1.0])
    p = s / s.sum()
    assert effective_rank(s) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert effective_rank(s * 1000) == pytest.approx(effective_rank(s))  # scale-free


def test_energy_and_l1_ranks():
    s = np.array([3.0, 2.0, 1.0, 1.0])  # energy 9,4,1,1 of 15; l1 3,2,1,1 of 7
    assert energy_rank(s, 0.6) == 1  # 9/15 = 0.6 exactly
    assert energy_rank(s, 0.61) == 2
    assert energy_rank(s, 1.0) == 4
    assert l1_rank(s, 3 / 7) == 1
    assert l1_rank(s, 0.5) == 2
    # l1 keeps more than energy at the same fraction: small values weigh more in Σσ than in Σσ².
    assert l1_rank(s, 0.9) >= energy_rank(s, 0.9)


@pytest.mark.parametrize(
    "text,policy",
    [
        ("erank", RankPolicy("erank", 1.0)),
        ("erank:1.5", RankPolicy("erank", 1.5)),
        ("energy:0.95", RankPolicy("energy", 0.95)),
        ("l1:0.8", RankPolicy("l1", 0.8)),
        ("ratio:0.25", RankPolicy("ratio", 0.25)),
        ("rank:16", RankPolicy("rank", 16)),
        ("ranks:fc1=4,conv/2=8", RankPolicy("ranks", ranks=(("fc1", 4), ("conv/2", 8)))),
        ("budget:params=2x", RankPolicy("budget", 2.0, budget="params")),
        ("budget:flops=3", RankPolicy("budget", 3.0, budget="flops")),
        ("budget:cosine=0.98", RankPolicy("budget", 0.98, budget="cosine")),
    ],
)
def test_parse_policy(text, policy):
    assert parse_policy(text) == policy


@pytest.mark.parametrize("text", ["", "erank:-1", "energy:1.5", "rank:0", "budget:params=0.5x", "budget:speed=2", "svd:3", "ranks:fc1"])
def test_bad_policies_are_input_errors(text):
    with pytest.raises(InputError, match="--lowrank"):
        parse_policy(text)


def test_layer_rank_rules():
    s = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    assert parse_policy("erank").layer_rank("x", s, 6) == math.ceil(effective_rank(s))
    assert parse_policy("erank:100").layer_rank("x", s, 6) == 6  # clipped to the full rank
    assert parse_policy("ratio:0.5").layer_rank("x", s, 6) == 3
    assert parse_policy("ranks:x=2").layer_rank("x", s, 6) == 2
    assert parse_policy("ranks:x=2").layer_rank("y", s, 6) is None


def test_greedy_params_budget_prefers_insensitive_layers():
    # Two layers of equal size; "robust" loses little metric when compressed, "fragile" a lot.
    ladders = {
        "robust": [(64, 1000.0, 0.0), (32, 500.0, 0.001), (16, 250.0, 0.002)],
        "fragile": [(64, 1000.0, 0.0), (32, 500.0, 0.2), (16, 250.0, 0.5)],
    }
    ranks, moves = greedy_allocate(ladders, 2000.0, parse_policy("budget:params=1.6x"))
    assert ranks == {"robust": 16}  # 2000 - 750 = 1250 ≤ 2000/1.6 without touching "fragile"
    ranks, _ = greedy_allocate(ladders, 2000.0, parse_policy("budget:params=2.5x"))
    assert ranks == {"robust": 16, "fragile": 32}


def test_greedy_metric_budget_takes_the_longest_prefix_that_measures_ok():
    ladders = {
        "a": [(8, 100.0, 0.0), (4, 50.0, 0.01)],
        "b": [(8, 100.0, 0.0), (4, 50.0, 0.03)],
    }
    measured = []

    def evaluate(ranks):  # pretend losses add up
        measured.append(dict(ranks))
        return 1.0 - 0.01 * ("a" in ranks) - 0.03 * ("b" in ranks)

    ranks, _ = greedy_allocate(ladders, 200.0, parse_policy("budget:cosine=0.975"), evaluate)
    assert ranks == {"a": 4}
    ranks, _ = greedy_allocate(ladders, 200.0, parse_policy("budget:cosine=0.95"), evaluate)
    assert ranks == {"a": 4, "b": 4}
