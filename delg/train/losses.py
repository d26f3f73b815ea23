"""DELG training losses: ArcFace cross-entropy, SupCon, attention cross-entropy, autoencoder reconstruction.

``DELGLoss(conf.loss)(out, labels)`` returns the weighted total and its parts; ``out`` is what
``DELG.forward(x, labels)`` returns for a batch that may hold several views of every image (SupCon).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from delg.errors import ProjectError

GLOBAL_LOSSES = ("ce", "supcon", "ce+supcon")


class LossConfigError(ProjectError, ValueError):
    """An unknown loss name or a bad weight; the message names the key."""


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherRows(torch.autograd.Function):
    """All ranks' (n_r, D) rows concatenated in rank order, (sum n_r, D); ranks may hold different n_r.

    Backward sums the gradient of the concatenation over ranks (every rank's loss depends on every rank's rows)
    and hands each rank the rows of its own part, so gradients reach each embedding through the rank that
    computed it, from every rank's anchors.  ``dist.all_gather`` alone carries no gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:  # type: ignore[override]
        width = max(sizes)
        pad = x.new_zeros((width, *x.shape[1:]))
        pad[: x.shape[0]] = x
        parts = [torch.empty_like(pad) for _ in sizes]
        dist.all_gather(parts, pad.contiguous())
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None


def gather_rows(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every rank's rows and labels, concatenated in rank order; gradients flow back to each rank's own rows.

    Args:
        x: (n, D) this rank's rows.
        labels: (n,) their classes.

    Returns:
        ((N, D) all rows, (N,) all labels, offset of this rank's first row in them); without a process group of
        more than one rank, ``(x, labels, 0)``.
    """
    rank, world = _world()
    if world == 1:
        return x, labels, 0
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    sizes = [int(c) for c in counts]
    all_x = _GatherRows.apply(x, sizes, rank)
    all_labels = _GatherRows.apply(labels[:, None], sizes, rank)[:, 0]
    return all_x, all_labels, sum(sizes[:rank])


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07,
                gather: bool = True) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, the "L_out" form), over the global batch under DDP.

    For each anchor ``i`` with positives ``P(i)`` (same label, not ``i``) and ``A(i)`` all samples but ``i``:
    ``l_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a in A(i)} exp(z_i.z_a / t) )``;
    the loss is the mean of ``l_i`` over anchors that have at least one positive.

    With a process group of ``W > 1`` ranks (and ``gather``), the samples are those of all ranks: this rank's
    rows are the anchors, contrasted against every rank's rows, and it returns
    ``W / (anchors with a positive, all ranks) * sum of its anchors' l_i``.  The mean of that over ranks is the
    loss of one process over the global batch, and so is the gradient once DDP has averaged it over ranks (the
    gather's backward brings each embedding the gradient of every rank's anchors).  Without gathering, an
    anchor would only see its own rank's share of the batch: fewer negatives, and positives split off to other
    ranks lost.

    Args:
        features: (N, D) descriptors (normalised here), all views stacked.
        labels: (N,) int class of every row.
        temperature: ``t``.
        gather: contrast against all ranks' rows (ignored without a process group).

    Returns:
        scalar tensor (0 with a gradient when no anchor has a positive).
    """
    z = F.normalize(features.float(), dim=1)
    n = z.shape[0]
    _, world = _world() if gather else (0, 1)
    if world > 1:
        z_all, labels_all, offset = gather_rows(z, labels)
    else:
        z_all, labels_all, offset = z, labels, 0
    logits = z @ z_all.t() / temperature  # (n, N): this rank's anchors against the global batch
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(n, device=z.device), offset + torch.arange(n, device=z.device)] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (labels[:, None] == labels_all[None, :]) & ~self_mask
    n_pos = pos.sum(1)
    has = n_pos > 0
    n_has = has.sum()
    if world > 1:
        n_has = n_has.clone()
        dist.all_reduce(n_has)  # anchors with a positive over the global batch
    if int(n_has) == 0:
        return features.sum() * 0.0
    per_anchor = -(log_prob.masked_fill(~pos, 0.0)).sum(1)[has] / n_pos[has]
    return per_anchor.sum() * world / n_has.to(per_anchor.dtype)


class DELGLoss(nn.Module):
    """Weighted sum of the configured global loss and (optionally) the local losses.

    Every weight and the temperature are checked when it is built (the trainer builds it before any work).
    Under DDP the SupCon part a rank returns is its share of the global-batch loss (see :func:`supcon_loss`):
    its mean over ranks, which the trainer logs, is the global-batch loss.
    """

    def __init__(self, conf: Mapping[str, Any]) -> None:
        super().__init__()
        from delg.config import default_schema
        from delg.settings import validate_section

        # Types and ranges by the schema (delg/settings.py); keys not given take their delg/conf/loss.yaml default.
        c = validate_section("loss", {**default_schema()["loss"], **conf}, error=LossConfigError)
        g = c["global"]
        self.use_ce = "ce" in g.split("+")
        self.use_supcon = "supcon" in g.split("+")
        self.ce_weight = float(c["ce_weight"])
        self.supcon_weight = float(c["supcon_weight"])
        self.temperature = float(c["supcon_temperature"])
        self.local = c["local"]
        self.attention_weight = float(c["attention_weight"])
        self.reconstruction_weight = float(c["reconstruction_weight"])

    @property
    def needs_two_views(self) -> bool:
        return self.use_supcon

    def forward(self, out: Mapping[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """out: ``DELG.forward`` outputs for N rows; labels (N,). Returns (total, {part: value})."""
        parts: dict[str, torch.Tensor] = {}
        if self.use_ce:
            parts["ce"] = self.ce_weight * F.cross_entropy(out["global_logits"], labels)
        if self.use_supcon:
            parts["supcon"] = self.supcon_weight * supcon_loss(out["global"], labels, self.temperature)
        if self.local:
            parts["attention"] = self.attention_weight * F.cross_entropy(out["local_logits"], labels)
            if "recon" in out:
                parts["reconstruction"] = self.reconstruction_weight * F.mse_loss(
                    out["recon"].float(), out["f16"].float()
                )
        total = torch.stack(list(parts.values())).sum()
        return total, {k: float(v.detach()) for k, v in parts.items()}
