"""Is the run learning? Embedding statistics, and one console warning when it is not.

Two failures look alike in a loss curve that falls: the network can spread its embeddings
over the sphere without making the two views of an image agree (the regulariser wins: the
first digits recipe ended with positive pairs at cosine 0.04, random pairs at 0.00), or it
can collapse them (all embeddings alike, or confined to a few directions). Users of the
reference codes ask which one they are in (VICReg issue 14, DINO issue 246); the trainer
says it.

`embedding_health(z1, z2)` measures, on one batch of raw projector outputs:
- ``embedding_std``: the mean over dimensions of the per-dimension standard deviation of
  the normalised embeddings, against ``embedding_std_uniform`` = 1/sqrt(q), its value for
  embeddings spread uniformly on the sphere (0 when collapsed);
- ``effective_rank``: exp of the entropy of the normalised Gram eigenvalues (from the
  n x n Gram: cheap at any q), between 1 (one direction) and min(n, q);
- ``positive_cosine``: the mean cosine between the two views of the same image, and
  ``random_cosine``: between view 1 of image i and view 2 of image i + 1 (another image).

`LearningHealthWatch` looks at them after ``warmup_steps`` (the trainer passes the
learning-rate warm-up, and at least a tenth of the run) and warns once per
kind of failure, in one line with the figures, when for ``patience`` checks in a row
- the positives are no closer than random pairs: positive_cosine < random_cosine +
  ``min_alignment_gap``; or
- the embeddings collapse: embedding_std < ``min_std_ratio`` / sqrt(q), or
  effective_rank < ``min_rank_fraction`` x min(n, q) (and below 2 at least).

Distributed: local statistics of this rank's batch, no collective; the trainer logs and
warns on rank 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F


@torch.no_grad()
def embedding_health(z1: torch.Tensor, z2: Optional[torch.Tensor] = None) -> dict[str, float]:
    """The statistics of the module docstring for (n, q) views; the cosines need ``z2`` and n >= 2."""
    zn = F.normalize(z1.float(), dim=1)
    n, q = zn.shape
    eig = torch.linalg.eigvalsh((zn @ zn.T).double() / n).clamp(min=0)
    p = eig / eig.sum().clamp(min=1e-12)
    entropy = -(p * torch.log(p.clamp(min=1e-30))).sum()
    out = {"embedding_std": float(zn.std(dim=0).mean()), "embedding_std_uniform": 1.0 / math.sqrt(q),
           "effective_rank": float(torch.exp(entropy))}
    if z2 is not None and n >= 2:
        zn2 = F.normalize(z2.float(), dim=1)
        out["positive_cosine"] = float((zn * zn2).sum(1).mean())
        out["random_cosine"] = float((zn * zn2.roll(1, dims=0)).sum(1).mean())
    return out


@dataclass
class LearningHealthWatch:
    """Warns (through ``warn``) once per failure kind after ``warmup_steps``; see the module docstring."""

    warmup_steps: int
    warn: Callable[[str], None]
    min_alignment_gap: float = 0.1
    min_std_ratio: float = 0.1
    min_rank_fraction: float = 0.01
    patience: int = 3
    warned: set = field(default_factory=set)
    _streak: dict = field(default_factory=dict)

    def check(self, step: int, health: dict[str, float], batch: int) -> list[str]:
        """Update with one batch's `embedding_health`; returns the warnings issued now (each at most once)."""
        if step <= self.warmup_steps:
            return []
        q = round(1.0 / health["embedding_std_uniform"] ** 2)
        findings = {}
        if "positive_cosine" in health and \
                health["positive_cosine"] < health["random_cosine"] + self.min_alignment_gap:
            findings["no_invariance"] = (
                f"step {step}: the two views of an image are no closer than two different images "
                f"(positive-pair cosine {health['positive_cosine']:.3f}, random pairs {health['random_cosine']:.3f}): "
                "the regulariser dominates and nothing invariant is learned. Give the invariance more weight "
                "(loss.sim_coeff; for SFRIK a lower lambda = mmd_coeff q / sim_coeff) or check that the "
                "augmentations leave the two views of an image recognisably alike.")
        min_rank = max(2.0, self.min_rank_fraction * min(batch, q))
        if health["embedding_std"] < self.min_std_ratio * health["embedding_std_uniform"] or \
                health["effective_rank"] < min_rank:
            findings["collapse"] = (
                f"step {step}: the embeddings are collapsing (per-dimension std {health['embedding_std']:.2e} "
                f"against {health['embedding_std_uniform']:.2e} if spread uniformly; effective rank "
                f"{health['effective_rank']:.1f} of at most {min(batch, q)}). Lower loss.sim_coeff (raise the "
                "regulariser's weight) or the learning rate, and check that the regulariser can prevent it "
                "(SFRIK with L = 1, loss.coeffs=[b1], only centres the embeddings).")
        if "collapse" in findings:  # collapsed views are trivially as close as random pairs: say the cause
            findings.pop("no_invariance", None)
        issued = []
        for kind in ("no_invariance", "collapse"):
            self._streak[kind] = self._streak.get(kind, 0) + 1 if kind in findings else 0
            if self._streak[kind] >= self.patience and kind not in self.warned:
                self.warned.add(kind)
                self.warn(findings[kind])
                issued.append(findings[kind])
        return issued
