"""Benchmarks pool several evaluations of one arm / head (other seeds) into one row."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


def _fake_eval(folder: Path, selector: str | None, n: int, seed: int, eps: int, rates: dict) -> Path:
    folder.mkdir(parents=True)
    tasks = {t: {"success_rate": r, "policy_s": 1.0, "chunks": 10} for t, r in rates.items()}
    (folder / "results.json").write_text(json.dumps({
        "tasks": tasks, "mean_success": sum(rates.values()) / len(rates), "ci95": [0, 1], "episodes_per_task": eps,
        "seed": seed, "num_samples": n, "selector": selector and {"type": selector}, "wall_time_s": 5.0,
        "policy": "ckpt"}))
    return folder


def test_selector_benchmark_pools_the_seeds_of_one_arm(tmp_path: Path) -> None:
    """Two runs of an arm (seed 0: 10 episodes, seed 1: 20) count as 30 episodes per task; arms that did not
    run the same seeds are refused."""
    from benchmarks.selectors import collect_evals

    a = _fake_eval(tmp_path / "n1_s0", None, 1, 0, 10, {"reach": 0.5, "push": 1.0})
    b = _fake_eval(tmp_path / "n1_s1", None, 1, 1, 20, {"reach": 0.8, "push": 0.5})
    c = _fake_eval(tmp_path / "c16_s0", "consistency", 16, 0, 10, {"reach": 1.0, "push": 1.0})
    d = _fake_eval(tmp_path / "c16_s1", "consistency", 16, 1, 20, {"reach": 1.0, "push": 0.9})
    rows = {r["selector"]: r for r in collect_evals([a, b, c, d])}
    assert rows["none"]["per_task"] == {"reach": 70, "push": 67}  # (5 + 16) / 30, (10 + 10) / 30
    assert rows["none"]["success"] == round(100 * 41 / 60, 1) and rows["none"]["episodes_per_task"] == 30
    assert rows["consistency"]["success"] == round(100 * 58 / 60, 1)
    assert rows["none"]["ci95"][0] < rows["none"]["success"] < rows["none"]["ci95"][1]
    with pytest.raises(ValueError, match="not comparable"):
        collect_evals([a, b, c])


def test_pooling_refuses_overlapping_episodes_and_other_policies(tmp_path: Path) -> None:
    from benchmarks.common import pool_evals

    a = json.loads((_fake_eval(tmp_path / "a", None, 1, 0, 10, {"reach": 0.5}) / "results.json").read_text())
    with pytest.raises(ValueError, match="overlap at seed 0"):
        pool_evals([a, dict(a)])
    with pytest.raises(ValueError, match="overlap at seed 0"):  # episodes 9.. of seed 0 repeat episode 9
        pool_evals([a, {**a, "first_episode": 9}])
    later = pool_evals([{**a, "first_episode": 10, "episodes_per_task": 20}, a])  # episodes 0-9 and 10-29
    assert later["runs"] == [(0, 0, 10), (0, 10, 20)] and later["episodes"] == 30
    with pytest.raises(ValueError, match="differ in 'policy'"):
        pool_evals([a, {**a, "seed": 1, "policy": "other"}])
    half = {**a, "tasks": {"reach": {"success_rate": 0.625, "successes": 5, "episodes": 8}}, "episodes_per_task": 8}
    assert pool_evals([half])["per_task"] == {"reach": 63}  # exact counts, rounded half up


def test_heads_benchmark_pools_comma_separated_results(tmp_path: Path) -> None:
    from benchmarks.heads import success_rows

    a = _fake_eval(tmp_path / "s0", None, 1, 0, 10, {"reach": 0.5, "push": 1.0})
    b = _fake_eval(tmp_path / "s1", None, 1, 1, 20, {"reach": 0.8, "push": 0.5})
    (row,) = success_rows([f"parallel={a / 'results.json'},{b / 'results.json'}"])
    assert row["head"] == "parallel" and row["success"] == round(100 * 41 / 60, 1) and row["runs"] == [(0, 0, 10), (1, 0, 20)]
    with pytest.raises(SystemExit, match="expected NAME=PATH"):
        success_rows(["parallel"])
