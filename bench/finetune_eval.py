"""Does fine-tuning help?  Off-the-shelf vs CE vs SupCon DELG global descriptors, revisitop E/M/H mAP.

Global descriptors as the pipeline extracts them (``delg.extract.extract_multiscale``, global head only): the image
downscaled to long side ``--max-side`` (default 384, configs/demo.yaml's ``extract.long_side``), one pass per scale
of ``--scales`` (default 0.7071,1,1.4142, delg/conf/extract.yaml's ``global_scales``), the L2-normalised sum;
``--scales 1`` is single scale.  Queries cropped to their box, exhaustive cosine ranking, ``delg.evaluate.evaluate``.
Two benchmarks: the embedded benchmark's test split (synthetic scenes, same domain as its training split, disjoint
landmarks and photos) and the real photos of ``<shared data>/images`` (``delg.data.folders``).

    .venv/bin/python bench/finetune_eval.py                                       # uses logs/train_{ce,supcon}
    .venv/bin/python bench/finetune_eval.py --ce PATH --supcon PATH --photos ../shared/data/images --scales 1
Not a test: it prints a table and writes bench/results/finetune_eval.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from delg.config import load_config  # noqa: E402
from delg.data.dataset import RetrievalDataset, load_dataset  # noqa: E402
from delg.data.images import load_pil, resize_max_side  # noqa: E402
from delg.evaluate import evaluate  # noqa: E402
from delg.extract import ExtractSettings, extract_multiscale  # noqa: E402
from delg.model import DELG, build_model  # noqa: E402


@torch.no_grad()
def global_descriptors(model: DELG, paths: list[Path], crops: list, settings: ExtractSettings,
                       desc: str) -> np.ndarray:
    """(N, D) L2-normalised global descriptors of the images ``paths`` (cropped to ``crops``, None = whole)."""
    out = []
    for p, c in tqdm(list(zip(paths, crops)), desc=desc, leave=False):
        im = resize_max_side(load_pil(p, c), settings.long_side)
        x = torch.from_numpy(np.array(im)).permute(2, 0, 1)  # (3, H, W) uint8
        out.append(extract_multiscale(model, x, settings)["global"])
    return np.stack(out)


def run(model: DELG, ds: RetrievalDataset, settings: ExtractSettings, name: str) -> dict:
    """revisitop E/M/H results of ``model`` on ``ds`` (queries ranked against the whole database)."""
    db = global_descriptors(model, ds.db_paths, [None] * ds.n_db, settings, f"{name} db")
    q = global_descriptors(model, ds.query_paths, ds.query_bbx, settings, f"{name} q")
    ranks = np.argsort(-(db @ q.T), axis=0, kind="stable")
    return evaluate(ds.gnd, ranks)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ce", default=str(REPO / "logs/train_ce/checkpoints/last.pth"))
    ap.add_argument("--supcon", default=str(REPO / "logs/train_supcon/checkpoints/last.pth"))
    ap.add_argument("--photos", default=str(REPO.parent / "shared" / "data" / "images"))
    ap.add_argument("--preset", default="default")
    ap.add_argument("--max-side", type=int, default=384, help="long side of every image (demo: 384)")
    ap.add_argument("--scales", default="0.7071,1.0,1.4142", help="comma list of global scales (1 = single)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "finetune_eval.json"))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--only", default=None, help="comma list of models to (re)run, e.g. SupCon; others come "
                    "from an existing --out file")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)  # a shared CPU: more threads than free cores spin and slow down
    scales = tuple(float(v) for v in a.scales.split(","))
    settings = ExtractSettings(scales=scales, global_scales=scales, long_side=a.max_side, local=False,
                               max_keypoints=1, attention_threshold=0.0)

    models = {"off-the-shelf": load_config(None, []).model}
    for name, path in (("CE", a.ce), ("SupCon", a.supcon)):
        if Path(path).is_file():
            models[name] = load_config(None, [f"model.checkpoint={path}"]).model
        else:
            print(f"skipping {name}: {path} not found (run the training script first)")
    benches = {"minibench": load_dataset(load_config(None, ["dataset.type=minibench", f"dataset.preset={a.preset}"]))}
    if Path(a.photos).is_dir():
        benches["photos"] = load_dataset(load_config(None, ["dataset.type=folders", f"dataset.root={a.photos}"]))
    out = Path(a.out)
    results: dict = {}
    if a.only:
        keep = set(a.only.split(","))
        models = {k: v for k, v in models.items() if k in keep}
        if out.is_file():
            results = json.loads(out.read_text())["results"]
    for mname, mconf in models.items():
        model = build_model(mconf)
        for bname, ds in benches.items():
            results.setdefault(bname, {})[mname] = run(model, ds, settings, f"{mname}/{bname}")
    lines = []
    for bname, per_model in results.items():
        lines.append(f"\n{bname} (mAP %, global scales {a.scales}, long side {a.max_side})")
        lines.append(f"{'model':<15}{'E':>8}{'M':>8}{'H':>8}")
        for mname, r in per_model.items():
            cells = [("n/a" if r.get(p) is None else f"{r[p]['mAP']:.2f}") for p in ("E", "M", "H")]
            lines.append(f"{mname:<15}" + "".join(f"{c:>8}" for c in cells))
    print("\n".join(lines))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"max_side": a.max_side, "scales": list(scales), "results": results}, indent=1,
                              default=float))
    return out


if __name__ == "__main__":
    main()
