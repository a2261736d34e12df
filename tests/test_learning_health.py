"""Tests of sfrik_scale.learning_health: embedding statistics and the once-only console warnings."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sfrik_scale.learning_health import LearningHealthWatch, embedding_health


def test_statistics_match_their_definitions_in_float64():
    torch.manual_seed(0)
    z1, z2 = torch.randn(32, 64, dtype=torch.float64), torch.randn(32, 64, dtype=torch.float64)
    h = embedding_health(z1, z2)
    u1, u2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    assert h["positive_cosine"] == pytest.approx(sum(float(u1[i] @ u2[i]) for i in range(32)) / 32, abs=1e-6)
    assert h["random_cosine"] == pytest.approx(sum(float(u1[i] @ u2[i - 1]) for i in range(32)) / 32, abs=1e-6)
    assert h["embedding_std"] == pytest.approx(float(u1.std(dim=0).mean()), rel=1e-5)
    assert h["embedding_std_uniform"] == pytest.approx(1 / 8)
    eig = torch.linalg.eigvalsh(u1 @ u1.T / 32).clamp(min=0)
    p = eig / eig.sum()
    assert h["effective_rank"] == pytest.approx(math.exp(float(-(p[p > 0] * p[p > 0].log()).sum())), rel=1e-5)


def test_collapsed_embeddings_have_rank_one_and_no_spread():
    z = torch.ones(16, 32) + 1e-4 * torch.randn(16, 32)
    h = embedding_health(z, z)
    assert h["effective_rank"] < 1.1 and h["embedding_std"] < 1e-3 * h["embedding_std_uniform"] * 32


def watch(warmup=10):
    said = []
    return LearningHealthWatch(warmup_steps=warmup, warn=said.append), said


def test_orthogonal_views_warn_once_after_warmup_with_the_figures():
    w, said = watch()
    torch.manual_seed(1)
    health = embedding_health(torch.randn(64, 512), torch.randn(64, 512))  # views of nothing in common
    for step in range(1, 11):
        assert w.check(step, health, batch=64) == []  # warm-up: silent
    assert w.check(11, health, 64) == [] and w.check(12, health, 64) == []  # patience: 3 checks in a row
    assert len(w.check(13, health, 64)) == 1
    for step in range(14, 30):
        w.check(step, health, 64)
    assert len(said) == 1 and "no closer than two different images" in said[0]
    assert f"{health['positive_cosine']:.3f}" in said[0] and "step 13" in said[0]


def test_aligned_spread_embeddings_never_warn_and_a_glitch_does_not_either():
    w, said = watch(warmup=0)
    torch.manual_seed(2)
    z = torch.randn(64, 512)
    good = embedding_health(z, z + 0.3 * torch.randn(64, 512))
    bad = embedding_health(torch.randn(64, 512), torch.randn(64, 512))
    for step, h in enumerate([good, bad, bad, good, bad, good] * 5, start=1):
        w.check(step, h, 64)
    assert said == []


def test_collapse_warns_once():
    w, said = watch(warmup=0)
    collapsed = embedding_health(torch.ones(64, 512) + 1e-5 * torch.randn(64, 512), torch.ones(64, 512))
    for step in range(1, 10):
        w.check(step, collapsed, 64)
    assert len(said) == 1 and "collapsing" in said[0] and "effective rank" in said[0]
