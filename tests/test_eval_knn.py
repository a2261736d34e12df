"""Tests of sfrik_scale.eval.knn: weighted kNN votes against a brute-force reference, 1 and 3 ranks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sfrik_scale.eval.common import shard_range, topk_correct
from sfrik_scale.eval.knn import knn_votes

from ._dist import run_ranks

N_BANK, N_QUERY, DIM, CLASSES = 53, 17, 8, 5
KS = (1, 3, 10, 100)


def make_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(N_BANK, DIM, generator=g, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (N_BANK,), generator=g)
    queries = torch.randn(N_QUERY, DIM, generator=g, dtype=torch.float64)
    return bank, labels, queries


def brute_force_votes(bank, labels, queries, k, temperature):
    """For every query: sort the whole bank by cosine similarity, weight the k best by exp(s / T)."""
    b = bank.numpy() / np.linalg.norm(bank.numpy(), axis=1, keepdims=True)
    q = queries.numpy() / np.linalg.norm(queries.numpy(), axis=1, keepdims=True)
    votes = np.zeros((len(q), CLASSES))
    for i, row in enumerate(q):
        sims = b @ row
        for j in np.argsort(-sims)[:k]:
            votes[i, labels[j]] += math.exp(sims[j] / temperature)
    return votes


def test_knn_votes_match_brute_force_for_every_k():
    bank, labels, queries = make_data()
    votes = knn_votes(bank, labels, queries, CLASSES, ks=KS, temperature=0.07, chunk_size=4)
    for k in KS:
        np.testing.assert_allclose(votes[k].numpy(), brute_force_votes(bank, labels, queries, k, 0.07), rtol=1e-5)


def test_k_larger_than_the_bank_counts_every_entry():
    bank, labels, queries = make_data(1)
    votes = knn_votes(bank, labels, queries, CLASSES, ks=(N_BANK, 10 * N_BANK), temperature=0.5)
    np.testing.assert_allclose(votes[10 * N_BANK].numpy(), votes[N_BANK].numpy(), rtol=1e-6)


def test_features_are_normalised_inside():
    bank, labels, queries = make_data(2)
    a = knn_votes(bank, labels, queries, CLASSES, ks=(5,))[5]
    b = knn_votes(3.0 * bank, labels, 0.5 * queries, CLASSES, ks=(5,))[5]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


def test_topk_correct_counts_hits():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 1])
    top1, top2 = topk_correct(scores, labels, (1, 2))
    assert int(top1) == 1 and int(top2) == 2
    assert int(topk_correct(scores, labels, (5,))[0]) == 3  # k > C counts every row


@pytest.mark.parametrize("bad, match", [
    (dict(ks=()), "ks must be positive"),
    (dict(temperature=0.0), "temperature"),
])
def test_knn_votes_rejects_bad_arguments(bad, match):
    bank, labels, queries = make_data()
    with pytest.raises(ValueError, match=match):
        knn_votes(bank, labels, queries, CLASSES, **bad)


def test_knn_votes_rejects_mismatched_shapes():
    bank, labels, queries = make_data()
    with pytest.raises(ValueError, match="share D"):
        knn_votes(bank, labels, queries[:, :3], CLASSES)


def _shard_worker(rank: int, world: int) -> dict:
    bank, labels, queries = make_data()
    start, stop = shard_range(N_BANK, rank, world)  # uneven blocks: 18/18/17
    votes = knn_votes(bank[start:stop], labels[start:stop], queries, CLASSES, ks=KS, temperature=0.07, chunk_size=4)
    return {k: v.numpy() for k, v in votes.items()}


@pytest.mark.distributed
def test_sharded_bank_on_three_ranks_matches_brute_force_on_every_rank():
    bank, labels, queries = make_data()
    for result in run_ranks(_shard_worker, 3):
        for k in KS:
            np.testing.assert_allclose(result[k], brute_force_votes(bank, labels, queries, k, 0.07), rtol=1e-5)
