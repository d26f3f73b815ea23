"""One-pass multi-scale extraction: outputs, keypoint geometry, crops, skips, kill-and-resume, sharding + merge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from delg.config import ConfigError, load_config
from delg.data.dataset import RetrievalDataset
from delg.data.revisitop import GroundTruth, QueryGroundTruth
from delg.extract import (
    ExtractError,
    ExtractSettings,
    extract_multiscale,
    extract_one,
    load_model,
    main,
    pil_to_tensor,
    select_local,
)
from delg.feature_stores import part_path, preset_name, sidecar, store_path
from delg.store import FeatureStore, store_contents

REPO = Path(__file__).resolve().parent.parent
N_DB = 10
OVR = [
    "extract.long_side=96",
    "extract.scales=[0.5, 1.0, 1.4142]",
    "extract.global_scales=[1.0, 1.4142]",
    "extract.max_keypoints=40",
    "model.backbone=efficientnet_lite0",
    "num_workers=0",
    "progress=false",
    "device=cpu",
]

# Runs an extraction in a child process; SLOW seconds per forward pass make it killable mid-way.
RUNNER = """
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
import delg.extract as E
from delg.config import load_config
sys.path.insert(0, {tests!r})
from test_extract import dataset_from_spec
spec, slow, overrides = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
if slow > 0:
    orig = E.load_model
    def load_slow(conf):
        m = orig(conf)
        f = m.extract
        def extract(*a, **k):
            time.sleep(slow)
            return f(*a, **k)
        m.extract = extract
        return m
    E.load_model = load_slow
E.main(load_config(None, overrides), dataset_from_spec(spec))
"""


def dataset_from_spec(spec: str | Path) -> RetrievalDataset:
    d = json.loads(Path(spec).read_text())
    gnd = GroundTruth(
        name="toy",
        imlist=d["db_names"],
        qimlist=d["query_names"],
        gnd=[QueryGroundTruth(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), b and tuple(b))
             for b in d["query_bbx"]],
    )
    return RetrievalDataset(
        name="toy",
        db_paths=[Path(p) for p in d["db_paths"]],
        db_names=d["db_names"],
        query_paths=[Path(p) for p in d["query_paths"]],
        query_names=d["query_names"],
        query_bbx=[tuple(b) if b else None for b in d["query_bbx"]],
        gnd=gnd,
    )


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """10 db images (RGB, grayscale, RGBA, varied sizes; one corrupt file) and 2 cropped queries."""
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    db_paths, db_names = [], []
    for i in range(N_DB):
        w, h = int(rng.integers(64, 140)), int(rng.integers(64, 140))
        arr = (rng.random((h // 8 + 1, w // 8 + 1, 3)) * 255).astype(np.uint8)
        im = Image.fromarray(arr).resize((w, h), Image.BILINEAR)  # smooth blobs, not pixel noise
        sub = root / ("sub" if i % 2 else "")
        sub.mkdir(exist_ok=True)
        if i == 3:
            p = sub / f"im{i}.png"
            im.convert("L").save(p)
        elif i == 5:
            p = sub / f"im{i}.png"
            im.convert("RGBA").save(p)
        else:
            p = sub / f"im{i}.jpg"
            im.save(p, quality=90)
        db_paths.append(str(p))
        db_names.append(f"sub/im{i}" if i % 2 else f"im{i}")
    bad = root / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    db_paths.insert(4, str(bad))
    db_names.insert(4, "broken")
    q = [db_paths[0], db_paths[1]]
    spec = {
        "db_paths": db_paths,
        "db_names": db_names,
        "query_paths": q,
        "query_names": ["q0", "q1"],
        "query_bbx": [[10.0, 5.0, 50.0, 45.0], None],
    }
    (root / "spec.json").write_text(json.dumps(spec))
    return root / "spec.json"


def _conf(out: Path, *extra: str):
    return load_config(None, [f"output_dir={out}", *OVR, *extra])


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory) -> Path:
    """An uninterrupted single-process run."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ref")
    main(_conf(out), dataset_from_spec(toy))
    return out


def _assert_same_stores(a: Path, b: Path) -> None:
    attrs_a, ca = store_contents(a)
    attrs_b, cb = store_contents(b)
    assert attrs_a == attrs_b
    assert sorted(ca) == sorted(cb)
    for n in ca:
        assert ca[n].keys() == cb[n].keys()
        for k in ca[n]:
            np.testing.assert_array_equal(ca[n][k], cb[n][k], err_msg=f"{n}/{k}")


def test_reference_outputs(reference, toy):
    conf = _conf(reference)
    ds = dataset_from_spec(toy)
    db = store_path(conf, "toy", "db")
    assert db.name == f"{preset_name(conf)}-db.h5" and db.parent == reference / "features" / "toy"
    skipped = json.loads(sidecar(db, "skipped").read_text())
    assert [s["name"] for s in skipped] == ["broken"] and "broken.jpg" in skipped[0]["error"]
    with FeatureStore(db) as st:
        assert st.names() == sorted(n for n in ds.db_names if n != "broken")
        assert st.model_meta["backbone"] == "efficientnet_lite0"
        assert st.settings["scales"] == [0.5, 1.0, 1.4142]
        G = st.read_globals(st.names())
        np.testing.assert_allclose(np.linalg.norm(G, axis=1), 1.0, rtol=1e-5)
        for name, path in zip(ds.db_names, ds.db_paths):
            if name == "broken":
                continue
            loc = st.read_local(name)
            w, h = Image.open(path).size
            assert tuple(loc["image_size"]) == (w, h)
            assert 0 < len(loc["scores"]) <= 40
            assert np.all(np.diff(loc["scores"]) <= 0)  # sorted by attention
            np.testing.assert_allclose(np.linalg.norm(loc["descriptors"], axis=1), 1.0, rtol=1e-4)
    # queries: cropped to bbx for every feature type
    with FeatureStore(store_path(conf, "toy", "query")) as st:
        assert tuple(st.read_local("q0")["image_size"]) == (40, 40)
        assert tuple(st.read_local("q1")["image_size"]) == Image.open(ds.query_paths[1]).size
        model = load_model(conf)
        crop = Image.open(ds.query_paths[0]).convert("RGB").crop((10, 5, 50, 45))
        one = extract_one(model, crop, conf)
        np.testing.assert_allclose(st.read_global("q0"), one["global"], atol=1e-5)
        np.testing.assert_allclose(st.read_local("q0")["keypoints"], one["keypoints"], atol=1e-4)


def test_global_is_sum_of_scales_and_keypoints_map_back(toy):
    """Independent recomputation from per-scale model calls: global = normalised sum; keypoints = centres / scale."""
    torch.manual_seed(0)
    conf = _conf(Path("unused"))
    model = load_model(conf)
    rng = np.random.default_rng(1)
    im = Image.fromarray((rng.random((20, 30, 3)) * 255).astype(np.uint8)).resize((192, 128), Image.BILINEAR)
    xs = ExtractSettings.from_conf(conf)  # long_side 96: the image is halved first
    small = im.resize((96, 64), Image.BILINEAR)
    out = extract_multiscale(model, pil_to_tensor(small), xs, orig_size=im.size)
    x = (pil_to_tensor(small).float()[None] / 255 - torch.tensor(model.mean).view(1, 3, 1, 1)) / torch.tensor(
        model.std
    ).view(1, 3, 1, 1)
    gs, cands = [], []
    for s in xs.scales:
        xs_ = torch.nn.functional.interpolate(x, size=(round(64 * s), round(96 * s)), mode="bilinear",
                                              align_corners=False, antialias=s < 1) if s != 1.0 else x
        o = model.extract(xs_)
        if s in xs.global_scales:
            gs.append(o["global"][0])
        h, w = o["attention"].shape[1:]
        c = model.keypoint_centers(h, w).numpy()
        c = c * np.array([192 / xs_.shape[-1], 128 / xs_.shape[-2]])
        for j, a in enumerate(o["attention"][0].reshape(-1).tolist()):
            cands.append((a, c[j]))
    g = torch.stack(gs).sum(0)
    np.testing.assert_allclose(out["global"], (g / g.norm()).numpy(), atol=1e-5)
    cands.sort(key=lambda t: -t[0])
    top = np.array([c for _, c in cands[: xs.max_keypoints]], np.float32)
    np.testing.assert_allclose(out["scores"], [a for a, _ in cands[: xs.max_keypoints]], rtol=1e-5)
    np.testing.assert_allclose(out["keypoints"], top, atol=1e-3)
    assert tuple(out["image_size"]) == (192, 128)


def test_select_local_matches_brute_force():
    rng = np.random.default_rng(0)
    per = []
    for m in (50, 30, 80):
        sc = rng.integers(0, 6, m).astype(np.float32)  # many ties
        per.append((sc, rng.random((m, 2)).astype(np.float32), rng.random((m, 4)).astype(np.float32)))
    for k, thr in ((10, 0.0), (25, 2.0), (500, 4.0)):
        kp, de, sc = select_local(per, k, thr)
        allsc = np.concatenate([p[0] for p in per])
        allkp = np.concatenate([p[1] for p in per])
        order = [i for i in sorted(range(len(allsc)), key=lambda i: (-allsc[i], i)) if allsc[i] >= thr][:k]
        np.testing.assert_array_equal(sc, allsc[order])
        np.testing.assert_array_equal(kp, allkp[order])
        assert de.shape == (len(order), 4)


def test_global_only_equals_global_of_full(reference, toy, tmp_path):
    torch.set_num_threads(1)
    conf = _conf(tmp_path, "extract.local=false", "extract.splits=[query]")
    main(conf, dataset_from_spec(toy))
    ref = _conf(reference)
    assert preset_name(conf) != preset_name(ref)
    with FeatureStore(store_path(conf, "toy", "query")) as a, FeatureStore(store_path(ref, "toy", "query")) as b:
        assert "keypoints" not in a.read("q0")
        np.testing.assert_array_equal(a.read_globals(["q0", "q1"]), b.read_globals(["q0", "q1"]))


def test_bad_settings():
    with pytest.raises(ExtractError, match="global_scales"):
        ExtractSettings.from_conf(load_config(None, ["extract.global_scales=[0.9]"]))


def test_kill_and_resume(reference, toy, tmp_path):
    """SIGKILL a real extraction when some but not all images are done; the rerun equals an uninterrupted run."""
    conf = _conf(tmp_path)
    db = store_path(conf, "toy", "db")
    progress = sidecar(db, "progress")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", RUNNER.format(tests=str(REPO / "tests")), str(toy)]
    proc = subprocess.Popen([*args, "0.2", f"output_dir={tmp_path}", *OVR], env=env, cwd=REPO)
    try:
        deadline = time.time() + 120
        done = 0
        while time.time() < deadline and proc.poll() is None:
            if progress.is_file():
                try:
                    done = json.loads(progress.read_text())["done"]
                except (ValueError, KeyError):
                    done = 0
                if done >= 3:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "extraction finished before it could be killed"
        assert 3 <= done < N_DB
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    with FeatureStore(db, "a", preset=preset_name(conf)) as st:  # opening for writing recovers what is there
        assert 3 <= len(st) < N_DB
    torch.set_num_threads(1)
    main(conf, dataset_from_spec(toy))  # the rerun (in-process: same code path, saves a Python start)
    _assert_same_stores(db, store_path(_conf(reference), "toy", "db"))
    _assert_same_stores(store_path(conf, "toy", "query"), store_path(_conf(reference), "toy", "query"))
    assert json.loads(sidecar(db, "skipped").read_text())[0]["name"] == "broken"


def test_shards_merge_equal_single_run(reference, toy, tmp_path):
    torch.set_num_threads(1)
    ds = dataset_from_spec(toy)
    main(_conf(tmp_path, "shard=1/2"), ds)
    db = store_path(_conf(tmp_path), "toy", "db")
    assert part_path(db, 1, 2).is_file() and not part_path(db, 0, 2).is_file()
    with FeatureStore(part_path(db, 1, 2)) as st:
        assert st.names() == sorted(ds.db_names[1::2])  # disjoint interleaved part
    main(_conf(tmp_path, "shard=0/2"), ds)  # the last part to finish merges
    assert not part_path(db, 0, 2).exists() and not part_path(db, 1, 2).exists()
    _assert_same_stores(db, store_path(_conf(reference), "toy", "db"))
    _assert_same_stores(store_path(_conf(tmp_path), "toy", "query"), store_path(_conf(reference), "toy", "query"))
    assert [s["name"] for s in json.loads(sidecar(db, "skipped").read_text())] == ["broken"]


def test_rerun_skips_and_overwrite_redoes(reference, toy, tmp_path, monkeypatch):
    import delg.extract as E

    ds = dataset_from_spec(toy)
    calls = []
    orig = E.load_model

    def counting(conf):
        calls.append(1)
        return orig(conf)

    monkeypatch.setattr(E, "load_model", counting)
    main(_conf(reference, "extract.splits=[query]"), ds)
    assert calls == []  # everything done: the model is not even built
    torch.set_num_threads(1)
    main(_conf(tmp_path, "extract.splits=[query]"), ds)
    q = store_path(_conf(tmp_path), "toy", "query")
    with FeatureStore(q, "a") as st:  # tamper, then overwrite=true must redo it
        st.write("q0", {"global": np.zeros(1280, np.float32), "image_size": [1, 1]}, overwrite=True)
    main(_conf(tmp_path, "extract.splits=[query]", "overwrite=true"), ds)
    assert len(calls) == 2
    _assert_same_stores(q, store_path(_conf(reference), "toy", "query"))


def test_merge_only_cli_keeps_valid_part_work(reference, toy, tmp_path):
    """A crashed sharded run: extract.merge=true merges what the parts hold; a normal run completes the rest."""
    torch.set_num_threads(1)
    ds = dataset_from_spec(toy)
    main(_conf(tmp_path, "shard=0/3", "extract.splits=[db]"), ds)  # parts 1, 2 never ran
    db = store_path(_conf(tmp_path), "toy", "db")
    assert part_path(db, 0, 3).is_file() and not db.is_file()
    main(_conf(tmp_path, "extract.merge=true", "extract.splits=[db]"), ds)
    with FeatureStore(db) as st:
        assert st.names() == sorted(n for n in ds.db_names[0::3] if n != "broken")
    main(_conf(tmp_path, "extract.splits=[db]"), ds)
    _assert_same_stores(db, store_path(_conf(reference), "toy", "db"))


def test_cli_script_rejects_unknown_key():
    res = subprocess.run(["bash", str(REPO / "extract_features.sh"), "extract.max_keypoint=1"], capture_output=True,
                         text=True, cwd=REPO)
    assert res.returncode == 2 and "extract.max_keypoint" in res.stderr and "extract.max_keypoints" in res.stderr


def test_parse_shard(monkeypatch):
    from delg.config import ConfigError
    from delg.extract import parse_shard

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert parse_shard(load_config(None, [])) is None
    assert parse_shard(load_config(None, ["shard=2/5"])) == (2, 5)
    assert parse_shard(load_config(None, ["shard=0/1"])) is None
    for bad in ("5/5", "x", "1-2"):
        with pytest.raises(ConfigError, match="shard"):
            parse_shard(load_config(None, [f"shard={bad}"]))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert parse_shard(load_config(None, [])) == (3, 4)  # torchrun
    assert parse_shard(load_config(None, ["shard=1/2"])) == (1, 2)  # explicit wins


# ------------------------------------------------------------------------------------ model conventions, seed rules
def _seed_setup(tmp_path: Path) -> tuple[Path, Path]:
    """A random R50 saved in the seed's pycls layout, and an 80x64 PNG (lossless: cv2 and PIL decode it alike)."""
    from pycls_layout import write_pycls_checkpoint

    ck, _ = write_pycls_checkpoint(tmp_path / "seed.pyth")
    rng = np.random.default_rng(3)
    arr = (rng.random((9, 11, 3)) * 255).astype(np.uint8)
    arr[..., 0] = 255  # strongly red: R and B differ everywhere, so a swapped order cannot pass
    img = tmp_path / "im.png"
    Image.fromarray(arr).resize((80, 64), Image.BILINEAR).save(img)
    return ck, img


def _seed_conf(out: Path, ck: Path, *extra: str):
    return load_config(None, [f"output_dir={out}", "model.backbone=resnet50", "model.pretrained=false",
                              f"model.checkpoint={ck}", "num_workers=0", "progress=false", "device=cpu",
                              "extract.attention_threshold=null", *extra])


def _bgr_input(bgr: np.ndarray) -> torch.Tensor:
    """The seed's preprocessing of a cv2 image (H, W, 3) B,G,R in 0..255: /255, then the BGR statistics."""
    from delg.model import BGR_MEAN, BGR_STD

    x = torch.from_numpy(np.ascontiguousarray(bgr, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0
    return (x - torch.tensor(BGR_MEAN).view(1, 3, 1, 1)) / torch.tensor(BGR_STD).view(1, 3, 1, 1)


def test_seed_checkpoint_is_fed_bgr_as_the_seed(tmp_path):
    """What delg.extract stores for a pycls checkpoint equals a forward on cv2.imread pixels with the BGR stats."""
    import cv2

    torch.set_num_threads(1)
    ck, img = _seed_setup(tmp_path)
    conf = _seed_conf(tmp_path / "out", ck, "extract.scales=[1.0]", "extract.global_scales=[1.0]",
                      "extract.long_side=null", "extract.splits=[db]")
    ds = RetrievalDataset(name="toy", db_paths=[img], db_names=["im"], query_paths=[img], query_names=["q"],
                          query_bbx=[None], gnd=None)
    main(conf, ds)
    _, stored = store_contents(store_path(conf, "toy", "db"))
    model = load_model(conf)
    assert model.input_colour == "bgr"
    with torch.no_grad():
        ref = model.extract(_bgr_input(cv2.imread(str(img))))
    np.testing.assert_allclose(stored["im"]["global"], ref["global"][0].numpy(), atol=1e-5)
    att = ref["attention"][0].reshape(-1).numpy()
    order = np.argsort(-att, kind="stable")
    np.testing.assert_allclose(stored["im"]["scores"], att[order], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stored["im"]["descriptors"], ref["local"][0].reshape(len(att), -1).numpy()[order],
                               atol=1e-5)
    with FeatureStore(store_path(conf, "toy", "db")) as st:  # the store's model meta says what the input was
        assert st.model_meta["input_colour"] == "bgr" and st.model_meta["mean"] == [0.406, 0.456, 0.485]


def test_seed_resize_and_sum_aggregation(tmp_path):
    """extract.resize=cv2_bilinear + global_aggregation=sum reproduce the seed: cv2.resize on the 8-bit image,
    cv2.resize of the 0..255 float image per scale, raw per-scale descriptors summed, then L2."""
    import cv2

    from delg.data.images import load_pil

    torch.set_num_threads(1)
    ck, img = _seed_setup(tmp_path)
    conf = _seed_conf(tmp_path, ck, "extract.scales=[0.5, 1.0]", "extract.global_scales=[0.5, 1.0]",
                      "extract.long_side=48", "extract.resize=cv2_bilinear", "extract.global_aggregation=sum")
    model = load_model(conf)
    got = extract_one(model, load_pil(img), conf)
    small = cv2.resize(cv2.imread(str(img)), (48, 38), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    with torch.no_grad():
        g = sum(model.extract(_bgr_input(cv2.resize(small, (round(48 * s), round(38 * s)),
                                                    interpolation=cv2.INTER_LINEAR) if s != 1.0 else small),
                              want_local=False, normalize_global=False)["global"][0] for s in (0.5, 1.0))
    np.testing.assert_allclose(got["global"], (g / g.norm()).numpy(), atol=1e-5)
    # The DELG/antialias defaults give a different descriptor, and a different store.
    conf2 = _seed_conf(tmp_path, ck, "extract.scales=[0.5, 1.0]", "extract.global_scales=[0.5, 1.0]",
                       "extract.long_side=48")
    assert not np.allclose(extract_one(model, load_pil(img), conf2)["global"], got["global"], atol=1e-4)
    assert preset_name(conf) != preset_name(conf2)


def test_nms_boxes_hand_computed():
    from delg.extract import nms_boxes

    boxes = np.array([[0, 0, 10, 10],       # score 0.9: kept
                      [0, 0, 10, 9.9],      # IoU with box 0 = 99/100 = 0.99 > 0.98: suppressed
                      [0, 0, 10, 9.5],      # IoU with box 0 = 0.95: kept
                      [40, 40, 50, 50],     # disjoint, lowest score: kept if among the top_k candidates
                      [20, 20, 30, 29.9]],  # disjoint: kept
                     np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.1, 0.6], np.float32)
    np.testing.assert_array_equal(nms_boxes(boxes, scores, 0.98, top_k=5), [0, 2, 4, 3])
    np.testing.assert_array_equal(nms_boxes(boxes, scores, 0.98, top_k=4), [0, 2, 4])
    np.testing.assert_array_equal(nms_boxes(boxes, scores, 0.5, top_k=5), [0, 4, 3])


def test_seed_threshold_halving():
    """Per scale: attention > 260, halved until >= N cells pass (the seed), then NMS over the top max_keypoints."""
    sc = np.array([300, 200, 140, 100, 70, 60, 10], np.float32)
    kp = np.arange(14, dtype=np.float32).reshape(7, 2)
    de = np.eye(7, dtype=np.float32)
    far = np.array([[100 * i, 0, 100 * i + 10, 10] for i in range(7)], np.float32)  # disjoint boxes
    # 260 -> 1 pass; 130 -> 3; 65 -> 5 >= 4: stop.
    _, _, got = select_local([(sc, kp, de, far)], 100, 260.0, halve_until=4, nms_iou=0.98)
    np.testing.assert_array_equal(got, [300, 200, 140, 100, 70])
    # Strictly above: a cell exactly at the threshold does not pass (130 -> 3 cells > 130; 140 > 130 passes).
    _, _, got = select_local([(np.array([260, 130, 65], np.float32), kp[:3], de[:3], far[:3])], 100, 260.0,
                             halve_until=1, nms_iou=0.98)
    np.testing.assert_array_equal(got, [260])
    # Halving stops below 0.1 even when fewer than N pass; the old rule (>= threshold, no halving) keeps 1.
    _, _, got = select_local([(sc, kp, de, far)], 100, 260.0, halve_until=1000, nms_iou=0.98)
    assert len(got) == 7
    assert len(select_local([(sc, kp, de)], 100, 260.0)[2]) == 1


def test_forgotten_checkpoint_is_an_error(tmp_path):
    """pretrained=false without model.checkpoint would extract with random weights: an error naming the key,
    before any work; model.random_weights=true says it is meant."""
    from delg.config import ConfigError

    conf = _conf(tmp_path, "model.pretrained=false")
    with pytest.raises(ConfigError, match=r"model\.checkpoint"):
        main(conf, dataset=None)  # raised before the (unconfigured) dataset is looked at
    with pytest.raises(ConfigError, match=r"model\.checkpoint"):
        preset_name(conf)  # what search / rerank / retrieve resolve their stores with
    with pytest.raises(ConfigError, match=r"model\.checkpoint"):
        load_model(conf)
    from delg import retrieve, search

    for stage in (search.main, retrieve.main):
        with pytest.raises(ConfigError, match=r"model\.checkpoint"):
            stage(_conf(tmp_path / "never", "model.pretrained=false"))
    assert not (tmp_path / "never").exists()
    ok = _conf(tmp_path, "model.pretrained=false", "model.random_weights=true")
    assert "-random-" in preset_name(ok)


def test_paper_configs_local_selection():
    """Our 2048-d models use DELG's attention thresholds; the seed configs the seed's extraction rules."""
    paper = REPO / "configs" / "paper"
    for name, thr in (("roxford5k_r50", 175.0), ("rparis6k_r1m_r50", 175.0), ("roxford5k_r101", 166.1),
                      ("rparis6k_r101", 166.1)):
        x = load_config(paper / f"{name}.yaml").extract
        assert (x.attention_threshold, x.threshold_halve_until, x.nms_iou) == (thr, 0, 0.0), name
    for name in ("roxford5k_seed_r50", "rparis6k_seed_r101", "roxford5k_r1m_seed_r101"):
        x = load_config(paper / f"{name}.yaml").extract
        assert (x.attention_threshold, x.threshold_halve_until, x.nms_iou) == (260.0, 1000, 0.98), name
        assert (x.global_aggregation, x.resize) == ("sum", "cv2_bilinear"), name


def test_new_settings_are_checked():
    for key, bad in (("global_aggregation", "mean"), ("resize", "nearest"), ("threshold_halve_until", -1),
                     ("nms_iou", 1.5)):
        with pytest.raises(ConfigError, match=f"extract.{key}: .* is not allowed"):
            load_config(None, [f"extract.{key}={bad}"])
        conf = load_config(None)
        conf.extract[key] = bad  # changed after load_config: from_conf checks again
        with pytest.raises(ExtractError, match=f"extract.{key}"):
            ExtractSettings.from_conf(conf)
