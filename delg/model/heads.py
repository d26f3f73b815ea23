"""DELG heads: GeM + whitening (global), ArcFace margin classifier, attention + autoencoder (local)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GeM(nn.Module):
    """Generalised-mean pooling with a learnable exponent ``p`` (shape (1,), as in pycls DELG's ``head.pool.p``)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C); computed in float32 (x^p overflows in fp16)."""
        p = self.p.float()
        x = x.float().clamp(min=self.eps).pow(p)
        return x.mean(dim=(-2, -1)).pow(1.0 / p)


class GlobalHead(nn.Module):
    """GeM pooling then a whitening FC (``fc``, with bias). L2 normalisation is done by the caller."""

    def __init__(self, in_dim: int, out_dim: int, p: float = 3.0) -> None:
        super().__init__()
        self.pool = GeM(p)
        self.fc = nn.Linear(in_dim, out_dim, bias=True)

    def forward(self, f32: torch.Tensor, whiten: bool = True) -> torch.Tensor:
        """(B, C32, h, w) -> (B, out_dim) if ``whiten`` else (B, C32); not normalised."""
        g = self.pool(f32)
        return self.fc(g.to(self.fc.weight.dtype)) if whiten else g

    @torch.no_grad()
    def init_pca(self, desc: torch.Tensor, power: float = 0.0) -> None:
        """Set the whitening FC to the centred PCA projection of ``desc`` (N, C32) GeM descriptors
        (:func:`pca_projection`): training then starts from the off-the-shelf descriptor, centred and reduced to
        ``out_dim``, instead of a random projection."""
        w, b = pca_projection(desc, self.fc.out_features, power)
        self.fc.weight.copy_(w.to(self.fc.weight))
        self.fc.bias.copy_(b.to(self.fc.bias))


@torch.no_grad()
def pca_projection(desc: torch.Tensor, out_dim: int, power: float = 0.0,
                   eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """A centred PCA projection learned from descriptors (the "learned whitening" of Radenovic et al., without
    pairs): ``y = W (x - mean)`` with ``W = diag(lambda^-power) U^T`` (``U`` the principal directions).

    With ``power=0`` the rows of ``W`` are orthonormal, so cosine similarities of centred descriptors are kept
    up to the dropped (least-variance) directions; ``power=0.5`` is full whitening.  When ``out_dim`` exceeds the
    rank of the data, the extra rows are an orthonormal basis of the null space (eigenvalue clamped to ``eps``
    relative to the largest before the power is taken).

    Args:
        desc: (N, C) descriptors (GeM outputs, not normalised); float.
        out_dim: D <= C, rows of the projection.
        power: eigenvalue exponent (0 = rotation/projection only, 0.5 = whitening).
        eps: relative floor of the eigenvalues (only matters with ``power > 0``).

    Returns:
        ``weight`` (D, C) and ``bias`` (D,) float32 such that ``weight @ x + bias = W (x - mean)``.
    """
    x = desc.double()
    n, c = x.shape
    if out_dim > c:
        raise ValueError(f"pca_projection: out_dim {out_dim} > descriptor size {c}")
    mean = x.mean(0)
    xc = x - mean
    cov = xc.t() @ xc / max(n - 1, 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(evals, descending=True, stable=True)
    evals, evecs = evals[order].clamp(min=0), evecs[:, order]
    u = evecs[:, :out_dim].t()  # (D, C), orthonormal rows
    lam = evals[:out_dim].clamp(min=float(evals[0]) * eps + 1e-12)
    weight = u * lam.pow(-float(power))[:, None] if power else u
    bias = -(weight @ mean)
    return weight.float(), bias.float()


class ArcFace(nn.Module):
    """Additive angular margin classifier (Deng et al. 2019): logits ``s * cos(theta + m)`` for the target class.

    Without labels it returns ``s * cos(theta)`` (no margin), which is what accuracy is measured on.
    """

    def __init__(self, in_dim: int, num_classes: int, margin: float = 0.15, scale: float = 30.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))
        nn.init.normal_(self.weight, std=0.01)
        self.margin, self.scale = float(margin), float(scale)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, D), labels (B,) int64 -> logits (B, num_classes), float32."""
        cos = F.linear(F.normalize(x.float(), dim=-1), F.normalize(self.weight.float(), dim=-1)).clamp(-1, 1)
        if labels is None:
            return cos * self.scale
        m = self.margin
        target = cos.gather(1, labels[:, None])
        sin = (1.0 - target.pow(2)).clamp(min=0).sqrt()
        with_margin = target * math.cos(m) - sin * math.sin(m)
        # Beyond theta = pi - m, cos(theta + m) stops decreasing; use the usual linear extension there.
        with_margin = torch.where(target > math.cos(math.pi - m), with_margin, target - math.sin(math.pi - m) * m)
        return cos.scatter(1, labels[:, None], with_margin) * self.scale

    @torch.no_grad()
    def init_from_means(self, desc: torch.Tensor, labels: torch.Tensor) -> None:
        """Imprint the class weights: row ``k`` = mean of the L2-normalised ``desc`` (N, D) of class ``k``
        (labels (N,) int64); classes without a sample keep their weights.  CE then starts from a sensible
        classifier and its first gradients refine the descriptor instead of chasing random class centres."""
        dev = self.weight.device
        z, labels = F.normalize(desc.float().to(dev), dim=-1), labels.long().to(dev)
        sums = torch.zeros(self.num_classes, z.shape[1], dtype=z.dtype, device=dev).index_add_(0, labels, z)
        has = torch.bincount(labels, minlength=self.num_classes) > 0
        self.weight[has] = F.normalize(sums[has], dim=-1).to(self.weight)


class LocalHead(nn.Module):
    """DELG local head on the (detached) stride-16 map.

    ``arch='delg'`` (Cao et al. 2020): an autoencoder ``encoder`` (C -> d, the local descriptor) / ``decoder``
    (d -> C, ReLU for ResNet); attention (``att_conv1`` C -> hidden, BN, ReLU, ``att_conv2`` -> 1, softplus) on
    ``attention_input``: ``'block3'`` the stride-16 map itself, as DELG (its TF code calls the attention on block 3
    with the reconstruction as the pooled target), or ``'recon'`` the reconstruction (what this project's code did
    before; checkpoints written then keep it, see ``DELG.meta``); the attention classifier pools
    ``attention * normalise(reconstruction)`` either way.
    ``arch='pycls'`` (the PyTorch DELG checkpoints): no autoencoder; ``att_conv1`` + BN is the reduction to the
    descriptor (``d = hidden``), attention on its ReLU, the classifier pools ``attention * descriptor``.
    """

    def __init__(self, in_dim: int, local_dim: int, hidden: int = 512, arch: str = "delg",
                 recon_relu: bool = True, attention_input: str = "block3") -> None:
        super().__init__()
        if attention_input not in ("block3", "recon"):
            raise ValueError(f"local head attention_input must be block3 or recon, got {attention_input!r}")
        # Both variants have the same tensor shapes (att_conv1 takes C channels), so a checkpoint cannot tell them
        # apart: the choice is stored in the checkpoint meta.
        self.attention_input = attention_input
        # ResNet stride-16 maps are post-ReLU (>= 0); EfficientNet's end in a linear projection (signed), so
        # the reconstruction is only rectified where the target is.
        self.recon_relu = recon_relu
        if arch not in ("delg", "pycls"):
            raise ValueError(f"local head arch must be delg or pycls, got {arch!r}")
        self.arch = arch
        if arch == "pycls":
            local_dim = hidden
        else:
            self.encoder = nn.Conv2d(in_dim, local_dim, 1)
            self.decoder = nn.Conv2d(local_dim, in_dim, 1)
        self.att_conv1 = nn.Conv2d(in_dim, hidden, 1)
        self.att_bn = nn.BatchNorm2d(hidden)
        self.att_conv2 = nn.Conv2d(hidden, 1, 1)
        self.local_dim = local_dim
        self.pooled_dim = in_dim if arch == "delg" else hidden

    def forward(self, f16: torch.Tensor) -> dict[str, torch.Tensor]:
        """f16 (B, C, h, w) -> dict:

        ``local`` (B, d, h, w) L2-normalised descriptors; ``attention`` (B, 1, h, w) softplus scores;
        ``pooled`` (B, pooled_dim) attention-weighted mean (classifier input); ``recon`` (B, C, h, w) or absent.
        """
        out: dict[str, torch.Tensor] = {}
        if self.arch == "delg":
            enc = self.encoder(f16)
            recon = self.decoder(enc)
            if self.recon_relu:
                recon = F.relu(recon)
            att_in = f16 if self.attention_input == "block3" else recon
            a = self.att_conv2(F.relu(self.att_bn(self.att_conv1(att_in))))
            att = F.softplus(a)
            out["local"] = F.normalize(enc, dim=1)
            out["recon"] = recon
            out["pooled"] = (att * F.normalize(recon, dim=1)).mean(dim=(-2, -1))
        else:
            h = self.att_bn(self.att_conv1(f16))
            att = F.softplus(self.att_conv2(F.relu(h)))
            out["local"] = F.normalize(h, dim=1)
            out["pooled"] = (att * out["local"]).mean(dim=(-2, -1))
        out["attention"] = att
        return out
