"""Revisited Oxford / Paris ground truth (revisitop protocol): the one reader of ``gnd_<name>.pkl`` / ``.mat``.

Formats read by :func:`read_gnd`:

* ``gnd_<name>.pkl`` (revisitop): ``{'imlist': [...], 'qimlist': [...], 'gnd': [{'bbx', 'easy', 'hard', 'junk'}]}``,
  0-based indices into ``imlist``.  Read with a restricted unpickler (plain containers, numbers, strings, numpy
  arrays only) because a pickle can run arbitrary code when loaded.
* ``gnd_<name>.mat`` (revisitop, as ``scipy.io.loadmat`` reads it): cell arrays ``imlist``/``qimlist`` and a struct
  array ``gnd`` with fields ``easy``/``hard``/``junk``/``bbx``, 1-based indices (converted to 0-based here).
* the older Oxford5k/Paris6k format (cnnimageretrieval): ``gnd`` entries with ``ok``/``junk`` and a ``qidx`` list.
  ``ok`` becomes ``easy``, ``hard`` is empty; there the queries are also database images and ``ok`` contains the
  query itself, exactly as that protocol counted it.

Query crops are applied by :func:`delg.data.images.load_pil` (``crop=gnd.gnd[j].bbx``), which replicates
revisitop's ``PIL.Image.crop(bbx)``.
"""

from __future__ import annotations

import importlib
import io
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from delg.errors import ProjectError
from delg.io import atomic_write_bytes


class GroundTruthError(ProjectError, ValueError):
    """A ground-truth file is missing, unsafe or malformed; the message names the file and the field."""


@dataclass
class QueryGroundTruth:
    """Ground truth of one query. Indices are 0-based rows of ``GroundTruth.imlist``."""

    easy: np.ndarray  # (n_easy,) int64
    hard: np.ndarray  # (n_hard,) int64
    junk: np.ndarray  # (n_junk,) int64
    bbx: tuple[float, float, float, float] | None  # (x1, y1, x2, y2) in the full query image; None = whole image


@dataclass
class GroundTruth:
    """A revisitop-style benchmark: database names, query names and per-query easy/hard/junk/bbx."""

    name: str  # e.g. roxford5k
    imlist: list[str]  # database image names without extension
    qimlist: list[str]  # query image names without extension (not in imlist)
    gnd: list[QueryGroundTruth]
    source: Path | None = field(default=None)  # file it was read from
    format: str = "revisitop"  # 'revisitop' (easy/hard/junk) | 'original' (Oxford5k/Paris6k ok/junk, queries in imlist)
    qidx: list[int] | None = None  # 'original' format only: row of each query in imlist

    @property
    def n_db(self) -> int:
        return len(self.imlist)

    @property
    def n_queries(self) -> int:
        return len(self.qimlist)


# --------------------------------------------------------------------------------------------------- unpickling


def _numpy_module(*names: str) -> Any:
    # numpy 2 moved numpy.core to numpy._core (numpy.core still imports there, with a DeprecationWarning).
    for n in names:
        try:
            return importlib.import_module(n)
        except ImportError:
            continue
    raise ImportError(f"none of {names} can be imported")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    multiarray = _numpy_module("numpy._core.multiarray", "numpy.core.multiarray")
    numeric = _numpy_module("numpy._core.numeric", "numpy.core.numeric")
    import codecs

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 2 / protocol-2 pickles of numpy arrays carry their raw bytes as latin-1 text re-encoded here.
        ("_codecs", "encode"): codecs.encode,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("__builtin__", "set"): set,
        ("__builtin__", "frozenset"): frozenset,
        ("__builtin__", "complex"): complex,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        if hasattr(numeric, "_frombuffer"):  # protocol-5 pickles of arrays
            allowed[(mod, "_frombuffer")] = numeric._frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals of :func:`_allowed_globals`; anything else (``os.system``, ...) is refused."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        # latin1 so that Python 2 pickles of numpy arrays (bytes stored as str) load, as numpy recommends.
        super().__init__(file, encoding="latin1")
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise GroundTruthError(
                f"{self._path}: refused to unpickle global '{module}.{name}' (a ground-truth pickle may only hold "
                "plain containers, numbers, strings and numpy arrays)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise GroundTruthError(f"{self._path}: refused to unpickle a persistent id ({pid!r})")


def safe_load_pickle(path: str | Path) -> Any:
    """Load a pickle holding only plain containers, numbers, strings and numpy arrays/dtypes/scalars."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except GroundTruthError:
        raise
    except FileNotFoundError:
        raise GroundTruthError(f"{path}: ground-truth file not found") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise GroundTruthError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------------- parsing


def _load_mat(path: Path) -> dict[str, Any]:
    import scipy.io

    try:
        raw = scipy.io.loadmat(str(path))
    except NotImplementedError:
        raise GroundTruthError(f"{path}: MATLAB v7.3 (HDF5) files are not supported; save it with -v7") from None
    except (ValueError, OSError, TypeError, IndexError, KeyError, scipy.io.matlab.MatReadError) as e:
        # an empty or text file: scipy raises MatReadError, IndexError, ... depending on the bytes
        raise GroundTruthError(f"{path}: not a readable .mat file ({type(e).__name__}: {e}); give revisitop's "
                               f"gnd_<name>.mat (or .pkl)") from None
    out: dict[str, Any] = {}
    for key in ("imlist", "qimlist"):
        if key in raw:
            out[key] = [_mat_string(x, path, key) for x in np.asarray(raw[key], dtype=object).ravel(order="F")]
    if "qidx" in raw:
        out["qidx"] = (np.asarray(raw["qidx"]).ravel() - 1).tolist()
    if "gnd" in raw:
        g = np.asarray(raw["gnd"]).ravel(order="F")
        if g.dtype.names is None:
            raise GroundTruthError(f"{path}: field 'gnd' must be a struct array, got {g.dtype}")
        entries = []
        for rec in g:
            entry: dict[str, Any] = {}
            for f in g.dtype.names:
                v = np.asarray(rec[f])
                if f in ("easy", "hard", "junk", "ok"):
                    # MATLAB indices are 1-based; an empty list is stored as a 0x0 double.
                    entry[f] = _as_index_array(v, path, f"gnd.{f}") - 1 if v.size else np.zeros(0, np.int64)
                else:
                    entry[f] = v
            entries.append(entry)
        out["gnd"] = entries
    return out


def _mat_string(x: Any, path: Path, key: str) -> str:
    # loadmat wraps each cell in (1, 1) object arrays around a (1,) unicode array; unwrap until a str.
    while isinstance(x, np.ndarray):
        if x.size != 1:
            raise GroundTruthError(f"{path}: field '{key}' must hold strings, got an array of shape {x.shape}")
        x = x.ravel()[0]
    if not isinstance(x, str):
        raise GroundTruthError(f"{path}: field '{key}' must hold strings, got {type(x).__name__}")
    return x


def _as_index_array(v: Any, path: Path, where: str) -> np.ndarray:
    try:
        a = np.asarray([] if v is None else v).ravel()
    except (ValueError, TypeError):
        raise GroundTruthError(f"{path}: {where} is not a list of indices") from None
    if a.size == 0:
        return np.zeros(0, np.int64)
    if a.dtype.kind in "iu":
        return a.astype(np.int64)
    if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
        return a.astype(np.int64)  # .mat stores indices as doubles
    raise GroundTruthError(f"{path}: {where} must hold integer indices, got {a.dtype} values like {a[:3].tolist()}")


def _parse_bbx(v: Any, path: Path, where: str) -> tuple[float, float, float, float] | None:
    if v is None:
        return None
    try:
        a = np.asarray(v, dtype=np.float64).ravel()
    except (ValueError, TypeError):
        raise GroundTruthError(f"{path}: {where} must be 4 numbers [x1, y1, x2, y2], got {v!r}") from None
    if a.size == 0:
        return None  # no box: the whole image is the query
    if a.size != 4 or not np.all(np.isfinite(a)):
        raise GroundTruthError(f"{path}: {where} must be 4 finite numbers [x1, y1, x2, y2], got {a.tolist()}")
    x1, y1, x2, y2 = (float(c) for c in a)
    if not (x2 > x1 and y2 > y1):
        raise GroundTruthError(f"{path}: {where} is empty or inverted (x2 <= x1 or y2 <= y1): {a.tolist()}")
    return (x1, y1, x2, y2)


def _name_list(data: Mapping[str, Any], key: str, path: Path) -> list[str]:
    if key not in data:
        raise GroundTruthError(f"{path}: missing field '{key}' (keys: {sorted(map(str, data))})")
    v = data[key]
    items = v.ravel().tolist() if isinstance(v, np.ndarray) else v
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise GroundTruthError(f"{path}: field '{key}' must be a list of image names, got {type(v).__name__}")
    names = []
    for i, x in enumerate(items):
        if isinstance(x, bytes):
            x = x.decode("utf-8")
        if not isinstance(x, str) or not x:
            raise GroundTruthError(f"{path}: {key}[{i}] must be a non-empty image name, got {x!r}")
        names.append(x)
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise GroundTruthError(f"{path}: field '{key}' has duplicate name '{dup}'")
    return names


def parse_gnd(data: Any, path: str | Path, name: str | None = None) -> GroundTruth:
    """Validate a loaded ground-truth dict (0-based indices) and build a :class:`GroundTruth`."""
    path = Path(path)
    if not isinstance(data, Mapping):
        raise GroundTruthError(f"{path}: top level must be a dict with imlist/qimlist/gnd, got {type(data).__name__}")
    imlist = _name_list(data, "imlist", path)
    qimlist = _name_list(data, "qimlist", path)
    if "gnd" not in data:
        raise GroundTruthError(f"{path}: missing field 'gnd' (keys: {sorted(map(str, data))})")
    raw = data["gnd"]
    raw = list(raw.ravel()) if isinstance(raw, np.ndarray) else raw
    if not isinstance(raw, Sequence) or len(raw) != len(qimlist):
        n = len(raw) if isinstance(raw, Sequence) else type(raw).__name__
        raise GroundTruthError(f"{path}: field 'gnd' must be a list with one entry per query ({len(qimlist)}), got {n}")
    fmt = "revisitop"
    if raw and isinstance(raw[0], Mapping) and "ok" in raw[0] and "easy" not in raw[0]:
        fmt = "original"
    lists = ("easy", "hard", "junk") if fmt == "revisitop" else ("ok", "junk")
    n_db = len(imlist)
    gnd = []
    for j, q in enumerate(raw):
        where = f"gnd[{j}] (query '{qimlist[j]}')"
        if not isinstance(q, Mapping):
            raise GroundTruthError(f"{path}: {where} must be a dict, got {type(q).__name__}")
        arrays = {}
        for f in (*lists, "bbx"):
            if f not in q:
                raise GroundTruthError(f"{path}: {where} is missing field '{f}'")
        for f in lists:
            a = _as_index_array(q[f], path, f"{where}.{f}")
            bad = a[(a < 0) | (a >= n_db)]
            if bad.size:
                one_based = path.suffix.lower() == ".mat"  # report the index as written in the file
                shown, lo, hi = (int(bad[0]) + 1, 1, n_db) if one_based else (int(bad[0]), 0, n_db - 1)
                raise GroundTruthError(
                    f"{path}: {where}.{f} has index {shown} out of range [{lo}, {hi}] of imlist"
                    + (" (1-based, as MATLAB writes it)" if one_based else "")
                )
            if np.unique(a).size != a.size:
                raise GroundTruthError(f"{path}: {where}.{f} lists an index twice")
            arrays[f] = a
        for a_name, b_name in ((lists[i], lists[k]) for i in range(len(lists)) for k in range(i + 1, len(lists))):
            both = np.intersect1d(arrays[a_name], arrays[b_name])
            if both.size:
                raise GroundTruthError(
                    f"{path}: {where}: '{a_name}' and '{b_name}' overlap (index {int(both[0])}); they must be disjoint"
                )
        bbx = _parse_bbx(q["bbx"], path, f"{where}.bbx")
        if fmt == "revisitop":
            gnd.append(QueryGroundTruth(easy=arrays["easy"], hard=arrays["hard"], junk=arrays["junk"], bbx=bbx))
        else:
            gnd.append(QueryGroundTruth(easy=arrays["ok"], hard=np.zeros(0, np.int64), junk=arrays["junk"], bbx=bbx))
    qidx = None
    if fmt == "original" and "qidx" in data:
        qidx = _as_index_array(data["qidx"], path, "qidx").tolist()
        if len(qidx) != len(qimlist) or any(not 0 <= i < n_db for i in qidx):
            raise GroundTruthError(f"{path}: field 'qidx' must give one imlist row per query")
    if name is None:
        name = path.stem[4:] if path.stem.startswith("gnd_") else path.stem
    return GroundTruth(name=name, imlist=imlist, qimlist=qimlist, gnd=gnd, source=path, format=fmt, qidx=qidx)


def read_gnd(path: str | Path) -> GroundTruth:
    """Read and validate ``gnd_<name>.pkl`` (0-based) or ``gnd_<name>.mat`` (1-based, converted to 0-based).

    Raises:
        GroundTruthError: missing file, unsafe pickle, missing field, index out of range, overlapping
            easy/hard/junk or malformed bbx; the message names the file and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise GroundTruthError(f"{path}: ground-truth file not found")
    suffix = path.suffix.lower()
    if suffix == ".pkl":
        data = safe_load_pickle(path)
    elif suffix == ".mat":
        data = _load_mat(path)
    else:
        raise GroundTruthError(f"{path}: unknown ground-truth format '{suffix}' (expected gnd_<name>.pkl or .mat)")
    return parse_gnd(data, path)


def find_gnd(root: str | Path, name: str) -> Path:
    """``<root>/gnd_<name>.pkl``, else ``.mat``; a clear error listing both when neither exists."""
    root = Path(root)
    for ext in (".pkl", ".mat"):
        p = root / f"gnd_{name}{ext}"
        if p.is_file():
            return p
    raise GroundTruthError(f"{root}: no ground truth for '{name}' (expected gnd_{name}.pkl or gnd_{name}.mat there)")


def image_path(images_dir: str | Path, name: str, check: bool = False) -> Path:
    """``<images_dir>/<name>.jpg`` (revisitop's layout); with ``check`` a missing file is a FileNotFoundError."""
    p = Path(images_dir) / f"{name}.jpg"
    if check and not p.is_file():
        raise FileNotFoundError(f"{p}: image '{name}' not found (expected <images_dir>/<name>.jpg)")
    return p


def write_gnd(path: str | Path, imlist: Sequence[str], qimlist: Sequence[str], gnd: Sequence[Mapping[str, Any]]) -> Path:
    """Write a ``gnd_<name>.pkl`` that :func:`read_gnd` reads: ``{'imlist', 'qimlist', 'gnd'}`` (pickle protocol 4).

    ``gnd[i]`` is ``{'bbx': [x1, y1, x2, y2], 'easy': [...], 'hard': [...], 'junk': [...]}`` with 0-based indices
    into ``imlist``, as plain lists, ints and floats (the embedded benchmark writes its test split with it).
    """
    data = {"imlist": list(imlist), "qimlist": list(qimlist), "gnd": [dict(g) for g in gnd]}
    return atomic_write_bytes(path, pickle.dumps(data, protocol=4))
