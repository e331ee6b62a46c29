"""One MetaWorld task as a LeRobot-keyed environment, with fast offscreen rendering.

Observations are dicts with the keys of the generated datasets, so a policy sees in closed loop
exactly what it was trained on:

    observation.images.<cam>        (S, S, 3) uint8, upright
    observation.state               (4,) float32: hand xyz + gripper opening (obs[:4])
    observation.environment_state   (39,) float32: MetaWorld's full observation (goal included)
    task                            the instruction string

Rendering: MuJoCo's default offscreen renderer (shadows, reflections, 4x MSAA) runs ~11 fps at 128 px
on a CPU (Mesa llvmpipe); with those off it runs 100-150 fps (measured in ENVIRONMENT.md).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from .tasks import INSTRUCTIONS

DEFAULT_CAMERA = "corner2"
# A second view from above: it resolves the depth along corner2's view ray, which one camera cannot
# (failed reaches of a one-camera baseline ended 10-12 cm off, mostly along that ray).
DEFAULT_SECOND_CAMERA = "topview"
CAMERAS = ("corner2", "topview", "corner", "corner3", "corner4", "behindGripper", "gripperPOV")
# corner2 moved close to the table (same pose as MetaWorld's corner4, and as LeRobot's MetaWorld
# datasets): at 128 px the goal markers are only a few pixels wide from corner2's default pose.
_CLOSE_UP = {"corner2": (0.75, 0.075, 0.7)}
# The corner cameras are mounted upside down: their images are flipped on both axes.
_FLIPPED = {"corner", "corner2", "corner3", "corner4"}
STATE_DIM, ENV_STATE_DIM, ACTION_DIM = 4, 39, 4


def set_gl_backend() -> None:
    # MuJoCo picks its GL backend when first imported: EGL renders headless with Mesa, no X server.
    os.environ.setdefault("MUJOCO_GL", "egl")
    if os.environ["MUJOCO_GL"] in ("egl", "osmesa"):
        os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])


def check_cameras(cameras: Sequence[str]) -> tuple[str, ...]:
    cams = tuple(cameras)
    bad = [c for c in cams if c not in CAMERAS]
    if not cams or bad or len(set(cams)) != len(cams):
        raise ValueError(f"cameras: expected 1+ distinct names from {CAMERAS}, received {cams!r}")
    return cams


class MetaWorldEnv:
    """A MetaWorld task with LeRobot-keyed observations; `set_variation` picks the configuration."""

    def __init__(self, task: str, cameras: Sequence[str] = (DEFAULT_CAMERA,), image_size: int = 128):
        if task not in INSTRUCTIONS:
            raise ValueError(f"task: unknown MetaWorld task {task!r}")
        if not 16 <= int(image_size) <= 1024:
            raise ValueError(f"image_size: expected 16..1024 pixels, received {image_size}")
        set_gl_backend()
        import mujoco

        self.task, self.instruction = task, INSTRUCTIONS[task]
        self.cameras, self.image_size = check_cameras(cameras), int(image_size)
        self.env = _ENV_CLASSES()[task]()
        self.max_path_length = int(self.env.max_path_length)
        model = self.env.model
        for cam, pos in _CLOSE_UP.items():
            if cam in self.cameras:
                model.cam_pos[model.camera(cam).id] = pos
        model.vis.quality.offsamples = 0  # no MSAA; must be set before the renderer is created
        self._renderer = mujoco.Renderer(model, self.image_size, self.image_size)
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self._has_variation = False

    def set_variation(self, variation: Any) -> None:
        """`variation`: a `metaworld.Task` of this env's task (see tasks.variations)."""
        if getattr(variation, "env_name", None) != self.task:
            raise ValueError(
                f"variation: expected a metaworld.Task for {self.task!r}, "
                f"received one for {getattr(variation, 'env_name', type(variation).__name__)!r}"
            )
        self.env.set_task(variation)
        self._has_variation = True

    def render(self) -> dict[str, np.ndarray]:
        images = {}
        for cam in self.cameras:
            self._renderer.update_scene(self.env.data, camera=cam)
            img = self._renderer.render()
            if cam in _FLIPPED:
                img = img[::-1, ::-1]
            images[cam] = np.ascontiguousarray(img)
        return images

    def _observation(self, env_obs: np.ndarray) -> dict[str, Any]:
        env_obs = np.asarray(env_obs, dtype=np.float32)
        obs: dict[str, Any] = {f"observation.images.{c}": img for c, img in self.render().items()}
        obs["observation.state"] = env_obs[:STATE_DIM].copy()
        obs["observation.environment_state"] = env_obs
        obs["task"] = self.instruction
        return obs

    def reset(self) -> dict[str, Any]:
        if not self._has_variation:
            raise RuntimeError(f"{self.task}: call set_variation(...) before reset()")
        import mujoco

        env_obs, _ = self.env.reset()
        # MetaWorld moves the goal marker in the model during reset but refreshes the rendered
        # positions only inside step(); without this the first frame shows the previous episode's goal.
        mujoco.mj_forward(self.env.model, self.env.data)
        return self._observation(env_obs)

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], bool, bool]:
        """action (4,) in [-1, 1] -> (observation, success, truncated at MetaWorld's 500 steps)."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,) or not np.isfinite(action).all():
            raise ValueError(f"action: expected 4 finite values, received {action!r}")
        env_obs, _reward, _terminated, truncated, info = self.env.step(np.clip(action, -1.0, 1.0))
        return self._observation(env_obs), bool(info["success"]), bool(truncated)

    def close(self) -> None:
        # Free the GL context explicitly: left to the garbage collector at interpreter exit, EGL
        # teardown prints spurious errors.
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self.env.close()


def _ENV_CLASSES() -> dict[str, type]:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return ALL_V3_ENVIRONMENTS
