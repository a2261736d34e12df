"""Weighted k-nearest-neighbour classification on frozen, L2-normalised features.

The protocol of Wu et al. (2018) as used by DINO and the SSL literature: the training
images (eval transform, no augmentation) form the bank; a query's k most cosine-similar
bank entries vote for their labels with weight ``exp(similarity / T)`` (T = 0.07); the
classes ranked by total vote give top-1/top-5. Evaluated for k in {10, 20, 100, 200}.

    sfrik-scale knn-eval RUN_DIR [--k 10 20 100 200] [--temperature 0.07]

Distributed: the bank stays sharded (rank r holds its block of the training set: memory
O(N D / world)); the queries (the val set) are gathered on every rank. For each chunk of
queries every rank finds the top-k among its own bank rows; the per-rank candidates
(chunk x k similarities and labels) are all-gathered and merged, so every rank ends with
the exact global top-k and identical votes. Plain collectives (no autograd). Without a
process group the bank is the whole training set.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from .. import comm
from .common import base_result, finish_result, gather_rows, topk_correct

if TYPE_CHECKING:  # the command's imports stay out of the kNN core (online evaluation, tests)
    from .session import EvalSetup

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07


def knn_votes(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
              ks: Sequence[int] = DEFAULT_KS, temperature: float = DEFAULT_TEMPERATURE,
              chunk_size: int = 1024, group=None) -> dict[int, torch.Tensor]:
    """Class votes of a weighted kNN, for each k.

    Args:
        bank: (n_local, D) this rank's bank features (normalised here).
        bank_labels: (n_local,) their labels in [0, num_classes).
        queries: (m, D) the query features, the SAME on every rank.
        num_classes: C.
        ks: neighbour counts; a k larger than the global bank counts every bank entry.
        temperature: T in exp(similarity / T).
        chunk_size: queries per similarity block (memory O(chunk x n_local)).
        group: process group (default: the world).

    Returns:
        {k: (m, C) float32 votes}; the predicted classes are the top entries of each row.

    Distributed: see the module docstring; collective over ``group`` (one all-gather of
    (chunk, max k) similarities and labels per chunk), identical results on every rank.

    Example:
        >>> votes = knn_votes(train_f, train_y, val_f, 10, ks=(20,))[20]
        >>> top1 = (votes.argmax(1) == val_y).float().mean()
    """
    if bank.ndim != 2 or queries.ndim != 2 or (bank.shape[0] and bank.shape[1] != queries.shape[1]):
        raise ValueError(f"bank (n, D) and queries (m, D) must share D, got {tuple(bank.shape)} and "
                         f"{tuple(queries.shape)}")
    if bank_labels.shape != (bank.shape[0],):
        raise ValueError(f"bank_labels must have shape ({bank.shape[0]},), got {tuple(bank_labels.shape)}")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive, got {list(ks)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _, world = comm.rank_and_world(group)
    kmax = max(ks)
    device = queries.device
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    bank_labels = bank_labels.to(device=device, dtype=torch.long)
    m = queries.shape[0]
    votes = {k: torch.zeros(m, num_classes, device=device) for k in ks}
    for start in range(0, m, chunk_size):
        q = queries[start:start + chunk_size]
        c = q.shape[0]
        sims = torch.full((c, kmax), float("-inf"), device=device)
        labels = torch.zeros((c, kmax), dtype=torch.long, device=device)
        local_k = min(kmax, bank.shape[0])
        if local_k:
            s, idx = (q @ bank.T).topk(local_k, dim=1)
            sims[:, :local_k], labels[:, :local_k] = s, bank_labels[idx]
        if world > 1:  # merge every rank's candidates into the global top-k
            all_sims = comm.all_gather_tensor(sims, group).view(world, c, kmax).permute(1, 0, 2).reshape(c, -1)
            all_labels = comm.all_gather_tensor(labels, group).view(world, c, kmax).permute(1, 0, 2).reshape(c, -1)
            sims, pos = all_sims.topk(kmax, dim=1)
            labels = all_labels.gather(1, pos)
        weights = (sims / temperature).exp()  # padding (-inf) weighs 0
        for k in ks:
            votes[k][start:start + c].scatter_add_(1, labels[:, :k], weights[:, :k])
    return votes


def run_knn_eval(setup: "EvalSetup", *, ks: Sequence[int] = DEFAULT_KS, temperature: float = DEFAULT_TEMPERATURE,
                 batch_size: int = 256, num_workers: int = 0, cache: bool = True,
                 chunk_size: int = 1024) -> dict:
    """Encode the labelled train split (the bank, sharded) and the val split, vote, write ``result.json``."""
    from .features import encoded_splits

    start = time.perf_counter()
    topo, s = setup.topo, setup
    bank, val = encoded_splits(s, batch_size=batch_size, num_workers=num_workers, cache=cache)
    queries = gather_rows(val["features"].to(topo.device))
    query_labels = gather_rows(val["labels"].to(topo.device))
    votes = knn_votes(bank["features"].to(topo.device), bank["labels"].to(topo.device), queries, s.num_classes,
                      ks=ks, temperature=temperature, chunk_size=chunk_size)
    per_k = {}
    m = max(queries.shape[0], 1)
    for k in ks:
        top1, top5 = topk_correct(votes[k], query_labels, (1, 5))
        per_k[str(k)] = {"top1": 100.0 * float(top1) / m, "top5": 100.0 * float(top5) / m}  # host sync
    headline = str(20 if 20 in ks else ks[0])
    metrics = {"top1": per_k[headline]["top1"], "top5": per_k[headline]["top5"], "k": int(headline),
               "per_k": per_k, "bank_size": s.data["labelled_images"], "queries": int(queries.shape[0])}
    s.monitor.scalars(0, {f"k{k}_top1": v["top1"] for k, v in per_k.items()} |
                      {f"k{k}_top5": v["top5"] for k, v in per_k.items()}, prefix="knn")
    result = base_result("knn", topo, s.source.to_dict(), s.data,
                         {"ks": list(ks), "temperature": temperature, "batch_size": batch_size})
    result["metrics"] = metrics
    _print_table(s.console, per_k)
    s.monitor.close()
    return finish_result(result, s.out_dir, topo, start)


def _print_table(console, per_k: dict) -> None:
    if console is None:
        return
    from rich.table import Table

    table = Table(title="weighted kNN")
    for col in ("k", "top-1 (%)", "top-5 (%)"):
        table.add_column(col, justify="right")
    for k, v in per_k.items():
        table.add_row(k, f"{v['top1']:.2f}", f"{v['top5']:.2f}")
    console.print(table)

