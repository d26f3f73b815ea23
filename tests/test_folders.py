"""<root>/<landmark>/<image> datasets: real photos + distractors, checked against manifest.csv; load_dataset."""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from delg.config import ConfigError, load_config
from delg.data.dataset import list_distractors, load_dataset
from delg.data.folders import load_folders
from delg.evaluate import evaluate


def _manifest(shared_data: Path) -> list[dict[str, str]]:
    with open(shared_data / "images" / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_real_folders_against_manifest(shared_data):
    rows = _manifest(shared_data)
    landmark_of = {r["path"].removeprefix("images/"): r["landmark"] for r in rows if r["path"].startswith("images/")}
    ds = load_folders(shared_data / "images")
    assert re.fullmatch(r"folders-images-[0-9a-f]{6}", ds.name) and ds.n_distractors == 0
    assert sorted(ds.db_names) == sorted(landmark_of) and len(ds.db_names) == 45
    assert ds.query_names == ds.db_names  # every landmark has 2+ photos, so every photo is a query
    assert len(set(landmark_of.values())) == 8
    assert all(b is None for b in ds.query_bbx) and ds.gnd.imlist == ds.db_names
    sizes = Counter(landmark_of.values())
    for j, (qname, q) in enumerate(zip(ds.query_names, ds.gnd.gnd)):
        i = ds.db_names.index(qname)
        assert ds.db_paths[i] == ds.query_paths[j] == shared_data / "images" / qname
        assert q.junk.tolist() == [i] and q.hard.size == 0
        # positives: exactly the other photos of the same landmark, per the manifest
        expected = sorted(k for k, lm in enumerate(ds.db_names) if landmark_of[lm] == landmark_of[qname] and k != i)
        assert sorted(q.easy.tolist()) == expected and len(expected) == sizes[landmark_of[qname]] - 1


def test_real_folders_with_distractors(shared_data):
    rows = _manifest(shared_data)
    expected = sorted("distractors/" + r["path"].removeprefix("images_distractors/") for r in rows
                      if r["path"].startswith("images_distractors/"))
    ds = load_folders(shared_data / "images", shared_data / "images_distractors")
    assert ds.n_distractors == 16 and ds.n_db == 61 and ds.n_queries == 45
    assert ds.db_names[45:] == expected and re.fullmatch(r"folders-images-[0-9a-f]{6}\+distractors-16-[0-9a-f]{6}", ds.name)
    assert len(set(ds.db_names)) == ds.n_db and ds.gnd.n_db == 45
    assert all(p.is_file() for p in ds.db_paths)
    assert "distractors" in ds.notes


def test_folders_evaluation_semantics(shared_data):
    # A ranking that puts the query itself first, then its landmark, then the rest: junk (itself) is removed,
    # so every AP is 1 and E = M = 100; Hard has no positives -> n/a.
    ds = load_folders(shared_data / "images", shared_data / "images_distractors")
    cols = []
    for q in ds.gnd.gnd:
        first = [*q.junk.tolist(), *q.easy.tolist()]
        cols.append(first + [i for i in range(ds.n_db) if i not in first])
    res = evaluate(ds.gnd, np.array(cols).T, n_db=ds.n_db)
    assert res["E"]["mAP"] == pytest.approx(100.0) and res["E"] == res["M"] and res["H"] is None
    # Distractors ranked first push every positive down by 16.
    cols2 = [list(range(45, 61)) + [i for i in c if i < 45] for c in cols]
    res2 = evaluate(ds.gnd, np.array(cols2).T, n_db=ds.n_db)
    assert res2["M"]["mAP"] < 60 and res2["M"]["mP@10"] == 0.0


def _img(p: Path) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(p)


def test_loose_and_single_image_landmarks(tmp_path):
    for n in ("a/1.jpg", "a/2.png", "a/sub/3.jpg", "b/1.jpg", "loose.jpg", "c/notes.txt"):
        if n.endswith(".txt"):
            (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / n).write_text("x")
        else:
            _img(tmp_path / n)
    ds = load_folders(tmp_path)
    assert ds.db_names == ["a/1.jpg", "a/2.png", "a/sub/3.jpg", "b/1.jpg", "loose.jpg"]
    # Only landmark 'a' (3 images, sub-folder included) gives queries; 'b' (one image) and loose.jpg: database only.
    assert ds.query_names == ["a/1.jpg", "a/2.png", "a/sub/3.jpg"]
    assert [q.easy.tolist() for q in ds.gnd.gnd] == [[1, 2], [0, 2], [0, 1]]
    assert "single_image_landmarks" in ds.notes and "loose_images" in ds.notes


def test_distractors_inside_root_not_counted_twice(tmp_path):
    for n in ("a/1.jpg", "a/2.jpg", "extra/x.jpg", "extra/deep/y.jpg"):
        _img(tmp_path / n)
    ds = load_folders(tmp_path, tmp_path / "extra")
    assert ds.db_names == ["a/1.jpg", "a/2.jpg", "distractors/deep/y.jpg", "distractors/x.jpg"]
    assert ds.n_queries == 2 and ds.n_distractors == 2


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_folders(tmp_path / "nope")
    _img(tmp_path / "only" / "1.jpg")
    with pytest.raises(FileNotFoundError, match="no landmark folder with two or more images"):
        load_folders(tmp_path)
    with pytest.raises(FileNotFoundError, match="distractor folder not found"):
        list_distractors(tmp_path / "missing")


def test_load_dataset_folders_and_unknown(shared_data):
    conf = load_config(None, ["dataset.type=folders", f"dataset.root={shared_data / 'images'}",
                              f"dataset.distractors={shared_data / 'images_distractors'}"])
    ds = load_dataset(conf)
    assert re.fullmatch(r"folders-images-[0-9a-f]{6}\+distractors-16-[0-9a-f]{6}", ds.name) and ds.n_db == 61
    with pytest.raises(ConfigError, match="dataset.root"):
        load_dataset(load_config(None, ["dataset.type=folders"]))
    with pytest.raises(ConfigError, match="dataset.type: 'gldv2' is not allowed: one of minibench, revisitop, folders"):
        load_dataset(load_config(None, ["dataset.type=gldv2"]))


def test_same_folder_name_elsewhere_is_another_dataset(tmp_path: Path) -> None:
    """Features are kept per dataset name: two photo folders called 'photos' must not share a store."""
    from PIL import Image

    names = []
    for parent in ("a", "b"):
        for lm in ("x", "y"):
            for k in range(2):
                p = tmp_path / parent / "photos" / lm / f"{k}.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (k * 50, 0, 0)).save(p)
        names.append(load_folders(tmp_path / parent / "photos").name)
    assert names[0] != names[1] and all(n.startswith("folders-photos-") for n in names)
    assert load_folders(tmp_path / "a" / "photos").name == names[0]  # stable for the same folder
