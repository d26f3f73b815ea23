"""Losses, augmentation, schedule, and the trainer end to end (single process, resume, DDP with gloo)."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from delg.config import ConfigError, load_config
from delg.data.gldv2 import LandmarkDataset, image_path, load_landmarks
from delg.model import DELG, build_model
from delg.model.heads import ArcFace
from delg.train.augment import train_transform
from delg.train.losses import DELGLoss, LossConfigError, supcon_loss
from delg.train.trainer import TrainConfigError, lr_factor
from delg.train.trainer import main as train_main

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ losses
def test_supcon_hand_computed():
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    t = 0.5
    s = (z @ z.t()).numpy() / t
    total, anchors = 0.0, 0
    for i in range(4):
        others = [a for a in range(4) if a != i]
        denom = math.log(sum(math.exp(s[i, a]) for a in others))
        pos = [p for p in others if labels[p] == labels[i]]
        total += -sum(s[i, p] - denom for p in pos) / len(pos)
        anchors += 1
    expected = total / anchors
    assert float(supcon_loss(z, labels, t)) == pytest.approx(expected, rel=1e-6)
    # Scale invariance (features are normalised) and a lone anchor without positives is ignored.
    assert float(supcon_loss(3 * z, labels, t)) == pytest.approx(expected, rel=1e-6)
    z5 = torch.cat([z, torch.tensor([[0.3, -0.9]])])
    s5 = (F.normalize(z5, dim=1) @ F.normalize(z5, dim=1).t()).numpy() / t
    tot = 0.0
    for i in range(4):
        others = [a for a in range(5) if a != i]
        denom = math.log(sum(math.exp(s5[i, a]) for a in others))
        pos = [p for p in others if p < 4 and labels[p] == labels[i]]
        tot += -sum(s5[i, p] - denom for p in pos) / len(pos)
    assert float(supcon_loss(z5, torch.tensor([0, 0, 1, 1, 2]), t)) == pytest.approx(tot / 4, rel=1e-6)


def test_arcface_margin_by_hand():
    head = ArcFace(2, 3, margin=0.2, scale=10.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    theta = 0.7
    x = torch.tensor([[math.cos(theta), math.sin(theta)]])
    logits = head(x, torch.tensor([0])).detach()
    assert float(logits[0, 0]) == pytest.approx(10 * math.cos(theta + 0.2), rel=1e-5)
    assert float(logits[0, 1]) == pytest.approx(10 * math.sin(theta), rel=1e-5)
    assert float(head(x).detach()[0, 0]) == pytest.approx(10 * math.cos(theta), rel=1e-5)


def test_unknown_loss_is_clear():
    with pytest.raises(LossConfigError, match="loss.global: 'triplet' is not allowed: one of ce, supcon, ce.supcon"):
        DELGLoss({"global": "triplet"})



@pytest.mark.parametrize("key,value", [("supcon_weight", -1.0), ("ce_weight", float("nan")),
                                       ("attention_weight", "high"), ("reconstruction_weight", True),
                                       ("supcon_temperature", 0.0), ("local", "yes")])
def test_loss_settings_are_range_checked(key: str, value: object):
    with pytest.raises(LossConfigError, match=f"loss.{key}: .* is not allowed"):
        DELGLoss({"global": "ce+supcon", key: value})


@pytest.mark.parametrize("override,key", [("train.lr=0", "lr"), ("train.epochs=0", "epochs"),
                                          ("train.batch_size=1", "batch_size"), ("train.warmup_epochs=-1",
                                                                                 "warmup_epochs"),
                                          ("train.images_per_class=0", "images_per_class"),
                                          ("train.clip_grad_norm=0", "clip_grad_norm"),
                                          ("loss.supcon_weight=-0.001", "supcon_weight")])
def test_train_settings_checked_before_any_work(tmp_path: Path, override: str, key: str):
    """A bad setting stops the trainer before it reads any data (the label file here does not exist)."""
    with pytest.raises((ConfigError, TrainConfigError, LossConfigError), match=rf"\.{key}: .* is not allowed"):
        conf = load_config(REPO / "configs" / "train_supcon.yaml",
                           [f"train.csv={tmp_path / 'missing.csv'}", f"train.images={tmp_path}", "train.data=gldv2",
                            f"output_dir={tmp_path / 'o'}", override])
        train_main(conf)
    assert not (tmp_path / "o").exists()

def test_local_losses_do_not_reach_backbone():
    m = DELG("efficientnet_lite0", pretrained=False, num_classes=3).train()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    out = m(x, y)
    crit = DELGLoss({"global": "ce", "local": True})
    _, parts = crit(out, y)
    assert set(parts) == {"ce", "attention", "reconstruction"}
    local = F.cross_entropy(out["local_logits"], y) + F.mse_loss(out["recon"], out["f16"])
    local.backward(retain_graph=True)
    assert all(p.grad is None for p in m.backbone.parameters())
    assert m.local_head.encoder.weight.grad is not None and m.att_classifier.weight.grad is not None
    F.cross_entropy(out["global_logits"], y).backward()
    assert m.backbone.stage16.conv_stem.weight.grad.abs().sum() > 0


def test_two_views_differ(tmp_path: Path):
    (tmp_path / "l.csv").write_text("landmark_id,images\n1,abc0001\n")
    data = load_landmarks(tmp_path / "l.csv", tmp_path)
    rng = np.random.default_rng(0)
    p = image_path(tmp_path, "abc0001")
    p.parent.mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(p)
    views, label, _ = LandmarkDataset(data, train_transform({"image_size": 32}), n_views=2)[0]
    assert views.shape == (2, 3, 32, 32) and label == 0
    assert not torch.allclose(views[0], views[1])


def test_lr_schedule():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(99, 100, 10) < 0.01


# ------------------------------------------------------------------------------------------------ trainer
def _write_gld(root: Path, n_classes: int = 3, per_class: int = 4, corrupt: int = 0) -> Path:
    """Tiny GLDv2-layout data: each landmark a distinct colour pattern."""
    rng = np.random.default_rng(0)
    lines = ["landmark_id,images"]
    k = 0
    for c in range(n_classes):
        base = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
        ids = []
        for _ in range(per_class):
            i = f"{k:016x}"[::-1]
            k += 1
            p = image_path(root / "images", i)
            p.parent.mkdir(parents=True, exist_ok=True)
            noise = rng.integers(-20, 20, (40, 48, 3))
            img = np.clip(np.asarray(Image.fromarray(base).resize((48, 40))) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(p)
            ids.append(i)
        lines.append(f"{10 * c + 1},{' '.join(ids)}")
    for j in range(corrupt):
        i = f"dead{j:012x}"
        p = image_path(root / "images", i)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"broken")
        lines[1] += f" {i}"
    (root / "train_clean.csv").write_text("\n".join(lines) + "\n")
    return root


def _overrides(root: Path, out: Path, *extra: str) -> list[str]:
    return [f"train.csv={root / 'train_clean.csv'}", f"train.images={root / 'images'}", f"output_dir={out}",
            "train.data=gldv2", "train.image_size=32", "train.batch_size=4", "num_workers=0", "progress=false",
            "model.pretrained=false", "model.global_dim=16", "model.local_dim=8", "model.attention_dim=16",
            "train.val_fraction=0", *extra]


def _log(out: Path) -> list[dict[str, str]]:
    with (out / "train_log.csv").open() as f:
        return list(csv.DictReader(f))


def test_trainer_single_process_resume_and_skips(tmp_path: Path):
    root = _write_gld(tmp_path / "gld", corrupt=1)
    out = tmp_path / "run"
    conf = load_config(REPO / "configs" / "train_ce.yaml", _overrides(root, out, "train.epochs=1"))
    last = train_main(conf)
    assert last == out / "checkpoints" / "last.pth" and (out / "config.yaml").is_file()
    rows = _log(out)
    assert [r["epoch"] for r in rows] == ["1"] and float(rows[0]["loss"]) > 0 and rows[0]["supcon"] == ""
    assert int(rows[0]["skipped_images"]) == 1
    skipped = (out / "skipped_images.csv").read_text()
    assert "dead000000000000" in skipped
    ck = torch.load(last, weights_only=True)
    assert ck["epoch"] == 1 and ck["format_version"] == 1 and ck["config"]["train"]["epochs"] == 1
    assert ck["meta"]["num_classes"] == 3 and ck["optimizer_state"]["state"]

    # Resume: epochs=2 continues from epoch 1 with the saved weights, does not redo it.
    conf2 = load_config(REPO / "configs" / "train_ce.yaml", _overrides(root, out, "train.epochs=2"))
    train_main(conf2)
    assert [r["epoch"] for r in _log(out)] == ["1", "2"]
    assert (out / "checkpoints" / "epoch_002.pth").is_file()

    # The checkpoint is what extraction gets with model.checkpoint=PATH.
    m = build_model(load_config(None, [f"model.checkpoint={last}"]).model)
    assert m.meta["trained_global"] and m.meta["trained_local"] and m.meta["global_dim"] == 16
    assert m.extract(torch.randn(1, 3, 64, 64))["global"].shape == (1, 16)


def test_class_count_mismatch_is_an_error(tmp_path: Path):
    root = _write_gld(tmp_path / "gld")
    conf = load_config(REPO / "configs" / "train_ce.yaml",
                       _overrides(root, tmp_path / "o", "model.num_classes=81313"))
    with pytest.raises(TrainConfigError, match=r"model.num_classes=81313 .* 3 landmarks"):
        train_main(conf)


def test_ddp_two_processes_gloo_supcon(tmp_path: Path):
    root = _write_gld(tmp_path / "gld", n_classes=4, per_class=4)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "delg.train", "--config", str(REPO / "configs" / "train_supcon.yaml"),
           *_overrides(root, out, "train.epochs=1", "train.batch_size=8", "device=cpu")]
    # Own session: on a timeout the whole group (torchrun and its workers) is killed, none is left behind.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    rows = _log(out)
    assert len(rows) == 1 and float(rows[0]["supcon"]) > 0 and float(rows[0]["ce"]) > 0  # CE + SupCon
    assert int(rows[0]["images"]) == 16  # both ranks' images are counted: 16 images, 2 steps of 8
    ck = torch.load(out / "checkpoints" / "last.pth", weights_only=True)
    assert ck["epoch"] == 1 and not any(k.startswith("module.") for k in ck["model_state"])


def test_init_global_head_pca_and_imprint(tmp_path: Path):
    from delg.train.trainer import init_global_head

    root = _write_gld(tmp_path / "gld", n_classes=3, per_class=4, corrupt=1)
    data = load_landmarks(root / "train_clean.csv", root / "images")
    ov = _overrides(root, tmp_path / "o", "train.whiten_init=pca", "train.whiten_views=0", "train.whiten_power=0",
                    "train.arcface_init=imprint")
    conf = load_config(REPO / "configs" / "train_ce.yaml", ov)
    model = build_model(conf.model, num_classes=3)
    init_global_head(model, data, conf, torch.device("cpu"), log=lambda *a: None)
    w = model.global_head.fc.weight
    torch.testing.assert_close(w @ w.t(), torch.eye(16), atol=1e-4, rtol=0)  # orthonormal rows (power 0)
    # The whitened descriptors of the (readable) training images are centred; their class means are the weights.
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p), np.float32) / 255).permute(2, 0, 1)
                     for p in data.paths if p.stat().st_size > 100])
    x = (x - torch.tensor(model.mean)[:, None, None]) / torch.tensor(model.std)[:, None, None]
    labels = torch.as_tensor(data.labels)[[p.stat().st_size > 100 for p in data.paths]]
    with torch.no_grad():
        g = model.global_head(model.backbone.forward32(model.backbone.forward16(x)), whiten=True)
    assert g.mean(0).abs().max() < 1e-3 * g.abs().max()
    for c in range(3):
        mean_dir = F.normalize(F.normalize(g[labels == c], dim=1).mean(0), dim=0)
        torch.testing.assert_close(model.arcface.weight[c], mean_dir, atol=1e-4, rtol=0)


def test_backbone_lr_mult_groups():
    from delg.train.trainer import _param_groups

    model = DELG(pretrained=False, whiten_dim=8, local_dim=4, attention_dim=8, num_classes=2)
    local = {id(p) for p in model.local_head.parameters()}
    groups = _param_groups(model, 1e-4, local, local_lr_mult=2.0, backbone_lr_mult=0.1)
    mult = {id(p): g["lr_mult"] for g in groups for p in g["params"]}
    assert {mult[id(p)] for p in model.backbone.parameters()} == {0.1}
    assert {mult[id(p)] for p in model.local_head.parameters()} == {2.0}
    assert mult[id(model.global_head.fc.weight)] == 1.0 and mult[id(model.arcface.weight)] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_seed_config_follows_the_seed_recipe():
    """configs/paper/seed_r50_delg_s512.yaml is the seed's CE + SupCon run (its configs/resnet_delg_consup.yaml):
    SupCon weight 0.001, 224 px, batch 32, lr 0.001 with 5 warm-up epochs then cosine, 200 epochs of the seed's
    41 steps, no gradient clipping, BatchNorm training, unbalanced (shuffled) batches."""
    conf = load_config(REPO / "configs" / "paper" / "seed_r50_delg_s512.yaml")
    t, loss = conf.train, conf.loss
    assert loss["global"] == "ce+supcon" and loss["supcon_weight"] == 0.001 and loss["ce_weight"] == 1.0
    assert loss["supcon_temperature"] == 0.07
    assert (t.image_size, t.batch_size, t.lr, t.epochs, t.warmup_epochs) == (224, 32, 0.001, 200, 5)
    assert (t.max_steps_per_epoch, t.images_per_class, t.momentum, t.nesterov, t.weight_decay) == (41, 1, 0.9, True,
                                                                                                    1e-4)
    assert t.clip_grad_norm is None and t.freeze_bn is False and t.val_fraction == 0
    assert (conf.model.arcface_margin, conf.model.arcface_scale) == (0.15, 30.0)
    # The per-step schedule against pycls' per-epoch one (warm-up from 0.1x over 5 epochs, cosine over all 200):
    # within 0.023x the base lr after warm-up, as the config's comment says.
    spe, n_ep, wu = int(t.max_steps_per_epoch), int(t.epochs), int(t.warmup_epochs)

    def pycls(e: int) -> float:
        f = 0.5 * (1 + math.cos(math.pi * e / n_ep))
        return f * (0.1 + 0.9 * e / wu if e < wu else 1.0)

    gap = max(abs(lr_factor(e * spe + s, spe * n_ep, wu * spe) - pycls(e)) for e in range(wu, n_ep) for s in range(spe))
    assert 0.02 < gap < 0.0231
    assert lr_factor(spe * n_ep - 1, spe * n_ep, wu * spe) < 1e-6  # decays to 0 at the end, as pycls' cosine

@pytest.mark.slow
def test_finetune_from_seed_pycls_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """configs/paper/seed_r50_delg_s512.yaml fine-tunes (CE + SupCon) from a checkpoint in the seed's pycls layout:
    the backbone and global head start from it, the classifiers are re-sized to the training landmarks."""
    from test_model import _pycls_resnet50_state

    seed = tmp_path / "r50_delg_s512.pyth"
    sd = _pycls_resnet50_state(n_cls=11, dim=512, gen=torch.Generator().manual_seed(0))
    torch.save({"epoch": 10, "model_state": sd, "optimizer_state": {}, "cfg": "MODEL:\n  DEPTH: 50\n"}, seed)
    root = _write_gld(tmp_path / "gld")
    out = tmp_path / "run"
    conf = load_config(REPO / "configs" / "paper" / "seed_r50_delg_s512.yaml", [
        f"model.checkpoint={seed}", "model.num_classes=null", f"train.csv={root / 'train_clean.csv'}",
        f"train.images={root / 'images'}", f"output_dir={out}", "train.image_size=32", "train.batch_size=4",
        "train.epochs=1", "train.val_fraction=0", "num_workers=0", "progress=false", "device=cpu"])
    assert conf.loss["global"] == "ce+supcon"
    last = train_main(conf)
    assert "classifiers re-initialised for 3 classes (checkpoint had 11)" in capsys.readouterr().out
    ck = torch.load(last, weights_only=True)
    assert ck["meta"]["backbone"] == "resnet50" and ck["meta"]["global_dim"] == 512 and ck["meta"]["num_classes"] == 3
    assert ck["meta"]["input_colour"] == "bgr"  # a fine-tune of a pycls checkpoint keeps its colour order
    rows = _log(out)
    assert float(rows[0]["ce"]) > 0 and float(rows[0]["supcon"]) > 0
    # one epoch of small steps moves the imported weights a little; a fresh start would be far away
    start = sd["globalmodel.stem.conv.weight"]
    tuned = next(v for k, v in ck["model_state"].items() if k.endswith("conv1.weight") and v.shape == start.shape)
    assert (tuned - start).norm() < 0.1 * start.norm()


def test_training_input_follows_the_model_colour_order() -> None:
    """A BGR model (a pycls checkpoint and its fine-tunes) is trained on B, G, R normalised with the BGR stats."""
    from PIL import Image

    from delg.model import BGR_MEAN, BGR_STD
    from delg.train.augment import eval_transform, normalisation

    rng = np.random.default_rng(0)
    arr = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    model = DELG("efficientnet_lite0", pretrained=False, input_colour="bgr")
    x = eval_transform({"image_size": 32}, normalisation(model))(Image.fromarray(arr))
    ref = (torch.from_numpy(arr[..., ::-1].copy()).permute(2, 0, 1).float() / 255
           - torch.tensor(BGR_MEAN).view(3, 1, 1)) / torch.tensor(BGR_STD).view(3, 1, 1)
    torch.testing.assert_close(x, ref)
    rgb = eval_transform({"image_size": 32}, normalisation(DELG("efficientnet_lite0", pretrained=False)))
    assert not torch.allclose(rgb(Image.fromarray(arr)), ref)
