"""The deploy control loop: chunk joining, asynchronous inference, safety, mock and MetaWorld robots."""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from robots import make_robot
from robots.chunking import ActionSchedule
from robots.deploy import (
    DeployConfig,
    LocalPolicy,
    RemotePolicy,
    format_stats,
    main,
    run_deploy,
)
from robots.safety import SafetyConfig


def _train(out: Path, data: Path, *args: str) -> Path:
    from vla.config import TrainConfig, parse_config
    from vla.presets import get_preset
    from vla.train import train

    return train(parse_config(TrainConfig, get_preset("debug"), [
        f"--output_dir={out}", f"--dataset.root={data}", "--dataset.synthetic=false", "--batch_size=4",
        "--steps=2", "--save_every=0", "--warmup_steps=1", *args]))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny policy for a 3-joint position-controlled arm with one camera (cam0)."""
    from vla.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("deploy")
    data = make_synthetic_dataset(root / "arm", num_episodes=2, episode_len=10, state_dim=3, action_dim=3)
    return _train(root / "run", data, "--policy.n_action_steps=2")


def _mock(**kw):
    return make_robot("mock", **{"state_dim": 3, "cameras": ["cam0"], "image_height": 32, "image_width": 32,
                                 "dynamics": "position", **kw})


class ScriptedPolicy:
    """A stand-in policy: chunks from a function of the observation, optionally slow or failing."""

    def __init__(self, fn, chunk_size: int = 4, n_action_steps: int = 2, sleep: float = 0.0, fail_every: int = 0):
        self.config = SimpleNamespace(chunk_size=chunk_size, n_action_steps=n_action_steps)
        self.fn, self.sleep, self.fail_every, self.calls = fn, sleep, fail_every, 0

    def predict_action_chunk(self, raw):
        self.calls += 1
        time.sleep(self.sleep)
        if self.fail_every and self.calls % self.fail_every == 0:
            raise RuntimeError("scripted failure")
        return self.fn(raw)

    def reset(self):
        pass


# ----- chunk joining ----------------------------------------------------------------------------------
def test_schedule_drops_late_actions_and_blends_the_overlap() -> None:
    s = ActionSchedule(blend_steps=2)
    s.add(np.zeros((6, 1)), obs_tick=0, now_tick=0)
    assert s.remaining(0) == 6 and s.action_at(5)[0] == 0 and s.action_at(6) is None
    # Computed from tick 2's observation, arriving at tick 4: its first two actions are in the past.
    late = s.add(np.arange(6, dtype=float)[:, None] + 10, obs_tick=2, now_tick=4)
    assert late == 2 and s.dropped_late == 2
    got = [s.action_at(t)[0] for t in range(4, 8)]
    # new actions for ticks 4.. are 12, 13, 14, 15; the first two crossfade from the old plan's 0
    np.testing.assert_allclose(got, [12 / 3, 13 * 2 / 3, 14, 15])
    assert s.remaining(4) == 4 and s.action_at(3) is None
    # A chunk that is entirely late keeps the current plan instead of leaving the robot with nothing.
    s.add(np.ones((2, 1)), obs_tick=0, now_tick=5)
    assert s.remaining(5) == 3 and s.action_at(5)[0] == pytest.approx(13 * 2 / 3)
    with pytest.raises(ValueError, match="NaN"):
        s.add(np.full((2, 1), np.nan), 5, 5)
    with pytest.raises(ValueError, match="action dim"):
        s.add(np.zeros((2, 2)), 5, 5)


def test_blending_bounds_the_jump_between_chunks() -> None:
    jumps = {}
    for b in (0, 3):
        s = ActionSchedule(blend_steps=b)
        s.add(np.zeros((8, 1)), 0, 0)
        s.add(np.ones((8, 1)), 2, 3)
        seq = [s.action_at(t)[0] for t in range(3, 9)]
        jumps[b] = np.abs(np.diff([0.0] + seq)).max()
    assert jumps[0] == 1.0 and jumps[3] == pytest.approx(0.25)


# ----- the loop on the mock robot ---------------------------------------------------------------------
def test_deploy_through_the_server_asynchronously(ckpt: Path) -> None:
    from robots.adapters import AdapterRegistry
    from robots.server import PolicyServer

    robot = _mock()
    with PolicyServer(AdapterRegistry.load(ckpt), port=0).running() as url, robot:
        policy = RemotePolicy(url)
        try:
            stats = run_deploy(robot, policy, DeployConfig(fps=40, episodes=2, max_steps=20, task="push the red block"))
        finally:
            policy.close()
    assert stats["episodes"] == 2 and stats["ticks"] == 40 and stats["errors"] == 0
    assert len(robot.sent) == 40 and np.isfinite(robot.actions).all()
    assert stats["chunks"] > 2 and stats["latency_ms_p50"] > 0 and stats["server_ms_p50"] > 0
    # While a request is in flight the current chunk keeps the robot moving; the new chunk's actions for
    # the ticks that passed meanwhile are skipped (a reply is picked up one tick later at the earliest).
    assert stats["late_actions_dropped"] >= stats["chunks"] - stats["episodes"]
    # (delay_ticks_mean is rounded to 3 decimals)
    assert stats["late_actions_dropped"] == pytest.approx(stats["delay_ticks_mean"] * stats["chunks"],
                                                          abs=5e-4 * stats["chunks"])
    assert stats["safety"]["ticks"] == 40 and stats["jitter_ms_p99"] is not None
    assert "control loop: 40 ticks in 2 episode(s)" in format_stats(stats)


def test_rtc_requests_carry_the_planned_actions(ckpt: Path) -> None:
    """`--rtc=true`: each asynchronous request carries the actions still planned and RTC weights that are
    1 over the expected delay; a flow-matching checkpoint served remotely accepts them."""
    from policies.rtc import rtc_weights
    from robots.chunking import ActionSchedule
    from robots.deploy import rtc_request

    sched = ActionSchedule(blend_steps=0)
    sched.add(np.arange(12.0).reshape(6, 2), obs_tick=0, now_tick=0)
    req = rtc_request(sched, tick=2, delay=1, horizon=8)
    assert req["inpaint"].tolist() == np.arange(4.0, 12.0).reshape(4, 2).tolist()  # ticks 2..5
    assert np.allclose(req["inpaint_weights"], rtc_weights(4, 1, 0)) and req["inpaint_weights"][0] == 1.0
    assert rtc_request(sched, tick=9, delay=1, horizon=8) == {}  # nothing planned: a plain request

    seen: list[dict] = []

    class Recording:
        config = type("C", (), {"chunk_size": 4, "n_action_steps": 2})()

        def predict_action_chunk(self, raw, **kw):
            seen.append(kw)
            return np.full((4, 3), 0.1)

    robot = _mock()
    with robot:
        stats = run_deploy(robot, LocalPolicy(Recording()), DeployConfig(fps=40, max_steps=12, rtc=True))
    assert stats["errors"] == 0 and len(seen) >= 3
    assert "inpaint" not in seen[0]  # the first chunk has nothing to agree with
    later = [kw for kw in seen[1:] if "inpaint" in kw]
    assert later and all(kw["inpaint"].shape[1] == 3 and np.allclose(kw["inpaint"], 0.1) for kw in later)

    from robots.adapters import AdapterRegistry
    from robots.server import PolicyServer

    robot = _mock()
    with PolicyServer(AdapterRegistry.load(ckpt), port=0).running() as url, robot:
        policy = RemotePolicy(url)
        try:
            stats = run_deploy(robot, policy, DeployConfig(fps=40, max_steps=16, rtc=True, task="push the red block"))
        finally:
            policy.close()
    assert stats["errors"] == 0 and stats["ticks"] == 16 and np.isfinite(robot.actions).all()


def test_selector_requests_carry_the_current_plan() -> None:
    """With a selector, each request after the first carries the actions still planned (the coherence
    selector's reference); without one, no request does."""
    seen: list[dict] = []

    class Recording:
        config = type("C", (), {"chunk_size": 4, "n_action_steps": 2})()

        def predict_action_chunk(self, raw, **kw):
            seen.append(kw)
            return np.full((4, 3), 0.1 * len(seen))

    for selector in ("coherence", None):
        seen.clear()
        robot = _mock()
        with robot:
            cfg = DeployConfig(fps=40, max_steps=8, asynchronous=False, num_samples=2 if selector else None,
                               selector=selector)
            stats = run_deploy(robot, LocalPolicy(Recording()), cfg)
        assert stats["errors"] == 0 and len(seen) >= 3
        refs = [kw.get("reference") for kw in seen]
        if selector is None:
            assert all(r is None for r in refs)
        else:
            assert refs[0] is None  # the first chunk has no plan to keep
            # synchronous, 2 of 4 executed: the plan's last 2 steps of the previous chunk
            assert all(r is not None and r.shape == (2, 3) and np.allclose(r, 0.1 * i) for i, r in enumerate(refs[1:], 1))


def test_plan_reference_leaves_out_the_late_steps() -> None:
    """Asynchronous requests: the plan for ticks the new chunk will arrive too late for is left out, and
    ``reference_start`` tells the selector which chunk step the plan starts at."""
    from robots.chunking import ActionSchedule
    from robots.deploy import plan_reference

    schedule = ActionSchedule(0)
    schedule.add(np.arange(8, dtype=float)[:, None] * np.ones((1, 3)), 0, 0)
    policy = type("P", (), {"chunk_size": 8, "takes_reference": True, "takes_reference_start": True})()
    cfg = DeployConfig(selector="coherence", num_samples=4)
    now = plan_reference(schedule, 2, policy, cfg)
    assert "reference_start" not in now and np.allclose(now["reference"][:, 0], [2, 3, 4, 5, 6, 7])
    late = plan_reference(schedule, 2, policy, cfg, late=2)
    assert late["reference_start"] == 2 and np.allclose(late["reference"][:, 0], [4, 5, 6, 7])
    assert plan_reference(schedule, 2, policy, cfg, late=6) == {}  # nothing planned that will execute
    assert plan_reference(schedule, 2, policy, DeployConfig(), late=1) == {}  # no selector, no plan
    policy.takes_reference_start = False  # an older policy / server: the whole plan, from step 0
    assert "reference_start" not in plan_reference(schedule, 2, policy, cfg, late=2)


def test_synchronous_loop_with_safety_limits(ckpt: Path) -> None:
    robot = _mock()
    cfg = DeployConfig(fps=50, max_steps=12, asynchronous=False, task="push the red block",
                       safety=SafetyConfig(lower=[-0.05], upper=[0.05], max_step=[0.02]))
    with robot:
        stats = run_deploy(robot, LocalPolicy(str(ckpt)), cfg)
    sent = robot.actions
    assert stats["ticks"] == 12 and stats["delay_ticks_max"] == 0 and stats["late_actions_dropped"] == 0
    assert (np.abs(sent) <= 0.05 + 1e-12).all() and (np.abs(np.diff(sent, axis=0)) <= 0.02 + 1e-12).all()
    assert stats["safety"]["position_limit"] + stats["safety"]["max_step"] > 0


def test_slow_policy_starves_to_hold_and_failures_are_survived() -> None:
    robot = _mock(initial_state=[0.5, 0.5, 0.5])
    # Always asks for +1 on every joint, but takes 0.15 s per chunk of 2 at 50 Hz: ticks run out of actions.
    slow = ScriptedPolicy(lambda raw: np.ones((2, 3)), chunk_size=2, n_action_steps=2, sleep=0.15, fail_every=3)
    with robot:
        stats = run_deploy(robot, LocalPolicy(slow), DeployConfig(fps=50, max_steps=30))
    assert stats["starved"] > 0 and stats["errors"] >= 1 and stats["ticks"] == 30
    sent = robot.actions
    assert set(np.unique(sent)) <= {0.5, 1.0}  # either the policy's action or holding the current position
    failing = ScriptedPolicy(lambda raw: np.ones((2, 3)), fail_every=1)
    with robot, pytest.raises(RuntimeError, match="failed 3 times in a row"):
        run_deploy(robot, LocalPolicy(failing), DeployConfig(fps=50, max_steps=10))


def test_wrong_action_dim_is_refused(ckpt: Path) -> None:
    robot = make_robot("mock", state_dim=2, cameras=["cam0"], image_height=32, image_width=32)
    with robot, pytest.raises(ValueError, match=r"\(H, 2\)"):
        run_deploy(robot, LocalPolicy(ScriptedPolicy(lambda raw: np.zeros((4, 3)))), DeployConfig(max_steps=3))


def test_vla_deploy_command_line(ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "stats.json"
    rc = main(["--robot.type=mock", "--robot.state_dim=3", "--robot.cameras=[cam0]", "--robot.dynamics=position",
               f"--policy={ckpt}", "--fps=50", "--max_steps=10", "--task=push the red block",
               "--safety.max_step=[0.5]", f"--stats_json={out}"])
    assert rc == 0 and "control loop: 10 ticks" in capsys.readouterr().out
    assert json.loads(out.read_text())["ticks"] == 10
    assert main(["--robot.type=mock"]) == 2  # neither --server nor --policy


# ----- MetaWorld ----------------------------------------------------------------------------------------
needs_metaworld = pytest.mark.skipif(importlib.util.find_spec("metaworld") is None, reason="metaworld not installed")


def _reach_controller(raw) -> np.ndarray:
    # MetaWorld's own scripted reach expert in one line: 5 x (goal - hand), clipped (the full state carries the goal).
    env = raw["observation.environment_state"]
    a = np.clip(5.0 * (env[36:39] - env[:3]), -1.0, 1.0)
    return np.repeat(np.append(a, 0.0)[None], 4, axis=0)


@pytest.mark.sim
@needs_metaworld
def test_metaworld_robot_closed_loop_reaches_the_goal() -> None:
    robot = make_robot("metaworld", task="reach-v3", image_size=64, max_steps=150)
    with robot:
        assert robot.instruction and robot.observation_features["observation.images.corner2"] == (64, 64, 3)
        stats = run_deploy(robot, LocalPolicy(ScriptedPolicy(_reach_controller)),
                           DeployConfig(fps=50, episodes=2, max_steps=150,
                                        safety=SafetyConfig(lower=[-1.0], upper=[1.0])))
        assert robot.episode == 1  # the second episode ran on the next variation
    assert stats["episodes"] == 2 and stats["successes"] == 2, format_stats(stats)
    assert stats["ticks"] < 2 * 150  # episodes ended at success


@pytest.mark.sim
@pytest.mark.slow
@needs_metaworld
def test_metaworld_robot_with_a_served_vla(tmp_path: Path) -> None:
    from robots.adapters import AdapterRegistry
    from robots.server import PolicyServer
    from vla.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "mw", num_episodes=2, episode_len=10, state_dim=4, action_dim=4,
                                  cameras=("observation.images.corner2",))
    ckpt = _train(tmp_path / "run", data)
    robot = make_robot("metaworld", task="drawer-open-v3", image_size=64)
    with PolicyServer(AdapterRegistry.load(ckpt), port=0).running() as url, robot:
        policy = RemotePolicy(url)
        try:
            stats = run_deploy(robot, policy, DeployConfig(fps=20, max_steps=15))
        finally:
            policy.close()
    assert stats["episodes"] == 1 and stats["ticks"] == 15 and stats["errors"] == 0 and robot.steps == 15
