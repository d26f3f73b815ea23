"""DELG model: ImageNet weights, extraction contract, keypoint centres, checkpoints, pycls import."""

from __future__ import annotations

import ast
import copy
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycls_layout import pycls_resnet50_state, write_pycls_checkpoint

from delg.config import load_config
from delg.model import DELG, CheckpointError, ModelError, build_model
from delg.model.backbones import create_timm

torch.set_num_threads(1)


def _conf(**kw):
    return load_config(None, [f"model.{k}={v}" for k, v in kw.items()]).model


@pytest.fixture(scope="module")
def lite() -> DELG:
    return build_model(_conf())


def test_efficientnet_lite0_imagenet_weights_classify_chelsea():
    from PIL import Image
    from skimage import data

    net = create_timm("efficientnet_lite0", pretrained=True).eval()
    im = Image.fromarray(data.chelsea()).resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float()[None] / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        assert int(net(x).argmax()) == 285  # Egyptian cat


def test_extract_contract_off_the_shelf(lite):
    m = lite
    assert not m.training and m.meta["trained_global"] is False and m.meta["trained_local"] is False
    assert m.meta["global_dim"] == 1280 and m.meta["local_dim"] == 64 and m.meta["checkpoint"] is None
    x = torch.randn(2, 3, 96, 128)
    out = m.extract(x)
    assert out["global"].shape == (2, 1280)
    assert torch.allclose(out["global"].norm(dim=1), torch.ones(2), atol=1e-5)
    assert out["attention"].shape == (2, 6, 8) and (out["attention"] > 0).all()
    assert out["local"].shape == (2, 6, 8, 64)
    assert torch.allclose(out["local"].norm(dim=-1), torch.ones(2, 6, 8), atol=1e-4)
    # Off the shelf = GeM + L2 of the ImageNet features, no untrained whitening.
    with torch.no_grad():
        f = m.backbone.forward32(m.backbone.forward16(x)).clamp(min=1e-6)
        gem = f.pow(3).mean(dim=(2, 3)).pow(1 / 3)
    assert torch.allclose(out["global"], F.normalize(gem, dim=1), atol=1e-5)


def test_stride16_computed_once_and_global_skippable(lite):
    m = lite
    calls = {"s16": 0, "s32": 0}
    h1 = m.backbone.stage16.register_forward_hook(lambda *a: calls.__setitem__("s16", calls["s16"] + 1))
    h2 = m.backbone.stage32.register_forward_hook(lambda *a: calls.__setitem__("s32", calls["s32"] + 1))
    try:
        out = m.extract(torch.randn(1, 3, 64, 64), want_global=False, want_local=True)
        assert set(out) == {"attention", "local"} and calls == {"s16": 1, "s32": 0}
        m.extract(torch.randn(1, 3, 64, 64))
        assert calls == {"s16": 2, "s32": 1}
        out = m.extract(torch.randn(1, 3, 64, 64), want_local=False)
        assert set(out) == {"global"}
    finally:
        h1.remove()
        h2.remove()


def _gradient_support_centre(trunk: torch.nn.Module, size: int, cell: tuple[int, int]) -> tuple[float, float]:
    """Independent receptive-field centre: the input pixels that one output cell depends on.

    Positive weights, identity BN and average pooling make every path non-zero, so the support of the gradient
    is exactly the receptive field (clipped to the image; the cell is chosen well inside).
    """
    t = copy.deepcopy(trunk).eval()
    for name, mod in list(t.named_modules()):
        if isinstance(mod, torch.nn.Conv2d):
            with torch.no_grad():
                mod.weight.fill_(1.0 / (mod.weight[0].numel()))
                if mod.bias is not None:
                    mod.bias.zero_()
        elif isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_parameters()
            mod.running_mean.zero_()
            mod.running_var.fill_(1 - mod.eps)
        elif isinstance(mod, torch.nn.MaxPool2d):
            parent = t.get_submodule(name.rpartition(".")[0]) if "." in name else t
            setattr(parent, name.rpartition(".")[2],
                    torch.nn.AvgPool2d(mod.kernel_size, mod.stride, mod.padding, count_include_pad=False))
    x = torch.full((1, 3, size, size), 0.1, requires_grad=True)
    y = t(x)
    y[0, :, cell[0], cell[1]].sum().backward()
    ys, xs = np.nonzero(x.grad[0].abs().sum(0).numpy() > 0)
    return (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2


@pytest.mark.parametrize("backbone,size", [("efficientnet_lite0", 448), ("resnet50", 448)])
def test_keypoint_centers_match_receptive_field(backbone, size):
    m = DELG(backbone=backbone, pretrained=False)
    h = w = size // 16
    cell = (h // 2, w // 2 - 1)
    cx, cy = _gradient_support_centre(m.backbone.stage16, size, cell)
    centers = m.keypoint_centers(h, w)
    assert centers.shape == (h * w, 2)
    got = centers[cell[0] * w + cell[1]]
    assert float(got[0]) == pytest.approx(cx) and float(got[1]) == pytest.approx(cy)


def test_bad_backbone_and_missing_resnet_weights(tmp_path, monkeypatch):
    from delg.errors import ConfigError

    # the typed settings refuse it (naming the valid backbones) before the model code would
    with pytest.raises((ModelError, ConfigError), match="model.backbone: 'vgg16' is not allowed.*efficientnet_lite0"):
        build_model(_conf(backbone="vgg16"))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr("delg.model.backbones.REPO_ROOT", tmp_path)
    with pytest.raises(ModelError, match="resnet50_imagenet.pth"):
        build_model(_conf(backbone="resnet50"))


def test_resnet_weights_from_local_file(tmp_path, monkeypatch):
    ref = create_timm("resnet50", pretrained=False)
    torch.save(ref.state_dict(), tmp_path / "resnet50_imagenet.pth")
    monkeypatch.setenv("DELG_WEIGHTS", str(tmp_path))
    m = build_model(_conf(backbone="resnet50"))
    assert torch.equal(m.backbone.stage16.layer3[2].conv2.weight, ref.layer3[2].conv2.weight)


def test_save_load_roundtrip_and_architecture_check(tmp_path):
    m = DELG("efficientnet_lite0", pretrained=False, whiten_dim=32, local_dim=16, num_classes=7,
             trained_global=True, trained_local=True)
    with torch.no_grad():
        m.global_head.pool.p.fill_(2.5)
    p = m.save(tmp_path / "ck.pth", epoch=3, config={"a": 1})
    ck = torch.load(p, weights_only=True)
    assert ck["format_version"] == 1 and ck["epoch"] == 3 and ck["config"] == {"a": 1}
    assert ck["meta"]["num_classes"] == 7 and ck["meta"]["backbone"] == "efficientnet_lite0"
    m2 = build_model(_conf(checkpoint=str(p), global_dim=999))  # dims come from the checkpoint
    assert m2.meta["global_dim"] == 32 and m2.meta["local_dim"] == 16 and m2.meta["trained_local"]
    assert m2.meta["checkpoint"] == str(p)
    x = torch.randn(1, 3, 64, 64)
    a, b = m.eval().extract(x), m2.extract(x)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6)
    with pytest.raises(ModelError, match="model.backbone=efficientnet_lite0"):
        build_model(_conf(checkpoint=str(p), backbone="resnet50"))
    bad = dict(ck)
    bad["model_state"] = {k: v for k, v in ck["model_state"].items() if "att_bn" not in k}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="missing: .*att_bn"):
        build_model(_conf(checkpoint=str(tmp_path / "bad.pth")))


class _Legacy:  # an arbitrary pickled object, as old checkpoints hold (pickled configs)
    pass


def test_pickled_objects_refused_numpy_scalars_allowed(tmp_path):
    m = DELG("efficientnet_lite0", pretrained=False, trained_global=True)
    p = m.save(tmp_path / "ck.pth", extra={"cfg_obj": _Legacy()})
    with pytest.raises(CheckpointError, match=r"ck\.pth: .*_Legacy.*refused"):
        build_model(_conf(checkpoint=str(p)))
    # numpy scalars (metrics saved by older training scripts) are data, not code: allowed
    p = m.save(tmp_path / "np.pth", extra={"best_map": np.float64(0.5), "dtype": np.dtype("float32")})
    assert build_model(_conf(checkpoint=str(p))).meta["trained_global"]


def test_every_torch_load_is_weights_only():
    """The rule for untrusted files: no ``torch.load`` anywhere in the project without ``weights_only=True``."""
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for f in sorted(root.glob("**/*.py")):
        if any(part.startswith(".") or part in ("outputs", "build") for part in f.relative_to(root).parts):
            continue
        for call in ast.walk(ast.parse(f.read_text(), str(f))):
            if not (isinstance(call, ast.Call) and ast.unparse(call.func) == "torch.load"):
                continue
            kw = {k.arg: k.value for k in call.keywords}
            flag = kw.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                offenders.append(f"{f.relative_to(root)}:{call.lineno}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


# ------------------------------------------------------------------------------------------ pycls import
_pycls_resnet50_state = pycls_resnet50_state  # the name tests/test_train.py imports


def test_pycls_checkpoint_import(tmp_path):
    sd = _pycls_resnet50_state(n_cls=11, dim=512, gen=torch.Generator().manual_seed(0))
    path = tmp_path / "r50_delg_s512.pyth"
    torch.save({"epoch": 10, "model_state": sd, "optimizer_state": {}, "cfg": "MODEL:\n  DEPTH: 50\n"}, path)
    m = build_model(_conf(backbone="resnet50", checkpoint=str(path)))
    meta = m.meta
    assert meta["backbone"] == "resnet50" and meta["global_dim"] == 512 and meta["local_dim"] == 512
    assert meta["num_classes"] == 11 and meta["trained_local"] and meta["trained_global"]
    bb = m.backbone
    assert torch.equal(bb.stage16.conv1.weight, sd["globalmodel.stem.conv.weight"])
    assert torch.equal(bb.stage16.layer3[5].conv2.weight, sd["globalmodel.s3.b6.f.b.weight"])
    assert torch.equal(bb.stage32.layer4[0].downsample[1].running_var, sd["globalmodel.s4.b1.bn.running_var"])
    assert torch.equal(m.arcface.weight, sd["desc_cls.weight"])

    # Outputs against a hand-written pycls forward of the heads on the same stride-16 map.
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    out = m.extract(x)
    with torch.no_grad():
        f16 = bb.forward16(x)
        f32 = bb.forward32(f16)

        def bn(t, name):
            return F.batch_norm(t, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                                sd[f"{name}.bias"], False, 0.0, 1e-5)

        p = sd["globalmodel.head.pool.p"]
        g = f32.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1 / p)
        g = F.linear(g, sd["globalmodel.head.fc.weight"], sd["globalmodel.head.fc.bias"])
        h = bn(F.conv2d(f16, sd["localmodel.conv1.weight"], sd["localmodel.conv1.bias"]), "localmodel.bn")
        att = F.softplus(F.conv2d(F.relu(h), sd["localmodel.conv2.weight"], sd["localmodel.conv2.bias"]))
    assert torch.allclose(out["global"], F.normalize(g, dim=1), atol=1e-5)
    assert torch.allclose(out["attention"], att[:, 0], rtol=1e-4, atol=1e-5)
    assert torch.allclose(out["local"], F.normalize(h, dim=1).permute(0, 2, 3, 1), atol=1e-5)

    # Strictness: an unknown key and a missing block are reported by name.
    sd2 = OrderedDict(sd)
    sd2["globalmodel.extra.weight"] = torch.zeros(1)
    torch.save({"model_state": sd2}, tmp_path / "x.pyth")
    with pytest.raises(CheckpointError, match="globalmodel.extra.weight"):
        build_model(_conf(backbone="resnet50", checkpoint=str(tmp_path / "x.pyth")))
    sd3 = OrderedDict((k, v) for k, v in sd.items() if not k.startswith("globalmodel.s2.b2.f.c."))
    torch.save({"model_state": sd3}, tmp_path / "y.pyth")
    with pytest.raises(CheckpointError, match=r"missing: .*layer2\.1\.conv3\.weight"):
        build_model(_conf(backbone="resnet50", checkpoint=str(tmp_path / "y.pyth")))



# ------------------------------------------------------------------------------------------------ whitening init
def test_pca_projection_orthonormal_and_matches_svd():
    from delg.model.heads import GlobalHead, pca_projection

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g,
                                                                                dtype=torch.float64) + 3.0
    w, b = pca_projection(x, 5)
    assert w.shape == (5, 12) and b.shape == (5,)
    torch.testing.assert_close(w.double() @ w.double().t(), torch.eye(5, dtype=torch.float64), atol=1e-5, rtol=0)
    # Explicit computation: the top-5 right singular vectors of the centred data (up to sign), bias = -W mean.
    mean = x.mean(0)
    _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
    signs = torch.sign((w.double() * vt[:5]).sum(1))
    torch.testing.assert_close(w.double() * signs[:, None], vt[:5], atol=1e-5, rtol=0)
    torch.testing.assert_close(b.double(), -(w.double() @ mean), atol=1e-4, rtol=0)
    y = x.float() @ w.t() + b  # centred, variances = the top eigenvalues in decreasing order
    torch.testing.assert_close(y.mean(0), torch.zeros(5), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.var(0).double(), s[:5] ** 2 / 199, rtol=1e-4, atol=0)

    # power=0.5 whitens: identity covariance on the fit data; a GlobalHead takes it as its FC.
    w2, b2 = pca_projection(x, 5, power=0.5)
    y2 = x.float() @ w2.t() + b2
    torch.testing.assert_close(torch.cov(y2.t().double()), torch.eye(5, dtype=torch.float64), atol=1e-4, rtol=0)
    head = GlobalHead(12, 5)
    head.init_pca(x.float(), power=0.5)
    torch.testing.assert_close(head.fc(x.float()), y2, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="out_dim"):
        pca_projection(x, 13)


def test_pca_projection_beyond_rank_stays_orthonormal():
    from delg.model.heads import pca_projection

    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))  # rank 3 after centring
    w, b = pca_projection(x, 8)
    torch.testing.assert_close(w @ w.t(), torch.eye(8), atol=1e-5, rtol=0)
    w2, _ = pca_projection(x, 8, power=0.5)
    assert torch.isfinite(w2).all()


def test_arcface_imprint_is_class_mean_direction():
    from delg.model.heads import ArcFace

    arc = ArcFace(4, 3)
    with torch.no_grad():
        arc.weight[2] = -1.0  # class 2 gets no sample: a fixed direction, away from the data (not a random one)
    before = arc.weight.detach().clone()
    d = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 5.0], [0, 0, 3.0, 0]])
    arc.init_from_means(d, torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(arc.weight[0], F.normalize(torch.tensor([1.0, 1.0, 0, 0]), dim=0))
    torch.testing.assert_close(arc.weight[1], F.normalize(torch.tensor([0, 0, 1.0, 1.0]), dim=0))
    torch.testing.assert_close(arc.weight[2], before[2])  # a class without samples keeps its weights
    # Imprinted, the classifier already separates the classes (no margin at test time).
    assert arc(d).argmax(1).tolist() == [0, 0, 1, 1]


# ------------------------------------------------------------------------------------------------ conventions
def test_colour_order_belongs_to_the_weights(tmp_path):
    """pycls (seed) weights expect BGR with the BGR statistics; the convention survives a save (a fine-tune of a seed
    checkpoint stays BGR); our checkpoints written before the key existed mean RGB."""
    from delg.model import BGR_MEAN, BGR_STD, IMAGENET_MEAN, IMAGENET_STD

    path, _ = write_pycls_checkpoint(tmp_path / "seed.pyth")
    m = build_model(_conf(backbone="resnet50", pretrained=False, checkpoint=str(path)))
    assert (m.input_colour, m.mean, m.std) == ("bgr", BGR_MEAN, BGR_STD)
    assert m.meta["input_colour"] == "bgr" and m.meta["mean"] == list(BGR_MEAN) and m.meta["std"] == list(BGR_STD)
    m.save(tmp_path / "ours.pth")
    again = build_model(_conf(backbone="resnet50", pretrained=False, checkpoint=str(tmp_path / "ours.pth")))
    assert (again.input_colour, again.mean, again.std) == ("bgr", BGR_MEAN, BGR_STD)
    # An old checkpoint of ours (no input_colour / mean / std / attention_input in its meta): RGB, attention on recon.
    lite = DELG("efficientnet_lite0", pretrained=False)
    lite.save(tmp_path / "old.pth")
    ck = torch.load(tmp_path / "old.pth", weights_only=True)
    for k in ("input_colour", "mean", "std", "attention_input"):
        del ck["meta"][k]
    torch.save(ck, tmp_path / "old.pth")
    old = build_model(_conf(checkpoint=str(tmp_path / "old.pth")))
    assert (old.input_colour, old.mean, old.std) == ("rgb", IMAGENET_MEAN, IMAGENET_STD)
    assert old.local_head.attention_input == "recon"
    assert DELG("efficientnet_lite0", pretrained=False).meta["input_colour"] == "rgb"


def test_delg_attention_runs_on_block3_and_old_checkpoints_keep_recon(tmp_path):
    """DELG computes attention on the stride-16 (block-3) map and pools attention * normalise(reconstruction)."""
    torch.manual_seed(0)
    m = DELG("efficientnet_lite0", pretrained=False, whiten_dim=16, local_dim=8, attention_dim=16, num_classes=3).eval()
    lh = m.local_head
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        f16 = m.backbone.forward16(x)
        recon = lh.decoder(lh.encoder(f16))  # efficientnet: no ReLU on the reconstruction
        att = F.softplus(lh.att_conv2(F.relu(lh.att_bn(lh.att_conv1(f16)))))
        logits = m.att_classifier((att * F.normalize(recon, dim=1)).mean(dim=(-2, -1)))
        out = m.extract(x)
        train_out = m(x, torch.tensor([1]))
    torch.testing.assert_close(out["attention"], att[:, 0])
    torch.testing.assert_close(train_out["local_logits"], logits)
    assert m.meta["attention_input"] == "block3"
    # The same tensors under the old variant: attention on the reconstruction, kept by a checkpoint that says so.
    m.save(tmp_path / "ck.pth")
    ck = torch.load(tmp_path / "ck.pth", weights_only=True)
    ck["meta"]["attention_input"] = "recon"
    torch.save(ck, tmp_path / "ck.pth")
    old = build_model(_conf(checkpoint=str(tmp_path / "ck.pth")))
    with torch.no_grad():
        att_old = F.softplus(lh.att_conv2(F.relu(lh.att_bn(lh.att_conv1(recon)))))
        torch.testing.assert_close(old.extract(x)["attention"], att_old[:, 0])


def test_arcface_scale_null_is_sqrt_dim():
    m = build_model(load_config(None, ["model.pretrained=false", "model.global_dim=2048", "model.arcface_scale=null",
                                       "model.arcface_margin=0.1", "model.num_classes=5"]).model)
    assert m.arcface.scale == pytest.approx(45.2548, abs=1e-4) and m.arcface.margin == 0.1
    assert m.meta["arcface_scale"] == pytest.approx(45.2548, abs=1e-4)


def test_paper_training_configs_follow_delg_head_settings():
    """The 2048-d paper training configs use DELG's ArcFace margin 0.1 and scale sqrt(2048)."""
    repo = Path(__file__).resolve().parent.parent
    for name in ("r50_gldv2_ce", "r50_gldv2_supcon", "r101_gldv2_ce", "r101_gldv2_supcon"):
        conf = load_config(repo / "configs" / "paper" / f"{name}.yaml")
        assert conf.model.global_dim == 2048 and conf.model.arcface_margin == 0.1, name
        assert conf.model.arcface_scale is None, name  # = sqrt(global_dim)
