"""GLDv2 label files, relabelling, split, class-balanced sampler, unreadable images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from delg.data.gldv2 import (
    EpochBatchSampler,
    GLDv2Error,
    LandmarkDataset,
    collate_skip,
    image_path,
    load_landmarks,
    read_labels,
    split_train_val,
)


def test_kaggle_2021_excerpt(shared_data: Path):
    csv = shared_data / "gldv2" / "kaggle_landmark_retrieval_2021_train_excerpt.csv"
    rows = read_labels(csv)
    assert len(rows) == 30
    lm1 = [i for i, lm in rows if lm == 1]
    assert lm1 == ["17660ef415d37059", "92b6290d571448f6", "cd41bf948edc0340", "fb09f1e98c6d2f70"]
    data = load_landmarks(csv, "/imgs")
    assert data.num_classes == len({lm for _, lm in rows})
    assert data.landmark_ids == sorted(data.landmark_ids) and data.landmark_ids[0] == 1
    assert set(data.labels.tolist()) == set(range(data.num_classes))
    i = data.image_ids.index("17660ef415d37059")
    assert data.labels[i] == 0
    assert data.paths[i] == Path("/imgs/1/7/6/17660ef415d37059.jpg")


def test_three_formats_agree(tmp_path: Path):
    (tmp_path / "clean.csv").write_text("landmark_id,images\n7,aaa111 bbb222\n3,ccc333\n")
    (tmp_path / "full.csv").write_text(
        "id,url,landmark_id\naaa111,http://x/a.jpg,7\nbbb222,http://x/b.jpg,7\nccc333,http://x/c.jpg,3\n")
    (tmp_path / "kaggle.csv").write_text("id,landmark_id\nccc333,3\naaa111,7\nbbb222,7\n")
    sets = [sorted(read_labels(tmp_path / f)) for f in ("clean.csv", "full.csv", "kaggle.csv")]
    assert sets[0] == sets[1] == sets[2] == [("aaa111", 7), ("bbb222", 7), ("ccc333", 3)]
    d = load_landmarks(tmp_path / "clean.csv", tmp_path)
    assert d.landmark_ids == [3, 7]
    assert dict(zip(d.image_ids, d.labels.tolist())) == {"aaa111": 1, "bbb222": 1, "ccc333": 0}
    assert image_path(tmp_path, "aaa111") == tmp_path / "a" / "a" / "a" / "aaa111.jpg"


def test_bad_files_name_file_and_line(tmp_path: Path):
    (tmp_path / "bad.csv").write_text("id,landmark_id\nabc123,4\nabd999,notanumber\n")
    with pytest.raises(GLDv2Error, match=r"bad.csv:3"):
        read_labels(tmp_path / "bad.csv")
    (tmp_path / "hdr.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(GLDv2Error, match="hdr.csv: header"):
        read_labels(tmp_path / "hdr.csv")
    with pytest.raises(GLDv2Error, match="not found"):
        read_labels(tmp_path / "nope.csv")


def _synthetic_labels(tmp_path: Path, n_classes: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lines = ["landmark_id,images"]
    for c in range(n_classes):
        n = int(rng.integers(1, 9))
        ids = ["".join(rng.choice(list("0123456789abcdef"), 16)) for _ in range(n)]
        lines.append(f"{100 + 3 * c},{' '.join(ids)}")
    p = tmp_path / "train_clean.csv"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_split_reproducible_stratified_order_free(tmp_path: Path):
    data = load_landmarks(_synthetic_labels(tmp_path), tmp_path)
    tr, va = split_train_val(data, 0.25, seed=3)
    tr2, va2 = split_train_val(data.subset(np.arange(len(data))[::-1]), 0.25, seed=3)
    assert sorted(va.image_ids) == sorted(va2.image_ids) and sorted(tr.image_ids) == sorted(tr2.image_ids)
    assert not set(tr.image_ids) & set(va.image_ids) and len(tr) + len(va) == len(data)
    assert set(tr.labels.tolist()) == set(range(data.num_classes))  # every landmark keeps training images
    assert va.num_classes == tr.num_classes == data.num_classes
    for c in range(data.num_classes):
        n = int((data.labels == c).sum())
        nv = int((va.labels == c).sum())
        assert nv == (0 if n < 3 else min(n - 1, max(1, round(0.25 * n))))
    _, va3 = split_train_val(data, 0.25, seed=4)
    assert sorted(va3.image_ids) != sorted(va.image_ids)


def test_balanced_sampler(tmp_path: Path):
    data = load_landmarks(_synthetic_labels(tmp_path, n_classes=15), tmp_path)
    s = EpochBatchSampler(data.labels, batch_size=8, balanced=True, images_per_class=2, seed=1)
    s.set_epoch(0)
    batches = list(s)
    assert len(batches) == len(s) > 0
    seen = set()
    for b in batches:
        counts = np.bincount(data.labels[b])
        assert (counts[counts > 0] >= 2).all()
        seen |= set(b)
    assert seen == set(range(len(data)))  # an epoch sees every image
    s.set_epoch(1)
    assert list(s) != batches
    s.set_epoch(0)
    assert list(s) == batches  # reproducible
    # Ranks split the same global list and get equal counts.
    parts = [list(EpochBatchSampler(data.labels, 8, True, 2, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(batches) // 2
    assert parts[0] == batches[0::2][: len(parts[0])]


def test_plain_sampler_covers_epoch(tmp_path: Path):
    for n, expect in ((22, 22), (21, 20)):  # a last batch of one is dropped (BatchNorm needs two)
        s = EpochBatchSampler(np.arange(n) % 4, batch_size=5)
        b = list(s)
        flat = [i for x in b for i in x]
        assert len(flat) == len(set(flat)) == expect and all(2 <= len(x) <= 5 for x in b)


def test_unreadable_images_are_reported_not_fatal(tmp_path: Path):
    (tmp_path / "l.csv").write_text("landmark_id,images\n1,aaa000 bbb000 ccc000\n")
    data = load_landmarks(tmp_path / "l.csv", tmp_path / "img")
    for i, kind in zip(data.image_ids, ("ok", "corrupt", "missing")):
        p = image_path(tmp_path / "img", i)
        p.parent.mkdir(parents=True, exist_ok=True)
        if kind == "ok":
            Image.new("RGB", (20, 16), (200, 10, 10)).save(p)
        elif kind == "corrupt":
            p.write_bytes(b"\xff\xd8 not a jpeg")
    ds = LandmarkDataset(data, lambda im: torch.zeros(3, 4, 4), n_views=2)
    batch = collate_skip([ds[i] for i in range(3)])
    assert batch["views"].shape == (1, 2, 3, 4, 4) and batch["index"].tolist() == [0]
    assert [i for i, _ in batch["bad"]] == [1, 2]
    assert "cannot decode" in batch["bad"][0][1] and "not found" in batch["bad"][1][1]


def test_layout_is_written_and_read_by_one_module(tmp_path: Path):
    from delg.data.gldv2_layout import read_train_clean, write_train_clean

    csv = write_train_clean(tmp_path / "train_clean.csv", [(7, ["aaa111", "bbb222"]), (3, ["ccc333"])])
    assert csv.read_text() == "landmark_id,images\n7,aaa111 bbb222\n3,ccc333\n"
    assert read_train_clean(csv) == [("aaa111", 7), ("bbb222", 7), ("ccc333", 3)]
    assert read_labels(csv) == read_train_clean(csv)
    # only the clean format is a train_clean.csv (the downloader checks the extracted images against it)
    (tmp_path / "kaggle.csv").write_text("id,landmark_id\nccc333,3\n")
    with pytest.raises(GLDv2Error, match="kaggle.csv: header"):
        read_train_clean(tmp_path / "kaggle.csv")


@pytest.mark.parametrize("text", ["landmark_id,images\n1,abcdef0123456789 ../x\n", "id,landmark_id\n../x,1\n"])
def test_image_ids_that_would_escape_the_image_folder_are_refused(tmp_path: Path, text: str):
    # ids become paths (a/b/c/<id>.jpg): '../x' would point outside the image folder
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(GLDv2Error, match=r"labels.csv:2: field '(images|id)': bad image id '\.\./x'"):
        read_labels(tmp_path / "labels.csv")
