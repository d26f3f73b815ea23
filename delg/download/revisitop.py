"""Recipe: Revisited Oxford/Paris (images + ``gnd_<name>.pkl``) and the 1M distractors;
``scripts/download_revisitop.sh``."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from delg.download.archives import _archive_problem, scan_archive
from delg.download.errors import BadArchiveError
from delg.download.fetch import Fetcher
from delg.download.jobs import RunReport, _log, _run_jobs, _write_marker

REVISITOP_GND_URL = "http://cmp.felk.cvut.cz/revisitop/data/datasets"  # <url>/<name>/gnd_<name>.pkl
REVISITOP_IMAGES = {  # images are hosted by the original Oxford VGG pages (face-blurred "-v1" archives)
    "roxford5k": ("https://www.robots.ox.ac.uk/~vgg/data/oxbuildings", ["oxbuild_images-v1.tgz"]),
    "rparis6k": ("https://www.robots.ox.ac.uk/~vgg/data/parisbuildings", ["paris_1-v1.tgz", "paris_2-v1.tgz"]),
}
REVISITOP1M_URL = "http://ptak.felk.cvut.cz/revisitop/revisitop1m"  # jpg/revisitop1m.<k>.tar.gz, revisitop1m.txt
REVISITOP1M_PARTS = 100


def revisitop_url(kind: str, name: str, file: str, base_url: str | None = None) -> str:
    """URL of a revisitop file.  ``kind``: 'gnd' | 'images' | 'r1m' (distractor tars) | 'r1m_list'.

    With ``base_url`` (a mirror, or a test server) every file comes from one tree:
    ``<base>/<name>/gnd_<name>.pkl``, ``<base>/<name>/jpg/<archive>``, ``<base>/revisitop1m/jpg/<tar>``,
    ``<base>/revisitop1m/revisitop1m.txt``.  Without it, the official hosts are used.
    """
    if base_url:
        b = base_url.rstrip("/")
        return {"gnd": f"{b}/{name}/{file}", "images": f"{b}/{name}/jpg/{file}",
                "r1m": f"{b}/revisitop1m/jpg/{file}", "r1m_list": f"{b}/revisitop1m/{file}"}[kind]
    if kind == "gnd":
        return f"{REVISITOP_GND_URL}/{name}/{file}"
    if kind == "images":
        return f"{REVISITOP_IMAGES[name][0]}/{file}"
    if kind == "r1m":
        return f"{REVISITOP1M_URL}/jpg/{file}"
    if kind == "r1m_list":
        return f"{REVISITOP1M_URL}/{file}"
    raise ValueError(f"unknown revisitop file kind '{kind}'")


def _gnd_names(path: Path) -> list[str]:
    """Database + query image names of a ground-truth file (read with the project's safe reader)."""
    from delg.data.revisitop import read_gnd  # numpy import is only paid when a gnd file is checked

    gnd = read_gnd(path)
    return [*gnd.imlist, *gnd.qimlist]


def _gnd_problem(path: Path, name: str) -> str | None:
    """Check a downloaded ``gnd_<name>.pkl`` (possibly still called ``.part``) with the project's reader."""
    try:
        if path.name != name:
            # read_gnd dispatches on the file name: check a copy under the final name (the file is small).
            with tempfile.TemporaryDirectory(prefix="gnd_check_") as tmp:
                shutil.copyfile(path, Path(tmp) / name)
                names = _gnd_names(Path(tmp) / name)
        else:
            names = _gnd_names(path)
    except (ValueError, OSError) as e:  # GroundTruthError is a ValueError
        return f"unreadable ground truth ({e})"
    return None if names else f"{path}: ground truth lists no images"


def _extract_archive_job(
    fetcher: Fetcher, url: str, archive: Path, dest: Path, flatten: bool, keep: bool, overwrite: bool = False
) -> Callable[[], bool]:
    """Download (checked with :func:`_archive_problem`) and extract one revisitop archive; resumable."""

    def run() -> bool:
        marker = archive.with_name(archive.name + ".extracted")
        if marker.is_file() and not overwrite:
            return True
        if not archive.is_file():
            fetcher.fetch(url, archive, verify=_archive_problem)
        try:
            stats = scan_archive(archive, dest, flatten=flatten, only_images=flatten)
        except BadArchiveError:
            archive.unlink()  # fetched again on the next run
            raise
        _write_marker(marker, {"files": stats.files, "images": stats.images, "skipped": stats.skipped[:20]})
        if not keep:
            archive.unlink()
        return False

    return run


def _present(root: Path, rel: str) -> bool:
    p = root / rel
    return p.is_file() or (not PurePosixPath(rel).suffix and p.with_name(p.name + ".jpg").is_file())


def download_revisitop(
    out: Path,
    names: Sequence[str] = ("roxford5k", "rparis6k"),
    distractor_parts: int = 0,
    base_url: str | None = None,
    jobs: int = 4,
    fetcher: Fetcher | None = None,
    keep_archives: bool = False,
    overwrite: bool = False,
) -> RunReport:
    """Download Revisited Oxford/Paris (images + ``gnd_<name>.pkl``) and optionally the 1M distractors.

    Args:
        out: receives ``<name>/jpg/*.jpg`` (flat), ``<name>/gnd_<name>.pkl``, ``<name>/archives/`` (markers),
            ``revisitop1m/jpg/...`` + ``revisitop1m/revisitop1m.txt`` and ``download_report.json``.
        names: datasets among ``roxford5k``, ``rparis6k``.
        distractor_parts: number of ``revisitop1m.<k>.tar.gz`` parts (0: none, 100: all ~1M images).
        base_url: one-tree mirror (see :func:`revisitop_url`); None: the official hosts.
        jobs: parallel downloads.
        fetcher: HTTP settings.
        keep_archives: keep archives after extraction (default: delete; the ``.extracted`` marker remains).
        overwrite: fetch the small files again and extract every archive again (a kept archive is not refetched).

    Returns:
        The run report (also ``out/download_report.json``): every image listed in a ground truth must be in
        ``<name>/jpg/``; with all 100 distractor parts every line of ``revisitop1m.txt`` must be present.
    """
    fetcher = fetcher or Fetcher()
    for name in names:
        if name not in REVISITOP_IMAGES:
            raise ValueError(f"unknown revisitop dataset '{name}' (choose from {', '.join(REVISITOP_IMAGES)})")
    if not 0 <= distractor_parts <= REVISITOP1M_PARTS:
        raise ValueError(f"distractor parts must be in 0..{REVISITOP1M_PARTS}, got {distractor_parts}")
    out.mkdir(parents=True, exist_ok=True)
    report = RunReport("revisitop", out, settings={
        "datasets": list(names), "distractor_parts": distractor_parts, "base_url": base_url or "official hosts",
        "jobs": jobs, "keep_archives": keep_archives, "overwrite": overwrite, "retries": fetcher.retries,
        "timeout": fetcher.timeout})
    job_list: list[tuple[str, Callable[[], bool]]] = []

    def small_file_job(url: str, dest: Path, verify: Callable[[Path], str | None] | None) -> Callable[[], bool]:
        def run() -> bool:
            if dest.is_file() and not overwrite and (verify is None or verify(dest) is None):
                return True
            dest.unlink(missing_ok=True)
            fetcher.fetch(url, dest, verify=verify)
            return False

        return run

    for name in names:
        gnd_file = f"gnd_{name}.pkl"
        job_list.append((f"{name}/{gnd_file}", small_file_job(
            revisitop_url("gnd", name, gnd_file, base_url), out / name / gnd_file,
            lambda p, f=gnd_file: _gnd_problem(p, f))))
        for arc in REVISITOP_IMAGES[name][1]:
            job = _extract_archive_job(fetcher, revisitop_url("images", name, arc, base_url),
                                       out / name / "archives" / arc, out / name / "jpg", True, keep_archives,
                                       overwrite)
            job_list.append((f"{name}/{arc}", job))
    r1m = out / "revisitop1m"
    if distractor_parts:
        job_list.append(("revisitop1m/revisitop1m.txt", small_file_job(
            revisitop_url("r1m_list", "revisitop1m", "revisitop1m.txt", base_url), r1m / "revisitop1m.txt", None)))
        for k in range(1, distractor_parts + 1):
            tar_name = f"revisitop1m.{k}.tar.gz"
            job = _extract_archive_job(fetcher, revisitop_url("r1m", "revisitop1m", tar_name, base_url),
                                       r1m / "archives" / tar_name, r1m / "jpg", False, keep_archives,
                                       overwrite)
            job_list.append((f"revisitop1m/{tar_name}", job))

    _log(f"revisitop: {', '.join(names)}{f' + {distractor_parts} distractor part(s)' if distractor_parts else ''}"
         f" from {base_url or 'the official hosts'} into {out}")
    _run_jobs(job_list, jobs, report, fetcher)

    failed = {f["item"] for f in report.failures}
    for name in names:
        gnd_path = out / name / f"gnd_{name}.pkl"
        if not gnd_path.is_file():
            continue
        try:
            listed = _gnd_names(gnd_path)
        except (ValueError, OSError) as e:
            report.fail(f"{name}/gnd_{name}.pkl", f"unreadable ground truth ({e})")
            continue
        missing = [n for n in listed if not (out / name / "jpg" / f"{n}.jpg").is_file()]
        listing = out / name / "missing.txt"
        listing.write_text("".join(f"{n}\n" for n in missing))
        report.checks[name] = {"listed": len(listed), "present": len(listed) - len(missing),
                               "missing": len(missing), "missing_list": str(listing)}
        if missing and not any(item.startswith(f"{name}/") for item in failed):
            report.fail(f"{name}/jpg", f"{len(missing)} of {len(listed)} images listed in gnd_{name}.pkl are not in "
                                       f"{out / name / 'jpg'} (see {listing})")
    if distractor_parts:
        markers = sorted((r1m / "archives").glob("revisitop1m.*.tar.gz.extracted"))
        extracted = sum(json.loads(m.read_text()).get("images", 0) for m in markers)
        check: dict[str, Any] = {"parts_requested": distractor_parts, "parts_extracted": len(markers),
                                 "images_extracted": extracted}
        list_path = r1m / "revisitop1m.txt"
        if list_path.is_file():
            listed_r1m = [ln.strip() for ln in list_path.read_text().splitlines() if ln.strip()]
            missing_r1m = [n for n in listed_r1m if not _present(r1m / "jpg", n)]
            listing = r1m / "missing.txt"
            listing.write_text("".join(f"{n}\n" for n in missing_r1m))
            check.update(listed=len(listed_r1m), present=len(listed_r1m) - len(missing_r1m),
                         missing=len(missing_r1m), missing_list=str(listing))
            # With only some parts requested most of the list is legitimately absent: report, do not fail.
            if missing_r1m and distractor_parts == REVISITOP1M_PARTS and not any(
                    item.startswith("revisitop1m/") for item in failed):
                report.fail("revisitop1m/jpg", f"{len(missing_r1m)} of {len(listed_r1m)} images listed in "
                                               f"revisitop1m.txt are missing (see {listing})")
        report.checks["revisitop1m"] = check
    report.write(out / "download_report.json")
    return report
