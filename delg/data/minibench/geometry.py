"""Camera geometry and the ground-truth rule: plane-to-image homographies, the overlap a view has with a query
region, and the easy / hard / junk label it earns (see :mod:`delg.data.minibench` for the rule)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

# Ground-truth thresholds (see the module docstring).
JUNK_VISIBLE = 0.25  # below this fraction of the query region visible: junk
JUNK_MIN_SIDE = 0.08  # visible area below (this * long side)^2 pixels: junk
EASY_VISIBLE = 0.7  # easy needs at least this fraction visible ...
EASY_SCALE = 1.5  # ... a scale change within [1/EASY_SCALE, EASY_SCALE] ...
EASY_ANISO = 1.35  # ... little perspective distortion ...
EASY_ROT = 25.0  # ... little in-plane rotation (degrees) ...
# ... and a mild photometric change (photo_level == 0).


def camera_homography(
    center: tuple[float, float], scale: float, roll: float, pitch: float, yaw: float, size: tuple[int, int],
    fov: float = 55.0,
) -> np.ndarray:
    """Plane-to-image homography of a pinhole camera looking at ``center`` of the plane.

    Args:
        center: point of the plane (canvas pixels) seen at the image centre.
        scale: image pixels per canvas pixel at the image centre (before tilt).
        roll, pitch, yaw: camera rotation in degrees (pitch/yaw tilt the plane, roll rotates the image).
        size: image ``(w, h)``.

    Returns:
        ``(3, 3)`` float64 ``H`` mapping canvas ``(x, y, 1)`` to image pixels.
    """
    w, h = size
    f = 0.5 * max(w, h) / math.tan(math.radians(fov) / 2)
    K = np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1.0]])
    r, p, y = (math.radians(a) for a in (roll, pitch, yaw))
    Rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    Rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    Ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    R = Rz @ Rx @ Ry
    dist = f / scale
    P = K @ np.column_stack([R[:, 0], R[:, 1], [0, 0, dist]])
    T = np.array([[1, 0, -center[0]], [0, 1, -center[1]], [0, 0, 1.0]])
    H = P @ T
    return H / H[2, 2]


def _jacobian(M: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Jacobian(s) of the homography ``M`` at point(s) ``p`` (``(2,)`` -> ``(2, 2)``, ``(N, 2)`` -> ``(N, 2, 2)``)."""
    pts = np.atleast_2d(p).astype(np.float64)
    q = pts @ M[:, :2].T + M[:, 2]
    wq = q[:, 2]
    u, v = q[:, 0] / wq, q[:, 1] / wq
    J = np.empty((len(pts), 2, 2))
    J[:, 0, 0] = (M[0, 0] - u * M[2, 0]) / wq
    J[:, 0, 1] = (M[0, 1] - u * M[2, 1]) / wq
    J[:, 1, 0] = (M[1, 0] - v * M[2, 0]) / wq
    J[:, 1, 1] = (M[1, 1] - v * M[2, 1]) / wq
    return J[0] if np.ndim(p) == 1 else J


# ----------------------------------------------------------------------------------------------------------------
# ground truth: measured overlap


def measure_overlap(
    H_q: np.ndarray, bbx: list[float], H_v: np.ndarray, view_size: tuple[int, int], canvas_size: tuple[int, int],
    occluder: np.ndarray | None = None, grid: int = 40,
) -> dict[str, float]:
    """How much of the query region ``bbx`` (in the query image) a view shows.

    Args:
        H_q: ``(3, 3)`` canvas-to-query homography.
        bbx: ``[x1, y1, x2, y2]`` query region in the query image.
        H_v: ``(3, 3)`` canvas-to-view homography.
        view_size: ``(w, h)`` of the view.
        canvas_size: ``(w, h)`` of the canvas; query points outside it are not part of the landmark.
        occluder: ``(h, w)`` bool mask of occluded view pixels, or None.
        grid: the region is sampled on a ``grid x grid`` lattice.

    Returns:
        dict with ``visible`` (fraction), ``visible_px`` (view pixels), ``scale``, ``aniso``, ``rot`` (degrees).
    """
    x1, y1, x2, y2 = bbx
    gx, gy = np.meshgrid(np.linspace(x1, x2, grid), np.linspace(y1, y2, grid))
    pq = np.stack([gx.ravel(), gy.ravel()], 1)
    Hq_inv = np.linalg.inv(H_q)
    hom = np.c_[pq, np.ones(len(pq))] @ Hq_inv.T
    pc = hom[:, :2] / hom[:, 2:3]
    on_canvas = (pc[:, 0] >= 0) & (pc[:, 0] < canvas_size[0]) & (pc[:, 1] >= 0) & (pc[:, 1] < canvas_size[1])
    M = H_v @ Hq_inv  # query image -> view
    hv = np.c_[pq, np.ones(len(pq))] @ M.T
    # the plane point must be in front of the view camera: same sign of w as the canvas->view map of a point
    # known to be in front (the view centre's back-projection)
    wv = (np.c_[pc, np.ones(len(pc))] @ H_v.T)[:, 2]
    c = np.linalg.inv(H_v) @ np.array([view_size[0] / 2, view_size[1] / 2, 1.0])
    front_sign = np.sign((H_v @ (c / c[2]))[2])
    front = np.sign(wv) == front_sign
    with np.errstate(divide="ignore", invalid="ignore"):
        pv = hv[:, :2] / hv[:, 2:3]
    inside = front & np.isfinite(pv).all(1)
    inside &= (pv[:, 0] >= 0) & (pv[:, 0] < view_size[0]) & (pv[:, 1] >= 0) & (pv[:, 1] < view_size[1])
    if occluder is not None and inside.any():
        xi = np.clip(pv[inside, 0].astype(int), 0, view_size[0] - 1)
        yi = np.clip(pv[inside, 1].astype(int), 0, view_size[1] - 1)
        idx = np.flatnonzero(inside)
        inside[idx[occluder[yi, xi]]] = False
    vis = inside & on_canvas
    n_region = int(on_canvas.sum())
    visible = float(vis.sum()) / max(n_region, 1)
    cell = (x2 - x1) * (y2 - y1) / max(len(pq), 1)
    out = {"visible": visible, "visible_px": 0.0, "scale": 0.0, "aniso": 1.0, "rot": 0.0}
    if vis.any():
        J = _jacobian(M, pq[vis])
        dets = np.abs(np.linalg.det(J))
        out["visible_px"] = float(dets.sum() * cell)
        out["scale"] = float(np.median(np.sqrt(dets)))
    # viewpoint change at the region centre (defined even if the centre is not visible)
    ctr = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    Jc = _jacobian(M, ctr)
    sv = np.linalg.svd(Jc, compute_uv=False)
    out["aniso"] = float(sv[0] / max(sv[1], 1e-9))
    out["rot"] = float(math.degrees(math.atan2(Jc[1, 0] - Jc[0, 1], Jc[0, 0] + Jc[1, 1])))
    if not vis.any():
        out["scale"] = float(math.sqrt(abs(np.linalg.det(Jc))))
    return {k: round(v, 5) for k, v in out.items()}


def label_view(m: Mapping[str, float], photo_level: int, long_side: int) -> str:
    """'easy' | 'hard' | 'junk' for a view of the query's landmark, from :func:`measure_overlap` (docstring rule)."""
    if m["visible"] < JUNK_VISIBLE or m["visible_px"] < (JUNK_MIN_SIDE * long_side) ** 2:
        return "junk"
    if (m["visible"] >= EASY_VISIBLE and 1 / EASY_SCALE <= m["scale"] <= EASY_SCALE and m["aniso"] <= EASY_ANISO
            and abs(m["rot"]) <= EASY_ROT and photo_level == 0):
        return "easy"
    return "hard"


