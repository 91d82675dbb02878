"""LUNA16 FROC / CPM (lidc_det.metrics.froc), one test per rule, plus a cross-check
against an independent, loop-by-loop transcription of the reference rules."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from lidc_det.cli import main
from lidc_det.data.luna import LunaCandidate, LunaFinding, write_annotations, write_candidates, write_series_uids
from lidc_det.metrics.froc import (
    OPERATING_FPS,
    FrocInputError,
    _bootstrap,
    _bootstrap_draws,
    _entries,
    evaluate_detections,
    evaluate_froc,
    match_candidates,
)
from lidc_det.results import Detections

ORIGIN = (0.0, 0.0, 0.0)


def F(uid: str, xyz: tuple[float, float, float], d: float) -> LunaFinding:
    return LunaFinding(uid, xyz, d)


def C(uid: str, xyz: tuple[float, float, float], p: float) -> LunaCandidate:
    return LunaCandidate(uid, xyz, p)


def far(i: int) -> tuple[float, float, float]:
    """A point far from every finding used in these tests."""
    return (500.0 + 20.0 * i, 500.0, 500.0)


# ------------------------------------------------------------- hit rules
def test_hit_is_strictly_inside_the_radius() -> None:
    ann = [F("a", ORIGIN, 10.0)]  # radius 5 mm
    on_sphere = [C("a", (5.0, 0.0, 0.0), 0.9), C("a", (3.0, 4.0, 0.0), 0.8), C("a", (0.0, 0.0, -5.0), 0.7)]
    m = match_candidates(ann, on_sphere)
    assert m.candidate_label.tolist() == [0, 0, 0]  # distance == radius: miss, hence FP
    assert m.n_tp_nodules == 0
    inside = [C("a", (4.999, 0.0, 0.0), 0.9)]
    m = match_candidates(ann, inside)
    assert m.candidate_label.tolist() == [1] and m.n_tp_nodules == 1


def test_nodule_hit_twice_counts_once_and_second_hit_is_not_fp() -> None:
    ann = [F("a", ORIGIN, 10.0)]
    cands = [C("a", (1.0, 0.0, 0.0), 0.4), C("a", (0.0, 2.0, 0.0), 0.7)]
    m = match_candidates(ann, cands)
    assert m.n_tp_nodules == 1 and m.n_tp_candidates == 2 and m.n_fp == 0
    assert m.nodule_score.tolist() == [0.7]  # the best hit scores the nodule
    r = evaluate_froc(ann, cands, n_bootstrap=0)
    assert r.n_fp == 0 and r.cpm == 1.0


def test_candidate_hitting_two_nodules_detects_both() -> None:
    ann = [F("a", ORIGIN, 10.0), F("a", (3.0, 0.0, 0.0), 10.0)]
    m = match_candidates(ann, [C("a", (1.5, 0.0, 0.0), 0.6)])
    assert m.nodule_score.tolist() == [0.6, 0.6] and m.n_tp_candidates == 1 and m.n_fp == 0


def test_candidate_in_excluded_finding_is_ignored() -> None:
    ann = [F("a", (100.0, 0.0, 0.0), 6.0)]
    exc = [F("a", ORIGIN, 8.0), F("a", (0.0, 50.0, 0.0), -1.0)]  # -1: unknown size, 10 mm like the reference
    cands = [
        C("a", (3.9, 0.0, 0.0), 0.9),  # inside the 8 mm finding: ignored
        C("a", (4.0, 0.0, 0.0), 0.8),  # on its sphere: FP
        C("a", (0.0, 54.9, 0.0), 0.7),  # inside the unknown-size finding (radius 5): ignored
        C("a", (0.0, 55.0, 0.0), 0.6),  # on its sphere: FP
    ]
    m = match_candidates(ann, cands, excluded=exc)
    assert m.candidate_label.tolist() == [-1, 0, -1, 0]
    r = evaluate_froc(ann, cands, excluded=exc, n_bootstrap=0)
    assert (r.n_ignored, r.n_fp, r.n_tp_candidates, r.n_candidates) == (2, 2, 0, 4)
    # without the excluded list the same marks are false positives
    assert evaluate_froc(ann, cands, n_bootstrap=0).n_fp == 4


def test_candidate_hitting_nodule_and_excluded_finding_is_tp() -> None:
    ann = [F("a", ORIGIN, 10.0)]
    exc = [F("a", (2.0, 0.0, 0.0), 10.0)]
    m = match_candidates(ann, [C("a", (1.0, 0.0, 0.0), 0.5)], excluded=exc)
    assert m.candidate_label.tolist() == [1] and m.n_tp_nodules == 1 and m.n_ignored == 0


def test_negative_target_diameter_uses_reference_default() -> None:
    # evaluate_froc takes records, which may carry -1; the reference gives them 10 mm
    ann = [F("a", ORIGIN, -1.0)]
    m = match_candidates(ann, [C("a", (4.9, 0.0, 0.0), 0.5), C("a", (5.0, 0.0, 0.0), 0.4)])
    assert m.candidate_label.tolist() == [1, 0]


# ------------------------------------------------------------- the cap
def test_top_100_cap_drops_the_101st_even_when_it_hits() -> None:
    ann = [F("a", ORIGIN, 10.0)]
    fps = [C("a", far(i), 0.5 + i / 1000) for i in range(100)]
    hit = C("a", (0.0, 0.0, 0.0), 0.1)  # the lowest of 101
    m = match_candidates(ann, [*fps, hit])
    assert m.n_candidates == 100 and m.n_dropped == 1 and m.n_tp_nodules == 0
    m = match_candidates(ann, [*fps[1:], hit])  # 100 candidates: all kept
    assert m.n_candidates == 100 and m.n_dropped == 0 and m.n_tp_nodules == 1
    m = match_candidates(ann, [*fps, hit], max_candidates_per_scan=None)
    assert m.n_candidates == 101 and m.n_tp_nodules == 1
    # the cap is per scan: another scan's candidates do not count against it
    m = match_candidates(ann, [*fps[1:], hit, *[C("b", far(i), 0.99) for i in range(50)]])
    assert m.n_tp_nodules == 1 and m.n_dropped == 0


def test_cap_ties_at_the_cut_are_all_dropped() -> None:
    # like the reference: keep probabilities > the 101st highest; ties at the cut all go
    cands = [C("a", far(i), 0.9) for i in range(98)] + [C("a", far(100 + i), 0.5) for i in range(3)]
    m = match_candidates([F("a", ORIGIN, 10.0)], cands)
    assert m.n_candidates == 98 and m.n_dropped == 3
    assert np.all(m.candidate_probability == 0.9)


# --------------------------------------------------------- denominators
def test_fp_per_scan_counts_scans_without_candidates() -> None:
    ann = [F("a", ORIGIN, 10.0)]
    cands = [C("a", far(0), 0.9), C("a", ORIGIN, 0.5)]  # an FP above the hit
    # one scan: curve (0,0) -> (1 FP/scan, 0) -> (1, 1)
    one = evaluate_froc(ann, cands, series_uids=["a"], n_bootstrap=0)
    assert one.operating_sensitivity == (0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0)
    # four scans, three without candidates: (0,0) -> (0.25, 0) -> (0.25, 1)
    four = evaluate_froc(ann, cands, series_uids=["a", "b", "c", "d"], n_bootstrap=0)
    assert four.n_scans == 4
    np.testing.assert_array_equal(four.fps_per_scan, [0.0, 0.25, 0.25])
    assert four.operating_sensitivity == (0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    # the default set is the union of annotation and candidate scans
    union = evaluate_froc([*ann, F("b", ORIGIN, 10.0)], cands, n_bootstrap=0)
    assert union.n_scans == 2 and union.n_nodules == 2


# ---------------------------------------------------- hand-computed FROC
def hand_example() -> tuple[list[LunaFinding], list[LunaCandidate], list[str]]:
    """8 scans (s7, s8 without candidates), 5 target nodules (nE missed).

    Entries by score: 0.95 TP(nA); 0.90 FP; 0.85 FP; tie 0.60: TP(nB), TP(nC),
    FP, FP, FP; 0.30 FP; 0.10 FP. The 0.20 mark is a second hit on nC (neither
    an entry nor an FP). 7 FPs over 8 scans, 5 nodules. Curve (FP/scan, sens):
    (0, 0) (0, .2) (1/8, .2) (2/8, .2) (5/8, .6) (6/8, .6) (7/8, .6).
    At 1/8: 0.2; at 1/4: 0.2; at 1/2: on the tie's diagonal from (1/4, .2) to
    (5/8, .6): 0.2 + (1/4)/(3/8) * 0.4 = 0.2 + 4/15 = 7/15; at 1, 2, 4, 8: past
    the end of the curve, 0.6. CPM = (0.2 + 0.2 + 7/15 + 4 * 0.6) / 7 = 7/15.
    """
    ann = [
        F("s1", ORIGIN, 10.0),  # nA
        F("s1", (50.0, 0.0, 0.0), 8.0),  # nB
        F("s2", ORIGIN, 6.0),  # nC
        F("s3", (20.0, 20.0, 20.0), 5.0),  # nD: missed
        F("s4", ORIGIN, 12.0),  # nE: missed
    ]
    cands = [
        C("s1", (1.0, 1.0, 1.0), 0.95),
        C("s1", far(0), 0.90),
        C("s1", (51.0, 0.0, 0.0), 0.60),
        C("s2", far(1), 0.85),
        C("s2", (0.0, 0.0, 2.0), 0.60),
        C("s2", (0.0, -2.0, 0.0), 0.20),
        C("s3", far(2), 0.60),
        C("s3", far(3), 0.60),
        C("s4", far(4), 0.60),
        C("s5", far(5), 0.30),
        C("s6", far(6), 0.10),
    ]
    return ann, cands, [f"s{i}" for i in range(1, 9)]


def test_hand_computed_sensitivities_and_cpm() -> None:
    ann, cands, uids = hand_example()
    r = evaluate_froc(ann, cands, series_uids=uids, n_bootstrap=0)
    expected = (0.2, 0.2, 7 / 15, 0.6, 0.6, 0.6, 0.6)
    assert r.operating_fps == OPERATING_FPS == (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    np.testing.assert_allclose(r.operating_sensitivity, expected, rtol=0, atol=1e-12)
    assert r.cpm == pytest.approx(7 / 15, abs=1e-12)
    assert r.cpm == pytest.approx(float(np.mean(r.operating_sensitivity)), abs=1e-15)  # CPM = mean of 7
    np.testing.assert_allclose(r.fps_per_scan, [0, 0, 1 / 8, 2 / 8, 5 / 8, 6 / 8, 7 / 8], atol=1e-15)
    np.testing.assert_allclose(r.sensitivity, [0, 0.2, 0.2, 0.2, 0.6, 0.6, 0.6], atol=1e-15)
    np.testing.assert_array_equal(r.thresholds, [np.inf, 0.95, 0.9, 0.85, 0.6, 0.3, 0.1])
    assert (r.n_scans, r.n_nodules, r.n_candidates) == (8, 5, 11)
    assert (r.n_tp_nodules, r.n_tp_candidates, r.n_fp, r.n_ignored, r.n_dropped) == (3, 4, 7, 0, 0)
    assert all(math.isnan(v) for v in (*r.ci_low, *r.ci_high, r.cpm_ci_low, r.cpm_ci_high))


def test_perfect_detector_cpm_1_and_fp_only_detector_cpm_0() -> None:
    ann = [F(f"s{i}", (10.0 * i, 0.0, 0.0), 6.0) for i in range(5)]
    perfect = [C(a.series_uid, a.center_xyz_mm, 0.5 + 0.1 * i) for i, a in enumerate(ann)]
    r = evaluate_froc(ann, perfect, n_bootstrap=50)
    assert r.cpm == 1.0 and r.operating_sensitivity == (1.0,) * 7 and r.n_fp == 0
    assert r.cpm_ci_low == r.cpm_ci_high == 1.0
    only_fp = [C(a.series_uid, far(i), 0.9) for i, a in enumerate(ann)]
    r = evaluate_froc(ann, only_fp, n_bootstrap=50)
    assert r.cpm == 0.0 and r.operating_sensitivity == (0.0,) * 7 and r.n_fp == 5
    assert r.cpm_ci_low == r.cpm_ci_high == 0.0
    r = evaluate_froc(ann, [], n_bootstrap=10)  # no candidates at all
    assert r.cpm == 0.0 and r.n_candidates == 0


# -------------------------------------------------------------- errors
def test_candidates_of_unknown_scans_raise() -> None:
    ann, cands, uids = hand_example()
    with pytest.raises(FrocInputError, match=r"1 candidate\(s\) belong to 1 scan\(s\) outside .* e\.g\. s6"):
        evaluate_froc(ann, cands, series_uids=[u for u in uids if u != "s6"])


def test_other_input_errors() -> None:
    ann, cands, uids = hand_example()
    with pytest.raises(FrocInputError, match="twice"):
        evaluate_froc(ann, cands, series_uids=[*uids, "s1"])
    with pytest.raises(FrocInputError, match="no target nodule"):
        evaluate_froc([], cands)
    with pytest.raises(FrocInputError, match="no scans"):
        evaluate_froc([], [])
    with pytest.raises(FrocInputError, match="max_candidates_per_scan"):
        evaluate_froc(ann, cands, max_candidates_per_scan=0)
    with pytest.raises(TypeError):
        evaluate_froc(ann, cands, series_uids="s1")  # type: ignore[arg-type]
    # annotations of scans outside the set are ignored (evaluating one fold)
    r = evaluate_froc(ann, [c for c in cands if c.series_uid == "s1"], series_uids=["s1"], n_bootstrap=0)
    assert r.n_nodules == 2 and r.n_scans == 1


# ------------------------------------------------------------ bootstrap
def random_study(seed: int, n_scans: int = 30) -> tuple[list, list, list, list[str]]:
    """Random scans with overlapping nodules, excluded findings (some of unknown size),
    half the probabilities on a coarse grid (many ties, mixed TP/FP groups), half
    continuous (pure FP stretches), and some scans over the 100 cap."""
    rng = np.random.default_rng(seed)
    ann, exc, cands = [], [], []
    uids = [f"1.2.3.{i}" for i in range(n_scans)]
    for uid in uids:
        for _ in range(rng.integers(0, 4)):
            c = tuple(rng.uniform(-100, 100, 3))
            ann.append(F(uid, c, float(rng.uniform(3, 30))))
            if rng.random() < 0.3:  # an overlapping neighbour
                ann.append(F(uid, tuple(np.add(c, rng.normal(0, 3, 3))), float(rng.uniform(3, 15))))
        for _ in range(rng.integers(0, 4)):
            exc.append(F(uid, tuple(rng.uniform(-100, 100, 3)), float(rng.choice([-1.0, rng.uniform(2, 20)]))))
        targets = [a for a in ann if a.series_uid == uid] + [e for e in exc if e.series_uid == uid]
        n = int(rng.choice([0, 5, 40, 120]))
        for _ in range(n):
            if targets and rng.random() < 0.3:
                t = targets[rng.integers(len(targets))]
                xyz = tuple(np.add(t.center_xyz_mm, rng.normal(0, 3, 3)))
            else:
                xyz = tuple(rng.uniform(-120, 120, 3))
            p = rng.random()
            cands.append(C(uid, xyz, float(np.round(p * 20) / 20) if rng.random() < 0.5 else p))
    return ann, exc, cands, uids


def test_bootstrap_ci_contains_estimate_and_is_reproducible() -> None:
    ann, exc, cands, uids = random_study(1)
    r1 = evaluate_froc(ann, cands, excluded=exc, series_uids=uids, n_bootstrap=300, seed=7)
    r2 = evaluate_froc(ann, cands, excluded=exc, series_uids=uids, n_bootstrap=300, seed=7)
    r3 = evaluate_froc(ann, cands, excluded=exc, series_uids=uids, n_bootstrap=300, seed=8)
    assert r1.n_bootstrap_used == 300
    for lo, s, hi in zip(r1.ci_low, r1.operating_sensitivity, r1.ci_high, strict=True):
        assert lo <= s <= hi and lo < hi
    assert r1.cpm_ci_low <= r1.cpm <= r1.cpm_ci_high
    assert (r1.ci_low, r1.ci_high, r1.cpm_ci_low) == (r2.ci_low, r2.ci_high, r2.cpm_ci_low)
    np.testing.assert_array_equal(r1.band_low, r2.band_low)
    assert (r1.ci_low, r1.ci_high) != (r3.ci_low, r3.ci_high)
    assert np.all(r1.band_low <= r1.band_high)


def test_ci_is_the_reference_order_statistic_of_the_replicates() -> None:
    ann, exc, cands, uids = random_study(4)
    n_boot, seed = 200, 11
    r = evaluate_froc(ann, cands, excluded=exc, series_uids=uids, n_bootstrap=n_boot, seed=seed)
    m = match_candidates(ann, cands, excluded=exc, series_uids=uids)
    draws = _bootstrap_draws(np.random.default_rng(seed), len(uids), n_boot)
    boot = _bootstrap(_entries(m), draws, np.asarray(OPERATING_FPS))
    boot = np.column_stack([boot, boot.mean(axis=1)])  # + CPM of each replicate
    srt = np.sort(boot, axis=0)
    # confidence 0.95: a = 0.025, sorted values at floor(0.025 * 200) = 5 and floor(0.975 * 200) = 195
    np.testing.assert_array_equal([*r.ci_low, r.cpm_ci_low], srt[5])
    np.testing.assert_array_equal([*r.ci_high, r.cpm_ci_high], srt[195])


# ------------------------------------- independent transcription of the reference
def reference_entries(ann, exc, cands, uids, cap=100):
    """The reference script's rules, written out loop by loop: per scan, a list of
    (is_nodule, probability, missed) FROC entries."""
    per_scan = {}
    for uid in uids:
        cs = [c for c in cands if c.series_uid == uid]
        if cap and len(cs) > cap:
            cut = sorted((c.probability for c in cs), reverse=True)[cap]
            cs = [c for c in cs if c.probability > cut]
        remaining = set(range(len(cs)))
        entries = []
        findings = [(f, True) for f in ann if f.series_uid == uid] + [(f, False) for f in exc if f.series_uid == uid]
        for f, included in findings:
            d = f.diameter_mm if f.diameter_mm >= 0 else 10.0
            r2 = (d / 2.0) ** 2
            x, y, z = f.center_xyz_mm
            hits = []
            for k, c in enumerate(cs):
                x2, y2, z2 = c.center_xyz_mm
                if (x - x2) ** 2 + (y - y2) ** 2 + (z - z2) ** 2 < r2:
                    hits.append(c.probability)
                    remaining.discard(k)
            if included:
                entries.append((1.0, max(hits), False) if hits else (1.0, -1e9, True))
        entries += [(0.0, cs[k].probability, False) for k in sorted(remaining)]
        per_scan[uid] = entries
    return per_scan


def reference_sensitivities(entries, n_scans, points):
    """ROC-based FROC of the reference (sklearn roc_curve), read at ``points`` by np.interp."""
    from sklearn.metrics import roc_curve

    gt = np.array([e[0] for e in entries])
    kept = np.array([not e[2] for e in entries])
    prob = np.array([e[1] for e in entries])
    n_det, n_total = gt[kept].sum(), gt.sum()
    if n_total == 0:
        return np.full(len(points), np.nan)
    if n_det == 0:
        return np.zeros(len(points))  # the reference gives NaN here; lidc-det defines 0
    fpr, tpr, _ = roc_curve(gt[kept], prob[kept])
    if gt.sum() == gt.size:
        fps = np.zeros(len(fpr))
    else:
        fps = fpr * (kept.sum() - n_det) / n_scans
    sens = (tpr * n_det) / n_total
    return np.interp(points, fps, sens)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_matches_reference_transcription(seed: int) -> None:
    import sklearn  # noqa: F401  (a required dependency: a broken install fails)
    ann, exc, cands, uids = random_study(seed)
    per_scan = reference_entries(ann, exc, cands, uids)
    expected = reference_sensitivities([e for u in uids for e in per_scan[u]], len(uids), OPERATING_FPS)
    r = evaluate_froc(ann, cands, excluded=exc, series_uids=uids, n_bootstrap=0)
    np.testing.assert_array_equal(r.operating_sensitivity, expected)
    assert r.cpm == pytest.approx(float(np.mean(expected)), abs=1e-15)
    assert r.n_nodules == sum(1 for u in uids for e in per_scan[u] if e[0] == 1.0)
    assert r.n_fp == sum(1 for u in uids for e in per_scan[u] if e[0] == 0.0)
    assert r.n_dropped > 0 and r.n_ignored > 0  # the data exercise the cap and the exclusions


def test_vectorised_bootstrap_equals_resampling_scans() -> None:
    import sklearn  # noqa: F401  (a required dependency: a broken install fails)
    ann, exc, cands, uids = random_study(5)
    per_scan = reference_entries(ann, exc, cands, uids)
    m = match_candidates(ann, cands, excluded=exc, series_uids=uids)
    draws = _bootstrap_draws(np.random.default_rng(3), len(uids), 40)
    points = np.array([*OPERATING_FPS, 0.3, 0.7, 3.0])
    fast = _bootstrap(_entries(m), draws, points, max_cells=50)  # small chunks on purpose
    for row, d in zip(fast, draws, strict=True):
        entries = [e for i in d for e in per_scan[uids[i]]]  # the scans drawn, with repeats
        np.testing.assert_array_equal(row, reference_sensitivities(entries, len(uids), points))


@pytest.mark.parametrize("n_scans", [100])
def test_bootstrap_speed(n_scans: int) -> None:
    rng = np.random.default_rng(0)
    uids = [f"s{i}" for i in range(n_scans)]
    ann = [F(u, tuple(rng.uniform(-99, 99, 3)), 10.0) for u in uids for _ in range(2)]
    cands = [C(u, tuple(rng.uniform(-99, 99, 3)), float(rng.random())) for u in uids for _ in range(100)]
    cands += [C(a.series_uid, a.center_xyz_mm, float(rng.random())) for a in ann]
    t0 = time.perf_counter()
    r = evaluate_froc(ann, cands, series_uids=uids, n_bootstrap=1000, max_candidates_per_scan=None)
    elapsed = time.perf_counter() - t0
    assert r.n_bootstrap_used == 1000 and r.n_candidates == 10200
    assert elapsed < 5.0, f"1000 bootstraps on {n_scans} scans x 102 candidates took {elapsed:.2f} s"


# ------------------------------------------------------ Detections, JSON, plot
def test_evaluate_detections_matches_candidates() -> None:
    ann, cands, uids = hand_example()
    dets = []
    for u in uids:  # s7, s8 give empty Detections: processed scans without candidates
        mine = [c for c in cands if c.series_uid == u]
        dets.append(
            Detections(
                u,
                np.array([c.center_xyz_mm for c in mine]).reshape(-1, 3),
                np.zeros(len(mine)),
                np.array([c.probability for c in mine]),
            )
        )
    r = evaluate_detections([*ann, F("other", ORIGIN, 5.0)], dets, n_bootstrap=20)
    ref = evaluate_froc(ann, cands, series_uids=uids, n_bootstrap=20)
    assert r.n_scans == 8 and r.n_nodules == 5  # "other" is not a processed scan
    assert r.operating_sensitivity == ref.operating_sensitivity and r.ci_low == ref.ci_low
    with pytest.raises(FrocInputError, match="two Detections"):
        evaluate_detections(ann, [dets[0], dets[0]])


def test_to_dict_is_strict_json() -> None:
    ann, cands, uids = hand_example()
    for n_boot in (0, 30):
        d = evaluate_froc(ann, cands, series_uids=uids, n_bootstrap=n_boot).to_dict()
        back = json.loads(json.dumps(d, allow_nan=False))
        assert back["cpm"] == pytest.approx(7 / 15)
        assert back["curve"]["thresholds"][0] is None  # +inf
        assert len(back["operating_sensitivity"]) == 7 and back["n_scans"] == 8
    assert back["ci_low"][0] is not None
    # the JSON curve keeps only the corners: (0,0) (0,.2) (1/4,.2) (5/8,.6) (7/8,.6)
    np.testing.assert_allclose(back["curve"]["fps_per_scan"], [0, 0, 0.25, 0.625, 0.875], atol=1e-15)
    np.testing.assert_allclose(back["curve"]["sensitivity"], [0, 0.2, 0.2, 0.6, 0.6], atol=1e-15)
    assert back["curve"]["thresholds"][1:] == [0.95, 0.85, 0.6, 0.1]
    # and interpolating it gives the same operating sensitivities on a large random study
    ann, exc, cands, uids = random_study(3, n_scans=60)
    r = evaluate_froc(ann, cands, excluded=exc, series_uids=uids, n_bootstrap=0)
    curve = r.to_dict()["curve"]
    assert len(curve["sensitivity"]) < len(r.sensitivity) / 2
    np.testing.assert_array_equal(
        np.interp(OPERATING_FPS, curve["fps_per_scan"], curve["sensitivity"]), r.operating_sensitivity
    )


def test_plot_froc_writes_png(tmp_path: Path) -> None:
    from lidc_det.plots import plot_froc

    ann, exc, cands, uids = random_study(2)
    r = evaluate_froc(ann, cands, excluded=exc, series_uids=uids, n_bootstrap=50)
    out = plot_froc(r, tmp_path / "plots" / "froc.png", label="random", title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000
    assert sorted(p.name for p in out.parent.iterdir()) == ["froc.png"]


# ------------------------------------------------------------------ CLI
def test_cli_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ann, cands, uids = hand_example()
    write_annotations(tmp_path / "annotations.csv", ann)
    write_annotations(tmp_path / "excluded.csv", [F("s5", far(5), 4.0)])  # makes the 0.30 mark irrelevant
    write_candidates(tmp_path / "cands.csv", cands)
    write_series_uids(tmp_path / "uids.csv", uids)
    out = tmp_path / "out"
    args = [
        "evaluate", "--annotations", str(tmp_path / "annotations.csv"), "--candidates", str(tmp_path / "cands.csv"),
        "--series-uids", str(tmp_path / "uids.csv"), "--out", str(out), "--bootstrap", "40", "--seed", "3",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "CPM" in text and "0.467" in text and "8 scans, 5 nodules" in text
    rec = json.loads((out / "froc.json").read_text())
    assert rec["cpm"] == pytest.approx(7 / 15)
    assert rec["n_bootstrap"] == 40 and rec["seed"] == 3
    assert rec["inputs"]["candidates"] == str((tmp_path / "cands.csv").resolve())
    assert rec["inputs"]["excluded"] is None
    assert "git_revision" in rec and rec["wall_time_s"] >= 0
    assert (out / "froc.png").read_bytes()[:4] == b"\x89PNG"

    # with the excluded finding the 0.30 FP is ignored: 6 FPs over 8 scans
    assert main([*args, "--excluded", str(tmp_path / "excluded.csv"), "--bootstrap", "0"]) == 0
    rec = json.loads((out / "froc.json").read_text())
    assert (rec["n_fp"], rec["n_ignored"]) == (6, 1)
    assert rec["curve"]["fps_per_scan"][-1] == pytest.approx(6 / 8)

    # a candidate of a scan outside the list: clear error, exit status 2
    write_series_uids(tmp_path / "few.csv", uids[:3])
    code = main(args[:5] + ["--series-uids", str(tmp_path / "few.csv")])
    assert code == 2
    assert "outside the evaluated set" in capsys.readouterr().err
