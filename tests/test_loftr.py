"""LoFTR verifier: cached-feature matching equals kornia's per-pair forward; checkpoint layouts; errors.

No real LoFTR weights here: checkpoints are written by the tests from random weights.  Random LoFTR gives almost no
mutual nearest neighbours (its random backbone features share one dominant direction), so the test weights are
random with two deterministic tweaks: the fixed positional encoding (``temp_bug_fix=True``) and the backbone's
coarse output scaled by 0.1 (position then dominates the coarse tokens), plus ``match_threshold=0``.  That gives
hundreds of matches per pair, so the whole pipeline (transformers, coarse and fine matching) is compared.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loftr_tools.base import ImageRef, VerifierUnavailable
from loftr_tools.loftr import LoFTRCheckpointError, LoFTRVerifier, kornia_config, read_checkpoint
from loftr_tools.resize import load_resized

CONF = {"temp_bug_fix": True, "match_threshold": 0.0, "long_side": 256, "mixed_precision": True}
MIN_MATCHES = 100


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    """One torch thread: on the shared 2-core machine a second thread mostly spins waiting for the first."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random kornia LoFTR weights (see the module docstring for the two tweaks)."""
    from kornia.feature import LoFTR

    torch.manual_seed(seed)
    model = LoFTR(pretrained=None, config=kornia_config(CONF))
    with torch.no_grad():
        model.backbone.layer3_outconv.weight.mul_(0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return random_state_dict()


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory: pytest.TempPathFactory, state: dict[str, torch.Tensor]) -> Path:
    """The zju3dv (PyTorch Lightning) layout: every key under 'matcher.' inside 'state_dict'."""
    path = tmp_path_factory.mktemp("ckpt") / "loftr_official.ckpt"
    torch.save({"epoch": 0, "state_dict": {f"matcher.{k}": v for k, v in state.items()}}, path)
    return path


@pytest.fixture(scope="module")
def verifier(official_ckpt: Path) -> LoFTRVerifier:
    return LoFTRVerifier({**CONF, "weights": str(official_ckpt)})


@pytest.fixture(scope="module")
def reference(official_ckpt: Path) -> torch.nn.Module:
    """kornia's own LoFTR with the same weights, loaded by kornia's load_state_dict (strips 'matcher.')."""
    from kornia.feature import LoFTR

    model = LoFTR(pretrained=None, config=kornia_config(CONF))
    model.load_state_dict(torch.load(official_ckpt, map_location="cpu", weights_only=True)["state_dict"])
    return model.eval()


@pytest.fixture(scope="module")
def photos(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three photos of one landmark from shared_data; synthetic textures when it is absent."""
    try:
        root = request.getfixturevalue("shared_data")
        paths = sorted((root / "images" / "paris_sacre_coeur").glob("*.jpg"))[:3]
        if len(paths) == 3:
            return paths
    except pytest.skip.Exception:
        pass
    rng = np.random.default_rng(0)
    out = []
    for k in range(3):
        noise = rng.random((70, 90))
        im = Image.fromarray((noise * 255).astype(np.uint8)).resize((720, 560), Image.BICUBIC)
        p = tmp_path_factory.mktemp("synthetic") / f"texture_{k}.png"
        im.convert("RGB").save(p)
        out.append(p)
    return out


def refs(photos: list[Path]) -> list[tuple[ImageRef, ImageRef]]:
    """Small crops: overlapping crops of one photo, two photos (landscape vs portrait), and a non-integer crop vs a
    whole photo resized to the long side (``long_side`` 256)."""
    a, b, c = photos

    def r(p: Path, crop: tuple[float, float, float, float] | None) -> ImageRef:
        return ImageRef(key=f"{p.name}{crop}", name=p.name, path=p, crop=crop)

    return [
        (r(a, (100, 100, 356, 292)), r(a, (116, 104, 372, 296))),  # 256x192 both
        (r(a, (100, 100, 356, 292)), r(c, (200, 100, 392, 356))),  # 256x192 vs 192x256
        (r(b, (0.4, 10.6, 256.2, 202.7)), r(c, None)),  # non-integer crop; a whole photo resized
    ]


@pytest.fixture(scope="module")
def prepared(verifier: LoFTRVerifier, photos: list[Path]) -> list[tuple[dict, dict]]:
    return [(verifier.prepare(r0), verifier.prepare(r1)) for r0, r1 in refs(photos)]


def reference_matches(model: torch.nn.Module, r0: ImageRef, r1: ImageRef) -> tuple[np.ndarray, np.ndarray]:
    """kornia's per-pair forward on the images; keypoints mapped with resize.py's own Resized.to_original."""
    im0 = load_resized(r0, CONF["long_side"], 8, gray=True)
    im1 = load_resized(r1, CONF["long_side"], 8, gray=True)
    with torch.inference_mode():
        out = model({"image0": im0.tensor(gray=True), "image1": im1.tensor(gray=True)})
    # kornia's keypoints put pixel centres at +0.5: subtract it to get resize.py's pixel-centre frame
    return im0.to_original(out["keypoints0"] - 0.5), im1.to_original(out["keypoints1"] - 0.5)


def assert_same_matches(ours: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray]) -> float:
    """Same number of matches, and the same keypoints (sorted by image-0 position) to 1e-3 px; returns the diff."""
    (p0, p1), (q0, q1) = ours, ref
    assert p0.dtype == np.float32 and p0.shape == p1.shape and p0.shape[1] == 2
    assert len(p0) == len(q0), f"{len(p0)} matches vs kornia's {len(q0)}"
    o, s = np.lexsort((p0[:, 0], p0[:, 1])), np.lexsort((q0[:, 0], q0[:, 1]))
    diff = max(np.abs(p0[o] - q0[s]).max(), np.abs(p1[o] - q1[s]).max())
    assert diff < 1e-3, diff
    return float(diff)


def test_matches_equal_kornia_forward(
    verifier: LoFTRVerifier, reference: torch.nn.Module, photos: list[Path], prepared: list[tuple[dict, dict]]
) -> None:
    for (r0, r1), (f0, f1) in zip(refs(photos), prepared):
        ours = verifier.match(f0, f1)
        ref = reference_matches(reference, r0, r1)
        assert len(ref[0]) >= MIN_MATCHES, f"test weights give too few matches ({len(ref[0])}) to be a real check"
        assert_same_matches(ours, ref)
        # keypoints are pixels of the original (cropped) image: inside it (fine offsets reach 4 px beyond a cell)
        w, h = Image.open(r1.path).size if r1.crop is None else (r1.crop[2] - r1.crop[0], r1.crop[3] - r1.crop[1])
        assert ours[1][:, 0].min() > -8 and ours[1][:, 0].max() < w + 8 and ours[1][:, 1].max() < h + 8


def test_match_many_equals_match(verifier: LoFTRVerifier, prepared: list[tuple[dict, dict]]) -> None:
    """Batched pairs (two of equal size in one batch, the other size in its own group) give the per-pair matches."""
    f0 = prepared[0][0]
    others = [prepared[0][1], prepared[1][1], f0]  # 256x192, 192x256, 256x192 (itself)
    assert verifier.conf["batch_size"] is None and verifier.batch_size == 1  # null resolves to 1 on CPU
    verifier._batch_size = 4  # force batches here (settings are read-only; the resolved size is the verifier's)
    try:
        many = verifier.match_many(f0, others)
    finally:
        verifier._batch_size = 1
    assert len(many) == len(others)
    for f1, got in zip(others, many):
        assert len(got[0]) >= MIN_MATCHES
        assert_same_matches(got, verifier.match(f0, f1))


def test_feature_cache_layout_and_nbytes(verifier: LoFTRVerifier, prepared: list[tuple[dict, dict]]) -> None:
    f = prepared[0][0]  # a 256x192 crop
    assert f["hw_c"] == (24, 32) and f["hw_f"] == (96, 128)
    assert f["coarse"].shape == (1, 24 * 32, 256) and f["coarse"].dtype == torch.float32  # CPU: float32
    assert f["fine"].shape == (1, 128, 96 + 4, 128 + 4)
    assert f["scale"] == (1.0, 1.0)
    expected = 4 * (24 * 32 * 256 + 128 * 100 * 132)
    assert verifier.feature_nbytes(f) == expected
    # a view into a larger tensor holds the whole storage: counted as such, once
    big = torch.zeros(2, 24 * 32, 256)
    assert verifier.feature_nbytes({"coarse": big[:1], "also": big[1:]}) == big.nelement() * 4
    # the whole resized photo: long side 256, sides multiples of 8, scale back to the original size
    g = prepared[2][1]
    assert max(g["hw_f"]) * 2 == 256 and g["scale"][0] > 1 and g["scale"][1] > 1


def test_kornia_layouts_load(tmp_path: Path, state: dict[str, torch.Tensor], verifier: LoFTRVerifier) -> None:
    plain, wrapped = tmp_path / "plain.pth", tmp_path / "wrapped.ckpt"
    torch.save(state, plain)
    torch.save({"state_dict": state}, wrapped)
    for p in (plain, wrapped):
        sd = read_checkpoint(p)
        assert sd.keys() == state.keys()
        v = LoFTRVerifier({**CONF, "weights": str(p)})
        for k, t in v.matcher.state_dict().items():
            assert torch.equal(t, verifier.matcher.state_dict()[k]), k
    assert "matcher.backbone.conv1.weight" not in read_checkpoint(plain)


def test_sinkhorn_checkpoint_refused(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    p = tmp_path / "sinkhorn.ckpt"
    sd = {f"matcher.{k}": v for k, v in state.items()}
    sd["matcher.coarse_matching.bin_score"] = torch.tensor(1.0)
    torch.save({"state_dict": sd}, p)
    with pytest.raises(LoFTRCheckpointError, match="sinkhorn.*dual-softmax"):
        LoFTRVerifier({**CONF, "weights": str(p)})


def test_missing_and_unexpected_keys_listed(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    sd = copy.copy(state)
    sd.pop("loftr_fine.layers.1.merge.weight")
    sd["extra_head.weight"] = torch.zeros(1)
    p = tmp_path / "partial.ckpt"
    torch.save({"state_dict": sd}, p)
    with pytest.raises(LoFTRCheckpointError) as e:
        LoFTRVerifier({**CONF, "weights": str(p)})
    assert "loftr_fine.layers.1.merge.weight" in str(e.value) and "extra_head.weight" in str(e.value)
    p2 = tmp_path / "garbage.ckpt"
    p2.write_bytes(b"not a checkpoint")
    with pytest.raises(LoFTRCheckpointError, match="garbage.ckpt"):
        LoFTRVerifier({**CONF, "weights": str(p2)})


def test_missing_weights_unavailable(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "outdoor_ds.ckpt"
    with pytest.raises(VerifierUnavailable) as e:
        LoFTRVerifier({"weights": str(missing)})
    assert str(missing) in str(e.value) and "outdoor_ds.ckpt" in str(e.value)


def test_temp_bug_fix_setting(official_ckpt: Path, verifier: LoFTRVerifier) -> None:
    """The setting selects the positional encoding (the two differ), and it enters the cache tag."""
    old = LoFTRVerifier({**CONF, "temp_bug_fix": False, "weights": str(official_ckpt)})
    assert verifier.matcher.pos_encoding.temp_bug_fix and not old.matcher.pos_encoding.temp_bug_fix
    assert not torch.allclose(verifier.matcher.pos_encoding.pe, old.matcher.pos_encoding.pe)
    assert old.cache_tag() != verifier.cache_tag() and verifier.cache_tag().startswith("loftr-")


def test_config_section() -> None:
    from delg.config import load_config

    conf = load_config(None, ["loftr.long_side=320", "loftr.temp_bug_fix=true"])
    assert conf.loftr.long_side == 320 and conf.loftr.temp_bug_fix is True
    assert set(conf.loftr) - {"ransac"} == set(LoFTRVerifier.default_conf)  # the RANSAC mapping is the YAML's alone
