"""`lerobot`: real arms through lerobot 0.4.4's robot classes (SO-100/SO-101 followers, Koch, ...).

Users already own and calibrate these arms with lerobot (``lerobot-calibrate``), so we reuse its
classes rather than talk to the servos ourselves; this driver only translates between lerobot's
per-motor dicts and our vectors:

* observation ``{"shoulder_pan.pos": 1.5, ..., "top": (H, W, 3) uint8}`` ->
  ``{"observation.state": (S,) float32 in motor order, "observation.images.top": (H, W, 3) uint8}``
* action vector (A,) -> ``{"shoulder_pan.pos": a[0], ...}``, and lerobot's returned dict (what it
  really sent after its own ``max_relative_target`` clipping) back to a vector.

The serial SDKs (Feetech for SO arms, Dynamixel for Koch/OMX) are optional: a missing one gives an
ImportError that says what to install. lerobot is imported only inside functions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from robots.base import IMAGE_PREFIX, STATE_KEY, Robot, RobotConfig

# lerobot robot type -> (python module of its servo SDK, lerobot extra, what the SDK is)
_SDKS = {
    "so100_follower": ("scservo_sdk", "feetech", "Feetech servo SDK"),
    "so101_follower": ("scservo_sdk", "feetech", "Feetech servo SDK"),
    "koch_follower": ("dynamixel_sdk", "dynamixel", "Dynamixel SDK"),
    "omx_follower": ("dynamixel_sdk", "dynamixel", "Dynamixel SDK"),
}
# Modules whose import registers lerobot's robot / camera config classes with draccus.
_LEROBOT_ROBOT_MODULES = ("so_follower", "koch_follower", "omx_follower")
_LEROBOT_CAMERA_MODULES = ("opencv", "realsense")


@RobotConfig.register_subclass("lerobot")
@dataclass
class LeRobotArmConfig(RobotConfig):
    robot: str = "so101_follower"  # lerobot robot type: so100_follower | so101_follower | koch_follower | ...
    port: str = "/dev/ttyACM0"
    id: str | None = None  # lerobot's robot id: names the calibration file <calibration_dir>/<id>.json
    calibration_dir: str | None = None  # None = lerobot's default (~/.cache/huggingface/lerobot/calibration)
    # camera name -> lerobot camera config, e.g.
    # {"top": {"type": "opencv", "index_or_path": 0, "width": 640, "height": 480, "fps": 30}}
    cameras: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Extra fields of lerobot's robot config (e.g. {"use_degrees": true, "max_relative_target": 10}).
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self) -> "LeRobotArm":
        return LeRobotArm(self)

    def lerobot_config(self) -> Any:
        """The equivalent lerobot ``RobotConfig`` (draccus-decoded, so lerobot validates it)."""
        import importlib

        import draccus
        from lerobot.robots.config import RobotConfig as LRConfig

        for m in _LEROBOT_ROBOT_MODULES:
            importlib.import_module(f"lerobot.robots.{m}")
        for m in _LEROBOT_CAMERA_MODULES:
            try:
                importlib.import_module(f"lerobot.cameras.{m}")
            except ImportError:  # realsense needs pyrealsense2; opencv cameras still work
                pass
        from vla.registry import choice_class

        choice_class("lerobot robot", LRConfig, self.robot)  # clear error with the known names
        data: dict[str, Any] = {"type": self.robot, "port": self.port, "id": self.id, **self.extra}
        if self.calibration_dir is not None:
            data["calibration_dir"] = self.calibration_dir
        if self.cameras:
            data["cameras"] = self.cameras
        return draccus.decode(LRConfig, data)


def sdk_install_hint(robot_type: str) -> str | None:
    """What to pip-install for the servo SDK of ``robot_type`` (None when it needs no known SDK).

    The requirement is read from the installed lerobot's own metadata (its ``feetech`` /
    ``dynamixel`` extras), so the version range matches the lerobot in this environment."""
    if robot_type not in _SDKS:
        return None
    _, extra, what = _SDKS[robot_type]
    req = {"feetech": "feetech-servo-sdk>=1.0.0,<2.0.0", "dynamixel": "dynamixel-sdk>=3.7.31,<3.9.0"}[extra]
    try:
        import importlib.metadata as md

        for r in md.requires("lerobot") or []:
            spec, _, marker = r.partition(";")
            if f'extra == "{extra}"' in marker and "lerobot" not in spec:
                req = spec.strip().replace(" ", "")
    except Exception:  # lerobot metadata missing: keep the known requirement
        pass
    return (f"lerobot robot {robot_type!r} needs the {what}, which is not installed: "
            f"pip install '{req}'  (lerobot's '{extra}' extra)")


def _check_sdk(robot_type: str) -> None:
    import importlib.util

    if robot_type in _SDKS and importlib.util.find_spec(_SDKS[robot_type][0]) is None:
        raise ImportError(sdk_install_hint(robot_type))


class LeRobotArm(Robot):
    """Drives a lerobot robot. ``robot=`` injects an already-built lerobot robot (or any object
    with its interface: ``observation_features``, ``action_features``, ``is_connected``,
    ``connect(calibrate)``, ``disconnect()``, ``get_observation()``, ``send_action(dict)``)."""

    def __init__(self, config: LeRobotArmConfig | None = None, robot: Any | None = None) -> None:
        super().__init__()
        self.config = config or LeRobotArmConfig()
        if robot is None:
            robot = self._make_lerobot_robot()
        self.robot = robot
        feats = dict(robot.observation_features)
        # lerobot marks scalar features with a type (float) and arrays with a shape tuple.
        self._state_keys = [k for k, v in feats.items() if not isinstance(v, tuple)]
        self._camera_keys = [k for k, v in feats.items() if isinstance(v, tuple)]
        self._camera_shapes = {k: tuple(int(d) for d in feats[k]) for k in self._camera_keys}
        self._action_keys = list(robot.action_features)
        if not self._action_keys:
            raise ValueError(f"lerobot robot {type(robot).__name__} declares no action features")
        for k, shape in self._camera_shapes.items():
            if len(shape) != 3 or shape[2] != 3:
                raise ValueError(f"lerobot camera {k!r} declares shape {shape}, expected (H, W, 3)")

    def _make_lerobot_robot(self) -> Any:
        _check_sdk(self.config.robot)
        from lerobot.robots import make_robot_from_config

        try:
            return make_robot_from_config(self.config.lerobot_config())
        except ModuleNotFoundError as e:  # an SDK we do not know about
            raise ImportError(sdk_install_hint(self.config.robot) or
                              f"lerobot robot {self.config.robot!r} needs module {e.name!r}: pip install it") from e

    @property
    def name(self) -> str:
        return f"LeRobotArm[{getattr(self.robot, 'name', type(self.robot).__name__)}]"

    @property
    def observation_features(self) -> dict[str, tuple[int, ...]]:
        feats: dict[str, tuple[int, ...]] = {STATE_KEY: (len(self._state_keys),)}
        for k in self._camera_keys:
            feats[IMAGE_PREFIX + k] = self._camera_shapes[k]
        return feats

    @property
    def state_names(self) -> list[str]:
        """lerobot observation keys in ``observation.state`` order (e.g. ``shoulder_pan.pos``)."""
        return list(self._state_keys)

    @property
    def action_names(self) -> list[str]:
        return list(self._action_keys)

    def _connect(self) -> None:
        # calibrate=True: lerobot loads <calibration_dir>/<id>.json, or asks the user to calibrate.
        self.robot.connect(calibrate=True)

    def _disconnect(self) -> None:
        if self.robot.is_connected:
            self.robot.disconnect()

    def _get_observation(self) -> dict[str, np.ndarray]:
        raw = self.robot.get_observation()
        missing = [k for k in self._state_keys + self._camera_keys if k not in raw]
        if missing:
            raise RuntimeError(f"{self.name}: lerobot observation lacks keys {missing}; received {sorted(raw)}")
        state = np.array([float(raw[k]) for k in self._state_keys], dtype=np.float32)
        obs = {STATE_KEY: state}
        for k in self._camera_keys:
            obs[IMAGE_PREFIX + k] = to_hwc_uint8(raw[k], self._camera_shapes[k], f"{self.name} camera {k!r}")
        return obs

    def _send_action(self, action: np.ndarray) -> np.ndarray:
        cmd = {k: float(v) for k, v in zip(self._action_keys, action)}
        sent = self.robot.send_action(cmd)
        missing = [k for k in self._action_keys if k not in sent]
        if missing:
            raise RuntimeError(f"{self.name}: lerobot send_action returned no value for {missing}; "
                               f"received keys {sorted(sent)}")
        return np.array([float(sent[k]) for k in self._action_keys], dtype=np.float64)


def to_hwc_uint8(img: Any, shape: tuple[int, ...], who: str) -> np.ndarray:
    """A camera frame as (H, W, 3) uint8. lerobot's cameras already give HWC uint8 RGB; a CHW
    frame is transposed and a float frame in [0, 1] is scaled, anything else is an error."""
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[2] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.shape != tuple(shape):
        raise RuntimeError(f"{who}: frame has shape {arr.shape}, expected {tuple(shape)} (H, W, 3)")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
            raise RuntimeError(f"{who}: float frame must be finite and in [0, 1], "
                               f"received range [{np.nanmin(arr)}, {np.nanmax(arr)}]")
        return np.round(arr * 255.0).astype(np.uint8)
    raise RuntimeError(f"{who}: frame dtype {arr.dtype} not supported, expected uint8 (or float in [0, 1])")
