"""HDF5 feature store: one file per (model preset, dataset, split), one group per image.

Layout of ``<output_dir>/features/<dataset>/<preset>-<split>.h5``::

    /                       attrs: format, preset, split, settings (JSON), model_meta (JSON)
    /<escaped image name>/  datasets:
        global       (D,)    L2-normalised global descriptor (float32, or float16 with ``float16=True``)
        keypoints    (N, 2)  float32 xy in pixels of the extracted image (after the query crop)
        descriptors  (N, d)  L2-normalised local descriptors (float32 / float16)
        scores       (N,)    float32 attention of each keypoint
        image_size   (2,)    int64 (w, h) of the extracted image (after the crop, before any resizing)

Image names may contain '/': they are escaped (``urllib.parse.quote``) into a single group name, so the file is
flat and every group is one image.

Crash safety: images are written into the scratch group ``__incomplete__``; a commit (every few images or seconds)
flushes the file, renames them to their final names (link moves) and flushes again.  A group under a real name is
therefore always complete on disk; opening the store for writing drops a left-over scratch group (the images of
an interrupted batch are redone).  A file that HDF5
cannot open (truncated by a crash, overwritten) or whose newest groups cannot be read is moved aside to
``<name>.corrupt[-k].h5`` with a message, the readable images are salvaged into a fresh file and the rest is redone.
Nothing time-dependent is stored, so two runs that computed the same features give stores that compare equal.

Content checksums: every image group carries ``checksums`` (JSON: a 16-hex BLAKE2b of each array's bytes, written
when the image is staged) and the file carries ``content`` (the XOR of one 64-bit token per image, token = hash of
the name and its array checksums), updated at every commit.  ``content`` is the store's identity for caches built
from it (the saved FAISS index): it changes with any image added, redone or deleted, whatever the file size.  Every
read of an image recomputes the checksum of the arrays it returns (a few microseconds per image) and a mismatch
(bytes changed after they were written, e.g. overwritten in place) is a :class:`StoreDamagedError` naming the image.
Global descriptors read are also checked to be finite and of unit norm (a damaged or foreign store).  Stores
written before checksums existed have no ``content``: they are read unverified (values are still checked) and
identified by size and modification time.
Writers take an exclusive ``flock`` on ``<file>.lock`` so two processes never write one store.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import h5py
import numpy as np

from delg.errors import ProjectError

FORMAT = "delg-feature-store/1"
SCRATCH = "__incomplete__"
LOCAL_KEYS = ("keypoints", "descriptors", "scores")
# Groups re-read on every write-open: the newest ones are those a crash may have left half-written.
VALIDATE_LAST = 16


class StoreError(ProjectError, RuntimeError):
    """A feature store cannot be used as asked; the message names the file."""


class PresetMismatchError(StoreError):
    """The file was written with another model preset / other extraction settings."""


class StoreBusyError(StoreError):
    """Another process is writing this store."""


class StoreDamagedError(StoreError):
    """Stored bytes do not match their checksum, or hold impossible values (NaN, non-unit global descriptor)."""


# |norm - 1| allowed for a stored global descriptor: float32 keeps ~1e-7, float16 rounds each entry by 2^-11 relative
NORM_TOL = {np.dtype(np.float32): 1e-3, np.dtype(np.float16): 1e-2}
CHECKSUMS = "checksums"  # group attribute: JSON {array name: 16-hex BLAKE2b of its bytes}
CONTENT = "content"  # file attribute: 16-hex XOR of every image's token


def array_digest(arr: np.ndarray) -> str:
    """16-hex BLAKE2b of an array's dtype, shape and bytes."""
    a = np.ascontiguousarray(arr)
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _token(key: str, checksums: Mapping[str, str]) -> int:
    """The 64-bit contribution of one image to the file's ``content``."""
    h = hashlib.blake2b(digest_size=8)
    h.update(key.encode())
    h.update(_json(dict(checksums)).encode())
    return int.from_bytes(h.digest(), "big")


def move_aside(path: Path, reason: str, then: str = "it is recomputed") -> Path:
    """Move a damaged file out of the way so it is recomputed: ``x.npy`` -> ``x.damaged-<UTC time>.npy``; logs one
    line naming the file, what is wrong and what happens next.  Returns where it went."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    aside = aside_path(path, f"damaged-{stamp}")
    os.replace(path, aside)
    _log(f"{path}: {reason}; moved it aside to {aside.name}; {then}")
    return aside


def escape_name(name: str) -> str:
    """Image name -> HDF5 group name (no '/', never '.' or '..', never the scratch name)."""
    key = quote(name, safe="")
    if key in (".", "..") or key == SCRATCH:
        key = "".join(f"%{ord(c):02X}" for c in key)
    return key


def unescape_name(key: str) -> str:
    return unquote(key)


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _log(msg: str) -> None:
    print(f"[store] {msg}", file=sys.stderr, flush=True)


def aside_path(path: Path, tag: str = "corrupt") -> Path:
    """``x.h5`` -> ``x.corrupt.h5`` (or ``x.corrupt-2.h5`` ... if taken)."""
    stem, suffix = path.name[: -len(path.suffix)] if path.suffix else path.name, path.suffix
    cand = path.with_name(f"{stem}.{tag}{suffix}")
    k = 2
    while cand.exists():
        cand = path.with_name(f"{stem}.{tag}-{k}{suffix}")
        k += 1
    return cand


class FeatureStore:
    """One HDF5 feature file.

    Args:
        path: the ``.h5`` file.
        mode: ``'r'`` (read only; the file must exist) or ``'a'`` (create / resume / recover; takes the lock).
        preset: expected preset name; a file written under another one raises :class:`PresetMismatchError`.
        settings: expected extraction settings (JSON-able); compared like ``preset``.
        split: ``'db'``, ``'query'`` ...; recorded in the file attributes.
        float16: store ``global`` and ``descriptors`` as float16 (reads always return float32).
        extra_attrs: more file attributes written on creation (e.g. the shard of a part file).
        wait: in mode ``'a'``, wait for another writer to finish instead of raising :class:`StoreBusyError`.
        commit_every, commit_seconds: staged images are committed in batches of at most this many images / seconds
            (each commit flushes twice; per-image flushes would cost ~10 ms an image).

    Example:
        >>> with FeatureStore(p, "a", preset="feats-x", settings={"max_size": 512}) as st:
        ...     st.write("img1", {"global": g, "keypoints": k, "descriptors": d, "scores": s, "image_size": (w, h)})
        >>> FeatureStore(p).read_globals(["img1"]).shape  # (1, D)
    """

    def __init__(
        self,
        path: str | Path,
        mode: str = "r",
        preset: str | None = None,
        settings: Mapping[str, Any] | None = None,
        split: str | None = None,
        float16: bool = False,
        extra_attrs: Mapping[str, Any] | None = None,
        wait: bool = False,
        commit_every: int = 64,
        commit_seconds: float = 2.0,
    ) -> None:
        if mode not in ("r", "a"):
            raise ValueError(f"FeatureStore mode must be 'r' or 'a', got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self.float16 = float16
        self._lock_fd: int | None = None
        self._names: set[str] | None = None
        self._staged: dict[str, None] = {}  # keys written under SCRATCH, not yet committed (insertion order)
        self.commit_every, self.commit_seconds = max(1, int(commit_every)), float(commit_seconds)
        self._last_commit = time.monotonic()
        if mode == "r":
            if not self.path.is_file():
                raise StoreError(f"{self.path}: feature store not found")
            try:
                self.f = h5py.File(self.path, "r")
            except OSError as e:
                raise StoreError(f"{self.path}: cannot open feature store ({e}); rerun the extraction to recover it") from None
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock(wait)
            try:
                self.f = self._open_for_writing()
            except BaseException:
                self._unlock()
                raise
            if "preset" not in self.f.attrs:  # a new file
                self.f.attrs["format"] = FORMAT
                if len(self.f) == 0:
                    self.f.attrs[CONTENT] = f"{0:016x}"
                if preset is not None:
                    self.f.attrs["preset"] = preset
                if settings is not None:
                    self.f.attrs["settings"] = _json(settings)
                if split is not None:
                    self.f.attrs["split"] = split
                for k, v in (extra_attrs or {}).items():
                    self.f.attrs[k] = v
                self.f.flush()
        self._check(preset, settings)

    # ------------------------------------------------------------------ opening, locking, recovery
    def _lock(self, wait: bool = False) -> None:
        from delg.locks import acquire

        self._lock_fd = acquire(self.path.with_name(self.path.name + ".lock"),
                                f"{self.path}: this feature store (being written)", wait=wait, busy=StoreBusyError)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            from delg.locks import release

            release(self.path.with_name(self.path.name + ".lock"), self._lock_fd)
            self._lock_fd = None

    def _open_for_writing(self) -> h5py.File:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return h5py.File(self.path, "w", track_order=True)
        try:
            f = h5py.File(self.path, "r+")
        except OSError as e:
            return self._recover(f"HDF5 cannot open it ({e})")
        try:
            if SCRATCH in f:  # an image whose write was interrupted
                del f[SCRATCH]
                f.flush()
            keys = list(f.keys())  # walks the whole link index: fails on damaged metadata
            for key in keys[-VALIDATE_LAST:]:
                _read_group(f[key])
        except (OSError, KeyError, RuntimeError, ValueError) as e:
            f.close()
            return self._recover(f"it is damaged ({type(e).__name__}: {e})")
        return f

    def _recover(self, reason: str) -> h5py.File:
        """Move a damaged file aside, salvage every image that still reads, continue in a fresh file."""
        aside = aside_path(self.path)
        os.replace(self.path, aside)
        tmp = self.path.with_name(self.path.name + ".salvage")
        new = h5py.File(tmp, "w", track_order=True)
        n = content = 0
        try:
            with h5py.File(aside, "r") as old:
                for k, v in old.attrs.items():
                    new.attrs[k] = v
                for key in old.keys():
                    if key == SCRATCH:
                        continue
                    try:
                        arrays = _read_group(old[key])
                    except (OSError, KeyError, RuntimeError, ValueError):
                        continue
                    content ^= _token(key, _write_group(new, key, arrays))
                    n += 1
        except (OSError, KeyError, RuntimeError, ValueError):
            pass  # nothing (more) readable: what was copied stays, the rest is redone
        new.attrs[CONTENT] = f"{content:016x}"
        new.flush()
        new.close()
        os.replace(tmp, self.path)
        _log(f"{self.path}: {reason}; moved it aside to {aside.name}, salvaged {n} images, the rest will be redone")
        return h5py.File(self.path, "r+")

    def _check(self, preset: str | None, settings: Mapping[str, Any] | None) -> None:
        have = self.f.attrs.get("preset")
        if preset is not None and have is not None and have != preset:
            raise PresetMismatchError(
                f"{self.path}: written with preset '{have}', not '{preset}'; use another output_dir or delete it"
            )
        if settings is not None and "settings" in self.f.attrs and self.f.attrs["settings"] != _json(settings):
            raise PresetMismatchError(
                f"{self.path}: extraction settings differ from the file's ({self.f.attrs['settings']} vs {_json(settings)})"
            )

    # ------------------------------------------------------------------ attributes
    @property
    def preset(self) -> str | None:
        return self.f.attrs.get("preset")

    @property
    def settings(self) -> dict[str, Any]:
        return json.loads(self.f.attrs.get("settings", "{}"))

    @property
    def model_meta(self) -> dict[str, Any] | None:
        raw = self.f.attrs.get("model_meta")
        return json.loads(raw) if raw is not None else None

    def set_model_meta(self, meta: Mapping[str, Any]) -> None:
        """Record the model's meta once; a different model later is an error (never mix two models' features)."""
        new = _json(dict(meta))
        old = self.f.attrs.get("model_meta")
        if old is None:
            self.f.attrs["model_meta"] = new
            self.f.flush()
        elif old != new:
            raise PresetMismatchError(f"{self.path}: written by another model ({old}), not ({new})")

    def _content(self) -> int | None:
        raw = self.f.attrs.get(CONTENT)
        return None if raw is None else int(raw, 16)

    def _group_token(self, key: str) -> int:
        sums = _checksums(self.f[key])
        return 0 if sums is None else _token(key, sums)

    def identity(self) -> str:
        """What the store holds, for the keys of caches built from it: ``content`` (changes with every image added,
        redone or deleted); for a store written before checksums, its size and modification time."""
        c = self.f.attrs.get(CONTENT)
        if c is not None:
            return f"content:{c}"
        st = self.path.stat()
        return f"size:{st.st_size}:mtime:{st.st_mtime_ns}"

    def attrs(self) -> dict[str, Any]:
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in self.f.attrs.items()}

    # ------------------------------------------------------------------ reading
    def names(self) -> list[str]:
        """Names of the complete images, sorted."""
        return sorted(self._name_set())

    def _name_set(self) -> set[str]:
        if self._names is None:
            self._names = {unescape_name(k) for k in self.f.keys() if k != SCRATCH}
        return self._names

    def has(self, name: str) -> bool:
        return name in self._name_set()

    def __len__(self) -> int:
        return len(self._name_set())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.has(name)

    def _group(self, name: str) -> h5py.Group:
        key = escape_name(name)
        if key not in self.f:
            raise KeyError(f"{self.path}: no features for image '{name}'")
        return self.f[key]

    def read_global(self, name: str) -> np.ndarray:
        """``(D,)`` float32, checked (checksum, finite, unit norm): :class:`StoreDamagedError` otherwise."""
        g = self._group(name)
        return np.asarray(_verified(g, "global", _checksums(g)), dtype=np.float32)

    def read_globals(self, names: Sequence[str]) -> np.ndarray:
        """``(N, D)`` float32 global descriptors in the order of ``names``."""
        if len(names) == 0:
            return np.zeros((0, self.global_dim()), np.float32)
        first = self.read_global(names[0])
        out = np.empty((len(names), first.shape[0]), np.float32)
        out[0] = first
        for i, n in enumerate(names[1:], 1):
            out[i] = self.read_global(n)
        return out

    def global_dim(self) -> int:
        meta = self.model_meta or {}
        if "global_dim" in meta:
            return int(meta["global_dim"])
        for key in self.f.keys():
            if key != SCRATCH:
                return int(self.f[key]["global"].shape[0])
        raise StoreError(f"{self.path}: empty feature store, global size unknown")

    def read_local(self, name: str) -> dict[str, np.ndarray]:
        """``{'keypoints': (N,2) f32 xy, 'descriptors': (N,d) f32, 'scores': (N,) f32, 'image_size': (2,) int64}``."""
        g = self._group(name)
        if "keypoints" not in g:
            raise StoreError(f"{self.path}: image '{name}' has no local features (extracted with extract.local=false)")
        sums = _checksums(g)
        out = {k: np.asarray(_verified(g, k, sums), dtype=np.float32) for k in LOCAL_KEYS}
        out["image_size"] = np.asarray(_verified(g, "image_size", sums), dtype=np.int64)
        return out

    def read(self, name: str) -> dict[str, np.ndarray]:
        """Every array of one image, as stored (no dtype conversion)."""
        return _read_group(self._group(name))

    def iter_items(self) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        for name in self.names():
            yield name, self.read(name)

    # ------------------------------------------------------------------ writing
    def write(self, name: str, feats: Mapping[str, Any], overwrite: bool = False) -> None:
        """Stage one image's arrays (``global``, optional ``keypoints``/``descriptors``/``scores``, ``image_size``).

        Staged images are committed (made visible under their name) in batches: every ``commit_every`` images,
        after ``commit_seconds``, on :meth:`commit` and on :meth:`close`.  A crash loses only the staged batch.
        """
        if self.mode != "a":
            raise StoreError(f"{self.path}: opened read-only")
        key = escape_name(name)
        if key in self.f and not overwrite:
            return
        self._stage(key, _cast(feats, self.float16))
        self._maybe_commit()

    def _stage(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        scratch = self.f.require_group(SCRATCH)
        if key in scratch:
            del scratch[key]
        _write_group(scratch, key, arrays)
        self._staged[key] = None
        self._name_set().add(unescape_name(key))

    def _maybe_commit(self) -> None:
        if len(self._staged) >= self.commit_every or time.monotonic() - self._last_commit >= self.commit_seconds:
            self.commit()

    def commit(self) -> int:
        """Make every staged image visible; returns how many.  Flushes before and after the renames, so a group
        under a real name is complete on disk whatever happens next."""
        n = len(self._staged)
        if n:
            self.f.flush()
            content = self._content()  # None: a store written before checksums, left without one
            for key in self._staged:
                if key in self.f:  # overwrite: the old version goes only now, when the new one is on disk
                    if content is not None:
                        content ^= self._group_token(key)
                    del self.f[key]
                self.f.move(f"{SCRATCH}/{key}", key)
                if content is not None:
                    content ^= self._group_token(key)
            del self.f[SCRATCH]
            if content is not None:
                self.f.attrs[CONTENT] = f"{content:016x}"
            self.f.flush()
            self._staged.clear()
        self._last_commit = time.monotonic()
        return n

    @property
    def n_staged(self) -> int:
        """Images written but not committed yet."""
        return len(self._staged)

    def copy_from(self, other: FeatureStore, names: Iterable[str] | None = None, overwrite: bool = True) -> int:
        """Copy images (arrays as stored) from another store, then commit; returns how many were copied."""
        n = 0
        for name in other.names() if names is None else names:
            if self.has(name) and not overwrite:
                continue
            self._stage(escape_name(name), other.read(name))
            n += 1
            if len(self._staged) >= self.commit_every:
                self.commit()
        self.commit()
        return n

    def delete(self, name: str) -> None:
        key = escape_name(name)
        if key in self.f:
            content = self._content()
            if content is not None:
                self.f.attrs[CONTENT] = f"{content ^ self._group_token(key):016x}"
            del self.f[key]
            self.f.flush()
        self._name_set().discard(name)

    def flush(self) -> None:
        self.commit()
        self.f.flush()

    def close(self) -> None:
        if getattr(self, "f", None) is not None and self.f.id.valid:
            if self.mode == "a":
                self.commit()
            self.f.close()
        self._unlock()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: h5py may already be gone
            pass


class StoreUnion:
    """Read-only view of several stores as one (a benchmark's database store + the shared distractor store).

    An image is read from the first store that has it; ``names`` is the sorted union.  Presents the reading part of
    :class:`FeatureStore` (``names/has/read_global(s)/read_local/read/global_dim/model_meta``), so the search does
    not need to know how many files hold the database.

    Args:
        stores: opened stores, in priority order; the view closes them on :meth:`close`.
    """

    def __init__(self, stores: Sequence[FeatureStore]) -> None:
        if not stores:
            raise ValueError("StoreUnion needs at least one store")
        self.stores = list(stores)
        self.path = self.stores[0].path
        self._owner: dict[str, int] | None = None

    def _owners(self) -> dict[str, int]:
        if self._owner is None:
            owner: dict[str, int] = {}
            for i in reversed(range(len(self.stores))):  # earlier stores win
                owner.update(dict.fromkeys(self.stores[i].names(), i))
            self._owner = owner
        return self._owner

    def _store_of(self, name: str) -> FeatureStore:
        i = self._owners().get(name)
        if i is None:
            raise KeyError(f"{', '.join(str(s.path) for s in self.stores)}: no features for image '{name}'")
        return self.stores[i]

    @property
    def model_meta(self) -> dict[str, Any] | None:
        return self.stores[0].model_meta

    def names(self) -> list[str]:
        return sorted(self._owners())

    def has(self, name: str) -> bool:
        return name in self._owners()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.has(name)

    def __len__(self) -> int:
        return len(self._owners())

    def global_dim(self) -> int:
        for st in self.stores:
            if len(st):
                return st.global_dim()
        return self.stores[0].global_dim()

    def read_global(self, name: str) -> np.ndarray:
        """``(D,)`` float32."""
        return self._store_of(name).read_global(name)

    def read_globals(self, names: Sequence[str]) -> np.ndarray:
        """``(N, D)`` float32 in the order of ``names`` (float16 stores are cast)."""
        if len(names) == 0:
            return np.zeros((0, self.global_dim()), np.float32)
        out = np.empty((len(names), self.global_dim()), np.float32)
        for i, n in enumerate(names):
            out[i] = self.read_global(n)
        return out

    def read_local(self, name: str) -> dict[str, np.ndarray]:
        return self._store_of(name).read_local(name)

    def read(self, name: str) -> dict[str, np.ndarray]:
        return self._store_of(name).read(name)

    def close(self) -> None:
        for st in self.stores:
            st.close()

    def __enter__(self) -> StoreUnion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cast(feats: Mapping[str, Any], float16: bool) -> dict[str, np.ndarray]:
    out = {}
    for k, v in feats.items():
        arr = np.asarray(v)
        if k in ("global", "descriptors"):
            arr = arr.astype(np.float16 if float16 else np.float32)
        elif k in ("keypoints", "scores"):
            arr = arr.astype(np.float32)
        elif k == "image_size":
            arr = arr.astype(np.int64)
        out[k] = arr
    return out


def _write_group(parent: h5py.Group, key: str, arrays: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Create ``parent/key`` with ``arrays`` and their checksums; returns the checksums."""
    g = parent.create_group(key)
    sums = {}
    for k, arr in arrays.items():
        arr = np.asarray(arr)
        g.create_dataset(k, data=arr)
        sums[k] = array_digest(arr)
    g.attrs[CHECKSUMS] = _json(sums)
    return sums


def _checksums(g: h5py.Group) -> dict[str, str] | None:
    raw = g.attrs.get(CHECKSUMS)
    if raw is None:
        return None  # written before checksums existed
    try:
        sums = json.loads(raw)
    except ValueError:
        sums = None
    if not isinstance(sums, dict):
        raise StoreDamagedError(f"{g.file.filename}: image '{unescape_name(g.name.rsplit('/', 1)[-1])}': unreadable "
                                f"checksums attribute; delete the file or extract again with overwrite=true")
    return sums


def _verified(g: h5py.Group, key: str, sums: Mapping[str, str] | None) -> np.ndarray:
    """One array of an image group, checked against its checksum (and, for ``global``, its values)."""
    arr = np.asarray(g[key][()])
    where = f"{g.file.filename}: image '{unescape_name(g.name.rsplit('/', 1)[-1])}'"
    if sums is not None and sums.get(key) != array_digest(arr):
        raise StoreDamagedError(f"{where}: '{key}' does not match the checksum written with it (the file was modified "
                                f"after extraction); delete the file or extract again with overwrite=true")
    if key == "global":
        check_global(arr, where)
    return arr


def check_global(arr: np.ndarray, where: str) -> None:
    """A stored global descriptor must be finite and of unit norm (``NORM_TOL``); else :class:`StoreDamagedError`."""
    if arr.dtype.kind != "f" or arr.ndim != 1:
        raise StoreDamagedError(f"{where}: global descriptor of dtype {arr.dtype} and shape {arr.shape}, expected a "
                                f"float vector; delete the file or extract again with overwrite=true")
    x = arr.astype(np.float64)
    if not np.isfinite(x).all():
        raise StoreDamagedError(f"{where}: global descriptor holds NaN/inf; delete the file or extract again with "
                                f"overwrite=true")
    norm = float(np.sqrt(x @ x))
    if abs(norm - 1.0) > NORM_TOL.get(arr.dtype, 1e-2):
        raise StoreDamagedError(f"{where}: global descriptor has norm {norm:.4g}, not 1 (damaged or not written by "
                                f"this extraction); delete the file or extract again with overwrite=true")


def _read_group(g: h5py.Group) -> dict[str, np.ndarray]:
    if "global" not in g:
        raise KeyError(f"group {g.name} has no 'global'")
    sums = _checksums(g)
    return {k: _verified(g, k, sums) for k in g.keys()}


def store_contents(path: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """``(file attributes, {name: arrays})`` of a store, for comparing two stores (tests, merges)."""
    with FeatureStore(path) as st:
        attrs = st.attrs()
        return attrs, {n: st.read(n) for n in st.names()}
