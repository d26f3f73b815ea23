"""DELG training losses: ArcFace cross-entropy, SupCon, attention cross-entropy, autoencoder reconstruction.

``DELGLoss(conf.loss)(out, labels)`` returns the weighted total and its parts; ``out`` is what
``DELG.forward(x, labels)`` returns for a batch that may hold several views of every image (SupCon).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from delg.errors import ProjectError

GLOBAL_LOSSES = ("ce", "supcon", "ce+supcon")


class LossConfigError(ProjectError, ValueError):
    """An unknown loss name or a bad weight; the message names the key."""


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, the "L_out" form).

    For each anchor ``i`` with positives ``P(i)`` (same label, not ``i``) and ``A(i)`` all samples but ``i``:
    ``l_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a in A(i)} exp(z_i.z_a / t) )``;
    the loss is the mean of ``l_i`` over anchors that have at least one positive.

    Args:
        features: (N, D) descriptors (normalised here), all views stacked.
        labels: (N,) int class of every row.
        temperature: ``t``.

    Returns:
        scalar tensor (0 with a gradient when no anchor has a positive).
    """
    z = F.normalize(features.float(), dim=1)
    n = z.shape[0]
    logits = z @ z.t() / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not bool(has.any()):
        return features.sum() * 0.0
    per_anchor = -(log_prob.masked_fill(~pos, 0.0)).sum(1)[has] / n_pos[has]
    return per_anchor.mean()


class DELGLoss(nn.Module):
    """Weighted sum of the configured global loss and (optionally) the local losses."""

    def __init__(self, conf: Mapping[str, Any]) -> None:
        super().__init__()
        g = str(conf.get("global", "ce"))
        if g not in GLOBAL_LOSSES:
            raise LossConfigError(f"loss.global: unknown loss '{g}'; valid: {', '.join(GLOBAL_LOSSES)}")
        self.use_ce = "ce" in g.split("+")
        self.use_supcon = "supcon" in g.split("+")
        self.ce_weight = float(conf.get("ce_weight", 1.0))
        self.supcon_weight = float(conf.get("supcon_weight", 1.0))
        self.temperature = float(conf.get("supcon_temperature", 0.07))
        if self.temperature <= 0:
            raise LossConfigError(f"loss.supcon_temperature must be > 0, got {self.temperature}")
        self.local = bool(conf.get("local", True))
        self.attention_weight = float(conf.get("attention_weight", 1.0))
        self.reconstruction_weight = float(conf.get("reconstruction_weight", 10.0))

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
