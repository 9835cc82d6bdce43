"""The cost sweep's curves: single-round routers' lambda grids read from a run's evaluation (its
fixed candidates are curves of their own), and every AIQ over one shared cost range."""

import json

import pytest

from bench.sweep import shared_aiq, single_round_points


def row(router: str, setting: str, cost: float, em: float) -> dict:
    return {"router": router, "setting": setting, "name": f"{router} ({setting})",
            "metrics": {"by_dataset": {"overall": {"em": em, "raw_cost": cost}}}}


def test_the_lambda_grids_leave_out_the_fixed_candidates(tmp_path):
    (tmp_path / "single_round").mkdir()
    rows = [row("knn", "λ=0", 80.0, 0.9), row("knn", "λ=0.5", 30.0, 0.8), row("fixed:Geo-Expert", "", 0.5, 0.4),
            row("fixed", "Tiny-LM", 0.1, 0.1)]
    (tmp_path / "single_round" / "results.json").write_text(json.dumps({"rows": rows}))
    assert single_round_points(tmp_path) == {"knn": [("λ=0", 80.0, 0.9), ("λ=0.5", 30.0, 0.8)]}


def test_every_curve_is_scored_over_the_range_of_all_curves():
    aiqs, (c_min, c_max) = shared_aiq({"cheap point": [(10.0, 0.8)], "line": [(0.0, 0.5), (100.0, 0.5)]})
    assert (c_min, c_max) == (0.0, 100.0)
    assert aiqs["line"] == pytest.approx(0.5)
    assert aiqs["cheap point"] == pytest.approx(0.8 * 0.9)  # quality 0 below its own cheapest point
