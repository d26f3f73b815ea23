"""LoFTR verifier (method ``loftr``) on kornia's :class:`kornia.feature.LoFTR`, with per-image work cached.

LoFTR is detector-free: a ResNet-FPN backbone gives a coarse (1/8) and a fine (1/2) feature map per image, a
transformer mixes the two coarse maps (self and cross attention), dual-softmax + mutual nearest neighbours give
coarse matches, and a small fine transformer refines them to sub-pixel positions.  Only part of this depends on
the pair, so the work is split:

* :meth:`LoFTRVerifier.prepare` (once per image, cached by the reranker): load + resize through
  :mod:`loftr_tools.resize` (grayscale, long side ``loftr.long_side``, sides multiples of 8), the backbone, the
  positional encoding, and the transformer's *leading self-attention layers* (``layer_names`` starts with
  ``'self'``; a self layer before the first cross layer sees only its own image). The fine map is stored already
  zero-padded for the 5x5 window gather (a pair does not pad and copy two full fine maps again), and already
  multiplied by the fine-pixel half of ``FinePreprocess.merge_feat`` (a linear map of ``cat[window pixel, coarse
  context]``, so its pixel half can be applied once per image instead of to 25 window pixels per match).
* :meth:`LoFTRVerifier.match` / :meth:`LoFTRVerifier.match_many`: the remaining coarse layers, coarse matching,
  fine windows, fine transformer and fine matching, on cached features only. ``match_many`` batches pairs that
  share image sizes.

The result equals kornia's own per-pair ``LoFTR.forward`` (tested to 1e-3 px): the same kornia submodules run in
the same order on the same tensors; only where they run changes.  kornia 0.9's ``LoFTR.extract_features`` /
``features0``/``features1`` split caches the backbone only; here the leading self layers are cached as well.

Weights are read from a local file (``loftr.weights``), never downloaded.  Both the official zju3dv layout
(``{'state_dict': {'matcher.backbone...': ...}}``) and kornia's (with or without ``state_dict``, no prefix) load,
strictly.  See ``loftr_tools/weights/README.md`` for which file needs which ``loftr.temp_bug_fix``.

Mixed precision (``mixed_precision``, the top-level flag passed in by the registry) is used on CUDA only: the
backbone and transformers run under float16 autocast and the cache holds float16 maps; the fine matching
(soft-argmax of the heatmap, i.e. the keypoint positions) always runs in float32.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from delg.config import REPO_ROOT
from delg.errors import ProjectError
from delg.io import file_sha1
from loftr_tools.base import ImageRef, Verifier, VerifierUnavailable
from loftr_tools.resize import load_resized, scaled_long_side, to_original

DEFAULT_WEIGHTS = "loftr_tools/weights/outdoor_ds.ckpt"
# Coarse similarity matrices of a batch of pairs are (B, L, S) float32, and coarse matching holds about three of
# them at once: keep a batch under this many bytes of them (640x480 pairs: L = S = 4800, ~92 MB each).
_MAX_BATCH_SIM_BYTES = 768 * 2**20


class LoFTRCheckpointError(ProjectError, ValueError):
    """A LoFTR checkpoint cannot be used (unreadable, wrong layout, sinkhorn, missing/unexpected keys)."""


def resolve_weights(path: str | Path | None) -> Path:
    """``loftr.weights`` as an absolute path; relative paths are relative to the repository root."""
    p = Path(path or DEFAULT_WEIGHTS).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a LoFTR checkpoint, in kornia's key layout (no ``matcher.`` prefix).

    Accepts the official zju3dv layout (``{'state_dict': {'matcher.<module>...': tensor}}``, PyTorch Lightning) and
    kornia's (a plain state dict, or one under ``'state_dict'``, without the prefix).  Loaded with
    ``weights_only=True`` (no code from the file runs).

    Raises:
        LoFTRCheckpointError: unreadable file, not a state dict, or an optimal-transport (sinkhorn) model.
    """
    path = Path(path)
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises pickle/zip/runtime errors of many kinds for a bad file
        raise LoFTRCheckpointError(f"{path}: cannot read LoFTR checkpoint ({type(e).__name__}: {e})") from None
    state = raw.get("state_dict", raw) if isinstance(raw, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoFTRCheckpointError(
            f"{path}: not a LoFTR state dict (expected {{'state_dict': {{name: tensor}}}} or {{name: tensor}})"
        )
    prefixed = [k for k in state if k.startswith("matcher.")]
    # Lightning checkpoints prefix every network key with the attribute name of the matcher ('matcher.').
    out = {(k[len("matcher.") :] if prefixed else k): v for k, v in state.items()}
    if any(k.endswith("bin_score") for k in out):
        raise LoFTRCheckpointError(
            f"{path}: this is a sinkhorn (optimal transport) LoFTR checkpoint ('coarse_matching.bin_score'); kornia's "
            "LoFTR implements only dual-softmax coarse matching. Use a dual-softmax checkpoint such as the official "
            "outdoor_ds.ckpt (see loftr_tools/weights/README.md)"
        )
    return out


def kornia_config(conf: Mapping[str, Any]) -> dict[str, Any]:
    """kornia's LoFTR ``config`` for our settings: ``temp_bug_fix`` and ``match_threshold`` over kornia's defaults."""
    from kornia.feature.loftr.loftr import default_cfg

    cfg = copy.deepcopy(default_cfg)
    cfg["coarse"]["temp_bug_fix"] = bool(conf.get("temp_bug_fix", False))
    cfg["match_coarse"]["thr"] = float(conf.get("match_threshold", cfg["match_coarse"]["thr"]))
    return cfg


def build_matcher(weights: str | Path, conf: Mapping[str, Any]) -> torch.nn.Module:
    """kornia ``LoFTR`` (``pretrained=None``: nothing is downloaded) with the weights of ``weights``, in eval mode.

    Raises:
        LoFTRCheckpointError: see :func:`read_checkpoint`; also when keys are missing or unexpected (listed).
    """
    from kornia.feature import LoFTR

    state = read_checkpoint(weights)
    model = LoFTR(pretrained=None, config=kornia_config(conf))
    res = torch.nn.Module.load_state_dict(model, state, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise LoFTRCheckpointError(
            f"{weights}: checkpoint does not fit kornia's LoFTR: missing keys {list(res.missing_keys)}, "
            f"unexpected keys {list(res.unexpected_keys)}"
        )
    return model.eval()


def _windows(fine_padded: torch.Tensor, batch: torch.Tensor, ids: torch.Tensor, w_c: int, window: int, stride: int
             ) -> torch.Tensor:
    """The ``window x window`` fine windows of coarse cells ``ids`` (row-major, coarse width ``w_c``).

    Args:
        fine_padded: fine maps zero-padded by ``window // 2`` on every side, :math:`(B, C_f, H_f + 2p, W_f + 2p)`.
        batch: batch index of each cell :math:`(M,)`; ids: coarse cell indices :math:`(M,)`.

    Returns:
        :math:`(M, window^2, C_f)`, the layout of ``F.unfold(fine, window, stride=stride, padding=window // 2)``
        indexed at the cells, as kornia's ``FinePreprocess`` gathers them.
    """
    offsets = torch.arange(window, device=ids.device)
    rows = ((ids // w_c) * stride)[:, None] + offsets
    cols = ((ids % w_c) * stride)[:, None] + offsets
    win = fine_padded[batch[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (M, window, window, C)
    return win.reshape(ids.shape[0], window * window, fine_padded.shape[1])



class LoFTRVerifier(Verifier):
    """LoFTR matches on cached per-image features.  Config section ``loftr`` (``delg/conf/loftr.yaml``).

    Args:
        conf: ``weights``, ``temp_bug_fix``, ``long_side``, ``match_threshold``, ``batch_size``, and
            ``mixed_precision`` (the top-level flag; float16 autocast on CUDA only).
        device: ``'cpu'``, ``'cuda'``, ``'cuda:N'``.

    Raises:
        VerifierUnavailable: the weight file is missing (the message says where to put which file), or CUDA was
            asked for but is absent.
        LoFTRCheckpointError: the file exists but is not a usable dual-softmax LoFTR checkpoint.

    Example:
        >>> v = LoFTRVerifier({"weights": "loftr_tools/weights/outdoor_ds.ckpt"})  # doctest: +SKIP
        >>> f0, f1 = v.prepare(ref0), v.prepare(ref1)  # doctest: +SKIP
        >>> pts0, pts1 = v.match(f0, f1)  # (N, 2) float32 xy in original (cropped) pixels  # doctest: +SKIP
    """

    name = "loftr"
    default_conf: dict[str, Any] = {
        "weights": DEFAULT_WEIGHTS,
        "temp_bug_fix": False,
        "long_side": 640,
        "match_threshold": 0.2,
        "batch_size": None,
        "mixed_precision": True,
    }

    def __init__(self, conf: Mapping[str, Any] | None = None, device: torch.device | str = "cpu") -> None:
        super().__init__(conf, device)
        self.weights = resolve_weights(self.conf["weights"])
        if not self.weights.is_file():
            raise VerifierUnavailable(
                f"LoFTR weights not found at {self.weights}: put the official zju3dv LoFTR dual-softmax outdoor "
                f"checkpoint 'outdoor_ds.ckpt' (MegaDepth-trained, ~46 MB) there, or set loftr.weights=PATH "
                f"(with loftr.temp_bug_fix=true for *_new checkpoints); see loftr_tools/weights/README.md"
            )
        self.amp = bool(self.conf["mixed_precision"]) and self.device.type == "cuda"
        # Batching pairs pays on a GPU; on CPU it was measured slower (the (B, L, S) similarity matrices leave
        # the cache), so pairs go one at a time there unless batch_size is set explicitly.
        self._batch_size = int(self.conf["batch_size"] or (8 if self.device.type == "cuda" else 1))
        # The cache holds float16 maps under CUDA autocast (half the memory); float32 otherwise.
        self.feat_dtype = torch.float16 if self.amp else torch.float32
        self.matcher = build_matcher(self.weights, self.conf).to(self.device)
        cfg = self.matcher.config
        self.stride_c, self.stride_f = cfg["resolution"]
        self.window = int(cfg["fine_window_size"])
        names = list(cfg["coarse"]["layer_names"])
        # Self-attention layers before the first cross layer depend on one image only: run them in prepare.
        self.n_cached_layers = names.index("cross") if "cross" in names else len(names)
        self._weights_id = self._hash_weights()

    # ------------------------------------------------------------------------------------------------ per image
    @torch.inference_mode()
    def prepare(self, ref: ImageRef, size_factor: float = 1.0) -> dict[str, Any]:
        """Per-image features (cached by the reranker), at ``size_factor`` times ``long_side`` (see the base class).

        Returns:
            ``coarse``: coarse tokens after the positional encoding and the leading self layers
            :math:`(1, H_c W_c, C_c)` with :math:`H_c = h / 8`; ``fine``: the fine map, already multiplied by the
            fine-pixel half of ``merge_feat``, zero-padded by 2 on every side :math:`(1, C_f, h / 2 + 4, w / 2 + 4)`
            (float16 on CUDA with mixed precision, else float32);
            ``hw_c``, ``hw_f``: the coarse and fine map sizes; ``scale``: ``(sx, sy)`` from the resized image back
            to the original (cropped) image.

        Raises:
            delg.data.images.ImageReadError: unreadable image (the reranker counts and skips it).
        """
        r = load_resized(ref, scaled_long_side(self.conf["long_side"], size_factor), multiple=self.stride_c, gray=True)
        img = r.tensor(self.device, gray=True)  # (1, 1, h, w) in [0, 1]
        with torch.autocast(device_type=self.device.type, enabled=self.amp):
            feats = self.matcher.extract_features(img)
            coarse, fine = feats["coarse"], feats["fine"]
            hw_c, hw_f = tuple(coarse.shape[2:]), tuple(fine.shape[2:])
            # token-major (1, L, C), as LoFTR.forward lays out the coarse map for the transformer
            tokens = coarse.permute(0, 2, 3, 1).reshape(1, -1, coarse.shape[1]).contiguous()
            for layer in self.matcher.loftr_coarse.layers[: self.n_cached_layers]:
                tokens = layer(tokens, tokens)
            fp = self.matcher.fine_preprocess
            if fp.cat_c_feat:
                # merge_feat(cat[window, coarse]) = W_a window + W_b coarse + bias: the W_a half acts per fine
                # pixel, so it is applied once to the map here instead of to 2 x 25 window pixels per match
                w_a = fp.merge_feat.weight[:, : fp.d_model_f]
                fine = torch.einsum("oc,nchw->nohw", w_a.to(fine.dtype), fine)
        p = self.window // 2
        fine = F.pad(fine.to(self.feat_dtype), (p, p, p, p))
        return {
            "coarse": tokens.to(self.feat_dtype).contiguous(),
            "fine": fine.contiguous(),
            "hw_c": hw_c,
            "hw_f": hw_f,
            "scale": r.scale,
        }

    def feature_nbytes(self, feats: dict[str, Any]) -> int:
        """Bytes held by one image's cached tensors (each storage counted once)."""
        seen: dict[int, int] = {}
        for v in feats.values():
            if isinstance(v, torch.Tensor):
                s = v.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())

    @property
    def batch_size(self) -> int:
        """``loftr.batch_size``, or when null 8 on CUDA and 1 on CPU."""
        return self._batch_size

    # ---------------------------------------------------------------------------------------------- per pair
    def match(self, f0: dict[str, Any], f1: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """LoFTR matches ``(pts0, pts1)``, each :math:`(N, 2)` float32 xy in original (cropped) image pixels."""
        return self.match_many(f0, [f1])[0]

    def match_many(self, f0: dict[str, Any], f1s: Sequence[dict[str, Any]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Match one image against many: the same as ``[match(f0, f1) for f1 in f1s]``, batched.

        Pairs whose second images share a size run as one batch (at most ``batch_size`` pairs, and fewer when
        their coarse similarity matrices would be large; ``batch_size`` null = 8 on CUDA, 1 on CPU).
        """
        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(f1s)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, f in enumerate(f1s):
            groups.setdefault((f["hw_c"], f["hw_f"]), []).append(i)
        L = f0["coarse"].shape[1]
        for (hw_c1, _), idx in groups.items():
            per_pair = 3 * 4 * L * hw_c1[0] * hw_c1[1]
            bs = max(1, min(self.batch_size, _MAX_BATCH_SIM_BYTES // max(per_pair, 1)))
            for s in range(0, len(idx), bs):
                chunk = idx[s : s + bs]
                for i, res in zip(chunk, self._match_batch(f0, [f1s[i] for i in chunk])):
                    out[i] = res
        return [r for r in out if r is not None]

    @torch.inference_mode()
    def coarse_confidences(self, f0: dict[str, Any], f1: dict[str, Any]) -> np.ndarray:
        """Confidences :math:`(M,)` of the pair's coarse matches (mutual nearest neighbours above
        ``loftr.match_threshold``), without the fine stage; for choosing a threshold (bench/rerank_speed.py)."""
        _, _, data = self._coarse_batch(f0, [f1])
        return data["mconf"].float().cpu().numpy()

    def _coarse_batch(self, f0: dict[str, Any], f1s: list[dict[str, Any]]
                      ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """The rest of the coarse transformer and coarse matching of pairs ``(f0, f1s[b])``: ``(x0, x1, data)``
        with kornia's coarse-match entries (``b_ids``, ``i_ids``, ``j_ids``, ``mconf``, ...) in ``data``."""
        m = self.matcher
        dev, B = self.device, len(f1s)
        data: dict[str, Any] = {
            "bs": B,
            "stride_c": self.stride_c,
            "stride_f": self.stride_f,
            "hw0_c": torch.Size(f0["hw_c"]),
            "hw1_c": torch.Size(f1s[0]["hw_c"]),
            "hw0_f": torch.Size(f0["hw_f"]),
            "hw1_f": torch.Size(f1s[0]["hw_f"]),
        }
        x0 = f0["coarse"].to(dev)
        x0 = x0.expand(B, -1, -1).contiguous() if B > 1 else x0
        x1 = torch.cat([f["coarse"].to(dev) for f in f1s]) if B > 1 else f1s[0]["coarse"].to(dev)
        names = m.loftr_coarse.layer_names
        with torch.autocast(device_type=dev.type, enabled=self.amp):
            # the rest of LocalFeatureTransformer.forward (its leading self layers ran in prepare)
            for layer, name in list(zip(m.loftr_coarse.layers, names))[self.n_cached_layers :]:
                if name == "self":
                    x0, x1 = layer(x0, x0), layer(x1, x1)
                else:  # cross: image 1 attends to the *updated* image 0, as in kornia
                    x0 = layer(x0, x1)
                    x1 = layer(x1, x0)
            m.coarse_matching(x0, x1, data)
        return x0, x1, data

    @torch.inference_mode()
    def _match_batch(self, f0: dict[str, Any], f1s: list[dict[str, Any]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Pairs ``(f0, f1s[b])`` as one batch; every ``f1s[b]`` has the same map sizes."""
        m = self.matcher
        dev, B = self.device, len(f1s)
        x0, x1, data = self._coarse_batch(f0, f1s)
        with torch.autocast(device_type=dev.type, enabled=self.amp):
            b, i, j = data["b_ids"], data["i_ids"], data["j_ids"]
            if len(b) == 0:
                empty = np.zeros((0, 2), np.float32)
                return [(empty, empty) for _ in range(B)]
            # FinePreprocess on the pre-padded cached maps: image 0 is one map for the whole batch
            stride = self.stride_c // self.stride_f
            w0 = _windows(f0["fine"].to(dev), torch.zeros_like(b), i, f0["hw_c"][1], self.window, stride)
            w1 = torch.cat([
                _windows(f1s[k]["fine"].to(dev), torch.zeros_like(b[b == k]), j[b == k], f1s[k]["hw_c"][1],
                         self.window, stride)
                for k in range(B)
            ])  # b is sorted by batch index, so the per-pair gathers concatenate in order
            fp = m.fine_preprocess
            if fp.cat_c_feat:
                # the W_b half of merge_feat on the coarse context, once per match (the W_a half is in the map)
                c_win = fp.down_proj(torch.cat([x0[b, i], x1[b, j]], 0))  # (2M, C_f)
                c_win = F.linear(c_win, fp.merge_feat.weight[:, fp.d_model_f :], fp.merge_feat.bias)
                merged = torch.cat([w0, w1], 0) + c_win.unsqueeze(1)
                w0, w1 = torch.chunk(merged, 2, dim=0)
            w0, w1 = m.loftr_fine(w0, w1)
        # float32 island: the heatmap soft-argmax gives the keypoint positions
        with torch.autocast(device_type=dev.type, enabled=False):
            data["mkpts0_c"], data["mkpts1_c"] = data["mkpts0_c"].float(), data["mkpts1_c"].float()
            m.fine_matching(w0.float(), w1.float(), data)
        k0 = data["mkpts0_f"].double().cpu().numpy()
        k1 = data["mkpts1_f"].double().cpu().numpy()
        bids = data["m_bids"].cpu().numpy()
        s0 = np.asarray(f0["scale"], np.float64)
        res = []
        for k in range(B):
            sel = bids == k
            res.append((loftr_to_original(k0[sel], s0), loftr_to_original(k1[sel], f1s[k]["scale"])))
        return res

    # ----------------------------------------------------------------------------------------------- misc
    def _hash_weights(self) -> str:
        return file_sha1(self.weights, 8)

    def identity_extra(self) -> dict[str, Any]:
        # The weights' content, not their path: another checkpoint under the same name is another matcher.
        return {"weights_sha1": self._weights_id, "amp": bool(self.amp)}

    def cache_tag(self) -> str:
        """Changes with everything that changes matches: weights (content hash), sizes, threshold, precision."""
        c = self.conf
        return (f"loftr-{self.weights.stem}-{self._weights_id}-{c['long_side']}px-thr{float(c['match_threshold']):g}"
                f"-tbf{int(bool(c['temp_bug_fix']))}{'-fp16' if self.amp else ''}")


def loftr_to_original(kpts: np.ndarray, scale: np.ndarray | tuple[float, float]) -> np.ndarray:
    """kornia LoFTR keypoints of the resized image -> float32 xy pixels of the original (cropped) image.

    kornia's LoFTR keypoints put the centre of pixel (x, y) at (x + 0.5, y + 0.5) (its docstring): subtract 0.5 to
    get pixel-centre coordinates, then map with the one pixel-centre mapping :func:`loftr_tools.resize.to_original`.
    """
    return to_original(np.asarray(kpts, np.float64).reshape(-1, 2) - 0.5, scale)
