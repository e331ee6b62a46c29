"""The safety layer between a policy and a robot driver.

A policy is a neural network: it can emit NaN, jump across the workspace, or stop answering. The
`SafetyFilter` turns whatever it proposes into a command that is always finite and inside the
configured limits, and `SafeRobot` puts it in front of a driver. Rules, in the order applied:

1. e-stop latched (`estop()`)                  -> hold the current position until `reset_estop()`
2. no accepted action within ``timeout_s``     -> hold (the watchdog; also before the first action)
3. action older than ``max_age_s`` (its own timestamp) -> dropped, hold
4. NaN/inf or a non-numeric action             -> hold
5. position limits ``lower``/``upper``          -> clip
6. ``max_step`` per tick from the current position -> clip the step
7. ``max_velocity`` (units/s) times the tick's dt   -> clip the step

"Hold" commands the current position (clipped into the limits). Limits are hard: they win over the
step rules when the robot is found outside them (counted as ``state_outside_limits``). Every
intervention is counted per kind (`stats()`) and logged; holding logs once when it starts, not
every tick.

Timestamps (``submit(..., timestamp=)``) must come from the filter's clock (``time.monotonic`` by
default; pass ``clock=`` to share another).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from robots.base import STATE_KEY, Robot

log = logging.getLogger(__name__)

KINDS = ("estop", "watchdog", "stale", "nonfinite", "position_limit", "max_step", "velocity",
         "state_outside_limits")


@dataclass
class SafetyConfig:
    # Per joint, or one value for all joints; None = no such limit.
    lower: list[float] | None = None  # position limits
    upper: list[float] | None = None
    max_step: list[float] | None = None  # largest change per control tick, relative to the current position
    max_velocity: list[float] | None = None  # units per second; the step bound is max_velocity * dt
    fps: float = 30.0  # control rate: dt = 1 / fps is the longest tick the velocity limit allows for
    max_age_s: float | None = 0.5  # actions whose timestamp is older are dropped
    timeout_s: float | None = 0.5  # watchdog: hold when no action was accepted for this long


def _per_joint(name: str, values: Sequence[float] | float | None, dim: int, positive: bool) -> np.ndarray | None:
    if values is None:
        return None
    arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if arr.ndim != 1 or arr.shape[0] not in (1, dim):
        raise ValueError(f"SafetyConfig.{name} needs 1 or {dim} values, received {np.shape(values)}")
    if np.isnan(arr).any() or (positive and not (arr > 0).all()):
        raise ValueError(f"SafetyConfig.{name} must be {'> 0' if positive else 'not NaN'}, received {arr.tolist()}")
    return np.broadcast_to(arr, (dim,)).copy()


class SafetyFilter:
    """Makes policy actions safe to send. ``submit(action, timestamp)`` when the policy proposes;
    ``tick(current)`` once per control tick returns the (A,) float64 command to send."""

    def __init__(self, dim: int, config: SafetyConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        cfg = config or SafetyConfig()
        if dim < 1:
            raise ValueError(f"SafetyFilter: dim must be >= 1, received {dim}")
        if not cfg.fps > 0:
            raise ValueError(f"SafetyConfig.fps must be > 0, received {cfg.fps}")
        for name in ("max_age_s", "timeout_s"):
            v = getattr(cfg, name)
            if v is not None and not v > 0:
                raise ValueError(f"SafetyConfig.{name} must be > 0 or None, received {v}")
        self.dim, self.config, self.clock = dim, cfg, clock
        self.lower = _per_joint("lower", cfg.lower, dim, False)
        self.upper = _per_joint("upper", cfg.upper, dim, False)
        self.lower = np.full(dim, -np.inf) if self.lower is None else self.lower
        self.upper = np.full(dim, np.inf) if self.upper is None else self.upper
        if (self.lower == np.inf).any() or (self.upper == -np.inf).any():
            raise ValueError(f"SafetyConfig: lower must be < +inf and upper > -inf, received "
                             f"lower {self.lower.tolist()}, upper {self.upper.tolist()}")
        if (self.lower > self.upper).any():
            raise ValueError(f"SafetyConfig: lower {self.lower.tolist()} exceeds upper {self.upper.tolist()}")
        self.max_step = _per_joint("max_step", cfg.max_step, dim, True)
        self.max_velocity = _per_joint("max_velocity", cfg.max_velocity, dim, True)
        self.dt = 1.0 / cfg.fps
        self._lock = threading.Lock()  # estop() may come from another thread (a key handler)
        self._counts: Counter[str] = Counter()
        self._action: np.ndarray | None = None
        self._action_ts: float | None = None
        self._received_at: float | None = None
        self._last_tick: float | None = None
        self._estop = False
        self._holding_reason: str | None = None
        self.n_ticks = 0

    # ----- inputs -------------------------------------------------------------------------------
    def submit(self, action: Any, timestamp: float | None = None) -> bool:
        """Offer a policy action (A,). ``timestamp``: when the observation it answers was taken
        (filter clock); too old -> dropped. Returns whether it was accepted. A wrong shape is a
        programming error and raises; broken values (NaN, inf, non-numeric) are accepted here and
        turned into a hold by `tick`, so the watchdog does not mask them."""
        arr = np.asarray(action)
        if arr.shape != (self.dim,):
            raise ValueError(f"SafetyFilter.submit: action has shape {arr.shape}, expected ({self.dim},)")
        now = self.clock()
        with self._lock:
            if self._is_stale(timestamp, now):
                self._count("stale", f"dropped an action {now - timestamp:.3f}s old (max_age_s={self.config.max_age_s})")
                return False
            self._action, self._action_ts, self._received_at = arr.copy(), timestamp, now
            return True

    def estop(self, reason: str = "") -> None:
        """Latch the emergency stop: every tick holds until `reset_estop()`."""
        with self._lock:
            self._estop = True
            self._action = None  # never resume an action proposed before the stop
        log.warning("safety: E-STOP latched%s", f" ({reason})" if reason else "")

    def reset_estop(self) -> None:
        with self._lock:
            self._estop = False
            self._action = None  # after a reset the robot holds until a fresh action arrives
        log.warning("safety: e-stop reset")

    @property
    def estopped(self) -> bool:
        return self._estop

    # ----- the filter ---------------------------------------------------------------------------
    def tick(self, current: Any) -> np.ndarray:
        """One control tick: the safe command (A,) float64 given the robot's current position (A,)."""
        cur = np.asarray(current, dtype=np.float64)
        if cur.shape != (self.dim,):
            raise ValueError(f"SafetyFilter.tick: current position has shape {cur.shape}, expected ({self.dim},)")
        if not np.isfinite(cur).all():
            # Without a known position there is no safe command to compute: stop the loop loudly.
            raise ValueError(f"SafetyFilter.tick: current position has NaN/inf ({cur.tolist()}); "
                             "the robot's state reading is broken")
        now = self.clock()
        with self._lock:
            dt = self.dt if self._last_tick is None else min(max(now - self._last_tick, 0.0), self.dt)
            self._last_tick = now
            self.n_ticks += 1
            reason = self._hold_reason(now)
            if reason is None:
                target = self._numeric(self._action)
                if target is None:
                    self._count("nonfinite", f"action is not a finite number vector: {self._action!r}")
                    reason = "nonfinite"
            if reason is not None:
                if self._holding_reason != reason:
                    log.warning("safety: holding position (%s)", reason)
                self._holding_reason = reason
                return self._hold(cur)
            if self._holding_reason is not None:
                log.info("safety: resuming policy actions after %s", self._holding_reason)
                self._holding_reason = None
            return self._clamp(target, cur, dt)

    def __call__(self, action: Any, current: Any, timestamp: float | None = None) -> np.ndarray:
        """``submit`` then ``tick``: the one-call form for a loop that has an action every tick."""
        self.submit(action, timestamp)
        return self.tick(current)

    def stats(self) -> dict[str, int]:
        """Interventions per kind (every kind present, 0 if none) plus ``ticks``."""
        with self._lock:
            return {**{k: self._counts[k] for k in KINDS}, "ticks": self.n_ticks}

    # ----- internals ----------------------------------------------------------------------------
    def _count(self, kind: str, msg: str, n: int = 1) -> None:
        self._counts[kind] += n
        log.debug("safety %s: %s", kind, msg)

    def _is_stale(self, timestamp: float | None, now: float) -> bool:
        m = self.config.max_age_s
        if timestamp is None or m is None:
            return False
        ts = float(timestamp)
        return not np.isfinite(ts) or now - ts > m

    def _hold_reason(self, now: float) -> str | None:
        if self._estop:
            self._count("estop", "holding: e-stop latched")
            return "estop"
        t = self.config.timeout_s
        if self._action is None or (t is not None and now - self._received_at > t):
            self._count("watchdog", "holding: no fresh action" + (f" within {t}s" if t is not None else ""))
            return "watchdog"
        if self._is_stale(self._action_ts, now):
            self._count("stale", f"dropped the current action, {now - self._action_ts:.3f}s old")
            self._action = None
            return "stale"
        return None

    @staticmethod
    def _numeric(action: np.ndarray | None) -> np.ndarray | None:
        if action is None or action.dtype.kind not in "biuf":
            return None
        with np.errstate(over="ignore", invalid="ignore"):
            out = action.astype(np.float64)  # float128 / huge ints may overflow to inf: caught below
        return out if np.isfinite(out).all() else None

    def _hold(self, cur: np.ndarray) -> np.ndarray:
        return self._limit(cur.copy(), cur)

    def _limit(self, cmd: np.ndarray, cur: np.ndarray) -> np.ndarray:
        out = np.clip(cmd, self.lower, self.upper)
        if ((cur < self.lower) | (cur > self.upper)).any() and (out != cmd).any():
            self._count("state_outside_limits", f"robot at {cur.tolist()} is outside the limits; command clipped in")
        return out

    def _clamp(self, target: np.ndarray, cur: np.ndarray, dt: float) -> np.ndarray:
        cmd = np.clip(target, self.lower, self.upper)
        if (cmd != target).any():
            self._count("position_limit", f"clipped {target.tolist()} to {cmd.tolist()}")
        if self.max_step is not None or self.max_velocity is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                delta = cmd - cur  # can overflow to +-inf for huge positions; the clip makes it finite
            for kind, bound in (("max_step", self.max_step),
                                ("velocity", None if self.max_velocity is None else self.max_velocity * dt)):
                if bound is None:
                    continue
                clipped = np.clip(delta, -bound, bound)
                if (clipped != delta).any():
                    self._count(kind, f"step {delta.tolist()} clipped to {clipped.tolist()}")
                delta = clipped
            with np.errstate(over="ignore"):
                cmd = cur + delta
        if not np.isfinite(cmd).all():  # last line of defence (overflow near the float64 range)
            self._count("nonfinite", f"computed a non-finite command {cmd.tolist()}")
            return self._hold(cur)
        return self._limit(cmd, cur)


class SafeRobot(Robot):
    """A robot whose every command goes through a `SafetyFilter`.

    The current position is ``observation.state`` (or ``state_indices`` of it, when the state has
    more entries than the action) from the latest `get_observation()`. Each reading is used for one
    command only: if no observation was read since the last command, `send_action` reads one first
    (a control loop reads every tick anyway), so the step limits never start from an old position.
    `send_action` returns what the driver really sent.
    """

    def __init__(self, robot: Robot, config: SafetyConfig | None = None, *,
                 safety: SafetyFilter | None = None, state_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        self.robot = robot
        self.safety = safety or SafetyFilter(robot.action_dim, config)
        if self.safety.dim != robot.action_dim:
            raise ValueError(f"SafeRobot: filter dim {self.safety.dim} != robot action_dim {robot.action_dim}")
        state_dim = robot.observation_features[STATE_KEY][0]
        if state_indices is None:
            if state_dim != robot.action_dim:
                raise ValueError(f"SafeRobot: observation.state has {state_dim} values but the action has "
                                 f"{robot.action_dim}; pass state_indices (which state entries are the joints)")
            state_indices = range(state_dim)
        self.state_indices = np.asarray(list(state_indices), dtype=np.int64)
        if self.state_indices.shape != (robot.action_dim,) or not (
                (self.state_indices >= 0) & (self.state_indices < state_dim)).all():
            raise ValueError(f"SafeRobot: state_indices must be {robot.action_dim} indices in [0, {state_dim}), "
                             f"received {self.state_indices.tolist()}")
        self._current: np.ndarray | None = None

    @property
    def name(self) -> str:
        return f"SafeRobot[{self.robot.name}]"

    @property
    def observation_features(self) -> dict[str, tuple[int, ...]]:
        return self.robot.observation_features

    @property
    def action_names(self) -> list[str]:
        return self.robot.action_names

    def _connect(self) -> None:
        self._current = None
        self.robot.connect()

    def _disconnect(self) -> None:
        self.robot.disconnect()

    def _get_observation(self) -> dict[str, np.ndarray]:
        obs = self.robot.get_observation()
        self._current = np.asarray(obs[STATE_KEY], dtype=np.float64)[self.state_indices]
        return obs

    def send_action(self, action: Any, timestamp: float | None = None) -> np.ndarray:
        """Filter ``action`` (A,) (anything: NaN, inf, huge, stale) and send the safe command.
        A wrong shape raises; every other problem becomes a hold, counted in `stats()`."""
        self._require_connected("send_action")
        self.safety.submit(action, timestamp)
        return self.tick()

    def tick(self) -> np.ndarray:
        """Send the filter's command without a new action (holds once the watchdog fires)."""
        self._require_connected("tick")
        if self._current is None:
            self.get_observation()
        cur, self._current = self._current, None  # one command per reading (see the class doc)
        return self.robot.send_action(self.safety.tick(cur))

    def _send_action(self, action: np.ndarray) -> np.ndarray:  # pragma: no cover - send_action overrides
        return self.send_action(action)

    def estop(self, reason: str = "") -> None:
        self.safety.estop(reason)

    def reset_estop(self) -> None:
        self.safety.reset_estop()

    def stats(self) -> dict[str, int]:
        return self.safety.stats()
