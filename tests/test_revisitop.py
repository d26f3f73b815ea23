"""Ground-truth reader (pkl / mat / original format), restricted unpickler, query crop, revisitop datasets."""

from __future__ import annotations

import os
import pickle
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from delg.config import ConfigError, load_config
from delg.data.dataset import load_dataset
from delg.data.images import load_pil
from delg.data.revisitop import GroundTruth, GroundTruthError, image_path, read_gnd


@pytest.fixture(scope="module")
def roxford(shared_data: Path) -> GroundTruth:
    return read_gnd(shared_data / "revisitop" / "gnd_roxford5k.pkl")


def _small() -> dict:
    """A valid revisitop-style ground truth: 6 database images, 2 queries."""
    return {
        "imlist": [f"db_{i}" for i in range(6)],
        "qimlist": ["q_0", "q_1"],
        "gnd": [
            {"bbx": [1.0, 2.0, 30.5, 40.0], "easy": [0, 1], "hard": [2], "junk": [3]},
            {"bbx": [0, 0, 10, 10], "easy": [], "hard": [4, 5], "junk": []},
        ],
    }


def _write(tmp_path: Path, data, name="gnd_toy.pkl", protocol=pickle.HIGHEST_PROTOCOL) -> Path:
    p = tmp_path / name
    p.write_bytes(pickle.dumps(data, protocol=protocol))
    return p


# ----------------------------------------------------------------------------------------------- real files


def test_real_roxford(roxford):
    assert roxford.name == "roxford5k" and roxford.format == "revisitop"
    assert roxford.n_db == 4993 and roxford.n_queries == 70
    assert sum(q.easy.size == 0 for q in roxford.gnd) == 2
    assert not set(roxford.qimlist) & set(roxford.imlist)
    q0 = roxford.gnd[0]
    assert roxford.qimlist[0] == "all_souls_000013" and q0.bbx == (136.5, 34.1, 648.5, 955.7)
    assert q0.easy.dtype == np.int64 and q0.easy.min() >= 0 and q0.hard.max() < roxford.n_db


def test_real_rparis(shared_data):
    g = read_gnd(shared_data / "revisitop" / "gnd_rparis6k.pkl")
    assert (g.name, g.n_db, g.n_queries) == ("rparis6k", 6322, 70)
    assert all(q.easy.size for q in g.gnd)


def test_real_original_format(shared_data):
    # 55 queries in imlist; ok -> easy (it contains the query itself, as the original protocol counted it).
    g = read_gnd(shared_data / "oxford5k_paris6k_original_gnd" / "gnd_oxford5k.pkl")
    assert (g.format, g.n_db, g.n_queries) == ("original", 5063, 55)
    assert all(q.hard.size == 0 for q in g.gnd)
    assert all(g.imlist[i] == n for i, n in zip(g.qidx, g.qimlist))
    assert all(i in q.easy for i, q in zip(g.qidx, g.gnd))


def test_real_order_matches_txt_listing(shared_data, roxford):
    # RRT's independent listings give queries / database images in qimlist / imlist order.  (Their w,h columns
    # use an inclusive, MATLAB-style box, not revisitop's PIL crop, so they are not compared here.)
    for txt, names in (("roxford5k_test_query.txt", roxford.qimlist), ("roxford5k_test_gallery.txt", roxford.imlist)):
        lines = (shared_data / "revisitop" / txt).read_text().split()
        assert [ln.split(",")[0] for ln in lines] == [f"jpg/{n}.jpg" for n in names]


# --------------------------------------------------------------------------------------------------- .mat


def _to_mat(g: GroundTruth, path: Path) -> None:
    """Write g the way revisitop's gnd_<name>.mat stores it: 1-based doubles, cell arrays, struct array."""
    import scipy.io

    def cell(names, shape):
        c = np.empty(shape, dtype=object)
        for i, n in enumerate(names):
            c.flat[i] = n
        return c

    s = np.zeros((1, g.n_queries), dtype=[("easy", "O"), ("hard", "O"), ("junk", "O"), ("bbx", "O")])
    for j, q in enumerate(g.gnd):
        for f in ("easy", "hard", "junk"):
            s[0, j][f] = (getattr(q, f) + 1).astype(np.float64)[None, :] if getattr(q, f).size else np.zeros((0, 0))
        s[0, j]["bbx"] = np.asarray(q.bbx, np.float64)[None, :]
    scipy.io.savemat(str(path), {"imlist": cell(g.imlist, (g.n_db, 1)), "qimlist": cell(g.qimlist, (1, g.n_queries)),
                                 "gnd": s})


def test_mat_equals_pkl(roxford, tmp_path):
    p = tmp_path / "gnd_roxford5k.mat"
    _to_mat(roxford, p)
    m = read_gnd(p)
    assert (m.name, m.imlist, m.qimlist) == (roxford.name, roxford.imlist, roxford.qimlist)
    for a, b in zip(m.gnd, roxford.gnd):
        for f in ("easy", "hard", "junk"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
            assert getattr(a, f).dtype == np.int64
        assert a.bbx == b.bbx


def test_mat_zero_index_is_out_of_range(tmp_path):
    import scipy.io

    s = np.zeros((1, 1), dtype=[("easy", "O"), ("hard", "O"), ("junk", "O"), ("bbx", "O")])
    s[0, 0]["easy"], s[0, 0]["hard"], s[0, 0]["junk"] = np.array([[0.0]]), np.zeros((0, 0)), np.zeros((0, 0))
    s[0, 0]["bbx"] = np.array([[0.0, 0, 5, 5]])
    imlist = np.empty((2, 1), object)
    imlist[0, 0], imlist[1, 0] = "a", "b"
    qimlist = np.empty((1, 1), object)
    qimlist[0, 0] = "q"
    p = tmp_path / "gnd_bad.mat"
    scipy.io.savemat(str(p), {"imlist": imlist, "qimlist": qimlist, "gnd": s})
    with pytest.raises(GroundTruthError, match=r"gnd_bad\.mat.*gnd\[0\] \(query 'q'\)\.easy has index 0 out of range \[1, 2\].*1-based"):
        read_gnd(p)


# ----------------------------------------------------------------------------------------------- validation


def test_small_pkl_with_numpy_arrays(tmp_path):
    d = _small()
    d["gnd"][0]["easy"] = np.array([0, 1], np.int32)
    d["gnd"][0]["bbx"] = np.array([1.0, 2.0, 30.5, 40.0])
    d["gnd"][1]["hard"] = np.array([4, 5], np.int64)
    g = read_gnd(_write(tmp_path, d))
    assert g.gnd[0].easy.tolist() == [0, 1] and g.gnd[1].hard.tolist() == [4, 5] and g.gnd[1].easy.size == 0
    assert g.gnd[0].bbx == (1.0, 2.0, 30.5, 40.0) and g.name == "toy"


def test_numpy1_module_paths(tmp_path):
    # A pickle written by numpy 1 names numpy.core.multiarray; protocol 2 stores module names as plain text.
    d = _small()
    d["gnd"][0]["easy"] = np.array([0, 1], np.int64)
    d["gnd"][0]["junk"] = [np.int64(3)]  # a numpy scalar: multiarray.scalar
    raw = pickle.dumps(d, protocol=2)
    assert b"numpy._core.multiarray" in raw or b"numpy.core.multiarray" in raw
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    p = tmp_path / "gnd_np1.pkl"
    p.write_bytes(raw)
    g = read_gnd(p)
    assert g.gnd[0].easy.tolist() == [0, 1] and g.gnd[0].junk.tolist() == [3]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    d = _small()
    d["imlist"] = [_Evil(marker)] + d["imlist"][1:]
    p = _write(tmp_path, d, "gnd_evil.pkl")
    with pytest.raises(GroundTruthError, match=r"gnd_evil\.pkl: refused to unpickle global '(posix|nt|os)\.system'"):
        read_gnd(p)
    assert not marker.exists()


def test_arbitrary_class_refused(tmp_path):
    p = _write(tmp_path, {"imlist": [Path("x")], "qimlist": [], "gnd": []}, "gnd_cls.pkl")
    with pytest.raises(GroundTruthError, match="refused to unpickle global 'pathlib"):
        read_gnd(p)


def _mutate(fn):
    d = _small()
    fn(d)
    return d


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.pop("imlist"), r"missing field 'imlist'"),
        (lambda d: d.pop("gnd"), r"missing field 'gnd'"),
        (lambda d: d["gnd"][1].pop("hard"), r"gnd\[1\] \(query 'q_1'\) is missing field 'hard'"),
        (lambda d: d["gnd"][0].pop("bbx"), r"gnd\[0\] \(query 'q_0'\) is missing field 'bbx'"),
        (lambda d: d["gnd"][1].update(hard=[4, 6]), r"gnd\[1\] \(query 'q_1'\)\.hard has index 6 out of range"),
        (lambda d: d["gnd"][0].update(junk=[-1]), r"gnd\[0\] \(query 'q_0'\)\.junk has index -1 out of range"),
        (lambda d: d["gnd"][0].update(junk=[1]), r"gnd\[0\] \(query 'q_0'\): 'easy' and 'junk' overlap"),
        (lambda d: d["gnd"][0].update(hard=[0]), r"'easy' and 'hard' overlap"),
        (lambda d: d["gnd"][0].update(bbx=[1, 2, 3]), r"gnd\[0\] \(query 'q_0'\)\.bbx must be 4 finite numbers"),
        (lambda d: d["gnd"][0].update(bbx=[10, 2, 3, 40]), r"\.bbx is empty or inverted"),
        (lambda d: d["gnd"][0].update(bbx=["a", 2, 3, 4]), r"\.bbx must be 4 numbers"),
        (lambda d: d["gnd"][0].update(easy=[0.5]), r"gnd\[0\] \(query 'q_0'\)\.easy must hold integer indices"),
        (lambda d: d["gnd"].pop(), r"field 'gnd' must be a list with one entry per query \(2\), got 1"),
        (lambda d: d.update(imlist=["a", "a"]), r"field 'imlist' has duplicate name 'a'"),
        (lambda d: d["qimlist"].__setitem__(0, 7), r"qimlist\[0\] must be a non-empty image name"),
    ],
)
def test_malformed(tmp_path, mutate, match):
    p = _write(tmp_path, _mutate(mutate), "gnd_bad.pkl")
    with pytest.raises(GroundTruthError, match=r"gnd_bad\.pkl.*" + match):
        read_gnd(p)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(GroundTruthError, match=r"gnd_nope\.pkl: ground-truth file not found"):
        read_gnd(tmp_path / "gnd_nope.pkl")
    (tmp_path / "gnd.txt").write_text("x")
    with pytest.raises(GroundTruthError, match="unknown ground-truth format"):
        read_gnd(tmp_path / "gnd.txt")
    (tmp_path / "gnd_trunc.pkl").write_bytes(pickle.dumps(_small())[:50])
    with pytest.raises(GroundTruthError, match=r"gnd_trunc\.pkl: not a readable pickle"):
        read_gnd(tmp_path / "gnd_trunc.pkl")


# ------------------------------------------------------------------------------------------ paths and crops


def test_image_path(tmp_path):
    assert image_path(tmp_path, "all_souls_000013") == tmp_path / "all_souls_000013.jpg"
    with pytest.raises(FileNotFoundError, match="all_souls_000013.jpg"):
        image_path(tmp_path, "all_souls_000013", check=True)


def test_query_crop_on_real_photo(shared_data, roxford):
    # ROxford query 0's box on a real 791x1087 photo: PIL rounds the box (half to even): 136.5 -> 136,
    # 648.5 -> 648, 34.1 -> 34, 955.7 -> 956, so the crop is 512 x 922 and equals the array slice.
    path = shared_data / "images" / "london_bridge" / "london_bridge_19481797_2295892421.jpg"
    bbx = roxford.gnd[0].bbx
    full = np.asarray(Image.open(path).convert("RGB"))
    crop = load_pil(path, crop=bbx)
    assert crop.size == (512, 922)
    np.testing.assert_array_equal(np.asarray(crop), full[34:956, 136:648])


# ------------------------------------------------------------------------------------------- load_dataset


def _revisitop_root(tmp_path: Path, name="toy") -> Path:
    root = tmp_path / name
    (root / "jpg").mkdir(parents=True)
    d = _small()
    _write(root, d, f"gnd_{name}.pkl")
    for n in d["imlist"] + d["qimlist"]:
        Image.new("RGB", (48, 48), (10, 20, 30)).save(root / "jpg" / f"{n}.jpg")
    return root


def test_load_dataset_revisitop(tmp_path):
    root = _revisitop_root(tmp_path)
    ds = load_dataset(load_config(None, ["dataset.type=revisitop", f"dataset.root={root}", "dataset.name=toy"]))
    assert ds.name == "toy" and ds.n_db == 6 and ds.n_queries == 2 and ds.n_distractors == 0
    assert ds.db_paths[2] == root / "jpg" / "db_2.jpg" and ds.query_names == ["q_0", "q_1"]
    assert ds.query_bbx[0] == (1.0, 2.0, 30.5, 40.0) and "query_crop" in ds.notes
    # Parent folder in revisitop's download layout (<data>/<name>/jpg) works too; query_crop=false drops boxes.
    ds2 = load_dataset(load_config(None, ["dataset.type=revisitop", f"dataset.root={tmp_path}", "dataset.name=toy",
                                          "dataset.query_crop=false"]))
    assert ds2.query_bbx == [None, None] and ds2.db_names == ds.db_names


def test_load_dataset_revisitop_distractors(tmp_path, shared_data):
    root = _revisitop_root(tmp_path)
    conf = load_config(None, ["dataset.type=revisitop", f"dataset.root={root}", "dataset.name=toy",
                              f"dataset.distractors={shared_data / 'images_distractors'}"])
    ds = load_dataset(conf)
    assert ds.n_distractors == 16 and ds.n_db == 6 + 16 and re.fullmatch(r"toy\+distractors-16-[0-9a-f]{6}", ds.name)
    assert ds.db_names[6:] == sorted(ds.db_names[6:]) and all(n.startswith("distractors/") for n in ds.db_names[6:])
    assert "distractors/WGABS_kremlin_01.png" in ds.db_names and ds.gnd.n_db == 6


def test_load_dataset_revisitop_errors(tmp_path, shared_data):
    with pytest.raises(ConfigError, match="dataset.root and dataset.name"):
        load_dataset(load_config(None, ["dataset.type=revisitop"]))
    with pytest.raises(ConfigError, match="dataset.name"):
        load_dataset(load_config(None, ["dataset.type=revisitop", f"dataset.root={tmp_path}"]))
    with pytest.raises(GroundTruthError, match="expected gnd_roxford5k.pkl or gnd_roxford5k.mat"):
        load_dataset(load_config(None, ["dataset.type=revisitop", f"dataset.root={tmp_path}",
                                        "dataset.name=roxford5k"]))
    # Real ground truth, no images: a clear count of what is missing; without the check the dataset is built.
    root = tmp_path / "roxford5k"
    (root / "jpg").mkdir(parents=True)
    (root / "gnd_roxford5k.pkl").symlink_to(shared_data / "revisitop" / "gnd_roxford5k.pkl")
    base = ["dataset.type=revisitop", f"dataset.root={root}", "dataset.name=roxford5k"]
    with pytest.raises(FileNotFoundError, match="5063 of the 5063 images listed in gnd_roxford5k.pkl are missing"):
        load_dataset(load_config(None, base))
    ds = load_dataset(load_config(None, [*base, "dataset.check_images=false"]))
    assert (ds.name, ds.n_db, ds.n_queries) == ("roxford5k", 4993, 70)
    assert ds.query_paths[0] == root / "jpg" / "all_souls_000013.jpg"


def test_load_dataset_minibench_dispatch(tmp_path, monkeypatch):
    # ensure_built is another module's job; here a stand-in returns a revisitop-layout folder.
    root = _revisitop_root(tmp_path, "minibench")
    seen = {}

    def ensure_built(conf):
        seen["preset"] = conf.dataset.preset
        return root

    monkeypatch.setitem(sys.modules, "delg.data.minibench", types.SimpleNamespace(ensure_built=ensure_built))
    ds = load_dataset(load_config(None, ["dataset.type=minibench", "dataset.preset=tiny"]))
    assert seen == {"preset": "tiny"} and ds.name == "minibench-tiny" and ds.n_queries == 2


def test_load_dataset_minibench_real(request):
    pytest.importorskip("delg.data.minibench")
    root = Path(request.getfixturevalue("tiny_bench"))
    conf = load_config(None, ["dataset.type=minibench", f"dataset.root={root}", "dataset.preset=tiny",
                              "progress=false"])
    ds = load_dataset(conf)
    g = read_gnd(root / "gnd_minibench.pkl")
    assert ds.name == "minibench-tiny" and ds.n_db == g.n_db and ds.n_queries == g.n_queries > 0
    assert all(p.is_file() for p in ds.db_paths + ds.query_paths)
