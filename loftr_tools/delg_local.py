"""DELG-local (method ``delg``): the DELG paper's reranking baseline on the stored local descriptors.

Reads the feature stores written by ``delg.extract`` through :class:`delg.store.FeatureStore` (one group per image:
``keypoints`` (N, 2) xy in pixels of the extracted, i.e. cropped, image, ``descriptors`` (N, d), ``scores``;
file attribute ``model_meta`` (JSON) with ``trained_local``). Matching follows DELG: each query descriptor's nearest
database descriptor is kept if their L2 distance is below ``delg_local.distance_threshold`` (optionally only mutual
nearest neighbours); the shared RANSAC (``loftr_tools.ransac``) then counts inliers. No image is decoded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from delg.data.images import ImageReadError
from delg.store import FeatureStore, StoreError
from loftr_tools.base import ImageRef, Verifier, VerifierUnavailable

log = logging.getLogger(__name__)

UNTRAINED_MSG = ("the DELG local head of this model is untrained; give model.checkpoint=... "
                 "(a DELG checkpoint with a trained attention/autoencoder head) and re-extract")


class DelgLocalVerifier(Verifier):
    """Nearest-neighbour matching of stored DELG local descriptors. Config section ``delg_local``.

    Args:
        conf: the ``delg_local`` section.
        device: unused (matching is a small CPU matrix product).
        stores: ``{'query': Path, 'db': Path}`` feature store files (one file for both is fine).
        on_demand: local features of images the db store does not hold (the distractors, stored with globals
            only): ``covers(name) -> bool`` and ``read_local(name)`` like :meth:`FeatureStore.read_local`, extracting
            them on first use (:class:`delg.extract.OnDemandLocals`).
    """

    name = "delg"
    reads_store = True  # features come from the query or db store by ref.key, not from the image file
    default_conf: dict[str, Any] = {
        "distance_threshold": 1.0,
        "mutual": False,
        "max_keypoints": 1000,
    }

    def __init__(
        self,
        conf: Mapping[str, Any] | None = None,
        device: torch.device | str = "cpu",
        stores: Mapping[str, str | Path] | None = None,
        on_demand: Any = None,
    ) -> None:
        super().__init__(conf, device)
        self.on_demand = on_demand
        if not stores or "query" not in stores or "db" not in stores:
            raise VerifierUnavailable("delg verifier needs stores={'query': <query store .h5>, 'db': <db store .h5>} "
                                      "(run delg.extract first)")
        self.paths = {k: Path(stores[k]) for k in ("query", "db")}
        self._stores: dict[str, FeatureStore] = {}
        for which, p in self.paths.items():
            meta = self._store(which).model_meta
            trained = (meta or {}).get("trained_local")
            if trained is None:
                log.warning("%s: the model meta does not say whether the local head is trained; assuming it is", p)
            elif not bool(trained):
                raise VerifierUnavailable(f"{p}: {UNTRAINED_MSG}")

    def _store(self, which: str) -> FeatureStore:
        if which not in self._stores:
            p = self.paths[which]
            if not p.is_file():
                raise VerifierUnavailable(f"{p}: feature store not found (run delg.extract first)")
            self._stores[which] = FeatureStore(p, "r")
        return self._stores[which]

    def close(self) -> None:
        """Close the feature store files."""
        for st in self._stores.values():
            st.close()
        self._stores.clear()

    def prepare(self, ref: ImageRef, size_factor: float = 1.0) -> dict[str, np.ndarray]:
        """Stored ``keypoints`` :math:`(N, 2)` float32 xy (original, cropped pixels) and L2-normalised
        ``descriptors`` :math:`(N, d)` float32 of ``ref`` (``ref.key`` starting with 'query/' reads the query store).
        ``size_factor`` is unused: stored features have no image size to lower."""
        which = "query" if ref.key.startswith("query/") else "db"
        st = self._store(which)
        from_demand = which == "db" and not st.has(ref.name) and self.on_demand is not None and self.on_demand.covers(ref.name)
        if not (from_demand or st.has(ref.name)):
            # Extraction skipped it (unreadable image): the reranker counts it like an image that fails to decode.
            raise ImageReadError(f"{self.paths[which]}: no features for image '{ref.name}' (not extracted)")
        try:
            # A distractor that reached the top K: its local features are extracted now (once, then stored).
            local = self.on_demand.read_local(ref.name) if from_demand else st.read_local(ref.name)
        except StoreError as e:  # extracted without local features
            raise VerifierUnavailable(f"{e}; re-extract with local features for the delg verifier") from None
        kp = local["keypoints"].reshape(-1, 2)
        desc = local["descriptors"]
        if len(kp) != len(desc):
            raise StoreError(f"{self.paths[which]}: '{ref.name}': {len(kp)} keypoints but {len(desc)} descriptors")
        n = int(self.conf["max_keypoints"])
        if n > 0 and len(kp) > n:
            # Keep the highest-attention features, as DELG does when it caps the count.
            order = np.argsort(-local["scores"], kind="stable")[:n]
            kp, desc = kp[order], desc[order]
        desc = desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
        return {"keypoints": kp, "descriptors": desc.astype(np.float32)}

    def match(self, f0: dict[str, np.ndarray], f1: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Nearest neighbours under ``distance_threshold`` as ``(pts0, pts1)``, each :math:`(M, 2)` float32."""
        return nn_match(f0["keypoints"], f0["descriptors"], f1["keypoints"], f1["descriptors"],
                        float(self.conf["distance_threshold"]), bool(self.conf["mutual"]))

    def identity_extra(self) -> dict[str, Any]:
        # The features read: each store's preset (model incl. checkpoint digest + extraction settings), settings and
        # model meta, so that another checkpoint's (or another extraction's) store never reuses these counts.
        out = {}
        for which in ("query", "db"):
            st = self._store(which)
            out[f"{which}_store"] = {"preset": st.preset, "settings": st.settings, "model_meta": st.model_meta}
        return out

    def cache_tag(self) -> str:
        c = self.conf
        return (f"delg-d{float(c['distance_threshold']):g}-{int(c['max_keypoints'])}kp"
                f"{'-mutual' if c['mutual'] else ''}")


def nn_match(
    k0: np.ndarray, d0: np.ndarray, k1: np.ndarray, d1: np.ndarray, threshold: float, mutual: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``d0`` :math:`(N, D)` its nearest row of ``d1`` :math:`(M, D)` if the L2 distance is below
    ``threshold`` (and, if ``mutual``, ``d0``'s row is also the nearest to it). Returns matched keypoints."""
    empty = np.zeros((0, 2), np.float32)
    if len(d0) == 0 or len(d1) == 0:
        return empty, empty
    a, b = torch.from_numpy(np.ascontiguousarray(d0, np.float32)), torch.from_numpy(np.ascontiguousarray(d1, np.float32))
    dist = torch.cdist(a, b)  # (N, M)
    dmin, j = dist.min(1)
    keep = dmin < threshold
    if mutual:
        i_back = dist.argmin(0)
        keep &= i_back[j] == torch.arange(len(d0))
    i = torch.nonzero(keep).flatten().numpy()
    j = j.numpy()[i]
    return k0[i].astype(np.float32), k1[j].astype(np.float32)
