"""Robots: the driver contract (mock), the lerobot translation (fake lerobot robot), the safety layer."""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field

import draccus
import hypothesis
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from robots import (
    LeRobotArm,
    LeRobotArmConfig,
    MockRobot,
    MockRobotConfig,
    RobotAlreadyConnectedError,
    RobotConfig,
    RobotNotConnectedError,
    SafeRobot,
    SafetyConfig,
    SafetyFilter,
    make_robot,
    robot_names,
)
from robots.lerobot_driver import sdk_install_hint, to_hwc_uint8
from vla.registry import UnknownNameError


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# ------------------------------------------------------------------------------------------------
# Registry and mock driver contract


def test_registry_names_and_unknown_name():
    assert {"mock", "lerobot"} <= set(robot_names())
    with pytest.raises(UnknownNameError, match=r"known robots: lerobot, metaworld, mock.*Did you mean 'mock'"):
        make_robot("mokc")


def test_robot_type_from_the_command_line():
    @dataclass
    class DeployCfg:
        robot: RobotConfig = field(default_factory=MockRobotConfig)

    cfg = draccus.parse(DeployCfg, args=["--robot.type=mock", "--robot.state_dim=3", "--robot.dynamics=position"])
    assert isinstance(cfg.robot, MockRobotConfig) and cfg.robot.state_dim == 3
    assert cfg.robot.build().action_dim == 3


def test_mock_contract_connect_disconnect_and_errors():
    r = make_robot("mock", state_dim=6, cameras=["top", "wrist"], image_height=8, image_width=10)
    assert r.observation_features == {"observation.state": (6,), "observation.images.top": (8, 10, 3),
                                      "observation.images.wrist": (8, 10, 3)}
    assert r.action_features == {"action": (6,)} and r.cameras == ["top", "wrist"]
    assert not r.is_connected
    with pytest.raises(RobotNotConnectedError, match=r"get_observation\(\) called before connect"):
        r.get_observation()
    with pytest.raises(RobotNotConnectedError, match=r"send_action\(\) called before connect"):
        r.send_action(np.zeros(6))
    r.disconnect()  # harmless when not connected
    with r:
        assert r.is_connected
        with pytest.raises(RobotAlreadyConnectedError):
            r.connect()
        obs = r.get_observation()
        assert obs["observation.state"].dtype == np.float32 and obs["observation.state"].shape == (6,)
        assert obs["observation.images.top"].dtype == np.uint8 and obs["observation.images.top"].shape == (8, 10, 3)
        with pytest.raises(ValueError, match=r"shape \(3,\), expected \(6,\)"):
            r.send_action(np.zeros(3))
        with pytest.raises(ValueError, match=r"NaN/inf at indices \[1\]"):
            r.send_action([0, np.nan, 0, 0, 0, 0])
        with pytest.raises(TypeError, match="numeric"):
            r.send_action(np.array(["a"] * 6))
        sent = r.send_action(np.arange(6, dtype=np.int32))
        assert sent.dtype == np.float64 and np.array_equal(sent, np.arange(6))
    assert not r.is_connected
    assert len(r.sent) == 1 and np.array_equal(r.actions, [np.arange(6)])

    # The context manager disconnects when the body raises.
    with pytest.raises(KeyError):
        with r:
            raise KeyError("boom")
    assert not r.is_connected


def test_mock_dynamics_images_and_recordings():
    r = MockRobot(MockRobotConfig(state_dim=2, dynamics="integrate", dt=0.5, initial_state=[1.0, 0.0],
                                  image_mode="constant", image_value=9, cameras=["c"], image_height=2, image_width=3))
    with r:
        for _ in range(4):
            r.send_action([1.0, -2.0])
        obs = r.get_observation()
    np.testing.assert_allclose(obs["observation.state"], [3.0, -4.0])
    assert (obs["observation.images.c"] == 9).all()
    assert r.actions.shape == (4, 2) and (np.diff(r.timestamps) >= 0).all()
    with r:  # reconnecting starts again from the initial state
        np.testing.assert_allclose(r.get_observation()["observation.state"], [1.0, 0.0])
    rnd = MockRobot(MockRobotConfig(state_dim=1, image_height=16, image_width=16))
    with rnd:
        a, b = (rnd.get_observation()["observation.images.cam0"] for _ in range(2))
    assert not np.array_equal(a, b)  # random frames change


def test_mock_config_errors():
    with pytest.raises(UnknownNameError, match="known mock robot dynamicss: integrate, none, position"):
        MockRobotConfig(dynamics="velocity").build()
    with pytest.raises(ValueError, match="needs action_dim == state_dim"):
        MockRobotConfig(state_dim=3, action_dim=2, dynamics="position").build()
    with pytest.raises(ValueError, match="initial_state has 1 values, expected state_dim=2"):
        MockRobotConfig(state_dim=2, initial_state=[0.0]).build()


# ------------------------------------------------------------------------------------------------
# lerobot driver: translation against a duck-typed lerobot robot


class FakeLeRobot:
    """Looks like a lerobot 0.4.4 follower arm: per-motor ``*.pos`` floats, camera arrays, and a
    ``max_relative_target``-style clip in send_action (which returns what it really sent)."""

    name = "fake_follower"

    def __init__(self, motors=("shoulder_pan", "elbow_flex", "gripper"), frame=None, max_rel=None):
        self.motors = list(motors)
        self.pos = {m: 10.0 * (i + 1) for i, m in enumerate(self.motors)}
        self.frame = np.full((4, 5, 3), 7, np.uint8) if frame is None else frame
        self.max_rel = max_rel
        self.is_connected = False
        self.received: list[dict] = []
        self.calibrate_arg = None

    @property
    def observation_features(self):
        return {**{f"{m}.pos": float for m in self.motors}, "top": (4, 5, 3)}

    @property
    def action_features(self):
        return {f"{m}.pos": float for m in self.motors}

    def connect(self, calibrate: bool = True):
        self.is_connected, self.calibrate_arg = True, calibrate

    def disconnect(self):
        self.is_connected = False

    def get_observation(self):
        return {"top": self.frame, **{f"{m}.pos": self.pos[m] for m in reversed(self.motors)}}

    def send_action(self, action):
        self.received.append(dict(action))
        out = {}
        for k, v in action.items():
            m = k.removesuffix(".pos")
            if self.max_rel is not None:
                v = float(np.clip(v, self.pos[m] - self.max_rel, self.pos[m] + self.max_rel))
            self.pos[m] = out[k] = v
        return out


def test_lerobot_translation_with_fake_robot():
    fake = FakeLeRobot(max_rel=5.0)
    arm = LeRobotArm(LeRobotArmConfig(), robot=fake)
    assert arm.action_names == ["shoulder_pan.pos", "elbow_flex.pos", "gripper.pos"]
    assert arm.observation_features == {"observation.state": (3,), "observation.images.top": (4, 5, 3)}
    with arm:
        assert fake.is_connected and fake.calibrate_arg is True
        obs = arm.get_observation()
        # State follows the motor order of the features, not the order of the lerobot dict.
        np.testing.assert_array_equal(obs["observation.state"], np.array([10.0, 20.0, 30.0], np.float32))
        assert obs["observation.state"].dtype == np.float32
        assert obs["observation.images.top"].dtype == np.uint8 and (obs["observation.images.top"] == 7).all()
        sent = arm.send_action(np.array([12.0, 100.0, 29.0]))
        assert fake.received[-1] == {"shoulder_pan.pos": 12.0, "elbow_flex.pos": 100.0, "gripper.pos": 29.0}
        np.testing.assert_allclose(sent, [12.0, 25.0, 29.0])  # lerobot's own clip comes back to us
        with pytest.raises(ValueError, match=r"shape \(2,\), expected \(3,\)"):
            arm.send_action([1.0, 2.0])
    assert not fake.is_connected


def test_lerobot_frames_and_broken_observations():
    chw = np.random.default_rng(0).random((3, 4, 5))
    img = to_hwc_uint8(chw, (4, 5, 3), "cam")
    assert img.shape == (4, 5, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img, np.round(chw.transpose(1, 2, 0) * 255).astype(np.uint8))
    with pytest.raises(RuntimeError, match=r"shape \(4, 4, 3\), expected \(4, 5, 3\)"):
        to_hwc_uint8(np.zeros((4, 4, 3), np.uint8), (4, 5, 3), "cam")
    with pytest.raises(RuntimeError, match="in \\[0, 1\\]"):
        to_hwc_uint8(np.full((4, 5, 3), 2.0), (4, 5, 3), "cam")

    fake = FakeLeRobot()
    fake.get_observation = lambda: {"shoulder_pan.pos": 1.0}  # a driver that lost keys
    with LeRobotArm(robot=fake) as arm, pytest.raises(RuntimeError, match=r"lacks keys \['elbow_flex.pos'"):
        arm.get_observation()


@pytest.mark.parametrize("robot,package", [("so101_follower", "feetech-servo-sdk"), ("koch_follower", "dynamixel-sdk")])
def test_lerobot_missing_sdk_says_what_to_install(robot, package, tmp_path):
    module = {"feetech-servo-sdk": "scservo_sdk", "dynamixel-sdk": "dynamixel_sdk"}[package]
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    with pytest.raises(ImportError, match=f"pip install '{package}[<>=]"):
        LeRobotArmConfig(robot=robot, calibration_dir=str(tmp_path)).build()
    assert sdk_install_hint("mock_thing") is None


def test_lerobot_config_translates_to_lerobot(tmp_path):
    cfg = LeRobotArmConfig(robot="so100_follower", port="/dev/ttyUSB3", id="left", calibration_dir=str(tmp_path),
                           cameras={"top": {"type": "opencv", "index_or_path": 0, "width": 64, "height": 48, "fps": 30}},
                           extra={"max_relative_target": 5.0})
    lr = cfg.lerobot_config()
    assert lr.type == "so100_follower" and lr.port == "/dev/ttyUSB3" and lr.id == "left"
    assert lr.max_relative_target == 5.0 and lr.cameras["top"].height == 48
    with pytest.raises(UnknownNameError, match="Did you mean 'so101_follower'"):
        LeRobotArmConfig(robot="so101_folower").lerobot_config()


# ------------------------------------------------------------------------------------------------
# Safety rules, one by one


def make_filter(dim=2, clock=None, **cfg) -> SafetyFilter:
    cfg.setdefault("fps", 10.0)
    return SafetyFilter(dim, SafetyConfig(**cfg), clock=clock or FakeClock())


def test_position_limits_clip():
    f = make_filter(lower=[-1.0, 0.0], upper=[1.0, 0.5])
    np.testing.assert_array_equal(f([5.0, -3.0], [0.0, 0.0]), [1.0, 0.0])
    np.testing.assert_array_equal(f([0.5, 0.25], [0.0, 0.0]), [0.5, 0.25])
    assert f.stats()["position_limit"] == 1


def test_max_step_is_relative_to_the_current_position():
    f = make_filter(max_step=[0.1, 0.2])
    np.testing.assert_allclose(f([1.0, -1.0], [0.5, 0.5]), [0.6, 0.3])
    np.testing.assert_allclose(f([0.55, 0.5], [0.5, 0.5]), [0.55, 0.5])
    assert f.stats()["max_step"] == 1


def test_velocity_limit_uses_the_tick_dt_capped_at_the_nominal_period():
    clock = FakeClock()
    f = make_filter(dim=1, clock=clock, max_velocity=[2.0], fps=10.0)  # 2 units/s, dt <= 0.1 s
    np.testing.assert_allclose(f([1.0], [0.0]), [0.2])  # first tick: nominal dt
    clock.t += 0.05
    np.testing.assert_allclose(f([1.0], [0.0]), [0.1])  # fast tick: smaller step
    clock.t += 5.0
    np.testing.assert_allclose(f([1.0], [0.0], timestamp=clock.t), [0.2])  # late tick: no bigger jump
    assert f.stats()["velocity"] == 3


def test_nonfinite_and_nonnumeric_actions_hold_position(caplog):
    f = make_filter(lower=[-1.0], upper=[1.0])
    cur = [0.3, -0.2]
    with caplog.at_level(logging.WARNING, logger="robots.safety"):
        for bad in ([np.nan, 0.0], [0.0, np.inf], [-np.inf, 1.0], np.array(["a", "b"]), np.array([1e400, 0], object)):
            np.testing.assert_array_equal(f(bad, cur), cur)
    assert f.stats()["nonfinite"] == 5
    assert "holding position (nonfinite)" in caplog.text
    assert caplog.text.count("holding position") == 1  # logged when holding starts, not every tick
    np.testing.assert_array_equal(f(np.array([1, 0], np.int8), cur), [1.0, 0.0])  # integers are fine


def test_stale_actions_are_dropped():
    clock = FakeClock()
    f = make_filter(clock=clock, max_age_s=0.5, timeout_s=10.0)
    assert not f.submit([1.0, 1.0], timestamp=clock.t - 0.6)  # too old on arrival
    np.testing.assert_array_equal(f.tick([0.0, 0.0]), [0.0, 0.0])
    assert f.submit([1.0, 1.0], timestamp=clock.t - 0.4)
    np.testing.assert_array_equal(f.tick([0.0, 0.0]), [1.0, 1.0])
    clock.t += 0.2  # the same action has now aged past max_age_s
    np.testing.assert_array_equal(f.tick([0.0, 0.0]), [0.0, 0.0])
    assert f.stats()["stale"] == 2


def test_watchdog_holds_without_fresh_actions():
    clock = FakeClock()
    f = make_filter(clock=clock, timeout_s=0.5)
    np.testing.assert_array_equal(f.tick([0.1, 0.2]), [0.1, 0.2])  # nothing submitted yet
    f.submit([1.0, 1.0])
    clock.t += 0.3
    np.testing.assert_array_equal(f.tick([0.1, 0.2]), [1.0, 1.0])  # still fresh: reuse the target
    clock.t += 0.3
    np.testing.assert_array_equal(f.tick([0.4, 0.5]), [0.4, 0.5])
    assert f.stats()["watchdog"] == 2
    f.submit([0.0, 0.0])
    np.testing.assert_array_equal(f.tick([0.4, 0.5]), [0.0, 0.0])


def test_estop_latches_until_reset():
    f = make_filter()
    f.estop("operator")
    assert f.estopped
    for _ in range(3):
        np.testing.assert_array_equal(f([1.0, 1.0], [0.2, 0.2]), [0.2, 0.2])
    f.reset_estop()
    np.testing.assert_array_equal(f.tick([0.2, 0.2]), [0.2, 0.2])  # pre-reset actions are not resumed
    np.testing.assert_array_equal(f([1.0, 1.0], [0.2, 0.2]), [1.0, 1.0])
    s = f.stats()
    assert s["estop"] == 3 and s["watchdog"] == 1 and s["ticks"] == 5


def test_robot_outside_limits_is_brought_inside():
    f = make_filter(dim=1, lower=[-1.0], upper=[1.0], max_step=[0.1])
    np.testing.assert_array_equal(f([5.0], [3.0]), [1.0])
    np.testing.assert_array_equal(f.tick([3.0]), [1.0])
    assert f.stats()["state_outside_limits"] == 2


def test_safety_config_and_input_errors():
    with pytest.raises(ValueError, match=r"max_step needs 1 or 2 values"):
        make_filter(max_step=[0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match=r"max_velocity must be > 0"):
        make_filter(max_velocity=[0.0])
    with pytest.raises(ValueError, match="lower .* exceeds upper"):
        make_filter(lower=[1.0], upper=[0.0])
    with pytest.raises(ValueError, match=r"upper > -inf"):
        make_filter(upper=[-np.inf])
    f = make_filter()
    with pytest.raises(ValueError, match=r"action has shape \(3,\), expected \(2,\)"):
        f.submit([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="current position has NaN/inf"):
        f.tick([np.nan, 0.0])


# ------------------------------------------------------------------------------------------------
# Property: whatever comes in, what goes out is finite, inside the limits and within the step bounds

_floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
_actions = st.one_of(
    hnp.arrays(st.sampled_from([np.float64, np.float32, np.float16]), 3),  # NaN/inf/huge included
    hnp.arrays(np.float64, 3, elements=_floats),
    hnp.arrays(st.sampled_from([np.int64, np.uint8, np.int8, np.bool_]), 3),
    hnp.arrays(np.complex128, 3),
    st.lists(st.one_of(_floats, st.integers(-(10**400), 10**400)), min_size=3, max_size=3).map(lambda v: np.array(v, dtype=object)),
    st.just(np.array(["1", "2", "x"])),
)
_bound = st.one_of(st.none(), st.lists(st.floats(1e-3, 10.0), min_size=3, max_size=3))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lo=st.lists(st.floats(-100, 100), min_size=3, max_size=3),
    width=st.lists(st.floats(0, 100), min_size=3, max_size=3),
    limited=st.booleans(),
    max_step=_bound,
    max_velocity=_bound,
    steps=st.lists(st.tuples(_actions,
                             st.one_of(  # current position: mostly inside the limits, sometimes anywhere
                                 hnp.arrays(np.float64, 3, elements=st.floats(-0.1, 1.1)).map(lambda u: ("rel", u)),
                                 hnp.arrays(np.float64, 3, elements=st.floats(-1e6, 1e6)).map(lambda a: ("abs", a)),
                                 hnp.arrays(np.float64, 3, elements=st.floats(allow_nan=False, allow_infinity=False))
                                 .map(lambda a: ("abs", a))),
                             st.one_of(st.none(), st.floats(-2.0, 0.1)),  # timestamp offset
                             st.floats(0.0, 1.0),  # clock advance
                             st.sampled_from(["", "", "", "estop", "reset"])),
                   min_size=1, max_size=8),
)
def test_safety_filter_output_is_always_safe(lo, width, limited, max_step, max_velocity, steps):
    lower, upper = np.array(lo), np.array(lo) + np.array(width)
    clock = FakeClock()
    cfg = dict(max_step=max_step, max_velocity=max_velocity, fps=10.0, max_age_s=0.5, timeout_s=0.5)
    if limited:
        cfg.update(lower=lower.tolist(), upper=upper.tolist())
    f = SafetyFilter(3, SafetyConfig(**cfg), clock=clock)
    step_bound = np.full(3, np.inf)
    if max_step is not None:
        step_bound = np.minimum(step_bound, max_step)
    if max_velocity is not None:
        step_bound = np.minimum(step_bound, np.array(max_velocity) * 0.1)
    n_inside = 0
    for action, (kind, cur), ts_offset, advance, event in steps:
        if kind == "rel":  # a fraction of the limit range (of [-100, 100] when unlimited)
            cur = lower + cur * (upper - lower) if limited else -100.0 + 200.0 * cur
        clock.t += advance
        if event == "estop":
            f.estop()
        elif event == "reset":
            f.reset_estop()
        out = f(action, cur, None if ts_offset is None else clock.t + ts_offset)
        assert out.shape == (3,) and out.dtype == np.float64
        assert np.isfinite(out).all(), (action, cur, out)
        if limited:
            assert ((out >= lower) & (out <= upper)).all(), (action, cur, out)
            inside = (cur >= lower) & (cur <= upper)
        else:
            inside = np.ones(3, bool)
        if inside.all():  # the step rules hold whenever the robot is where it may be
            n_inside += 1
            with np.errstate(over="ignore"):
                tol = 4 * np.spacing(np.abs(cur)) + 1e-12
            assert (np.abs(out - cur) <= step_bound + tol).all(), (action, cur, out, step_bound)
    s = f.stats()
    assert s["ticks"] == len(steps) and all(v >= 0 for v in s.values())
    hypothesis.event(f"robot inside the limits: {n_inside > 0}")


# ------------------------------------------------------------------------------------------------
# SafeRobot: the filter in front of a driver


def test_safe_robot_closed_loop_returns_what_was_really_sent():
    mock = MockRobot(MockRobotConfig(state_dim=2, dynamics="position", cameras=[]))
    robot = SafeRobot(mock, SafetyConfig(lower=[-1.0], upper=[1.0], max_step=[0.25]))
    with robot:
        outs = []
        for _ in range(6):
            robot.get_observation()
            outs.append(robot.send_action([5.0, -0.5]))
        np.testing.assert_allclose(outs[-1], [1.0, -0.5])
        np.testing.assert_allclose(outs[0], [0.25, -0.25])
        np.testing.assert_array_equal(np.stack(outs), mock.actions)  # the return value is the record
        held = robot.send_action([np.nan, 0.0])  # reads a fresh state itself: holds where the arm is
        np.testing.assert_array_equal(held, [1.0, -0.5])
        robot.estop()
        np.testing.assert_array_equal(robot.send_action([0.0, 0.0]), [1.0, -0.5])
    s = robot.stats()
    assert s["nonfinite"] == 1 and s["estop"] == 1 and s["max_step"] >= 3 and s["position_limit"] == 6
    with pytest.raises(RobotNotConnectedError):
        robot.send_action([0.0, 0.0])


def test_safe_robot_needs_state_indices_when_dims_differ():
    mock = MockRobot(MockRobotConfig(state_dim=4, action_dim=2, cameras=[]))
    with pytest.raises(ValueError, match="pass state_indices"):
        SafeRobot(mock)
    robot = SafeRobot(mock, SafetyConfig(max_step=[0.1]), state_indices=[2, 3])
    with robot:
        np.testing.assert_allclose(robot.send_action([1.0, 1.0]), [0.1, 0.1])
