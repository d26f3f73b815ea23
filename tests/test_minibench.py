"""The embedded benchmark (tiny preset): layout, ground truth vs geometry, determinism, atomicity, split hygiene."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import re
from pathlib import Path
from typing import NoReturn

import cv2
import numpy as np
import pytest
from PIL import Image

from delg.config import load_config
from delg.data import minibench as mb


class _PlainUnpickler(pickle.Unpickler):
    """Refuses every class: the ground truth must be plain lists/dicts/ints/floats/strings."""

    def find_class(self, module: str, name: str) -> NoReturn:
        raise pickle.UnpicklingError(f"class {module}.{name} not allowed")


def _gnd(root: Path) -> dict:
    with open(root / mb.GND_NAME, "rb") as f:
        return _PlainUnpickler(f).load()


def _manifest(root: Path) -> dict:
    return json.loads((root / "sources.json").read_text())


def test_layout_and_pickle(tiny_bench: Path) -> None:
    g = _gnd(tiny_bench)
    assert set(g) == {"imlist", "qimlist", "gnd"}
    preset = mb.PRESETS["tiny"]
    n_lm = preset.n_photo_landmarks + preset.n_facade_landmarks
    assert len(g["qimlist"]) == 2 * n_lm == len(g["gnd"])
    n_db_expected = n_lm * (len(preset.view_tiers) + preset.n_confuser_views) + preset.views_per_distractor * (
        preset.n_photo_distractors + preset.n_plain_distractors)
    assert len(g["imlist"]) == n_db_expected
    assert len(set(g["imlist"])) == len(g["imlist"])
    assert not set(g["qimlist"]) & set(g["imlist"]), "queries must not be in the database"
    on_disk = {p.stem for p in (tiny_bench / "jpg").glob("*.jpg")}
    assert on_disk == set(g["imlist"]) | set(g["qimlist"])
    for name, q in zip(g["qimlist"], g["gnd"]):
        assert set(q) == {"bbx", "easy", "hard", "junk"}
        assert len(q["bbx"]) == 4 and all(isinstance(v, float) for v in q["bbx"])
        w, h = Image.open(tiny_bench / "jpg" / f"{name}.jpg").size
        x1, y1, x2, y2 = q["bbx"]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert (x2 - x1) * (y2 - y1) > 0.1 * w * h  # a real region, not a sliver
        lists = [q["easy"], q["hard"], q["junk"]]
        assert all(isinstance(i, int) and 0 <= i < len(g["imlist"]) for lst in lists for i in lst)
        assert not (set(q["easy"]) & set(q["hard"]) or set(q["easy"]) & set(q["junk"]) or set(q["hard"]) & set(q["junk"]))
        assert q["easy"] or q["hard"], f"{name} has no positives"
    # some queries have easy views, and the protocol has hard and junk cases at all
    assert sum(len(q["easy"]) for q in g["gnd"]) > 0
    assert sum(len(q["hard"]) for q in g["gnd"]) > 0
    assert sum(len(q["junk"]) for q in g["gnd"]) > 0
    with Image.open(tiny_bench / "jpg" / f"{g['imlist'][0]}.jpg") as im:
        assert im.format == "JPEG" and max(im.size) == preset.long_side


def test_ground_truth_labels_follow_the_landmarks(tiny_bench: Path) -> None:
    g, m = _gnd(tiny_bench), _manifest(tiny_bench)
    imgs = m["images"]
    for name, q in zip(g["qimlist"], g["gnd"]):
        lm = imgs[f"jpg/{name}.jpg"]["landmark"]
        assert lm is not None and imgs[f"jpg/{name}.jpg"]["role"] == "query"
        labelled = set(q["easy"]) | set(q["hard"]) | set(q["junk"])
        same = {i for i, n in enumerate(g["imlist"]) if imgs[f"jpg/{n}.jpg"]["landmark"] == lm}
        # every view of the landmark is labelled (revisitop: not-visible views are junk); nothing else is
        assert labelled == same
    roles = {v["role"] for k, v in imgs.items() if k.startswith("jpg/")}
    assert roles == {"query", "db", "distractor"}


def _poly_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _visible_by_polygons(Hq: np.ndarray, bbx: list[float], Hv: np.ndarray, vsize: list[int],
                         csize: list[int]) -> float | None:
    """Independent check of measure_overlap (no occluders): intersect, in the query image, the bbx with the
    view's image rectangle and the canvas, mapped there by homographies.  None when a corner maps behind."""
    x1, y1, x2, y2 = bbx
    box = np.float32([[x1, y1], [x2, y1], [x2, y2], [x1, y2]])
    M = Hq @ np.linalg.inv(Hv)  # view -> query
    w, h = vsize
    rect = np.c_[np.float64([[0, 0], [w, 0], [w, h], [0, h]]), np.ones(4)] @ M.T
    cw, ch = csize
    crect = np.c_[np.float64([[0, 0], [cw, 0], [cw, ch], [0, ch]]), np.ones(4)] @ Hq.T
    if (rect[:, 2] <= 0).any() or (crect[:, 2] <= 0).any():
        return None
    view_q = np.float32(rect[:, :2] / rect[:, 2:])
    canvas_q = np.float32(crect[:, :2] / crect[:, 2:])
    a_region, region = cv2.intersectConvexConvex(box, canvas_q)
    if a_region <= 0:
        return None
    a_vis, _ = cv2.intersectConvexConvex(np.float32(region.reshape(-1, 2)), view_q)
    return max(a_vis, 0.0) / a_region


def test_ground_truth_matches_geometry(tiny_bench: Path) -> None:
    g, m = _gnd(tiny_bench), _manifest(tiny_bench)
    imgs, rule = m["images"], m["rule"]
    checked = 0
    for name, q, meta in zip(g["qimlist"], g["gnd"], m["gnd_meta"]):
        assert meta["query"] == name
        qi = imgs[f"jpg/{name}.jpg"]
        assert qi["bbx"] == q["bbx"]
        labels = {}
        for lab in ("easy", "hard", "junk"):
            for i in q[lab]:
                labels[g["imlist"][i]] = lab
        assert set(labels) == set(meta["views"])
        for vname, lab in labels.items():
            vm = meta["views"][vname]
            assert vm["label"] == lab
            assert mb.label_view(vm, vm["photo_level"], rule["long_side"]) == lab
            vi = imgs[f"jpg/{vname}.jpg"]
            indep = _visible_by_polygons(np.array(qi["H"]), q["bbx"], np.array(vi["H"]), vi["size"], vi["canvas_size"])
            if indep is None:
                continue
            checked += 1
            if vi["occluded_fraction"] == 0:
                assert vm["visible"] == pytest.approx(indep, abs=0.06), (name, vname)
            else:  # occluders only hide more
                assert vm["visible"] <= indep + 0.06, (name, vname)
        vis = {lab: [meta["views"][v]["visible"] for v, lb in labels.items() if lb == lab] for lab in ("easy", "hard", "junk")}
        if vis["easy"] and vis["junk"]:
            assert min(vis["easy"]) > max(vis["junk"])
        assert all(v >= rule["easy_visible"] for v in vis["easy"])
    assert checked >= 0.7 * sum(len(x["views"]) for x in m["gnd_meta"])


def _gray(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), np.float32)


def test_homographies_describe_the_pixels(tiny_bench: Path) -> None:
    """Warping an easy view into its query with the stored homographies lines the pixels up (NCC in the bbx)."""
    g, m = _gnd(tiny_bench), _manifest(tiny_bench)
    imgs = m["images"]

    def ncc(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> float:
        a, b = a[valid], b[valid]  # only where the view has pixels
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum() + 1e-9))

    pos, neg = [], []
    for name, q in zip(g["qimlist"], g["gnd"]):
        qimg = _gray(tiny_bench / "jpg" / f"{name}.jpg")
        Hq = np.array(imgs[f"jpg/{name}.jpg"]["H"])
        x1, y1, x2, y2 = (round(v) for v in q["bbx"])
        for i in q["easy"][:2]:
            vname = g["imlist"][i]
            Hv = np.array(imgs[f"jpg/{vname}.jpg"]["H"])
            vimg = _gray(tiny_bench / "jpg" / f"{vname}.jpg")
            M, qsize = Hq @ np.linalg.inv(Hv), (qimg.shape[1], qimg.shape[0])
            warped = cv2.warpPerspective(vimg, M, qsize)
            valid = cv2.warpPerspective(np.ones_like(vimg), M, qsize, flags=cv2.INTER_NEAREST)[y1:y2, x1:x2] > 0
            pos.append(ncc(qimg[y1:y2, x1:x2], warped[y1:y2, x1:x2], valid))
            # the same warp applied to a negative image must not line up
            other = next(j for j in range(len(g["imlist"])) if j not in q["easy"] + q["hard"] + q["junk"])
            oimg = cv2.resize(_gray(tiny_bench / "jpg" / f"{g['imlist'][other]}.jpg"), (Image.open(
                tiny_bench / "jpg" / f"{vname}.jpg").size))
            warped_neg = cv2.warpPerspective(oimg, Hq @ np.linalg.inv(Hv), (qimg.shape[1], qimg.shape[0]))
            neg.append(ncc(qimg[y1:y2, x1:x2], warped_neg[y1:y2, x1:x2], valid))
    assert pos, "no easy views at all"
    assert min(pos) > 0.6, pos
    assert max(neg) < 0.5 < min(pos), (pos, neg)


def test_train_split_gldv2_layout(tiny_bench: Path) -> None:
    preset = mb.PRESETS["tiny"]
    csv_path = tiny_bench / "train_clean.csv"
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == ["landmark_id", "images"]
    assert len(rows) == preset.train_classes
    listed = []
    for r in rows:
        int(r["landmark_id"])
        ids = r["images"].split(" ")
        assert len(ids) == preset.train_per_class
        for iid in ids:
            assert re.fullmatch(r"[0-9a-f]{16}", iid)
            p = tiny_bench / "train" / iid[0] / iid[1] / iid[2] / f"{iid}.jpg"
            assert p.is_file(), p
            listed.append(iid)
    assert len(set(listed)) == len(listed)
    on_disk = {p.stem for p in (tiny_bench / "train").rglob("*.jpg")}
    assert on_disk == set(listed)
    with Image.open(p) as im:
        assert max(im.size) == preset.train_long_side


def _thumb(path: Path) -> np.ndarray:
    # 16x16 grey thumbnail, zero mean / unit norm: a cheap near-duplicate signature
    a = cv2.resize(_gray(path), (16, 16), interpolation=cv2.INTER_AREA).ravel()
    a -= a.mean()
    return a / (np.linalg.norm(a) + 1e-9)


def test_test_and_train_sources_are_disjoint(tiny_bench: Path) -> None:
    m = _manifest(tiny_bench)
    test_src, train_src = set(m["sources"]["test"]), set(m["sources"]["train"])
    assert test_src and train_src and not test_src & train_src
    for rel, info in m["images"].items():
        assert (tiny_bench / rel).is_file()
        assert set(info["sources"]) <= (test_src if info["split"] == "test" else train_src), rel
    # at least one real photograph on each side (the packaged photos are found without any download)
    assert any(not s.startswith("procedural:") for s in test_src)
    assert any(not s.startswith("procedural:") for s in train_src)
    # no training image is a near duplicate of a test image
    test_imgs = sorted((tiny_bench / "jpg").glob("*.jpg"))
    train_imgs = sorted((tiny_bench / "train").rglob("*.jpg"))
    T = np.stack([_thumb(p) for p in test_imgs])
    R = np.stack([_thumb(p) for p in train_imgs])
    assert float((R @ T.T).max()) < 0.9
    # ... and the check can fire: a brightened, re-encoded copy of a test image is caught
    buf = io.BytesIO()
    Image.fromarray(np.clip(_gray(test_imgs[0]) * 1.1 + 5, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=70)
    copy_path = tiny_bench.parent / "near_dup_probe.jpg"
    copy_path.write_bytes(buf.getvalue())
    try:
        assert float((T @ _thumb(copy_path)).max()) > 0.95
    finally:
        copy_path.unlink()


def test_build_info_and_reuse(tiny_bench: Path) -> None:
    info = mb.read_build_info(tiny_bench)
    assert info is not None and info["preset"] == "tiny" and info["version"] == mb.VERSION
    checksum, n = mb.content_checksum(tiny_bench)
    assert (checksum, n) == (info["checksum"], info["files"])
    stamp = (tiny_bench / "BUILD.json").stat().st_mtime_ns
    assert mb.build(tiny_bench, preset="tiny") == tiny_bench.absolute()
    assert (tiny_bench / "BUILD.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    # a complete build is found by ensure_built without building or printing
    conf = load_config(None, [f"dataset.root={tiny_bench}", "dataset.preset=tiny"])
    lines: list[str] = []
    assert mb.ensure_built(conf, log=lines.append) == tiny_bench
    assert lines == []


def test_foreign_folder_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "photo.jpg").write_bytes(b"not ours")
    with pytest.raises(mb.MinibenchError, match="BUILD.json"):
        mb.build(out, preset="tiny")
    assert (out / "photo.jpg").read_bytes() == b"not ours"
    with pytest.raises(mb.MinibenchError, match="preset"):
        mb.build(tmp_path / "x", preset="huge")


def test_crash_leaves_nothing_then_deterministic_rebuild(tiny_bench: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench" / "tiny"
    out.parent.mkdir()
    # the remains of a killed build (a dead pid) must be cleaned up
    host = os.uname().nodename
    stale = out.parent / f".tiny.tmp-{host}-999999999-deadbeef"
    (stale / "jpg").mkdir(parents=True)
    (stale / "jpg" / "half.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(RuntimeError, match="simulated failure"):
        mb.build(out, preset="tiny", _fail_after=2)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # neither the stale nor our own temp folder is left
    # a rerun (through ensure_built) succeeds and is byte-identical to the session build
    conf = load_config(None, [f"dataset.root={out}", "dataset.preset=tiny", "progress=false"])
    lines: list[str] = []
    assert mb.ensure_built(conf, log=lines.append) == out
    assert len(lines) == 1 and "preset tiny" in lines[0] and str(out) in lines[0]
    assert mb.read_build_info(out) == mb.read_build_info(tiny_bench)
    assert (out / mb.GND_NAME).read_bytes() == (tiny_bench / mb.GND_NAME).read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]


# Content checksum (BUILD.json) of the tiny preset as built by the code before the module split (commit f213563),
# with the pinned image libraries (Pillow's JPEG encoder, OpenCV, scikit-image's sample photographs).  A refactor
# must not change one pixel or one ground-truth byte; a deliberate change of the benchmark bumps VERSION and this.
TINY_CHECKSUM_V2 = ("896459d59ad8cf02ff7a8c9ac9ffe8d8b65a63ea9d76e843bedc33506ac6d994", 59)


def test_tiny_build_is_byte_identical_to_the_reference(tiny_bench: Path) -> None:
    assert mb.VERSION == 2, "the benchmark changed: rebuild with the new code and update TINY_CHECKSUM_V2"
    assert mb.content_checksum(tiny_bench) == TINY_CHECKSUM_V2
