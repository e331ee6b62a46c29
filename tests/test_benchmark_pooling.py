"""Benchmarks pool several evaluations of one arm / head (other seeds) into one row."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


def _fake_eval(folder: Path, selector: str | None, n: int, seed: int, eps: int, rates: dict,
               overrides: list[str] | None = None, solved: dict | None = None) -> Path:
    """A results.json as `vla eval metaworld` writes it. Per task, the first round(rate * eps) episodes
    succeed unless ``solved`` names the episode indices that do."""
    folder.mkdir(parents=True)
    tasks = {}
    for t, r in rates.items():
        ok = [i in solved[t] for i in range(eps)] if solved else [i < round(r * eps) for i in range(eps)]
        tasks[t] = {"success_rate": r, "policy_s": 1.0, "chunks": 10, "successful": ok,
                    "variations": [[1, i] for i in range(eps)], "seeds": [1000 * seed + i for i in range(eps)]}
    (folder / "results.json").write_text(json.dumps({
        "tasks": tasks, "mean_success": sum(rates.values()) / len(rates), "ci95": [0, 1], "episodes_per_task": eps,
        "seed": seed, "num_samples": n, "selector": selector and {"type": selector}, "wall_time_s": 5.0,
        "policy": "ckpt", "policy_overrides": overrides or []}))
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


def test_selector_latency_rows_interleave_arms_and_steps(checkpoint) -> None:
    """Every (selector, N, Euler steps) arm gets a row; ratios are against the saved setting's plain N=1 and
    against the plain N=1 at the row's own steps; the targets name the reduced-steps arms."""
    from benchmarks.selectors import measure_latency, targets
    from vla.policy import VLAPolicy

    path = checkpoint[0]
    saved = VLAPolicy.from_pretrained(path)
    steps = saved.config.head.num_steps
    policies = {steps: saved, 1: VLAPolicy.from_pretrained(path, overrides=["--head.num_steps=1"])}
    rows = measure_latency(policies, ["first"], [1, 16], repeats=2, bf16=False)
    got = {(r["selector"], r["N"], r["num_steps"]): r for r in rows}
    assert set(got) == {(s, n, k) for k in (steps, 1) for s, n in
                        [("none (plain)", 1), ("first", 1), ("first", 16)]}
    base = got["none (plain)", 1, steps]
    assert base["vs_N1"] == 1.0 and base["vs_N1_same_steps"] == 1.0
    one = got["first", 16, 1]
    assert one["vs_N1"] == round(one["ms_median"] / base["ms_median"], 2)
    assert one["vs_N1_same_steps"] == round(one["ms_median"] / got["none (plain)", 1, 1]["ms_median"], 2)
    lat = targets([], rows)["latency_N16_vs_N1"]
    assert set(lat) == {"first", "first 1 steps", "first 1 steps vs N=1 at 1 steps"}


def test_selector_latency_arms_take_a_path() -> None:
    """``--selectors gated=DIR`` times a selector whose assets lie elsewhere (a config map); a bare name stays one."""
    from benchmarks.selectors import selector_arg

    assert selector_arg("dagger") == ("dagger", "dagger")
    assert selector_arg("gated=out/g=1") == ("gated", {"type": "gated", "path": "out/g=1"})
    for bad in ("=d", "gated="):
        with pytest.raises(ValueError, match="NAME or NAME=DIR"):
            selector_arg(bad)


def test_selector_targets_take_the_saved_policy_as_baseline() -> None:
    """With an N=1 arm at overridden settings beside the saved one, the gain is measured from the saved one."""
    from benchmarks.selectors import targets

    def arm(n, overrides, successes):
        return {"selector": "none" if n == 1 else "dagger", "N": n, "overrides": overrides,
                "success": 100 * successes / 300, "successes": successes, "episodes": 300}

    out = targets([arm(1, "--head.num_steps=5", 150), arm(1, "", 200), arm(16, "--head.num_steps=5", 221)], [])
    assert out["success"]["baseline_N1"] == 100 * 200 / 300 and out["success"]["baseline_overrides"] == ""
    assert out["success"]["gain_points"] == 7.0 and out["success"]["met"]
    assert out["success"]["best_N16_overrides"] == "--head.num_steps=5"


def test_selector_benchmark_pairs_every_arm_with_the_saved_policy(tmp_path: Path) -> None:
    """Each arm is paired by episode (task, variation, seed) with the N=1 arm without overrides: episodes gained
    and lost, and the exact McNemar p; results.json files without per-episode outcomes pool but do not pair."""
    from benchmarks.common import episode_outcomes, paired_comparison
    from benchmarks.selectors import collect_evals, targets

    base = _fake_eval(tmp_path / "n1", None, 1, 0, 50, {"reach": 0.4}, solved={"reach": set(range(20))})
    five = _fake_eval(tmp_path / "n1_5", None, 1, 0, 50, {"reach": 0.4}, ["--head.num_steps=5"],
                      solved={"reach": set(range(20))})
    # 30 solved: 18 of the baseline's 20 (2 lost) and 12 the baseline failed (gained)
    arm = _fake_eval(tmp_path / "d16", "dagger", 16, 0, 50, {"reach": 0.6}, ["--head.num_steps=5"],
                     solved={"reach": set(range(2, 32))})
    rows = {(r["selector"], r["overrides"]): r for r in collect_evals([arm, five, base])}
    d = rows["dagger", "--head.num_steps=5"]
    assert (d["vs_base_gained"], d["vs_base_lost"]) == (12, 2)
    assert d["vs_base_mcnemar_p"] == round(2 * (1 + 14 + 91) / 2 ** 14, 4)  # P(X <= 2), X ~ Bin(14, 1/2), two-sided
    assert rows["none", ""]["vs_base_gained"] == 0 and rows["none", "--head.num_steps=5"]["vs_base_mcnemar_p"] == 1.0
    assert targets(list(rows.values()), [])["success"]["vs_base_gained"] == 12
    with pytest.raises(ValueError, match="different episodes"):
        paired_comparison(episode_outcomes([json.loads((base / "results.json").read_text())]), {})
    old = json.loads((base / "results.json").read_text())
    del old["tasks"]["reach"]["successful"]
    (base / "results.json").write_text(json.dumps(old))
    assert "vs_base_gained" not in collect_evals([arm, base])[0]


def test_selector_latency_takes_policy_overrides(tmp_path: Path) -> None:
    """``--policy.FIELD=VALUE`` reaches every arm's checkpoint (a token head's draws for the candidates) and is
    recorded with the latency rows; a field the config lacks is refused with the fields it has."""
    from benchmarks.selectors import main
    from tests.helpers import tiny_checkpoint

    path, _ = tiny_checkpoint(tmp_path, 2, 10, "--head.type=discrete")
    out = tmp_path / "sel.json"
    over = ["--policy.head.temperature=1.0", "--policy.head.greedy_first=true"]
    assert main(["--policy", str(path), "--selectors", "first", "--samples", "1", "4", "--repeats", "1",
                 "--out", str(out), *over]) == 0
    got = json.loads(out.read_text())
    assert got["latency_run"]["policy_overrides"] == ["--head.temperature=1.0", "--head.greedy_first=true"]
    assert {(r["selector"], r["N"]) for r in got["latency"]} == {("none (plain)", 1), ("first", 1), ("first", 4)}
    with pytest.raises(ValueError, match="has no field 'bogus'"):
        main(["--policy", str(path), "--selectors", "first", "--samples", "1", "--repeats", "1", "--out",
              str(out), "--policy.head.bogus=1"])
