"""The one DELG trainer, whatever the loss (ArcFace CE, SupCon, or both; local losses optional).

SGD (Nesterov) with linear warm-up then cosine decay, AMP + channels_last on CUDA, a checkpoint every epoch
(``<output_dir>/checkpoints/last.pth``, written atomically, plus ``epoch_NNN.pth``), automatic resume from
``last.pth``, DDP under ``torchrun`` (gloo on CPU, nccl on CUDA), a tqdm bar (loss, lr, images/s) and
``<output_dir>/train_log.csv`` with one row per epoch.

    python -m delg.train --config configs/train_ce.yaml epochs=5 output_dir=logs/x
    torchrun --nproc_per_node 2 -m delg.train --config configs/train_supcon.yaml
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from delg.config import Config, dump_config
from delg.data.gldv2 import (
    EpochBatchSampler,
    LandmarkDataset,
    LandmarkSet,
    collate_skip,
    load_landmarks,
    split_train_val,
)
from delg.data.images import ImageReadError, load_pil
from delg.devices import resolve_device
from delg.errors import ProjectError
from delg.io import atomic_path
from delg.model import DELG, build_model
from delg.model.checkpoints import load_into_model, read_checkpoint
from delg.train.augment import eval_transform, normalisation, train_transform, whole_transform
from delg.train.losses import DELGLoss

LOG_COLUMNS = ["epoch", "loss", "ce", "supcon", "attention", "reconstruction", "lr", "images", "images_per_s",
               "val_acc", "skipped_images", "seconds"]


class TrainConfigError(ProjectError, ValueError):
    """A training setting does not fit the data (class count, paths); the message names the key."""


# ------------------------------------------------------------------------------------------------ data
def training_data(conf: Mapping[str, Any]) -> LandmarkSet:
    """The training images ``conf.train`` names (minibench training split by default)."""
    t = conf["train"]
    if t["data"] == "minibench":
        from delg.data.minibench import ensure_built

        # Use dataset.root/preset when the run is about the minibench; otherwise its default build.
        ds_conf = conf if conf["dataset"]["type"] == "minibench" else {"dataset": {"root": None, "preset": "default"},
                                                                       "progress": conf.get("progress", True)}
        root = Path(ensure_built(ds_conf))  # GLDv2's layout: train_clean.csv, train/a/b/c/<id>.jpg
        csv_path, images = root / "train_clean.csv", root / "train"
    elif t["data"] == "gldv2":
        if not t.get("csv") or not t.get("images"):
            raise TrainConfigError("train.data=gldv2 needs train.csv=<label file> and train.images=<image root>")
        csv_path, images = Path(t["csv"]), Path(t["images"])
    else:
        raise TrainConfigError(f"train.data: unknown '{t['data']}'; valid: minibench, gldv2")
    return load_landmarks(csv_path, images, int(t.get("min_images_per_class") or 1), t.get("max_classes"))


# ------------------------------------------------------------------------------------------------ helpers
def check_train_settings(t: Mapping[str, Any]) -> None:
    """Check the ``train`` settings before any work: types and ranges by the schema (:mod:`delg.settings`), then
    the rules between keys; a bad one raises :class:`TrainConfigError` naming its key."""
    from delg.settings import validate_section

    validate_section("train", t, error=TrainConfigError)
    if int(t["images_per_class"]) > int(t["batch_size"]):
        raise TrainConfigError(f"train.images_per_class ({t['images_per_class']}) must be <= train.batch_size "
                               f"({t['batch_size']})")


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up from ~0 to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def _param_groups(model: torch.nn.Module, weight_decay: float, local_ids: set[int] | None = None,
                  local_lr_mult: float = 1.0, backbone_lr_mult: float = 1.0) -> list[dict[str, Any]]:
    """SGD groups: no weight decay on biases, norms and the GeM exponent; ``local_lr_mult`` for the local branch,
    ``backbone_lr_mult`` for parameters whose name starts with ``backbone.`` (each group's ``lr_mult``)."""
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = local_lr_mult if id(p) in (local_ids or set()) else backbone_lr_mult if n.startswith("backbone.") \
            else 1.0
        groups.setdefault((p.ndim <= 1 or n.endswith(".p"), mult), []).append(p)
    return [{"params": ps, "weight_decay": 0.0 if no_decay else weight_decay, "lr_mult": mult}
            for (no_decay, mult), ps in groups.items()]


def set_train_mode(model: DELG, freeze_bn: bool) -> None:
    """Train mode; with ``freeze_bn`` the backbone's BatchNorms keep their ImageNet statistics (eval mode, affine
    parameters still learn): small per-process batches give noisy batch statistics and huge BN gradients."""
    model.train()
    if freeze_bn:
        for mod in model.backbone.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.eval()


def _read_log(path: Path, upto_epoch: int) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("epoch", "").isdigit() and int(r["epoch"]) <= upto_epoch]


def _write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


@torch.no_grad()
def _val_accuracy(model: DELG, data: LandmarkSet, conf: Mapping[str, Any], device: torch.device) -> float | None:
    """Top-1 accuracy of the ArcFace classifier (no margin) on the held-out images."""
    if len(data) == 0 or model.arcface is None:
        return None
    model.eval()
    ds = LandmarkDataset(data, eval_transform(conf["train"], normalisation(model)), n_views=1)
    loader = DataLoader(ds, batch_size=32, num_workers=int(conf.get("num_workers", 0)), collate_fn=collate_skip)
    hit = n = 0
    for b in loader:
        if b["views"] is None:
            continue
        x = b["views"][:, 0].to(device)
        g = model.global_head(model.backbone.forward32(model.backbone.forward16(x)), whiten=True)
        pred = model.arcface(g).argmax(1).cpu()
        hit += int((pred == b["labels"]).sum())
        n += len(pred)
    set_train_mode(model, bool(conf["train"].get("freeze_bn", True)))
    return hit / n if n else None


@torch.no_grad()
def init_global_head(model: DELG, data: LandmarkSet, conf: Mapping[str, Any], device: torch.device,
                     log=print) -> None:
    """Start the global branch from the off-the-shelf descriptor instead of random projections.

    ``train.whiten_init=pca``: GeM descriptors (C32,) of every training image (the whole image, long side at most
    ``2 * train.image_size``, plus ``train.whiten_views`` augmented crops of it) give a centred PCA projection, eigenvalues raised to
    ``-train.whiten_power`` (:meth:`GlobalHead.init_pca`): the learned whitening of Radenovic et al., from the
    training split only.  ``train.arcface_init=imprint`` then sets each ArcFace class weight to the mean whitened
    descriptor of the class's (whole) training images.  Both are no-ops when set to ``random``.  One pass over
    the training images: meant for small training sets (the embedded benchmark), not GLDv2.
    """
    t = conf["train"]
    pca = str(t.get("whiten_init", "random")) == "pca"
    imprint = str(t.get("arcface_init", "random")) == "imprint" and model.arcface is not None
    if not (pca or imprint) or len(data) == 0:
        return
    t0 = time.time()
    was_training = model.training
    model.eval()
    views = int(t.get("whiten_views", 0) or 0) if pca else 0
    aug = train_transform(t, normalisation(model))
    whole = whole_transform(2 * int(t.get("image_size", 224)), normalisation(model))

    def gem(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device)
        return model.global_head(model.backbone.forward32(model.backbone.forward16(x)), whiten=False).float().cpu()

    full, crops, labels = [], [], []
    with torch.random.fork_rng(devices=[]):  # the crops are reproducible and leave the training RNG alone
        torch.manual_seed(int(conf.get("seed", 0)))
        for i in range(len(data)):
            try:
                im = load_pil(data.paths[i])
            except ImageReadError:
                continue
            full.append(gem(whole(im)[None])[0])
            labels.append(int(data.labels[i]))
            if views:
                crops.append(gem(torch.stack([aug(im) for _ in range(views)])))
    if not full:
        return
    full_t, labels_t = torch.stack(full), torch.tensor(labels, dtype=torch.int64)
    if pca:
        fit = torch.cat([full_t, *crops]) if crops else full_t
        model.global_head.init_pca(fit.to(device), float(t.get("whiten_power", 0.0)))
    if imprint:
        fc = model.global_head.fc
        model.arcface.init_from_means(fc(full_t.to(fc.weight)).cpu(), labels_t)
    done = ([f"pca whitening from {len(full_t) * (1 + views)} descriptors"] if pca else []) + \
        (["arcface imprinted"] if imprint else [])
    log(f"global head initialised ({', '.join(done)}) in {time.time() - t0:.1f}s")
    model.train(was_training)


# ------------------------------------------------------------------------------------------------ main
def main(conf: Config) -> Path:
    """Train; returns ``<output_dir>/checkpoints/last.pth``."""
    rank, world, local_rank = _dist_env()
    device = resolve_device(conf.get("device", "auto"))  # the one device rule: cuda -> cuda:LOCAL_RANK
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif world > 1 and "OMP_NUM_THREADS" not in os.environ:
        # CPU processes sharing a machine: oversubscribed BLAS threads spin and slow everything down.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    main_proc = rank == 0
    log = print if main_proc else (lambda *a, **k: None)
    t = conf.train
    out = Path(conf.output_dir)
    ck_dir = out / "checkpoints"
    last = ck_dir / "last.pth"
    torch.manual_seed(int(conf.seed) + rank)

    check_train_settings(t)
    criterion = DELGLoss(conf.loss)  # checks the loss settings
    data = training_data(conf)
    train_set, val_set = split_train_val(data, float(t.val_fraction or 0), int(conf.seed))
    k = data.num_classes
    if conf.model.num_classes is not None and int(conf.model.num_classes) != k:
        raise TrainConfigError(
            f"model.num_classes={conf.model.num_classes} but the training data ({data.source}) has {k} landmarks; "
            "set model.num_classes=null to take it from the data"
        )
    model = build_model(conf.model, num_classes=k)
    fresh_global = not model.trained_global  # an ImageNet backbone, not a fine-tuned checkpoint
    if model.num_classes != k:
        log(f"classifiers re-initialised for {k} classes (checkpoint had {model.num_classes})")
        model.reset_classifiers(k)
    model.trained_global, model.trained_local = True, bool(criterion.local) or model.trained_local
    model.to(device)
    set_train_mode(model, bool(t.freeze_bn))
    use_amp = device.type == "cuda" and bool(conf.get("mixed_precision", True))
    if device.type == "cuda" and t.channels_last:
        model.to(memory_format=torch.channels_last)
    # Parameters the configured loss never reaches are frozen, so DDP waits for no missing gradient.
    if not criterion.use_ce and model.arcface is not None:
        model.arcface.requires_grad_(False)
    if not criterion.local:
        model.local_head.requires_grad_(False)
        if model.att_classifier is not None:
            model.att_classifier.requires_grad_(False)
    # Gradient clipping per branch: the reconstruction MSE on raw features is large and would otherwise shrink
    # the attention classifier's and the global branch's steps to nothing.
    lh = model.local_head
    recon_ids = {id(p) for n, p in lh.named_parameters() if n.startswith(("encoder.", "decoder."))}
    att_ids = {id(p) for p in lh.parameters() if id(p) not in recon_ids}
    if model.att_classifier is not None:
        att_ids |= {id(p) for p in model.att_classifier.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    clip_groups = [g for g in ([p for p in trainable if id(p) not in recon_ids | att_ids],
                               [p for p in trainable if id(p) in recon_ids],
                               [p for p in trainable if id(p) in att_ids]) if g]
    opt = torch.optim.SGD(_param_groups(model, float(t.weight_decay), recon_ids | att_ids,
                                        float(t.local_lr_mult or 1.0), float(t.get("backbone_lr_mult") or 1.0)),
                          lr=float(t.lr), momentum=float(t.momentum),
                          nesterov=bool(t.nesterov))

    start_epoch = 0
    if t.resume and last.is_file():
        ck = read_checkpoint(last)
        load_into_model(model, ck["model_state"], str(last))
        if ck.get("optimizer_state"):
            opt.load_state_dict(ck["optimizer_state"])
        start_epoch = int(ck.get("epoch") or 0)
        log(f"resuming from {last} (epoch {start_epoch} done)")
    if start_epoch == 0 and fresh_global and main_proc:
        # Rank 0 only: wrapping the model in DistributedDataParallel below broadcasts rank 0's parameters and
        # buffers, so the other ranks would read every training image for nothing.
        init_global_head(model, train_set, conf, device, log)
        set_train_mode(model, bool(t.freeze_bn))
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(conf, out / "config.yaml")

    n_views = 2 if criterion.needs_two_views else 1
    per_rank = max(1, int(t.batch_size) // world)
    sampler = EpochBatchSampler(train_set.labels, per_rank * world, balanced=criterion.needs_two_views,
                                images_per_class=int(t.images_per_class), seed=int(conf.seed), rank=0, world_size=1)
    # Every rank draws the same global batches and takes its slice of each, so ranks stay in step.
    # The model's own colour order / statistics: a fine-tune of a pycls checkpoint stays BGR.
    dataset = LandmarkDataset(train_set, train_transform(t, normalisation(model)), n_views=n_views)
    loader = DataLoader(dataset, batch_sampler=_RankSlice(sampler, rank, world), collate_fn=collate_skip,
                        num_workers=int(conf.get("num_workers", 0)), pin_memory=device.type == "cuda")
    steps_per_epoch = len(sampler)
    if t.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, int(t.max_steps_per_epoch))
    if steps_per_epoch == 0:
        raise TrainConfigError(f"train.batch_size={t.batch_size}: no full batch in {len(train_set)} training images")
    total = steps_per_epoch * int(t.epochs)
    warmup = int(round(float(t.warmup_epochs) * steps_per_epoch))
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    rows = _read_log(out / "train_log.csv", start_epoch) if main_proc else []
    skipped: dict[int, str] = {}
    log(f"training {data.num_classes} classes on {len(train_set)} images ({len(val_set)} val), {world} process(es), "
        f"{device}, loss={conf.loss['global']}{'+local' if criterion.local else ''}, epochs {start_epoch}->{t.epochs}")

    for epoch in range(start_epoch, int(t.epochs)):
        sampler.set_epoch(epoch)
        t0, seen, sums, n_steps = time.time(), 0, {}, 0
        bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{t.epochs}",
                   disable=not (main_proc and conf.get("progress", True)), leave=False)
        lr = float(t.lr)
        for step, batch in enumerate(bar):
            if step >= steps_per_epoch:
                break
            for i, reason in batch["bad"]:
                skipped[i] = reason
            has = torch.tensor([0 if batch["views"] is None else 1], device=device)
            if world > 1:
                dist.all_reduce(has, op=dist.ReduceOp.MIN)
            if int(has) == 0:  # every rank skips together, or DDP would hang
                continue
            gstep = epoch * steps_per_epoch + step
            lr = float(t.lr) * lr_factor(gstep, total, warmup)
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_mult", 1.0)
            v = batch["views"]  # (B, V, 3, H, W) -> views stacked: rows [0:B] view 1, [B:2B] view 2
            x = v.transpose(0, 1).reshape(-1, *v.shape[2:]).to(device, non_blocking=True)
            labels = batch["labels"].repeat(v.shape[1]).to(device)
            if device.type == "cuda" and t.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                outputs = net(x, labels, criterion.use_ce)
            loss, parts = criterion(outputs, labels)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if t.clip_grad_norm:
                scaler.unscale_(opt)
                for params in clip_groups:
                    torch.nn.utils.clip_grad_norm_(params, float(t.clip_grad_norm))
            scaler.step(opt)
            scaler.update()
            seen += len(batch["labels"])
            n_steps += 1
            for kk, vv in {"loss": float(loss.detach()), **parts}.items():
                sums[kk] = sums.get(kk, 0.0) + vv
            rate = seen * world / max(time.time() - t0, 1e-6)
            bar.set_postfix(loss=f"{sums['loss'] / n_steps:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
        bar.close()
        stats = torch.tensor([sums.get(c, 0.0) for c in LOG_COLUMNS[1:6]] + [n_steps, seen], dtype=torch.float64)
        all_skipped = [skipped]
        if world > 1:
            dist.all_reduce(stats)
            all_skipped = [None] * world
            dist.all_gather_object(all_skipped, skipped)
        if main_proc:
            merged = {i: r for s in all_skipped for i, r in s.items()}
            steps_all = max(float(stats[5]), 1.0)
            secs = time.time() - t0
            row: dict[str, Any] = {c: f"{float(stats[j]) / steps_all:.6f}" for j, c in enumerate(LOG_COLUMNS[1:6])}
            used = {"ce": criterion.use_ce, "supcon": criterion.use_supcon, "attention": criterion.local,
                    "reconstruction": criterion.local and model.local_head.arch == "delg"}
            row.update({c: "" for c, u in used.items() if not u})
            # Accuracy of the ArcFace head; meaningless (blank) when the loss does not train it.
            acc = _val_accuracy(model, val_set, conf, device) if criterion.use_ce else None
            row.update(epoch=epoch + 1, lr=f"{lr:.6g}", images=int(stats[6]), images_per_s=f"{float(stats[6]) / secs:.2f}",
                       val_acc="" if acc is None else f"{acc:.4f}", skipped_images=len(merged), seconds=f"{secs:.1f}")
            # Checkpoint first: a kill between the two repeats at most this epoch's log row.
            model.save(last, optimizer=opt, epoch=epoch + 1, config=conf, extra={"landmark_ids": data.landmark_ids})
            if t.keep_epochs:
                model.save(ck_dir / f"epoch_{epoch + 1:03d}.pth", epoch=epoch + 1, config=conf)
            rows.append(row)
            _write_log(out / "train_log.csv", rows)
            if merged:
                _write_skipped(out / "skipped_images.csv", merged, train_set)
            log(f"epoch {epoch + 1}/{t.epochs}: loss {row['loss']} lr {row['lr']} {row['images_per_s']} img/s"
                + (f" val_acc {row['val_acc']}" if row["val_acc"] else "") + (f" skipped {len(merged)}" if merged else ""))
        if world > 1:
            dist.barrier()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    log(f"checkpoint: {last}  (use it with model.checkpoint={last})")
    return last


def _write_skipped(path: Path, skipped: Mapping[int, str], data: LandmarkSet) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "path", "reason"])
        for i in sorted(skipped):
            w.writerow([data.image_ids[i], str(data.paths[i]), skipped[i]])


class _RankSlice(torch.utils.data.Sampler[list[int]]):
    """Rank ``r``'s part of every global batch (``batch[r::world]``); balanced batches stay class-paired
    because groups of one landmark are contiguous and per-rank slices are taken group-wise."""

    def __init__(self, sampler: EpochBatchSampler, rank: int, world: int) -> None:
        self.sampler, self.rank, self.world = sampler, rank, world

    def __iter__(self):
        k = self.sampler.k if self.sampler.balanced else 1
        for b in self.sampler:
            groups = [b[i:i + k] for i in range(0, len(b), k)]
            mine = [i for g in groups[self.rank::self.world] for i in g]
            if mine:
                yield mine
            else:  # fewer groups than ranks: fall back to an image-wise split so no rank is idle
                yield b[self.rank::self.world] or b[:1]

    def __len__(self) -> int:
        return len(self.sampler)

