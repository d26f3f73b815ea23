"""Dataset downloads against a local HTTP server laid out like the official ones (127.0.0.1 only, tiny files).

The server counts requests per path, can honour or ignore ``Range`` and can cut the connection halfway through
the first response of chosen files, so resume, refetch, md5 mismatches and 404s are exercised end to end through
the shell scripts.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import subprocess
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from delg.download import (
    BadArchiveError,
    DownloadError,
    _content_range,
    parse_md5,
    read_train_clean,
    scan_archive,
)

REPO = Path(__file__).resolve().parent.parent
GLDV2_SH = REPO / "download_dataset.sh"
REVISITOP_SH = REPO / "scripts" / "download_revisitop.sh"


# ------------------------------------------------------------------------------------------------ local server


@dataclass
class ServerState:
    root: Path
    range_support: bool = True
    cut_first: set[str] = field(default_factory=set)  # paths whose first response is cut halfway
    requests: Counter[str] = field(default_factory=Counter)
    range_headers: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: returning early closes it (a cut)

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            rng = self.headers.get("Range")
            with state.lock:
                state.requests[path] += 1
                first = state.requests[path] == 1
                state.range_headers.append((path, rng))
            f = (state.root / path.lstrip("/")).resolve()
            if not f.is_relative_to(state.root.resolve()) or not f.is_file():
                self.send_error(404)
                return
            data = f.read_bytes()
            start = 0
            m = re.fullmatch(r"bytes=(\d+)-", rng or "")
            if m and state.range_support:
                start = int(m.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if first and path in state.cut_first:
                self.wfile.write(body[: len(body) // 2])
                return
            self.wfile.write(body)

    return Handler


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, ServerState]]:
    root = tmp_path / "server"
    root.mkdir()
    state = ServerState(root)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def run_script(script: Path, args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **env_extra}
    # Defaults first: argparse keeps the last value, so a test's own --retries wins.
    cmd = ["bash", str(script), "-j", "3", "--retries", "1", "--backoff", "0", "--timeout", "10", "--no-progress",
           *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------------------------------------ fake data


def fake_jpg(key: str) -> bytes:
    # Content only has to be distinct and checkable: nothing decodes these.
    return b"\xff\xd8\xff\xe0" + hashlib.sha256(key.encode()).digest() * 8 + b"\xff\xd9"


def make_tar(path: Path, files: dict[str, bytes], gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def gld_id(split: str, t: int, k: int) -> str:
    return hashlib.md5(f"{split}-{t}-{k}".encode()).hexdigest()[:16]


def gld_member(image_id: str) -> str:
    return f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


MISSING_ID = "0123456789abcdef"  # listed in train_clean.csv, in no tar


@pytest.fixture
def gldv2(server: tuple[str, ServerState]) -> tuple[str, ServerState, dict[str, list[str]]]:
    """3 train tars, 1 index tar, 1 test tar (3 images each), their md5 files and every metadata CSV."""
    url, state = server
    root = state.root
    ids: dict[str, list[str]] = {}
    for split, n in (("train", 3), ("index", 1), ("test", 1)):
        for t in range(n):
            tar_ids = [gld_id(split, t, k) for k in range(3)]
            ids[f"{split}/{t}"] = tar_ids
            tar = make_tar(root / split / f"images_{t:03d}.tar", {gld_member(i): fake_jpg(i) for i in tar_ids})
            digest = hashlib.md5(tar.read_bytes()).hexdigest()
            md5 = root / "md5sum" / split / f"md5.images_{t:03d}.txt"
            md5.parent.mkdir(parents=True, exist_ok=True)
            md5.write_text(f"{digest}  images_{t:03d}.tar\n")
    train_ids = [i for t in range(3) for i in ids[f"train/{t}"]]
    for rel in ("metadata/train.csv", "metadata/train_attribution.csv", "metadata/train_label_to_category.csv",
                "metadata/index.csv", "metadata/index_image_to_landmark.csv", "metadata/index_label_to_category.csv",
                "metadata/test.csv", "ground_truth/retrieval_solution_v2.1.csv",
                "ground_truth/recognition_solution_v2.1.csv"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("id\n" + "".join(f"{i}\n" for i in train_ids))
    (root / "metadata" / "train_clean.csv").write_text(
        "landmark_id,images\n"
        f"1,{' '.join(train_ids[:5])}\n"
        f"7,{' '.join(train_ids[5:])} {MISSING_ID}\n"
    )
    return url, state, ids


def gld_env(url: str, out: Path) -> dict[str, str]:
    return {"GLDV2_BASE_URL": url, "GLDV2_DIR": str(out)}


def assert_extracted(out: Path, split: str, tar_ids: list[str]) -> None:
    for i in tar_ids:
        p = out / split / gld_member(i)
        assert p.is_file(), p
        assert p.read_bytes() == fake_jpg(i)


# ------------------------------------------------------------------------------------------------ GLDv2


def test_gldv2_clean_run_then_rerun_fetches_nothing(gldv2: tuple, tmp_path: Path) -> None:
    url, state, ids = gldv2
    out = tmp_path / "landmark"
    r = run_script(GLDV2_SH, ["3", "1", "1"], gld_env(url, out))
    assert r.returncode == 0, r.stdout + r.stderr
    for key, tar_ids in ids.items():
        assert_extracted(out, key.split("/")[0], tar_ids)
    for split, n in (("train", 3), ("index", 1), ("test", 1)):
        for t in range(n):
            assert (out / "tars" / split / f"images_{t:03d}.tar.extracted").is_file()
            assert not (out / "tars" / split / f"images_{t:03d}.tar").exists()  # deleted after extraction
    for name in ("train.csv", "train_clean.csv", "index.csv", "test.csv", "retrieval_solution_v2.1.csv"):
        assert (out / name).read_bytes() == next(state.root.rglob(name)).read_bytes()
    report = json.loads((out / "download_report.json").read_text())
    assert report["failures"] == []
    assert report["settings"]["counts"] == {"train": 3, "index": 1, "test": 1} and report["settings"]["base_url"] == url
    assert report["checks"]["train_clean.csv"] == {
        "listed": 10, "present": 9, "missing": 1, "missing_list": str(out / "train_clean_missing.txt")}
    assert (out / "train_clean_missing.txt").read_text().split() == [MISSING_ID]
    assert "present=9" in r.stdout and "missing=1" in r.stdout

    before = sum(state.requests.values())
    r2 = run_script(GLDV2_SH, ["3", "1", "1"], gld_env(url, out))
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert sum(state.requests.values()) == before  # markers: no tar, md5 or CSV is requested again
    assert len(json.loads((out / "download_report.json").read_text())["skipped"]) == len(report["done"])


def test_gldv2_overrides_output_dir_and_overwrite(gldv2: tuple, tmp_path: Path) -> None:
    """The project's key=value style: output_dir= picks the folder, overwrite=true extracts everything again."""
    url, state, ids = gldv2
    out = tmp_path / "elsewhere"
    env = {"GLDV2_BASE_URL": url}
    r = run_script(GLDV2_SH, ["1", "0", "0", f"output_dir={out}", "jobs=2", "progress=false"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_extracted(out, "train", ids["train/0"])
    victim = out / "train" / gld_member(ids["train/0"][0])
    victim.unlink()
    before = sum(state.requests.values())
    assert run_script(GLDV2_SH, ["1", "0", "0", f"output_dir={out}"], env).returncode == 0
    assert not victim.exists() and sum(state.requests.values()) == before  # done work is not redone
    r = run_script(GLDV2_SH, ["1", "0", "0", f"output_dir={out}", "overwrite=true"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert victim.is_file() and sum(state.requests.values()) > before
    r = run_script(GLDV2_SH, ["1", "0", "0", "output_dri=x"], env)
    assert r.returncode == 2 and "nearest valid key: 'output_dir'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("range_support", [True, False])
def test_gldv2_resume_after_cut_connection(gldv2: tuple, tmp_path: Path, range_support: bool) -> None:
    url, state, ids = gldv2
    state.range_support = range_support
    cut = "/train/images_001.tar"
    state.cut_first.add(cut)
    out = tmp_path / "landmark"
    full_size = (state.root / cut.lstrip("/")).stat().st_size

    r = run_script(GLDV2_SH, ["3", "0", "0"], gld_env(url, out))
    assert r.returncode == 1
    report = json.loads((out / "download_report.json").read_text())
    assert [f["item"] for f in report["failures"]] == ["train/images_001.tar"]
    assert "train/images_001.tar" in r.stdout
    part = out / "tars" / "train" / "images_001.tar.part"
    assert part.stat().st_size == full_size // 2  # the truncated download is kept for resuming
    assert not (out / "train" / gld_member(ids["train/1"][0])).exists()
    assert_extracted(out, "train", ids["train/0"] + ids["train/2"])

    r2 = run_script(GLDV2_SH, ["3", "0", "0"], gld_env(url, out))
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert_extracted(out, "train", ids["train/1"])
    assert state.requests["/train/images_000.tar"] == 1  # verified tars are not fetched again
    assert state.requests["/train/images_002.tar"] == 1
    assert state.requests["/md5sum/train/md5.images_000.txt"] == 1
    assert state.requests[cut] == 2
    second = [h for p, h in state.range_headers if p == cut][1]
    assert second == f"bytes={full_size // 2}-"  # asked for the rest; without Range support the server resent all
    assert not part.exists()
    assert json.loads((out / "download_report.json").read_text())["checks"]["train_clean.csv"]["present"] == 9


def test_gldv2_cut_connection_recovered_within_one_run(gldv2: tuple, tmp_path: Path) -> None:
    url, state, ids = gldv2
    state.cut_first.add("/test/images_000.tar")
    out = tmp_path / "landmark"
    r = run_script(GLDV2_SH, ["0", "0", "1", "--retries", "2"], gld_env(url, out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert_extracted(out, "test", ids["test/0"])
    assert state.requests["/test/images_000.tar"] == 2


@pytest.mark.parametrize("good", [True, False])
def test_gldv2_whole_part_left_by_a_killed_run(gldv2: tuple, tmp_path: Path, good: bool) -> None:
    """A run killed after the last byte but before the rename leaves a whole ``.part``: the server answers the
    resume request with 416, the ``.part`` is verified as is, and fetched again only when its md5 is wrong."""
    url, state, ids = gldv2
    out = tmp_path / "landmark"
    tar = (state.root / "train" / "images_000.tar").read_bytes()
    part = out / "tars" / "train" / "images_000.tar.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(tar if good else bytes(len(tar)))
    r = run_script(GLDV2_SH, ["1", "0", "0", "--retries", "2", "--keep-tars"], gld_env(url, out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert_extracted(out, "train", ids["train/0"])
    assert (out / "tars" / "train" / "images_000.tar").read_bytes() == tar  # --keep-tars
    headers = [h for p, h in state.range_headers if p == "/train/images_000.tar"]
    assert headers == ([f"bytes={len(tar)}-"] if good else [f"bytes={len(tar)}-", None])


def test_gldv2_md5_mismatch_is_reported_and_not_extracted(gldv2: tuple, tmp_path: Path) -> None:
    url, state, ids = gldv2
    bad = state.root / "train" / "images_002.tar"
    data = bytearray(bad.read_bytes())
    data[600] ^= 0xFF  # inside the first member's data: still a valid tar, wrong md5
    bad.write_bytes(bytes(data))
    out = tmp_path / "landmark"
    r = run_script(GLDV2_SH, ["3", "0", "0", "--retries", "2"], gld_env(url, out))
    assert r.returncode == 1
    failures = json.loads((out / "download_report.json").read_text())["failures"]
    assert [f["item"] for f in failures] == ["train/images_002.tar"]
    assert "md5 mismatch" in failures[0]["reason"]
    assert state.requests["/train/images_002.tar"] == 2  # fetched again from scratch, then given up
    for i in ids["train/2"]:
        assert not (out / "train" / gld_member(i)).exists()
    assert not list((out / "tars" / "train").glob("images_002.tar*"))  # no bad tar or .part left behind
    assert_extracted(out, "train", ids["train/0"] + ids["train/1"])
    check = json.loads((out / "download_report.json").read_text())["checks"]["train_clean.csv"]
    assert (check["present"], check["missing"]) == (6, 4)


def test_gldv2_http_404_listed_and_nonzero(gldv2: tuple, tmp_path: Path) -> None:
    url, state, _ = gldv2
    (state.root / "index" / "images_000.tar").unlink()  # md5 file still there, tar gone
    out = tmp_path / "landmark"
    r = run_script(GLDV2_SH, ["4", "1", "0", "--retries", "3"], gld_env(url, out))  # train/images_003: nothing
    assert r.returncode == 1
    failures = {f["item"]: f["reason"] for f in json.loads((out / "download_report.json").read_text())["failures"]}
    assert set(failures) == {"index/images_000.tar", "train/images_003.tar"}
    assert "404" in failures["index/images_000.tar"] and "404" in failures["train/images_003.tar"]
    assert "md5.images_003.txt" in failures["train/images_003.tar"]
    assert state.requests["/index/images_000.tar"] == 1  # a 404 is permanent: not retried
    assert "FAILED (2)" in r.stdout


def test_gldv2_bad_count_is_an_argument_error(tmp_path: Path) -> None:
    r = run_script(GLDV2_SH, ["501", "0", "0"], {"GLDV2_DIR": str(tmp_path / "x"), "GLDV2_BASE_URL": "http://127.0.0.1:9"})
    assert r.returncode == 2
    assert "0..500" in r.stderr


# ------------------------------------------------------------------------------------------------ revisitop


def _gnd(imlist: list[str], qimlist: list[str]) -> bytes:
    gnd = [{"bbx": [0.0, 0.0, 10.0, 10.0], "easy": [0], "hard": [1], "junk": []} for _ in qimlist]
    return pickle.dumps({"imlist": imlist, "qimlist": qimlist, "gnd": gnd})


R1M_PARTS = {1: ["00/a.jpg", "00/b.jpg"], 2: ["01/c.jpg"], 3: ["02/d.jpg"]}


@pytest.fixture
def revisitop(server: tuple[str, ServerState]) -> tuple[str, ServerState, dict[str, list[str]]]:
    """Tiny roxford5k (1 tgz, flat), rparis6k (2 tgz with sub-folders), 3 distractor parts + revisitop1m.txt."""
    url, state = server
    root = state.root
    ox = {"imlist": ["all_souls_000001", "bodleian_000002", "radcliffe_000003"], "qimlist": ["all_souls_000013"]}
    pa = {"imlist": ["paris_defense_000001", "paris_louvre_000002", "paris_louvre_000003"],
          "qimlist": ["paris_defense_000009"]}
    for name, d in (("roxford5k", ox), ("rparis6k", pa)):
        (root / name / "jpg").mkdir(parents=True)
        (root / name / f"gnd_{name}.pkl").write_bytes(_gnd(d["imlist"], d["qimlist"]))
    make_tar(root / "roxford5k/jpg/oxbuild_images-v1.tgz",
             {f"{n}.jpg": fake_jpg(n) for n in ox["imlist"] + ox["qimlist"]}, gz=True)
    make_tar(root / "rparis6k/jpg/paris_1-v1.tgz",
             {"paris/defense/paris_defense_000001.jpg": fake_jpg("paris_defense_000001"),
              "paris/defense/paris_defense_000009.jpg": fake_jpg("paris_defense_000009"),
              "paris/README.txt": b"not an image"}, gz=True)
    make_tar(root / "rparis6k/jpg/paris_2-v1.tgz",
             {f"paris/louvre/{n}.jpg": fake_jpg(n) for n in pa["imlist"][1:]}, gz=True)
    for k, names in R1M_PARTS.items():
        make_tar(root / f"revisitop1m/jpg/revisitop1m.{k}.tar.gz", {n: fake_jpg(n) for n in names}, gz=True)
    (root / "revisitop1m/revisitop1m.txt").write_text("".join(f"{n}\n" for ns in R1M_PARTS.values() for n in ns))
    return url, state, {"roxford5k": ox["imlist"] + ox["qimlist"], "rparis6k": pa["imlist"] + pa["qimlist"]}


def rop_env(url: str, out: Path) -> dict[str, str]:
    return {"REVISITOP_BASE_URL": url, "REVISITOP_DIR": str(out)}


def test_revisitop_clean_run_with_distractors(revisitop: tuple, tmp_path: Path) -> None:
    url, state, names = revisitop
    out = tmp_path / "revisitop"
    r = run_script(REVISITOP_SH, ["--distractors", "2"], rop_env(url, out))
    assert r.returncode == 0, r.stdout + r.stderr
    for name, listed in names.items():
        jpgs = sorted(p.name for p in (out / name / "jpg").iterdir())
        assert jpgs == sorted(f"{n}.jpg" for n in listed)  # flat, images only (README.txt left out)
        assert all((out / name / "jpg" / f"{n}.jpg").read_bytes() == fake_jpg(n) for n in listed)
        assert (out / name / f"gnd_{name}.pkl").read_bytes() == (state.root / name / f"gnd_{name}.pkl").read_bytes()
        assert not list((out / name / "archives").glob("*.tgz"))
    for k in (1, 2):
        for n in R1M_PARTS[k]:
            assert (out / "revisitop1m" / "jpg" / n).read_bytes() == fake_jpg(n)
    assert state.requests["/revisitop1m/jpg/revisitop1m.3.tar.gz"] == 0
    report = json.loads((out / "download_report.json").read_text())
    assert report["failures"] == []
    assert report["checks"]["roxford5k"]["present"] == 4 and report["checks"]["rparis6k"]["missing"] == 0
    r1m = report["checks"]["revisitop1m"]
    assert (r1m["parts_extracted"], r1m["images_extracted"], r1m["listed"], r1m["present"]) == (2, 3, 4, 3)

    before = sum(state.requests.values())
    r2 = run_script(REVISITOP_SH, ["--distractors", "2"], rop_env(url, out))
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert sum(state.requests.values()) == before


def test_revisitop_distractors_only(revisitop: tuple, tmp_path: Path) -> None:
    url, state, _ = revisitop
    out = tmp_path / "revisitop"
    r = run_script(REVISITOP_SH, ["--datasets", "--distractors", "3"], rop_env(url, out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (out / "roxford5k").exists() and state.requests["/roxford5k/gnd_roxford5k.pkl"] == 0
    check = json.loads((out / "download_report.json").read_text())["checks"]["revisitop1m"]
    assert (check["listed"], check["present"], check["missing"]) == (4, 4, 0)
    assert (out / "revisitop1m" / "revisitop1m.txt").is_file()


def test_revisitop_resume_after_cut_connection(revisitop: tuple, tmp_path: Path) -> None:
    url, state, names = revisitop
    cut = "/rparis6k/jpg/paris_2-v1.tgz"
    state.cut_first.add(cut)
    out = tmp_path / "revisitop"
    r = run_script(REVISITOP_SH, [], rop_env(url, out))
    assert r.returncode == 1
    failures = json.loads((out / "download_report.json").read_text())["failures"]
    assert [f["item"] for f in failures] == ["rparis6k/paris_2-v1.tgz"]
    assert (out / "rparis6k/archives/paris_2-v1.tgz.part").is_file()
    assert json.loads((out / "download_report.json").read_text())["checks"]["rparis6k"]["missing"] == 2

    r2 = run_script(REVISITOP_SH, [], rop_env(url, out))
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert sorted(p.stem for p in (out / "rparis6k" / "jpg").iterdir()) == sorted(names["rparis6k"])
    assert state.requests["/roxford5k/jpg/oxbuild_images-v1.tgz"] == 1
    assert state.requests["/rparis6k/jpg/paris_1-v1.tgz"] == 1
    assert state.requests["/rparis6k/gnd_rparis6k.pkl"] == 1
    assert state.requests[cut] == 2
    assert [h for p, h in state.range_headers if p == cut][1].startswith("bytes=")


def test_revisitop_truncated_archive_and_missing_images(revisitop: tuple, tmp_path: Path) -> None:
    url, state, _ = revisitop
    tgz = state.root / "roxford5k/jpg/oxbuild_images-v1.tgz"
    tgz.write_bytes(tgz.read_bytes()[:-40])  # served whole (Content-Length matches) but the gzip is cut
    make_tar(state.root / "rparis6k/jpg/paris_2-v1.tgz",  # one listed Paris image is absent from the archive
             {"paris/louvre/paris_louvre_000002.jpg": fake_jpg("paris_louvre_000002")}, gz=True)
    out = tmp_path / "revisitop"
    r = run_script(REVISITOP_SH, ["--retries", "2"], rop_env(url, out))
    assert r.returncode == 1
    failures = {f["item"]: f["reason"] for f in json.loads((out / "download_report.json").read_text())["failures"]}
    assert set(failures) == {"roxford5k/oxbuild_images-v1.tgz", "rparis6k/jpg"}
    assert "truncated" in failures["roxford5k/oxbuild_images-v1.tgz"]
    assert "1 of 4 images" in failures["rparis6k/jpg"]
    assert state.requests["/roxford5k/jpg/oxbuild_images-v1.tgz"] == 2
    assert not list((out / "roxford5k" / "jpg").glob("*.jpg"))  # nothing extracted from the damaged archive
    assert (out / "rparis6k" / "missing.txt").read_text().split() == ["paris_louvre_000003"]


# ------------------------------------------------------------------------------------------------ units


def test_scan_archive_refuses_path_traversal(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    for evil in ("../evil.jpg", "/tmp/evil_abs.jpg", "a/../../evil.jpg"):
        arc = make_tar(tmp_path / "evil.tar", {"ok.jpg": b"x", evil: b"y"})
        with pytest.raises(BadArchiveError, match="outside the target folder"):
            scan_archive(arc, dest)
        assert not (tmp_path / "evil.jpg").exists() and not Path("/tmp/evil_abs.jpg").exists()


def test_scan_archive_skips_links_and_detects_truncation(tmp_path: Path) -> None:
    arc = tmp_path / "links.tar"
    with tarfile.open(arc, "w") as tar:
        info = tarfile.TarInfo("a.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
        link = tarfile.TarInfo("link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    stats = scan_archive(arc, tmp_path / "out")
    assert (stats.files, stats.images, stats.skipped) == (1, 1, ["link.jpg"])
    assert not (tmp_path / "out" / "link.jpg").exists() and (tmp_path / "out" / "a.jpg").read_bytes() == b"abc"

    big = make_tar(tmp_path / "big.tar", {"a.jpg": os.urandom(5000)})
    big.write_bytes(big.read_bytes()[:2048])  # cut inside the member's data
    with pytest.raises(BadArchiveError, match="truncated"):
        scan_archive(big)


def test_small_parsers(tmp_path: Path) -> None:
    assert _content_range("bytes 100-199/200") == (100, 200)
    assert _content_range("bytes */200") == (None, 200)
    assert _content_range(None) == (None, None)
    assert parse_md5("D41D8CD98F00B204E9800998ECF8427E  images_000.tar\n", "x") == "d41d8cd98f00b204e9800998ecf8427e"
    with pytest.raises(DownloadError, match="no md5"):
        parse_md5("<Error>NoSuchKey</Error>", "md5.images_000.txt")
    bad = tmp_path / "train_clean.csv"
    bad.write_text("landmark_id,images\n1,abcdef0123456789 ../x\n")
    with pytest.raises(ValueError, match=r"train_clean.csv:2: field 'images'"):
        read_train_clean(bad)
