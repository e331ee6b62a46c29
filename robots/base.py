"""The `Robot` contract every driver implements, and the `RobotConfig` registry of drivers.

Shaped like LeRobot's robots (connect / disconnect / get_observation / send_action, a context
manager), but speaking arrays instead of per-motor dicts: observations use LeRobot's dataset keys
(``observation.state`` (S,) float32, ``observation.images.<cam>`` (H, W, 3) uint8) so a policy
trained on a LeRobot dataset reads them directly, and an action is one vector (A,).

`send_action` returns what was REALLY sent (after clipping by the driver or the safety layer):
that is what a recorder must log, not what the policy asked for.

Drivers register a config with ``@RobotConfig.register_subclass("name")``; ``--robot.type=name``
then selects it from the command line, and ``cfg.build()`` makes the driver.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import draccus
import numpy as np

from vla.config import register_choice_field
from vla.registry import choice_class, choice_names

STATE_KEY = "observation.state"
IMAGE_PREFIX = "observation.images."
ACTION_KEY = "action"


class RobotNotConnectedError(RuntimeError):
    """A method that talks to the robot was called before `connect()` (or after `disconnect()`)."""


class RobotAlreadyConnectedError(RuntimeError):
    """`connect()` was called on a robot that is already connected."""


@dataclass
class RobotConfig(draccus.ChoiceRegistry):
    """Base of all driver configs. Subclasses implement ``build() -> Robot``."""

    def build(self) -> "Robot":  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.build")

    @property
    def type(self) -> str:
        return self.get_choice_name(type(self))


def robot_names() -> list[str]:
    """Names of the registered drivers (``--robot.type`` values)."""
    import robots  # noqa: F401  (importing the package registers the built-in drivers)

    return choice_names(RobotConfig)


def make_robot(cfg: RobotConfig | str, **fields: Any) -> "Robot":
    """Build a driver from its config, or from its registered name plus config fields.

    ``make_robot("mock", state_dim=3)``; an unknown name lists the known ones (did-you-mean).
    """
    if isinstance(cfg, str):
        import robots  # noqa: F401

        cfg = choice_class("robot", RobotConfig, cfg)(**fields)
    elif fields:
        raise TypeError("make_robot: pass config fields only together with a driver name")
    return cfg.build()


class Robot(abc.ABC):
    """A robot the control loop drives. Subclasses implement the underscored hooks; the public
    methods check the connection state and the shapes so every driver fails the same clear way."""

    def __init__(self) -> None:
        self._connected = False

    # ----- what the robot looks like (valid before connect) -----------------------------------
    @property
    @abc.abstractmethod
    def observation_features(self) -> dict[str, tuple[int, ...]]:
        """Observation key -> shape, e.g. ``{"observation.state": (6,),
        "observation.images.top": (480, 640, 3)}``."""

    @property
    @abc.abstractmethod
    def action_names(self) -> list[str]:
        """One name per action dimension, in vector order (motor names for arms)."""

    @property
    def action_dim(self) -> int:
        return len(self.action_names)

    @property
    def action_features(self) -> dict[str, tuple[int, ...]]:
        return {ACTION_KEY: (self.action_dim,)}

    @property
    def cameras(self) -> list[str]:
        return [k[len(IMAGE_PREFIX):] for k in self.observation_features if k.startswith(IMAGE_PREFIX)]

    # ----- driver hooks -------------------------------------------------------------------------
    @abc.abstractmethod
    def _connect(self) -> None: ...

    @abc.abstractmethod
    def _disconnect(self) -> None: ...

    @abc.abstractmethod
    def _get_observation(self) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def _send_action(self, action: np.ndarray) -> np.ndarray:
        """Send a checked, finite (A,) float64 vector; return what was really sent (A,)."""

    # ----- public contract ----------------------------------------------------------------------
    @property
    def is_connected(self) -> bool:
        return self._connected

    def connect(self) -> None:
        if self._connected:
            raise RobotAlreadyConnectedError(f"{self.name}: connect() called but the robot is already connected")
        self._connect()
        self._connected = True

    def disconnect(self) -> None:
        """Release the robot. Safe to call when not connected, so cleanup in ``finally`` blocks
        never hides the error that got us there."""
        if not self._connected:
            return
        try:
            self._disconnect()
        finally:
            self._connected = False

    def __enter__(self) -> "Robot":
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()

    @property
    def name(self) -> str:
        return type(self).__name__

    def _require_connected(self, method: str) -> None:
        if not self._connected:
            raise RobotNotConnectedError(
                f"{self.name}.{method}() called before connect(); use `with robot:` or call robot.connect() first"
            )

    def get_observation(self) -> dict[str, np.ndarray]:
        """Read the robot: ``observation.state`` (S,) float32 and ``observation.images.<cam>``
        (H, W, 3) uint8, exactly the keys and shapes of `observation_features`."""
        self._require_connected("get_observation")
        obs = self._get_observation()
        check_observation(obs, self.observation_features, self.name)
        return obs

    def send_action(self, action: np.ndarray) -> np.ndarray:
        """Command the robot with an (A,) vector; returns the (A,) command really sent.

        A driver never forwards NaN/inf: wrap it in `robots.safety.SafeRobot` to turn a broken
        action into "hold the current position" instead of an error."""
        self._require_connected("send_action")
        a = check_action(action, self.action_dim, self.name)
        sent = np.asarray(self._send_action(a), dtype=np.float64)
        if sent.shape != (self.action_dim,):
            raise RuntimeError(f"{self.name}: driver reported a sent action of shape {sent.shape}, "
                               f"expected ({self.action_dim},)")
        return sent


def check_action(action: Any, dim: int, who: str = "robot") -> np.ndarray:
    """Validate an action vector: numeric, shape (dim,), finite. Returns it as float64."""
    arr = np.asarray(action)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{who}.send_action: action must be a numeric array, received dtype {arr.dtype}")
    if arr.shape != (dim,):
        raise ValueError(f"{who}.send_action: action has shape {arr.shape}, expected ({dim},)")
    arr = arr.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{who}.send_action: action has NaN/inf at indices {bad.tolist()} (received {arr.tolist()}); "
                         "wrap the robot in robots.safety.SafeRobot to hold position instead")
    return arr


def check_observation(obs: dict[str, np.ndarray], features: dict[str, tuple[int, ...]], who: str = "robot") -> None:
    """Check an observation has exactly the declared keys and shapes (catches driver bugs early,
    before a policy silently reads a wrongly shaped image)."""
    missing = sorted(set(features) - set(obs))
    extra = sorted(set(obs) - set(features))
    if missing or extra:
        raise RuntimeError(f"{who}: observation keys differ from observation_features: "
                           f"missing {missing}, unexpected {extra}")
    for k, shape in features.items():
        got = np.shape(obs[k])
        if tuple(got) != tuple(shape):
            raise RuntimeError(f"{who}: observation {k!r} has shape {tuple(got)}, expected {tuple(shape)}")


# `--robot.type=...` on the command line is checked against the registered names.
register_choice_field("robot", RobotConfig)

# Whoever reads the RobotConfig registry (``from robots.base import RobotConfig``, draccus parsing
# ``--robot.type``) sees every built-in driver; `robots.client` never imports this module (no torch).
from robots import register_builtin_drivers  # noqa: E402  (after RobotConfig exists: drivers import it)

register_builtin_drivers()
