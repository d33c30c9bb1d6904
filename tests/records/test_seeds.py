"""acert.records.seeds: points over seeds, the gaps to ACERT's front, the report acert plot
writes."""

from __future__ import annotations

import pytest

from acert.foundation.errors import AcertError
from acert.records.seeds import Spread, front_gaps, seed_points, write_seed_report


def row(method: str, point: str, clean: float, acr_pct: float) -> dict:
    return {
        "run": f"{method}-{point}",
        "method": method,
        "point": point,
        "dataset": "mnist5k",
        "eps_max": 0.4,
        "bound": "ibp",
        "n": 1000,
        "clean_acc": clean / 100,
        "acr_pct": acr_pct,
        "acceps": 0.5,
    }


def acert_rows() -> list[dict]:
    """ACERT's front: (80 %, 70) and (90 %, 50), each over three seeds spread by ±1."""
    return [
        row("acert", f"kappa={k}, seed={s}", clean + d, acr + d)
        for k, clean, acr in ((0, 80, 70), (0.9, 90, 50))
        for s, d in ((0, -1), (1, 0), (2, 1))
    ]


def test_points_group_the_seeds_of_one_knob_setting_with_mean_and_range():
    points = {p.knobs: p for p in seed_points(acert_rows())}
    assert set(points) == {"kappa=0", "kappa=0.9"}
    low = points["kappa=0"]
    assert low.seeds == (0, 1, 2)
    assert low.clean == Spread(80, 79, 81) and low.acr_pct == Spread(70, 69, 71)
    assert low.acr_pct.text() == "70.0 [69.0, 71.0]"


def test_rows_without_the_bounds_metrics_are_left_out():
    rows = acert_rows()
    assert seed_points(rows, "crown") == []
    rows[0].update(crown_acr_pct=60.0, crown_clean_acc=0.8, crown_acceps=0.4, crown_n=100)
    [point] = seed_points(rows, "crown")
    assert point.seeds == (0,) and point.acr_pct == Spread(60, 60, 60)


@pytest.mark.parametrize(
    ("acr", "spread", "verdict", "gap"),
    [
        (50.0, 0.5, "above", 10.0),  # front at 85 %: 60 [59, 61]; the point's range below it
        (59.0, 1.5, "within spread", 1.0),  # [57.5, 60.5] overlaps [59, 61]
        (66.0, 1.0, "below", -6.0),
    ],
)
def test_a_baseline_is_above_within_or_below_the_front_by_the_seed_ranges(
    acr, spread, verdict, gap
):
    rows = acert_rows() + [
        row("mtl-ibp", f"mtl_alpha=0.5, seed={s}", 85, acr + d)
        for s, d in ((0, -spread), (1, 0), (2, spread))
    ]
    [result] = front_gaps(seed_points(rows))
    assert result.verdict == verdict
    assert result.gap == pytest.approx(gap)


def test_points_more_accurate_than_the_front_are_not_compared():
    rows = [*acert_rows(), row("ibp", "eps_train=0.1", 95, 20), row("standard", "", 98, 0)]
    [result] = front_gaps(seed_points(rows))
    assert result.point.method == "ibp" and result.verdict == "outside" and result.gap is None


@pytest.mark.parametrize(
    ("clean", "acr", "verdict", "gap"),
    [
        (75.0, 60.0, "dominated", 10.0),  # the front's κ=0 (80 [79, 81], 70 [69, 71]) beats both
        (75.0, 69.5, "outside", None),  # more ACR than the front's lowest seed: not comparable
        (78.5, 60.0, "above", 10.0),  # clean 77.5-79.5 meets κ=0's 79-81: equal accuracy
        (78.5, 69.5, "within spread", 0.5),
    ],
)
def test_a_point_less_accurate_than_the_front_is_dominated_only_on_both_axes(
    clean, acr, verdict, gap
):
    seeds = [
        row("sabr", f"sabr_lambda=0.5, seed={s}", clean + d, acr) for s, d in enumerate((-1, 0, 1))
    ]
    [result] = front_gaps(seed_points([*acert_rows(), *seeds]))
    assert result.verdict == verdict
    assert result.gap == (None if gap is None else pytest.approx(gap))


def test_a_study_without_acert_has_no_front():
    with pytest.raises(AcertError, match="no acert runs"):
        front_gaps(seed_points([row("ibp", "eps_train=0.1, seed=0", 95, 20)]))


def test_the_report_is_written_only_once_a_point_has_several_seeds(tmp_path):
    single = [row("acert", "kappa=0", 80, 70), row("ibp", "eps_train=0.4", 85, 40)]
    assert write_seed_report(single, tmp_path, "ibp") == []
    rows = [*acert_rows(), row("sabr", "sabr_lambda=0.5, seed=0", 85, 50)]
    figure, report = write_seed_report(rows, tmp_path, "ibp")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.read_text()
    assert "| acert | κ=0 | 0,1,2 | 80.0 [79.0, 81.0] | 70.0 [69.0, 71.0] |" in text
    assert "| sabr λ=0.5 | 1 | 85.0 | 50.0 | +10.0 | above |" in text


def test_the_adaptive_methods_form_one_front_against_every_fixed_eps_method(tmp_path):
    """acert and adaptive-<base> together: a fixed-ε point is judged against the best of them
    at its clean accuracy, and no adaptive point is judged against its own front."""
    adaptive_mtl = [
        row("adaptive-mtl-ibp", f"mtl_alpha=0.9, seed={s}", 85 + d, 66 + d)
        for s, d in ((0, -1), (1, 0), (2, 1))
    ]
    fixed = [
        row("mtl-ibp", f"mtl_alpha=0.9, seed={s}", 85 + d, 61 + d) for s, d in ((0, -1), (1, 1))
    ]
    points = seed_points([*acert_rows(), *adaptive_mtl, *fixed])
    [alone] = [g for g in front_gaps(points) if g.point.method == "mtl-ibp"]
    assert alone.gap == pytest.approx(-1.0) and alone.verdict == "within spread"  # ACERT: 60
    gaps = front_gaps(points, ("acert", "adaptive-mtl-ibp"))
    assert [g.point.method for g in gaps] == ["mtl-ibp"]
    assert gaps[0].gap == pytest.approx(5.0) and gaps[0].verdict == "above"  # 66 [65, 67]
    report = write_seed_report([*acert_rows(), *adaptive_mtl, *fixed], tmp_path, "ibp")[1]
    text = report.read_text()
    assert "## Against the front of every method with adaptive radii" in text
    assert "| mtl-ibp α=0.9 | 2 | 85.0 [84.0, 86.0] | 61.0 [60.0, 62.0] | +5.0 | above |" in text
