"""Robots: the `Robot` contract, drivers (`mock`, `lerobot`, `metaworld`), the safety layer, the policy
server and its light client.

Two kinds of users import this package, so it imports nothing by itself:

* the robot computer imports `robots.client` (numpy, msgpack, websockets only: no torch, no ``vla``);
* everything else uses the drivers: ``from robots import make_robot, SafeRobot`` loads them on first
  use, and importing `robots.base` (directly or through any of these names) registers the built-in
  drivers under ``--robot.type``. No hardware library is imported (lerobot and the servo SDKs load only
  when a `lerobot` driver is built; MuJoCo only inside a `metaworld` robot's simulator process).
"""
from __future__ import annotations

import importlib
from typing import Any

# The built-in drivers: importing each registers its config with RobotConfig.
BUILTIN_DRIVERS = ("robots.mock", "robots.lerobot_driver", "robots.metaworld_robot")

_EXPORTS = {
    **dict.fromkeys(["Robot", "RobotConfig", "RobotNotConnectedError", "RobotAlreadyConnectedError", "make_robot",
                     "robot_names"], "robots.base"),
    "MockRobot": "robots.mock", "MockRobotConfig": "robots.mock",
    "LeRobotArm": "robots.lerobot_driver", "LeRobotArmConfig": "robots.lerobot_driver",
    "MetaWorldRobot": "robots.metaworld_robot", "MetaWorldRobotConfig": "robots.metaworld_robot",
    "SafeRobot": "robots.safety", "SafetyConfig": "robots.safety", "SafetyFilter": "robots.safety",
    "PolicyClient": "robots.client", "ServerError": "robots.client",
}
__all__ = [*sorted(_EXPORTS), "register_builtin_drivers"]  # noqa: PLE0605


def register_builtin_drivers() -> None:
    """Import the built-in drivers (idempotent). `robots.base` calls it at the end of its import."""
    for name in BUILTIN_DRIVERS:
        importlib.import_module(name)


def __getattr__(name: str) -> Any:  # PEP 562: the exports load on first access
    if name not in _EXPORTS:
        raise AttributeError(f"module 'robots' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
