"""Local verification for reranking: LoFTR, DISK/ALIKED+LightGlue, DELG-local and SIFT, one RANSAC, one reranker.

Importing the package is cheap; the verifiers (torch/kornia models) load when built:

    from loftr_tools.registry import build_verifier
    from loftr_tools.rerank import Reranker, rerank
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_verifier", "ransac_inliers"]


def __getattr__(name: str) -> Any:
    # Lazy re-exports: keep `import loftr_tools` free of torch/kornia/cv2 imports.
    if name == "build_verifier":
        from loftr_tools.registry import build_verifier

        return build_verifier
    if name == "ransac_inliers":
        from loftr_tools.ransac import ransac_inliers

        return ransac_inliers
    raise AttributeError(f"module 'loftr_tools' has no attribute '{name}'")
