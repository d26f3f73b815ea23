"""delg.evaluate against an independent re-implementation of revisitop's published loop, and hand-computed cases."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from delg.data.revisitop import GroundTruth, QueryGroundTruth, read_gnd
from delg.evaluate import (
    RankingError,
    cli,
    compute_map,
    evaluate,
    evaluate_per_query,
    format_table,
    main,
    protocol_gnd,
)

# ------------------------------------------------------------------------------------------ reference (revisitop)
# A plain re-implementation of revisitop's python/evaluate.py (compute_ap / compute_map), loop for loop, with
# np.isin standing in for the np.in1d that numpy 2.4 removed.  It is deliberately NOT vectorised.


def ref_compute_ap(ranks, nres):
    ap = 0.0
    recall_step = 1.0 / nres
    for j in np.arange(len(ranks)):
        rank = ranks[j]
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def ref_compute_map(ranks, gnd, kappas=(1, 5, 10)):
    m = 0.0
    nq = len(gnd)
    aps = np.zeros(nq)
    pr = np.zeros(len(kappas))
    prs = np.zeros((nq, len(kappas)))
    nempty = 0
    for i in np.arange(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = float("nan")
            prs[i, :] = float("nan")
            nempty += 1
            continue
        qgndj = np.array(gnd[i]["junk"])
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k = 0
        ij = 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = ref_compute_ap(pos, len(qgnd))
        m = m + ap
        aps[i] = ap
        pos += 1
        for j in np.arange(len(kappas)):
            kq = min(max(pos), kappas[j])
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]
    return m / (nq - nempty), aps, pr / (nq - nempty), prs


def ref_protocols(g: GroundTruth):
    """revisitop's example_evaluate.py construction of the E/M/H ground truth."""
    out = {}
    out["E"] = [{"ok": q.easy, "junk": np.concatenate([q.junk, q.hard])} for q in g.gnd]
    out["M"] = [{"ok": np.concatenate([q.easy, q.hard]), "junk": q.junk} for q in g.gnd]
    out["H"] = [{"ok": q.hard, "junk": np.concatenate([q.junk, q.easy])} for q in g.gnd]
    return out


# ----------------------------------------------------------------------------------------------- helpers


def _gt(entries, n_db, names=None) -> GroundTruth:
    gnd = [
        QueryGroundTruth(np.array(e.get("easy", []), np.int64), np.array(e.get("hard", []), np.int64),
                         np.array(e.get("junk", []), np.int64), None)
        for e in entries
    ]
    return GroundTruth("toy", [f"db{i}" for i in range(n_db)], names or [f"q{j}" for j in range(len(entries))], gnd)


def _biased_ranks(g: GroundTruth, rng: np.random.Generator, n_db: int | None = None) -> np.ndarray:
    """A plausible ranking: random scores, with positives and junk pushed up (so the top rows hold some)."""
    n_db = n_db or g.n_db
    cols = []
    for q in g.gnd:
        s = rng.random(n_db)
        s[q.easy] += rng.random(q.easy.size) * 1.5
        s[q.hard] += rng.random(q.hard.size) * 1.2
        s[q.junk] += rng.random(q.junk.size) * 1.2
        s[q.easy[:1]] += 2.0  # one easy and one hard positive near the top, so that cut rankings hold both
        s[q.hard[:1]] += 2.0
        cols.append(np.argsort(-s, kind="stable"))
    return np.stack(cols, axis=1)


@pytest.fixture(scope="module", params=["gnd_roxford5k.pkl", "gnd_rparis6k.pkl"])
def real_gnd(request, shared_data: Path) -> GroundTruth:
    return read_gnd(shared_data / "revisitop" / request.param)


# ------------------------------------------------------------------------------------------- hand computed


def test_hand_computed_ap_and_precision():
    # db ids ranked: 3, 0, 5, 1, 2, 4; ok = {0, 1}, junk = {5}.
    # Positives at 0-based ranks 1 and 3; the junk at rank 2 is removed, so positives sit at 1 and 2.
    # AP = 1/2 * [ (0/1 + 1/2)/2 + (1/2 + 2/3)/2 ] = 1/2 * [1/4 + 7/12] = 5/12.
    # 1-based positions 2, 3: mP@1 -> kq = min(3, 1) = 1: 0/1 = 0; mP@5 -> kq = min(3, 5) = 3: 2/3; mP@10 = 2/3.
    ranks = np.array([[3, 0, 5, 1, 2, 4]]).T
    m, aps, pr, prs = compute_map(ranks, [{"ok": [0, 1], "junk": [5]}])
    assert m == pytest.approx(5 / 12, abs=1e-12)
    assert pr == pytest.approx([0.0, 2 / 3, 2 / 3], abs=1e-12)
    # Same ranking cut to the top 2 rows: only the positive at rank 1 is seen, AP still divides by 2 positives:
    # AP = 1/2 * (0/1 + 1/2)/2 = 1/8; last positive at 1-based 2: mP@1 = 0, mP@5 -> kq = 2: 1/2.
    m, _, pr, _ = compute_map(ranks[:2], [{"ok": [0, 1], "junk": [5]}])
    assert m == pytest.approx(1 / 8, abs=1e-12)
    assert pr == pytest.approx([0.0, 0.5, 0.5], abs=1e-12)


def test_hand_computed_perfect_and_missing():
    # Query 0: the only positive first -> AP = (1 + 1)/2 = 1, all mP@k = 1 (k capped at 1).
    # Query 1: no positive -> left out of the mean.
    # Query 2: positives {1, 2}, ranked 1 at 0-based rank 0, 2 at rank 3; AP = 1/2*[(1+1)/2 + (1/3 + 2/4)/2] = 0.708333...
    #          1-based positions 1, 4: mP@1 = 1; mP@5 -> kq = 4: 2/4; mP@10 -> 2/4.
    ranks = np.array([[0, 1, 2, 3], [0, 1, 2, 3], [1, 0, 3, 2]]).T
    gnd = [{"ok": [0], "junk": []}, {"ok": [], "junk": [1]}, {"ok": [1, 2], "junk": []}]
    m, aps, pr, prs = compute_map(ranks, gnd)
    q2 = 0.5 * (1.0 + (1 / 3 + 2 / 4) / 2)
    assert aps[0] == pytest.approx(1.0) and math.isnan(aps[1]) and aps[2] == pytest.approx(q2)
    assert m == pytest.approx((1 + q2) / 2)
    assert pr == pytest.approx([1.0, (1 + 0.5) / 2, (1 + 0.5) / 2])


def test_no_positive_inside_cut_scores_zero_and_stays_in_mean():
    # Query 0: positive at rank 0 (AP 1). Query 1: its positive (db 3) is outside the top-2 cut -> AP 0, P@k 0.
    ranks = np.array([[0, 1], [1, 2]]).T
    m, aps, pr, prs = compute_map(ranks, [{"ok": [0], "junk": []}, {"ok": [3], "junk": []}])
    assert aps.tolist() == [1.0, 0.0] and m == pytest.approx(0.5)
    assert prs[1].tolist() == [0.0, 0.0, 0.0] and pr == pytest.approx([0.5, 0.5, 0.5])


def test_protocols_and_na():
    # Query 0: easy {0}, hard {1}, junk {2}; ranking 1, 2, 0, 3.
    #  E: ok {0}, junk {2, 1} -> positive at rank 2, minus 2 junk before -> 0: AP 1.
    #  M: ok {0, 1}, junk {2} -> positives at 0 and 2-1=1: AP 1.
    #  H: ok {1}, junk {2, 0} -> positive at rank 0: AP 1.
    # Query 1: easy only -> H has no positives for any query except query 0.
    g = _gt([{"easy": [0], "hard": [1], "junk": [2]}, {"easy": [3]}], n_db=4)
    ranks = np.array([[1, 2, 0, 3], [0, 1, 2, 3]]).T
    res = evaluate(g, ranks)
    # Query 1 under E: its easy db 3 at rank 3, no junk -> AP = (0/3 + 1/4)/2 = 1/8.
    assert res["E"]["mAP"] == pytest.approx((100 + 100 / 8) / 2)
    assert res["H"]["mAP"] == pytest.approx(100.0)
    assert set(res["M"]) == {"mAP", "mP@1", "mP@5", "mP@10"}
    # No hard positives anywhere -> H is n/a (None), E and M are the same numbers.
    g2 = _gt([{"easy": [0]}, {"easy": [3]}], n_db=4)
    res2 = evaluate(g2, ranks)
    assert res2["H"] is None and res2["E"] == res2["M"]
    pq = evaluate_per_query(g, ranks)
    assert pq["H"]["n_queries"] == 1 and math.isnan(pq["H"]["ap"][1])


def test_distractor_indices_are_negatives():
    # db rows 0..2 are ground truth, 3..4 distractors ranked first: positive 0 at rank 2 -> AP (0/2 + 1/3)/2 = 1/6.
    g = _gt([{"easy": [0]}], n_db=3)
    ranks = np.array([[4, 3, 0, 1, 2]]).T
    assert evaluate(g, ranks, n_db=5)["E"]["mAP"] == pytest.approx(100 / 6)
    with pytest.raises(RankingError, match="out of range"):
        evaluate(g, ranks[:4], n_db=4)
    with pytest.raises(RankingError, match="5 rows"):
        evaluate(g, ranks, n_db=4)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((4,), np.int64), "2-D"),
        (np.zeros((4, 2), np.float32), "integer"),
        (np.zeros((4, 3), np.int64), "columns"),
        (np.array([[0, -1], [1, 0]]), "negative"),
        (np.array([[0, 1], [0, 2]]), "lists database image 0 2 times"),
        (np.array([[0, 1], [9, 2]]), "out of range"),
    ],
)
def test_rank_validation(bad, match):
    g = _gt([{"easy": [0]}, {"easy": [1]}], n_db=4)
    with pytest.raises(RankingError, match=match):
        evaluate(g, bad, n_db=4)


# ---------------------------------------------------------------------------------- against the reference


def _compare(g: GroundTruth, ranks: np.ndarray):
    ref = ref_protocols(g)
    for p in ("E", "M", "H"):
        m, aps, pr, prs = compute_map(ranks, protocol_gnd(g, p))
        rm, raps, rpr, rprs = ref_compute_map(ranks, ref[p])
        assert abs(m - rm) < 1e-9, p
        np.testing.assert_allclose(aps, raps, atol=1e-9, rtol=0)  # NaN where the reference has NaN
        np.testing.assert_allclose(pr, rpr, atol=1e-9, rtol=0)
        np.testing.assert_allclose(prs, rprs, atol=1e-9, rtol=0)


def test_matches_reference_full_random(real_gnd):
    rng = np.random.default_rng(0)
    ranks = np.stack([rng.permutation(real_gnd.n_db) for _ in range(real_gnd.n_queries)], axis=1)
    _compare(real_gnd, ranks)


def test_matches_reference_biased_full_and_cut(real_gnd):
    rng = np.random.default_rng(1)
    ranks = _biased_ranks(real_gnd, rng)
    _compare(real_gnd, ranks)
    # Cut to the top K rows, K the smallest that keeps an easy and a hard positive of every query inside (the
    # reference would crash otherwise); the positives past the cut must add nothing to AP.
    first = [
        max(np.flatnonzero(np.isin(col, ok)).min(initial=len(col)) for ok in (q.easy, q.hard) if ok.size)
        for q, col in zip(real_gnd.gnd, ranks.T)
    ]
    k = max(max(first) + 1, 50)
    cut = ranks[:k]
    n_out = sum(int((~np.isin(np.concatenate([q.easy, q.hard]), col)).sum()) for q, col in zip(real_gnd.gnd, cut.T))
    assert k < real_gnd.n_db // 2 and n_out > 0  # the cut really drops positives
    _compare(real_gnd, cut)


def test_query_counts_real(shared_data):
    g = read_gnd(shared_data / "revisitop" / "gnd_roxford5k.pkl")
    pq = evaluate_per_query(g, _biased_ranks(g, np.random.default_rng(2)))
    assert pq["E"]["n_queries"] == 68 and pq["M"]["n_queries"] == 70 and pq["H"]["n_queries"] == 70


def test_format_table_and_cli(tmp_path, shared_data, capsys):
    g = read_gnd(shared_data / "revisitop" / "gnd_rparis6k.pkl")
    ranks = _biased_ranks(g, np.random.default_rng(3)).astype(np.int32)
    np.save(tmp_path / "ranks.npy", ranks)
    out = main(["--gnd", str(g.source), "--ranks", str(tmp_path / "ranks.npy"), "--json", str(tmp_path / "r.json")])
    data = json.loads(out.read_text())
    res = evaluate(g, ranks)
    for p in ("E", "M", "H"):
        for k in ("mAP", "mP@1", "mP@5", "mP@10"):
            assert data[p][k] == pytest.approx(res[p][k], abs=1e-9)
    printed = capsys.readouterr().out
    assert f"{res['M']['mAP']:.2f}" in printed
    np.savez(tmp_path / "global.npz", ranks=ranks[:100], scores=np.zeros((100, g.n_queries)))
    out = main(["--gnd", str(g.source), "--ranks", str(tmp_path / "global.npz"), "--json", str(tmp_path / "c.json")])
    cut = evaluate(g, ranks[:100])
    assert json.loads(out.read_text())["H"]["mAP"] == pytest.approx(cut["H"]["mAP"], abs=1e-9)
    assert set(json.loads(out.read_text())) == {"E", "M", "H"}  # the layout, nothing else at the top
    out = main(["--gnd", str(g.source), "--ranks", str(tmp_path / "global.npz"), f"output_dir={tmp_path / 'ev'}"])
    assert out == tmp_path / "ev" / "evaluation.json" and json.loads(out.read_text())["H"] is not None
    capsys.readouterr()
    # a missing ground truth: one line "error: --gnd ...", exit 2 (the rule of every entry point; it was 1)
    assert cli(["--gnd", str(tmp_path / "nope.pkl"), "--ranks", str(tmp_path / "ranks.npy")]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: --gnd .*nope\.pkl.*\n", err), err
    table = format_table({"global": res, "folders": {"E": res["E"], "M": res["M"], "H": None}}, title="T")
    lines = table.splitlines()
    assert lines[0] == "T" and "global" in table and "n/a" in lines[-2] and f"{res['H']['mAP']:.2f}" in table
