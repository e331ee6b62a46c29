"""`mock`: a robot in memory that records every command it receives.

It stands in for an arm in tests and dry runs of the deploy loop: the loop can be checked end to
end (rates, what was sent, when) with no hardware. Optional dynamics make a closed loop move:

* ``none``: the state never changes (a robot with its motors off).
* ``position``: the state jumps to the commanded position (an ideal position servo, like the
  LeRobot arms whose action is a goal position).
* ``integrate``: ``state += action * dt`` (the action is a velocity).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from robots.base import IMAGE_PREFIX, STATE_KEY, Robot, RobotConfig
from vla.registry import lookup

_DYNAMICS = ("none", "position", "integrate")
_IMAGE_MODES = ("random", "constant")


@RobotConfig.register_subclass("mock")
@dataclass
class MockRobotConfig(RobotConfig):
    state_dim: int = 6
    action_dim: int | None = None  # None = state_dim
    cameras: list[str] = field(default_factory=lambda: ["cam0"])
    image_height: int = 64
    image_width: int = 64
    image_mode: str = "random"  # random | constant
    image_value: int = 128  # pixel value of "constant" images
    dynamics: str = "none"  # none | position | integrate
    dt: float = 0.1  # seconds per step of the "integrate" dynamics
    initial_state: list[float] | None = None  # None = zeros
    seed: int = 0

    def build(self) -> "MockRobot":
        return MockRobot(self)


class MockRobot(Robot):
    def __init__(self, config: MockRobotConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or MockRobotConfig()
        lookup("mock robot dynamics", dict.fromkeys(_DYNAMICS), cfg.dynamics)
        lookup("mock robot image_mode", dict.fromkeys(_IMAGE_MODES), cfg.image_mode)
        if cfg.state_dim < 1:
            raise ValueError(f"MockRobotConfig.state_dim must be >= 1, received {cfg.state_dim}")
        self._action_dim = cfg.state_dim if cfg.action_dim is None else cfg.action_dim
        if self._action_dim < 1:
            raise ValueError(f"MockRobotConfig.action_dim must be >= 1, received {self._action_dim}")
        if cfg.dynamics != "none" and self._action_dim != cfg.state_dim:
            raise ValueError(f"MockRobotConfig: dynamics={cfg.dynamics!r} needs action_dim == state_dim, "
                             f"received action_dim={self._action_dim}, state_dim={cfg.state_dim}")
        if cfg.initial_state is not None and len(cfg.initial_state) != cfg.state_dim:
            raise ValueError(f"MockRobotConfig.initial_state has {len(cfg.initial_state)} values, "
                             f"expected state_dim={cfg.state_dim}")
        if not 0 <= cfg.image_value <= 255:
            raise ValueError(f"MockRobotConfig.image_value must be in [0, 255], received {cfg.image_value}")
        self.state = np.zeros(cfg.state_dim, dtype=np.float64)
        # (timestamp from time.monotonic(), action really sent) for every send_action call
        self.sent: list[tuple[float, np.ndarray]] = []
        self.n_observations = 0
        self.n_connects = 0
        self._rng = np.random.default_rng(cfg.seed)

    @property
    def observation_features(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        feats: dict[str, tuple[int, ...]] = {STATE_KEY: (c.state_dim,)}
        for cam in c.cameras:
            feats[IMAGE_PREFIX + cam] = (c.image_height, c.image_width, 3)
        return feats

    @property
    def action_names(self) -> list[str]:
        return [f"joint_{i}" for i in range(self._action_dim)]

    def _connect(self) -> None:
        # A fresh connection starts from the initial state, like an arm powered up at rest.
        init = self.config.initial_state
        self.state = np.zeros(self.config.state_dim) if init is None else np.asarray(init, dtype=np.float64)
        self.n_connects += 1

    def _disconnect(self) -> None:
        pass  # nothing to release; the recordings stay readable after disconnect

    def _get_observation(self) -> dict[str, np.ndarray]:
        c = self.config
        obs: dict[str, np.ndarray] = {STATE_KEY: self.state.astype(np.float32)}
        shape = (c.image_height, c.image_width, 3)
        for cam in c.cameras:
            if c.image_mode == "random":
                obs[IMAGE_PREFIX + cam] = self._rng.integers(0, 256, size=shape, dtype=np.uint8)
            else:
                obs[IMAGE_PREFIX + cam] = np.full(shape, c.image_value, dtype=np.uint8)
        self.n_observations += 1
        return obs

    def _send_action(self, action: np.ndarray) -> np.ndarray:
        self.sent.append((time.monotonic(), action.copy()))
        if self.config.dynamics == "position":
            self.state = action.copy()
        elif self.config.dynamics == "integrate":
            self.state = self.state + action * self.config.dt
        return action

    # ----- recordings -----------------------------------------------------------------------
    @property
    def actions(self) -> np.ndarray:
        """Every action sent so far, (N, A) float64."""
        return np.stack([a for _, a in self.sent]) if self.sent else np.zeros((0, self._action_dim))

    @property
    def timestamps(self) -> np.ndarray:
        """When each action was sent (time.monotonic seconds), (N,)."""
        return np.array([t for t, _ in self.sent], dtype=np.float64)
