"""Robots: the `Robot` contract, drivers (`mock`, `lerobot`) and the safety layer.

Importing the package registers the built-in drivers under ``--robot.type``; it imports no
hardware library (lerobot and the servo SDKs load only when a `lerobot` driver is built).
"""
from robots.base import (
    Robot,
    RobotAlreadyConnectedError,
    RobotConfig,
    RobotNotConnectedError,
    make_robot,
    robot_names,
)
from robots.lerobot_driver import LeRobotArm, LeRobotArmConfig
from robots.mock import MockRobot, MockRobotConfig
from robots.safety import SafeRobot, SafetyConfig, SafetyFilter

__all__ = [
    "Robot", "RobotConfig", "RobotNotConnectedError", "RobotAlreadyConnectedError", "make_robot", "robot_names",
    "MockRobot", "MockRobotConfig", "LeRobotArm", "LeRobotArmConfig", "SafeRobot", "SafetyConfig", "SafetyFilter",
]
