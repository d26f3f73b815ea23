"""report.html: a page to look at instead of numbers.

For each query: the (cropped) query, then the top hits of the global ranking and of each reranking, with borders
coloured by ground truth (positive green, junk grey, negative red), the inlier count under each reranked hit, and
the inlier matches drawn for the top hits.  The page is self-contained (thumbnails inlined as JPEG data URIs), so
it can be mailed or attached to a paper review as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from delg.data.dataset import RetrievalDataset
from delg.data.images import ImageReadError, load_pil
from delg.io import atomic_write_text
from loftr_tools.base import IDENTICAL_INLIERS

COLOURS = {"easy": "#1a9850", "hard": "#91cf60", "junk": "#969696", "neg": "#d73027"}
MatchFn = Callable[[int, int], "tuple[np.ndarray, np.ndarray] | None"]


def _thumb(path: Path, crop: Any, side: int) -> Image.Image | None:
    try:
        im = load_pil(path, crop)
    except ImageReadError:
        return None
    im.thumbnail((side, side))
    return im


def _data_uri(im: Image.Image, quality: int = 80) -> str:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def label_of(dataset: RetrievalDataset, q: int, db: int) -> str:
    """'easy' | 'hard' | 'junk' | 'neg': the ground-truth relation of database image ``db`` to query ``q``."""
    g = dataset.gnd.gnd[q]
    if db in g.easy:
        return "easy"
    if db in g.hard:
        return "hard"
    if db in g.junk:
        return "junk"
    return "neg"


def draw_matches(
    im0: Image.Image, im1: Image.Image, pts0: np.ndarray, pts1: np.ndarray, height: int = 240, max_lines: int = 200
) -> Image.Image:
    """Side-by-side picture of two images with lines between matched points.

    Args:
        im0, im1: the two images at the resolution in which ``pts0``/``pts1`` are given.
        pts0, pts1: ``(N, 2)`` matched xy pixel coordinates (inliers).
        height: height of the output picture.
    """
    s0, s1 = height / im0.height, height / im1.height
    a = im0.resize((max(1, round(im0.width * s0)), height))
    b = im1.resize((max(1, round(im1.width * s1)), height))
    canvas = Image.new("RGB", (a.width + b.width, height), "white")
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width, 0))
    d = ImageDraw.Draw(canvas)
    n = len(pts0)
    idx = np.linspace(0, n - 1, min(n, max_lines)).astype(int) if n else []
    for i in idx:
        x0, y0 = pts0[i] * s0
        x1, y1 = pts1[i] * s1
        d.line([(x0, y0), (x1 + a.width, y1)], fill=(0, 255, 0), width=1)
    return canvas


def _cell(uri: str | None, border: str, caption: str) -> str:
    img = f'<img src="{uri}">' if uri else '<div class="missing">unreadable</div>'
    return f'<div class="hit" style="border-color:{border}">{img}<div class="cap">{html.escape(caption)}</div></div>'


def write_report(
    out: Path,
    dataset: RetrievalDataset,
    rankings: Mapping[str, np.ndarray],
    results: Mapping[str, Any],
    inliers: Mapping[str, Mapping[tuple[int, int], int]] | None = None,
    match_fn: Mapping[str, MatchFn] | None = None,
    conf: Mapping[str, Any] | None = None,
    title: str = "Retrieval report",
) -> Path:
    """Write ``report.html``.

    Args:
        out: the HTML file to write.
        rankings: method -> ``(depth, n_queries)`` ranking; 'global' first.
        results: method -> evaluator JSON (shown as a table at the top).
        inliers: method -> {(query, db): inlier count} for the reranked pairs (captions).
        match_fn: method -> ``f(q, db) -> (pts0, pts1)`` inlier matches in original (cropped) pixels, drawn for the
            first ``draw_matches`` hits.
        conf: the ``report`` config section.
    """
    conf = dict(conf or {})
    top_n = int(conf.get("top_n", 10))
    side = int(conf.get("thumb_side", 160))
    n_draw = int(conf.get("draw_matches", 3))
    max_q = int(conf.get("max_queries", 50)) or dataset.n_queries
    inliers = inliers or {}
    match_fn = match_fn or {}
    thumbs: dict[int, str | None] = {}

    def db_uri(i: int) -> str | None:
        if i not in thumbs:
            t = _thumb(dataset.db_paths[i], None, side)
            thumbs[i] = _data_uri(t) if t else None
        return thumbs[i]

    rows = []
    for m, r in results.items():
        cells = []
        for p in ("E", "M", "H"):
            v = (r or {}).get(p)
            cells.append(f"{v['mAP']:.2f}" if v else "n/a")
        mv = (r or {}).get("M")
        cells += [f"{mv[k]:.2f}" if mv else "n/a" for k in ("mP@1", "mP@5", "mP@10")]
        rows.append("<tr><td>" + html.escape(m) + "</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    table = (
        "<table class='res'><tr><th>method</th><th>E mAP</th><th>M mAP</th><th>H mAP</th>"
        "<th>M mP@1</th><th>M mP@5</th><th>M mP@10</th></tr>" + "".join(rows) + "</table>"
    )

    sections = []
    for q in range(min(max_q, dataset.n_queries)):
        qt = _thumb(dataset.query_paths[q], dataset.query_bbx[q], side)
        parts = [f"<h3>query {q}: {html.escape(dataset.query_names[q])}</h3><div class='row'>"]
        parts.append(_cell(_data_uri(qt) if qt else None, "#2166ac", "query (cropped)" if dataset.query_bbx[q] else "query"))
        parts.append("</div>")
        for method, ranks in rankings.items():
            cells = []
            for pos, db in enumerate(ranks[:top_n, q]):
                db = int(db)
                lab = label_of(dataset, q, db)
                cap = f"{pos + 1}. {lab}"
                n_in = inliers.get(method, {}).get((q, db))
                if n_in is not None:
                    cap += " · same image" if n_in >= IDENTICAL_INLIERS else f" · {n_in} inl."
                cells.append(_cell(db_uri(db), COLOURS[lab], cap))
            parts.append(f"<div class='method'>{html.escape(method)}</div><div class='row'>{''.join(cells)}</div>")
            fn = match_fn.get(method)
            if fn is not None and n_draw > 0:
                pics = []
                for db in ranks[:n_draw, q]:
                    if inliers.get(method, {}).get((q, int(db)), 0) >= IDENTICAL_INLIERS:
                        continue  # the query itself: nothing to draw
                    got = fn(q, int(db))
                    if got is None:
                        continue
                    try:
                        im0 = load_pil(dataset.query_paths[q], dataset.query_bbx[q])
                        im1 = load_pil(dataset.db_paths[int(db)])
                    except ImageReadError:
                        continue
                    pic = draw_matches(im0, im1, got[0], got[1], height=side)
                    pics.append(f"<img class='matches' src='{_data_uri(pic)}' title='{len(got[0])} inliers'>")
                if pics:
                    parts.append("<div class='row'>" + "".join(pics) + "</div>")
        sections.append("<section>" + "".join(parts) + "</section>")

    legend = " ".join(f"<span style='border:3px solid {c};padding:2px'>{k}</span>" for k, c in COLOURS.items())
    notes = html.escape(json.dumps(dataset.notes))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body{{font-family:sans-serif;margin:20px}} .row{{display:flex;flex-wrap:wrap;gap:4px;margin:2px 0 8px}}
.hit{{border:4px solid;padding:1px;text-align:center;font-size:11px}} .hit img{{display:block;max-height:{side}px}}
.missing{{width:{side}px;height:{side // 2}px;background:#eee}} .method{{font-weight:bold;font-size:13px}}
table.res td,table.res th{{padding:3px 8px;border-bottom:1px solid #ccc;text-align:right}} section{{margin-bottom:24px}}
img.matches{{margin-right:6px}}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>dataset <b>{html.escape(dataset.name)}</b>: {dataset.n_queries} queries, {dataset.n_db} database images. {notes}</p>
{table}
<p>Borders: {legend}; inlier counts under reranked hits.</p>
{"".join(sections)}
</body></html>"""
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    return out
