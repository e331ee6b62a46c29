"""`metaworld`: a MetaWorld task as a `Robot`, so the deploy loop and the policy server can be tried
end to end in simulation before a real arm is plugged in.

    robot = make_robot("metaworld", task="drawer-open-v3", cameras=["corner2"])
    with robot:
        obs = robot.get_observation()      # observation.images.corner2 (128, 128, 3) uint8,
                                           # observation.state (4,), observation.environment_state (39,)
        robot.send_action(np.array([0.1, 0, 0, -1]))   # one simulator step; robot.success, robot.done
        robot.reset_episode()              # the next held-out variation

The simulator runs in its own spawned process. MuJoCo renders through Mesa's software GL, which loads
its own LLVM; importing triton (which torch pulls in lazily) after that segfaults on the clashing
symbols (benchmarks/metaworld/workers.py). A robot lives next to a policy that may import torch at any
time, so the simulator gets a clean process that imports triton first, exactly like the evaluation
workers. It also matches a real robot: the simulator's time advances only when an action arrives.

Actions are MetaWorld's: (4,) in [-1, 1], a hand displacement (x, y, z) and a gripper effort. They are
relative, so holding still is "zero displacement, same grip" (`hold_action`), not "go to the current
state" as for a position-controlled arm. Episodes come from the evaluation variations
(benchmarks/metaworld/tasks.py), never seen in training data.
"""
from __future__ import annotations

import multiprocessing as mp
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from robots.base import IMAGE_PREFIX, STATE_KEY, Robot, RobotConfig

ENV_STATE_KEY = "observation.environment_state"
STATE_DIM, ENV_STATE_DIM, ACTION_DIM = 4, 39, 4  # as benchmarks/metaworld/env.py (not imported here)


@RobotConfig.register_subclass("metaworld")
@dataclass
class MetaWorldRobotConfig(RobotConfig):
    task: str = "reach-v3"
    cameras: list[str] = field(default_factory=lambda: ["corner2"])
    image_size: int = 128
    split: str = "eval"  # which variations episodes use: eval (held out from training data) | train
    variation: int = 0  # index of the first episode's variation; each reset_episode() takes the next
    seed: int = 0  # run seed: which variations, in what order (benchmarks/metaworld/tasks.py)
    fps: float = 20.0  # control rate the deploy loop keeps (the simulator steps once per action)
    max_steps: int = 500  # MetaWorld truncates its episodes here
    start_timeout_s: float = 120.0  # starting the simulator process (imports MuJoCo, loads the model)

    def build(self) -> "MetaWorldRobot":
        return MetaWorldRobot(self)


class MetaWorldRobot(Robot):
    def __init__(self, config: MetaWorldRobotConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or MetaWorldRobotConfig()
        if cfg.split not in ("eval", "train"):
            raise ValueError(f"MetaWorldRobotConfig.split: expected 'eval' or 'train', received {cfg.split!r}")
        if not cfg.cameras or len(set(cfg.cameras)) != len(cfg.cameras):
            raise ValueError(f"MetaWorldRobotConfig.cameras: expected 1+ distinct names, received {cfg.cameras}")
        if not 16 <= cfg.image_size <= 1024:
            raise ValueError(f"MetaWorldRobotConfig.image_size: expected 16..1024, received {cfg.image_size}")
        if not cfg.fps > 0 or cfg.variation < 0:
            raise ValueError(f"MetaWorldRobotConfig: fps must be > 0 and variation >= 0, received "
                             f"fps={cfg.fps}, variation={cfg.variation}")
        self._proc: Any = None
        self._conn: Any = None
        self._obs: dict[str, np.ndarray] | None = None
        self.instruction = ""  # the task's instruction, known once connected
        self.episode = -1
        self.steps = 0
        self.success = False  # MetaWorld's info["success"] at any step of this episode
        self.truncated = False
        self._grip = -1.0  # last gripper command: hold_action keeps it

    @property
    def fps(self) -> float:
        return float(self.config.fps)

    @property
    def observation_features(self) -> dict[str, tuple[int, ...]]:
        s = self.config.image_size
        feats: dict[str, tuple[int, ...]] = {IMAGE_PREFIX + c: (s, s, 3) for c in self.config.cameras}
        feats[STATE_KEY] = (STATE_DIM,)
        feats[ENV_STATE_KEY] = (ENV_STATE_DIM,)
        return feats

    @property
    def action_names(self) -> list[str]:
        return ["dx", "dy", "dz", "gripper"]

    @property
    def done(self) -> bool:
        """The episode is over: success, MetaWorld's truncation, or ``max_steps`` actions."""
        return self.success or self.truncated or self.steps >= self.config.max_steps

    def hold_action(self, obs: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The command that keeps the arm still: no displacement, the same gripper command."""
        return np.array([0.0, 0.0, 0.0, self._grip])

    # ----- driver hooks -------------------------------------------------------------------------
    def _connect(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        cfg = self.config
        args = dict(task=cfg.task, cameras=list(cfg.cameras), image_size=cfg.image_size, split=cfg.split,
                    seed=cfg.seed)
        self._proc = ctx.Process(target=_simulator_main, args=(child, args), name=f"metaworld-{cfg.task}",
                                 daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        try:
            self.instruction = self._call("hello", None, timeout=cfg.start_timeout_s)
            self.episode = cfg.variation - 1
            self._reset()
        except BaseException:
            self._stop_process()
            raise

    def _disconnect(self) -> None:
        self._stop_process()

    def _get_observation(self) -> dict[str, np.ndarray]:
        # The simulator's state changes only when an action is applied: the latest observation is current.
        return {k: v.copy() for k, v in self._obs.items()}

    def _send_action(self, action: np.ndarray) -> np.ndarray:
        sent = np.clip(action, -1.0, 1.0)  # what MetaWorld applies
        obs, success, truncated = self._call("step", sent)
        self._obs = obs
        self.steps += 1
        self.success = self.success or success
        self.truncated = truncated
        self._grip = float(sent[3])
        return sent

    # ----- episodes -----------------------------------------------------------------------------
    def reset_episode(self) -> dict[str, np.ndarray]:
        """Start the next episode (the next variation); returns its first observation."""
        self._require_connected("reset_episode")
        self._reset()
        return self.get_observation()

    def _reset(self) -> None:
        self.episode += 1
        self._obs = self._call("reset", self.episode)
        self.steps, self.success, self.truncated, self._grip = 0, False, False, -1.0

    # ----- the simulator process ----------------------------------------------------------------
    def _call(self, cmd: str, arg: Any, timeout: float = 60.0) -> Any:
        if self._conn is None:
            raise RuntimeError(f"{self.name}: the simulator process is not running")
        self._conn.send((cmd, arg))
        if not self._conn.poll(timeout):
            raise TimeoutError(f"{self.name}: the simulator did not answer {cmd!r} within {timeout:.0f}s")
        try:
            status, value = self._conn.recv()
        except EOFError as e:
            code = self._proc.exitcode if self._proc is not None else None
            raise RuntimeError(f"{self.name}: the simulator process died (exit code {code}) during {cmd!r}; "
                               "a crash in MuJoCo or the GL renderer") from e
        if status == "error":
            raise RuntimeError(f"{self.name}: the simulator failed during {cmd!r}:\n{value}")
        return value

    def _stop_process(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(("close", None))
                self._conn.poll(10)
            except (OSError, EOFError):
                pass
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
            self._proc = None


def _simulator_main(conn: Any, args: dict[str, Any]) -> None:
    """The simulator process: answers (command, argument) messages until "close"."""
    from benchmarks.metaworld.workers import init_worker

    init_worker()  # triton before Mesa's LLVM, one thread, EGL (see the module doc)
    env = None
    pool: list[Any] = []
    try:
        while True:
            cmd, arg = conn.recv()
            try:
                if cmd == "close":
                    conn.send(("ok", None))
                    return
                if cmd == "hello":
                    from benchmarks.metaworld.env import MetaWorldEnv

                    env = MetaWorldEnv(args["task"], args["cameras"], args["image_size"])
                    conn.send(("ok", env.instruction))
                elif cmd == "reset":
                    from benchmarks.metaworld.tasks import variations

                    if arg >= len(pool):  # MetaWorld builds 50 variations at a time (~0.5 s): fetch ahead
                        pool = [v for _, _, v in variations(args["task"], args["split"], max(arg + 1, 10),
                                                            args["seed"])]
                    env.set_variation(pool[arg])
                    conn.send(("ok", _robot_obs(env.reset())))
                elif cmd == "step":
                    obs, success, truncated = env.step(arg)
                    conn.send(("ok", (_robot_obs(obs), success, truncated)))
                else:
                    conn.send(("error", f"unknown command {cmd!r}"))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    except (EOFError, KeyboardInterrupt):
        pass  # the robot process went away
    finally:
        if env is not None:
            env.close()


def _robot_obs(obs: dict[str, Any]) -> dict[str, np.ndarray]:
    # The instruction is not an array: the robot exposes it once (`instruction`) instead of every frame.
    return {k: v for k, v in obs.items() if k != "task"}
