"""+1M storage: distractors get globals only in one store shared across benchmarks, local features on demand for
those that reach a top K, float16 for the +1M configs, and a disk-space check before any image is extracted."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import delg.extract as E
import delg.feature_stores as FS
from delg.config import load_config
from delg.data.dataset import load_dataset
from delg.store import FeatureStore

REPO = Path(__file__).resolve().parent.parent
# Two scales at 128 px: ~200 local features an image, enough for RANSAC, and seconds for the whole module.
FAST = ["progress=false", "num_workers=0", "device=cpu", "extract.long_side=128", "extract.scales=[1.0, 1.4142]",
        "extract.global_scales=[1.0]", "extract.max_keypoints=150", "extract.float16=true", "rerank.top_k=6",
        "rerank.cache=false"]


def _conf(out: Path, bench: Path, dis: Path, shared: Path, *extra: str):
    return load_config("configs/tiny.yaml", [f"output_dir={out}", f"dataset.root={bench}", f"dataset.distractors={dis}",
                                             f"extract.distractor_dir={shared}", *FAST, *extra])


def _trained(orig):
    """The off-the-shelf model with its local head declared trained, so DELG-local accepts its features (the
    features themselves do not change)."""
    def load(conf):
        m = orig(conf)
        m.trained_local = True
        return m
    return load


class Counter:
    """Wraps extract_multiscale to count the images it extracts (and whether they had local features)."""

    def __init__(self, orig) -> None:
        self.orig, self.calls = orig, []

    def __call__(self, model, image, settings, *a, **k):
        self.calls.append(settings.local)
        return self.orig(model, image, settings, *a, **k)


@pytest.fixture(scope="module")
def runs(tiny_bench: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Benchmark A (tiny, + 6 distractors copied from its own views so that some reach the top K), then benchmark B
    (a 4-photo folder benchmark, another output_dir) sharing the distractor folder and settings."""
    from delg import search

    tmp = tmp_path_factory.mktemp("dis")
    dis = tmp / "distractors"
    (dis / "sub").mkdir(parents=True)
    jpgs = sorted((tiny_bench / "jpg").glob("*.jpg"))
    for i, p in enumerate(jpgs[:12:2]):
        shutil.copy(p, dis / ("sub" if i % 2 else "") / f"d{i}.jpg")
    photos = tmp / "photos"
    for i, p in enumerate(jpgs[1:5]):
        (photos / f"lm{i // 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, photos / f"lm{i // 2}" / f"p{i}.jpg")
    shared = tmp / "shared"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(E, "load_model", _trained(E.load_model))
        count = Counter(E.extract_multiscale)
        mp.setattr(E, "extract_multiscale", count)
        conf_a = _conf(tmp / "a", tiny_bench, dis, shared)
        ds_a = load_dataset(conf_a)
        search.main(conf_a, ds_a)
        calls_a = list(count.calls)
        count.calls.clear()
        conf_b = _conf(tmp / "b", photos, dis, shared, "dataset.type=folders")
        ds_b = load_dataset(conf_b)
        ranks_b = search.main(conf_b, ds_b)
        calls_b = list(count.calls)
    return SimpleNamespace(tmp=tmp, dis=dis, shared=shared, bench=tiny_bench, conf_a=conf_a, ds_a=ds_a, calls_a=calls_a,
                           conf_b=conf_b, ds_b=ds_b, calls_b=calls_b, ranks_b=ranks_b)


def test_distractor_store_holds_globals_only_and_db_store_locals(runs) -> None:
    conf, ds = runs.conf_a, runs.ds_a
    assert ds.n_distractors == 6 and ds.distractor_id
    dpath = FS.distractor_store_path(conf, ds)
    assert dpath == runs.shared / ds.distractor_id / f"{FS.preset_name(conf)}-distractors.h5"
    own, dis = ds.db_names[: ds.n_own], ds.db_names[ds.n_own :]
    with FeatureStore(dpath) as st:
        assert st.names() == sorted(dis)
        for n in dis:
            assert set(st.read(n)) == {"global", "image_size"}  # no local features for distractors
            assert st.read(n)["global"].dtype == np.float16
    with FeatureStore(FS.store_path(conf, ds.name, "db")) as st:
        assert st.names() == sorted(own)  # the benchmark's own images only, with their local features
        assert st.read(own[0])["descriptors"].dtype == np.float16
        assert st.read_local(own[0])["descriptors"].dtype == np.float32
    # distractors were extracted without the local head, the benchmark's images with it
    assert runs.calls_a.count(False) == 6 and runs.calls_a.count(True) == ds.n_own + ds.n_queries
    # the search saw the whole database: distractors take part in the rankings
    ranks = np.load(Path(conf.output_dir) / "ranks" / "global.npy")
    assert ranks.max() >= ds.n_own and sorted(ranks[:, 0]) == list(range(ds.n_db))


def test_two_benchmarks_share_one_distractor_store(runs) -> None:
    assert runs.ds_b.name != runs.ds_a.name and runs.conf_b.output_dir != runs.conf_a.output_dir
    assert FS.distractor_store_path(runs.conf_b, runs.ds_b) == FS.distractor_store_path(runs.conf_a, runs.ds_a)
    # B extracted its own images only (its queries are those images, read from the db store): the distractors
    # were already in the shared store
    assert runs.ds_b.n_own == 4 and runs.calls_b == [True] * 4
    ranks = np.load(runs.ranks_b)
    assert sorted(ranks[:, 0]) == list(range(runs.ds_b.n_db))  # B's search reads the shared distractor globals


def test_delg_local_extracts_distractor_locals_on_demand_once(runs, monkeypatch: pytest.MonkeyPatch) -> None:
    from delg import search
    from loftr_tools import rerank

    monkeypatch.setattr(E, "load_model", _trained(E.load_model))
    count = Counter(E.extract_multiscale)
    monkeypatch.setattr(E, "extract_multiscale", count)
    conf, ds = runs.conf_a, runs.ds_a
    out = rerank.main(conf, "delg", ds)
    got = np.load(out)
    k = int(conf.rerank.top_k)
    ranks = np.load(Path(conf.output_dir) / "ranks" / "global.npy")
    in_top = {ds.db_names[i] for i in ranks[:k].ravel() if i >= ds.n_own}
    assert in_top, "no distractor reached a top K: the test would prove nothing"
    local_path = FS.distractor_local_path(conf, ds)
    with FeatureStore(local_path) as st:
        assert set(st.names()) == in_top  # exactly the distractors some query verifies, not the others
    assert count.calls == [True] * len(in_top)  # each extracted once, with its local features
    # a second reranking (no inlier cache) finds them stored: nothing is extracted again
    count.calls.clear()
    again = np.load(rerank.main(conf, "delg", ds))
    assert count.calls == []
    np.testing.assert_array_equal(again["inliers"], got["inliers"])

    # The old layout: every database image, distractors included, extracted up front into one db store.  The
    # benchmark's own images and the queries are copied from run A (same preset) to save time: the distractors'
    # local features are extracted up front here, through the ordinary extraction.
    conf_old = _conf(runs.tmp / "old", runs.bench, runs.dis, runs.shared / "unused")
    ds_old = replace(ds, distractor_id=None)
    assert FS.distractor_store_path(conf_old, ds_old) is None
    for split in ("db", "query"):
        dst = FS.store_path(conf_old, ds.name, split)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(FS.store_path(conf, ds.name, split), dst)
    count.calls.clear()
    search.main(conf_old, ds_old)
    assert count.calls == [True] * ds.n_distractors
    ref = np.load(rerank.main(conf_old, "delg", ds_old))
    assert not (runs.shared / "unused").exists()
    np.testing.assert_array_equal(ref["ranks"], got["ranks"])
    np.testing.assert_array_equal(ref["inliers"], got["inliers"])
    assert got["inliers"].max() > 0


def test_paper_r1m_configs_store_float16_in_one_shared_distractor_store() -> None:
    paths = {}
    for f in sorted((REPO / "configs" / "paper").glob("*_r1m_*.yaml")):
        conf = load_config(f)
        assert conf.extract.float16 is True, f.name
        if conf.model.checkpoint is None:  # given on the command line by the user; here random weights stand in
            conf = load_config(f, ["model.random_weights=true"])
        assert Path(conf.extract.distractor_dir) == REPO / "outputs" / "paper" / "features", f.name
        if conf.model.checkpoint is None:  # the seed configs name a checkpoint file that is not here
            ds = SimpleNamespace(distractor_id="distractors-x", n_distractors=1)
            paths[f.name] = FS.distractor_store_path(conf, ds)
    # same model and settings on the two benchmarks -> the same distractor store
    assert paths["roxford5k_r1m_r50.yaml"] == paths["rparis6k_r1m_r50.yaml"]
    assert paths["roxford5k_r1m_r101.yaml"] == paths["rparis6k_r1m_r101.yaml"]
    assert paths["roxford5k_r1m_r50.yaml"] != paths["roxford5k_r1m_r101.yaml"]


def test_disk_check_refuses_before_any_image(runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    count = Counter(E.extract_multiscale)
    monkeypatch.setattr(E, "extract_multiscale", count)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=100_000))
    conf = _conf(tmp_path / "run", runs.bench, runs.dis, tmp_path / "shared")
    with pytest.raises(E.DiskSpaceError) as err:
        E.main(conf, runs.ds_a)
    msg = str(err.value)
    assert "\n" not in msg and str(FS.store_path(conf, runs.ds_a.name, "db").parent) in msg
    assert "free" in msg and "need" in msg
    assert count.calls == []  # refused before the first image
    assert "need ~" in capsys.readouterr().err  # the estimate is printed
    # with DELG-local reranking, the check also counts the local features at most top_k x n_queries distractors get
    jobs = E.store_jobs(load_config(None, [f"output_dir={tmp_path}", "rerank.methods=[delg]", "rerank.top_k=4"]),
                        runs.ds_a, "db")
    assert [j.on_demand for j in jobs] == [0, min(runs.ds_a.n_distractors, 4 * runs.ds_a.n_queries)]


def test_disk_estimate_and_sharded_doubling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    xs = E.ExtractSettings((1.0,), (1.0,), 1024, True, 1000, 0.0)
    f32 = E.bytes_per_image(2048, 128, xs, float16=False)
    f16 = E.bytes_per_image(2048, 128, xs, float16=True)
    g16 = E.bytes_per_image(2048, 128, replace(xs, local=False), float16=True)
    assert 1000 * 128 * 4 < f32 < 1000 * 128 * 4 * 1.1 and f16 < 0.55 * f32 and g16 < 10_000
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=15_000))
    assert E.check_disk_space(tmp_path, 1, 10_000, sharded=False) == 10_000
    with pytest.raises(E.DiskSpaceError, match="x2"):
        E.check_disk_space(tmp_path, 1, 10_000, sharded=True)  # the merge copies the part
