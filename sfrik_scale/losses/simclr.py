"""SimCLR's NT-Xent loss with global negatives.

T. Chen, S. Kornblith, M. Norouzi, G. Hinton, "A simple framework for contrastive learning
of visual representations", ICML 2020. As in the SFRIK paper's comparison (official code
valeoai/sfrik, ``SimCLR`` in src/sfrik/ssl.py): temperature 0.15, negatives from the whole
global batch, both views.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import comm
from ._common import check_coeff, check_q, unit_rows, validate_views
from .spec import LossSpec, Option


class SimCLRLoss(nn.Module):
    """NT-Xent (Chen et al., 2020) over the global batch of both views.

    Every sample of both views is an anchor. For an anchor u (L2-normalised) the candidates
    are the other 2N - 1 samples of the global batch (both views): its other view v is the
    positive, the 2N - 2 others the negatives:

        l(u) = -log( exp(u.v / T) / sum_{w != u} exp(u.w / T) ),   loss = mean over anchors

    Cost: the method inherently holds the gathered (2N, q) embeddings and a (2n, 2N) logit
    block per rank.

    Args:
        temperature: T > 0; the SFRIK paper's comparison uses 0.15.
        q: if given, the embedding width the inputs must have (checked); None: any q >= 2.
        group: process group (None: the default group, or a single process).

    Shapes: z1, z2 (batch, q), raw projector outputs of this rank's shard (row i of z1 and
    of z2 are two views of one image), any float dtype (bf16/fp16 are promoted to fp32).
    The global batch must hold N >= 2 rows (else there is no negative).

    Returns: {"loss" (differentiable), "positive_sim" (mean cosine between the two views),
    "accuracy" (fraction of anchors whose positive has the largest logit)}, the last two
    detached 0-dim tensors.

    Distributed:
        Global: the candidates, gathered once with ``comm.all_gather_rows`` (differentiable;
        backward all-reduces the gradient of the gathered (2N, q) tensor and keeps this
        rank's rows). Local: the anchors are this rank's 2n samples, so "loss",
        "positive_sim" and "accuracy" are means over them; their means over ranks are the
        single-process values on the concatenated batch. Gradient convention: each rank's
        gradient on its shard, divided by world size, equals those rows of the
        single-process gradient on the concatenated batch (DeepSpeed/DDP averaging gives the
        exact single-process parameter gradients). Without a process group: a plain
        single-process loss.

    Example:
        >>> loss_fn = SimCLRLoss(temperature=0.15)
        >>> z1, z2 = torch.randn(256, 128, requires_grad=True), torch.randn(256, 128)
        >>> out = loss_fn(z1, z2)
        >>> out["loss"].backward()
    """

    local_components: tuple[str, ...] = ("loss", "positive_sim", "accuracy")

    def __init__(self, temperature: float = 0.15, q: Optional[int] = None, group: comm.Group = None) -> None:
        super().__init__()
        self.temperature = check_coeff("temperature", temperature, positive=True)
        self.q = check_q(q)
        self.group = group

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> dict[str, torch.Tensor]:
        validate_views(z1, z2, self.group, q=self.q)
        rank, world = comm.rank_and_world(self.group)
        n = z1.shape[0]
        if n * world < 2:  # shapes agree on all ranks here, so every rank raises alike
            raise ValueError(f"NT-Xent needs a global batch of at least 2 rows (negatives), got "
                             f"N={n * world} (z1 of shape {tuple(z1.shape)})")
        anchors = torch.cat([unit_rows(z1), unit_rows(z2)])  # (2n, q): [view 1; view 2]
        # Gathered in rank order, each rank contributing its [view 1; view 2] block of 2n rows.
        candidates = comm.all_gather_rows(anchors, self.group)  # (2N, q)
        logits = anchors @ candidates.T / self.temperature  # (2n, 2N)

        local = torch.arange(2 * n, device=z1.device)
        self_index = rank * 2 * n + local
        positive_index = rank * 2 * n + (local + n) % (2 * n)
        is_self = F.one_hot(self_index, num_classes=logits.shape[1]).bool()
        logits = logits.masked_fill(is_self, float("-inf"))
        loss = F.cross_entropy(logits, positive_index)

        with torch.no_grad():
            positive_sim = (anchors[:n] * anchors[n:]).sum(dim=1).mean()
            accuracy = (logits.argmax(dim=1) == positive_index).to(logits.dtype).mean()
        return {"loss": loss, "positive_sim": positive_sim, "accuracy": accuracy}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, q={self.q}"


SPEC = LossSpec(
    name="simclr", cls=SimCLRLoss, display="SimCLR", summary="NT-Xent with global negatives (Chen et al., 2020)",
    options=(Option("temperature", float, 0.15, "SimCLR temperature (> 0).", minimum=0.0, strict=True),))
