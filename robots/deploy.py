"""`vla deploy`: the robot control loop, with asynchronous inference and smooth chunk joining.

    vla deploy --robot.type=lerobot --robot.robot=so101_follower --robot.port=/dev/ttyACM0 \\
               --server=ws://gpu-box:8765 --adapter=so101 --task="pick up the cube" --fps=30
    vla deploy --robot.type=metaworld --robot.task=drawer-open-v3 --policy=outputs/.../pretrained_model

Every tick (at ``fps``): read the robot, hand the observation to the inference thread when a new chunk
is due, take the action planned for this tick (robots/chunking.py joins consecutive chunks), pass it
through the `SafetyFilter` and send it. Inference never blocks the loop: the next chunk is requested
``n_action_steps - expected delay`` ticks after the previous observation, so it arrives about when
it is needed while the current chunk keeps the robot moving. With ``--asynchronous=false`` the loop
stops and waits for each chunk instead (the classic receding horizon), for comparison.

Ticks with no planned action (inference slower than a whole chunk) command the hold action and are
counted as ``starved``. The statistics (rate, jitter, latency, delays, safety interventions) are
printed at the end and, with ``--stats_json``, written as JSON.
"""
from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from robots.base import STATE_KEY, Robot, RobotConfig
from robots.chunking import ActionSchedule
from robots.safety import SafetyConfig, SafetyFilter

log = logging.getLogger(__name__)


def _default_robot() -> RobotConfig:
    import robots  # noqa: F401  (registers the drivers)

    return RobotConfig.get_choice_class("mock")()


@dataclass
class DeployConfig:
    robot: RobotConfig = field(default_factory=_default_robot)
    server: str | None = None  # ws://host:port of `vla serve`
    policy: str | None = None  # or: a local checkpoint, run in this process
    adapter: str | None = None  # the embodiment's LoRA adapter (server or local); None = the default
    task: str | None = None  # instruction; None = the robot's own (metaworld) or ""
    fps: float | None = None  # control rate; None = the robot's `fps`, else 30
    episodes: int = 1
    max_steps: int = 300  # ticks per episode (an episode also ends when the robot says `done`)
    n_action_steps: int | None = None  # ticks between observations sent; None = the policy's own
    blend_steps: int = 2  # ticks of crossfade from the old chunk to the new one
    # Real-time chunking (flow heads): each request carries the actions still planned, and the new chunk
    # is inpainted to agree with them (frozen over the expected delay, then RTC's decaying weights).
    rtc: bool = False
    asynchronous: bool = True
    hold: str = "auto"  # the hold command: auto (the robot's hold_action, else state) | state | zero
    device: str = "cpu"  # for --policy
    num_samples: int | None = None  # candidate chunks per request (with a selector)
    selector: str | None = None
    seed: int | None = None
    max_consecutive_errors: int = 3  # failed inference requests in a row before the loop gives up
    stats_json: str | None = None
    safety: SafetyConfig = field(default_factory=SafetyConfig)  # its fps is replaced by the loop's


# ----- where chunks come from -------------------------------------------------------------------------
class RemotePolicy:
    """Chunks from `vla serve` through the light client."""

    def __init__(self, url: str, adapter: str | None = None) -> None:
        from robots.client import PolicyClient

        self.client = PolicyClient(url, adapter=adapter)
        meta = self.client.adapter_metadata(adapter)
        self.chunk_size, self.n_action_steps = int(meta["chunk_size"]), int(meta["n_action_steps"])
        supports = self.client.metadata.get("supports", {})
        self.takes_reference = bool(supports.get("reference"))
        self.takes_reference_start = bool(supports.get("reference_start"))
        self.server_ms: list[float] = []

    def __call__(self, obs: dict[str, Any], **kw: Any) -> np.ndarray:
        reply = self.client.infer(obs, **{k: v for k, v in kw.items() if v is not None})
        self.server_ms.append(float(reply.timing.get("total_ms", math.nan)))
        return reply.actions

    def reset(self) -> None:
        pass

    def close(self) -> None:
        self.client.close()


class LocalPolicy:
    """Chunks from a policy in this process: a checkpoint path (+ adapter), or any object with
    ``predict_action_chunk(raw) -> (H, A)`` and ``config.chunk_size`` / ``config.n_action_steps``."""

    def __init__(self, policy: Any, adapter: str | None = None, device: str = "cpu") -> None:
        from policies.broker import accepts_keyword  # in-process policies have torch loaded anyway

        if isinstance(policy, (str, Path)):
            from robots.adapters import AdapterRegistry

            reg = AdapterRegistry.load(policy, device=device)
            name = reg.check_name(adapter or reg.default)
            self._predict: Callable[..., np.ndarray] = lambda obs, **kw: reg.predict(name, obs, **kw)
            cfg = reg.policy.config
            self.takes_reference = accepts_keyword(reg.policy.predict_action_chunk, "reference")
            self.takes_reference_start = accepts_keyword(reg.policy.predict_action_chunk, "reference_start")
        else:
            if adapter is not None:
                raise ValueError("LocalPolicy: an adapter needs a checkpoint path")
            self._predict, cfg = policy.predict_action_chunk, policy.config
            self._reset = getattr(policy, "reset", None)
            self.takes_reference = accepts_keyword(policy.predict_action_chunk, "reference")
            self.takes_reference_start = accepts_keyword(policy.predict_action_chunk, "reference_start")
        self.chunk_size, self.n_action_steps = int(cfg.chunk_size), int(cfg.n_action_steps)

    def __call__(self, obs: dict[str, Any], **kw: Any) -> np.ndarray:
        kw = {k: v for k, v in kw.items() if v is not None}
        if "seed" in kw:
            import torch

            kw["generator"] = torch.Generator().manual_seed(kw.pop("seed"))
        return np.asarray(self._predict(obs, **kw))

    def reset(self) -> None:
        if getattr(self, "_reset", None) is not None:
            self._reset()

    def close(self) -> None:
        pass


class InferenceThread:
    """Runs one request at a time off the control loop's thread; results are picked up by `poll`."""

    def __init__(self, fn: Callable[..., np.ndarray]) -> None:
        self._fn = fn
        self._jobs: queue.Queue = queue.Queue(maxsize=1)
        self._results: queue.Queue = queue.Queue()
        self.busy = False
        self._thread = threading.Thread(target=self._run, name="vla-deploy-infer", daemon=True)
        self._thread.start()

    def submit(self, obs: dict[str, Any], tick: int, **extra: Any) -> None:
        """Run ``fn(obs, **extra)``; ``extra`` = per-request arguments (e.g. RTC's inpaint)."""
        if self.busy:
            raise RuntimeError("InferenceThread.submit: a request is already in flight")
        self.busy = True
        self._jobs.put((obs, tick, time.perf_counter(), extra))

    def poll(self, wait: float | None = None) -> tuple | None:
        """(chunk or exception, obs tick, latency s) of a finished request, or None."""
        try:
            res = self._results.get(timeout=wait) if wait is not None else self._results.get_nowait()
        except queue.Empty:
            return None
        self.busy = False
        return res

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            obs, tick, t0, extra = job
            try:
                out: Any = self._fn(obs, **extra)
            except Exception as e:  # handed to the loop, which decides (count, hold, give up)
                out = e
            self._results.put((out, tick, time.perf_counter() - t0))

    def close(self) -> None:
        self._jobs.put(None)


# ----- the loop ----------------------------------------------------------------------------------------
def hold_reference(robot: Robot, mode: str) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """The command that keeps ``robot`` still, from an observation (what the safety filter holds)."""
    inner = getattr(robot, "robot", robot)  # through a SafeRobot-style wrapper
    dim = robot.action_dim
    if mode not in ("auto", "state", "zero"):
        raise ValueError(f"hold: expected auto, state or zero, received {mode!r}")
    if mode == "zero":
        return lambda obs: np.zeros(dim)
    if mode == "auto" and callable(getattr(inner, "hold_action", None)):
        return lambda obs: np.asarray(inner.hold_action(obs), dtype=np.float64)
    state_dim = robot.observation_features[STATE_KEY][0]
    if state_dim != dim:
        raise ValueError(f"hold=state needs observation.state ({state_dim}) to be the joint positions the action "
                         f"({dim}) commands; for relative/velocity actions use --hold=zero")
    return lambda obs: np.asarray(obs[STATE_KEY], dtype=np.float64)


def rtc_request(schedule: ActionSchedule, tick: int, delay: int, horizon: int) -> dict[str, Any]:
    """Real-time chunking arguments for a chunk requested at ``tick``: the actions still planned from
    ``tick`` on (at most ``horizon``), frozen for the expected ``delay`` ticks, then decaying weights."""
    from policies.rtc import rtc_weights

    planned = schedule.planned(tick, horizon)
    if len(planned) == 0:
        return {}
    return {"inpaint": planned, "inpaint_weights": rtc_weights(len(planned), min(delay, len(planned)), 0)}


def plan_reference(schedule: ActionSchedule, tick: int, policy: Any, cfg: DeployConfig,
                   late: int = 0) -> dict[str, Any]:
    """With a selector: the actions still planned from ``tick`` on, for selectors that prefer candidates
    agreeing with the current plan (``coherence``, docs/selectors.md); others ignore it.

    ``late``: how many of the new chunk's first steps will have passed when it arrives (asynchronous
    inference drops them); the plan for those ticks is left out and ``reference_start`` says where it
    begins, so the comparison (and its decay) starts at the first step that will execute."""
    if cfg.selector is None or not getattr(policy, "takes_reference", False):
        return {}
    if not getattr(policy, "takes_reference_start", False):
        late = 0  # a policy without reference_start: the plan from the observation's tick, as before
    late = max(0, min(int(late), policy.chunk_size - 1))
    planned = schedule.planned(tick, policy.chunk_size)[late:]
    if len(planned) == 0:
        return {}
    return {"reference": planned, "reference_start": late} if late else {"reference": planned}


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def run_deploy(robot: Robot, policy: Any, cfg: DeployConfig, stop: threading.Event | None = None) -> dict[str, Any]:
    """Drive ``robot`` with ``policy`` (a `RemotePolicy`/`LocalPolicy`-like callable) for
    ``cfg.episodes`` episodes; returns the loop statistics. ``robot`` must be connected."""
    fps = float(cfg.fps or getattr(robot, "fps", None) or 30.0)
    dt = 1.0 / fps
    n_exec = int(cfg.n_action_steps or policy.n_action_steps)
    if cfg.num_samples not in (None, 1) and cfg.selector is None:
        raise ValueError(f"num_samples={cfg.num_samples} needs a selector (--selector=NAME) to pick one chunk to execute")
    if not 1 <= n_exec <= policy.chunk_size:
        raise ValueError(f"n_action_steps must be in [1, chunk_size={policy.chunk_size}], received {n_exec}")
    # perf_counter: the loop's clock, so the action timestamps below compare with the filter's.
    safety = SafetyFilter(robot.action_dim, SafetyConfig(**{**asdict(cfg.safety), "fps": fps}), clock=time.perf_counter)
    hold = hold_reference(robot, cfg.hold)
    task = cfg.task if cfg.task is not None else getattr(getattr(robot, "robot", robot), "instruction", "")
    kw = dict(num_samples=cfg.num_samples, selector=cfg.selector, seed=cfg.seed)
    stop = stop or threading.Event()
    worker = InferenceThread(lambda obs, **extra: policy(obs, **kw, **extra))
    lateness, periods, work, latency, delays = [], [], [], [], []
    n = dict(ticks=0, starved=0, overruns=0, errors=0, episodes=0, successes=0)
    schedule = ActionSchedule(cfg.blend_steps)
    failed = [0]  # inference failures in a row
    started = time.perf_counter()

    def observe() -> dict[str, Any]:
        return {**robot.get_observation(), "task": task}

    def accept(result: tuple, now_tick: int) -> None:
        out, obs_tick, lat = result
        if isinstance(out, Exception):
            n["errors"] += 1
            log.warning("inference failed (%s): %s", type(out).__name__, out)
            return
        chunk = np.asarray(out, dtype=np.float64)
        if chunk.ndim != 2 or chunk.shape[1] != robot.action_dim:
            raise ValueError(f"the policy returned a chunk of shape {chunk.shape}; the robot needs "
                             f"(H, {robot.action_dim})")
        schedule.add(chunk, obs_tick, now_tick)
        latency.append(lat * 1e3)
        delays.append(now_tick - obs_tick)

    def take(result: tuple, now_tick: int) -> None:
        """`accept`, and give up after ``max_consecutive_errors`` failed requests in a row."""
        accept(result, now_tick)
        failed[0] = failed[0] + 1 if isinstance(result[0], Exception) else 0
        if failed[0] >= cfg.max_consecutive_errors:
            raise RuntimeError(f"the policy failed {failed[0]} times in a row: {result[0]}") from result[0]

    def wait(what: str) -> tuple:
        res = worker.poll(wait=60.0)
        if res is None:
            raise TimeoutError(f"no answer from the policy for {what} within 60 s")
        return res

    try:
        for ep in range(cfg.episodes):
            inner = getattr(robot, "robot", robot)
            if ep > 0 and callable(getattr(inner, "reset_episode", None)):
                inner.reset_episode()
            policy.reset()
            schedule.clear()
            # The first chunk is waited for: the robot has nothing to do before it.
            while schedule.remaining(0) == 0:
                obs = observe()
                worker.submit(obs, 0)
                take(wait("the first chunk"), 0)
            last_obs_tick = 0
            t0 = time.perf_counter()
            prev_start = None
            for k in range(cfg.max_steps):
                if stop.is_set():
                    break
                target = t0 + k * dt
                delay = target - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                t_tick = time.perf_counter()
                lateness.append((t_tick - target) * 1e3)
                if prev_start is not None:
                    periods.append((t_tick - prev_start) * 1e3)
                prev_start = t_tick
                if k > 0:
                    obs = observe()
                res = worker.poll()
                if res is not None:
                    take(res, k)
                due = k - last_obs_tick >= n_exec
                if cfg.asynchronous:
                    # Ask early by the expected delay so the chunk lands when the current one runs out.
                    expected = math.ceil(float(np.median(delays[-5:]))) if delays else 1
                    due = k - last_obs_tick >= max(1, n_exec - expected) or schedule.remaining(k) <= expected
                    if due and not worker.busy:
                        worker.submit(obs, k, **(rtc_request(schedule, k, expected, policy.chunk_size)
                                                 if cfg.rtc else {}), **plan_reference(schedule, k, policy, cfg, expected))
                        last_obs_tick = k
                elif due or schedule.remaining(k) == 0:
                    worker.submit(obs, k, **plan_reference(schedule, k, policy, cfg))
                    take(wait("a chunk"), k)  # synchronous: the chunk starts now (no late actions)
                    last_obs_tick = k
                ref = hold(obs)
                action = schedule.action_at(k)
                if action is None:
                    n["starved"] += 1
                    action = ref
                # The action is due now: its timestamp is this tick's target time (late ticks become stale).
                safety.submit(action, timestamp=target)
                robot.send_action(safety.tick(ref))
                n["ticks"] += 1
                spent = time.perf_counter() - t_tick
                work.append(spent * 1e3)
                if spent > dt:
                    n["overruns"] += 1
                if getattr(getattr(robot, "robot", robot), "done", False):
                    break
            n["episodes"] += 1
            n["successes"] += int(bool(getattr(getattr(robot, "robot", robot), "success", False)))
            # Drain a request still in flight so the next episode starts clean.
            if worker.busy:
                worker.poll(wait=60.0)
    finally:
        worker.close()
    server_ms = getattr(policy, "server_ms", [])
    stats = {
        "fps": fps, "dt_ms": round(dt * 1e3, 3), "asynchronous": cfg.asynchronous, "n_action_steps": n_exec,
        "chunk_size": policy.chunk_size, "blend_steps": cfg.blend_steps, **n,
        "success_rate": round(n["successes"] / n["episodes"], 3) if n["episodes"] else None,
        "duration_s": round(time.perf_counter() - started, 3),
        "achieved_hz": round(1e3 / float(np.mean(periods)), 2) if periods else None,
        "period_ms_mean": round(float(np.mean(periods)), 3) if periods else None,
        "period_ms_std": round(float(np.std(periods)), 3) if periods else None,
        "jitter_ms_p50": _pct(lateness, 50), "jitter_ms_p99": _pct(lateness, 99),
        "jitter_ms_max": round(max(lateness), 3) if lateness else None,
        "work_ms_p50": _pct(work, 50), "work_ms_p99": _pct(work, 99),
        "latency_ms_p50": _pct(latency, 50), "latency_ms_p99": _pct(latency, 99),
        "server_ms_p50": _pct([s for s in server_ms if math.isfinite(s)], 50),
        "delay_ticks_mean": round(float(np.mean(delays)), 3) if delays else None,
        "delay_ticks_max": int(max(delays)) if delays else None,
        "chunks": schedule.chunks, "late_actions_dropped": schedule.dropped_late,
        "safety": safety.stats(),
    }
    return stats


def format_stats(stats: dict[str, Any]) -> str:
    """A short human-readable block of the loop statistics."""
    s = stats
    lines = [
        f"control loop: {s['ticks']} ticks in {s['episodes']} episode(s), target {s['fps']:g} Hz, "
        f"achieved {s['achieved_hz']} Hz ({'asynchronous' if s['asynchronous'] else 'synchronous'} inference)",
        f"  tick lateness (jitter) ms: p50 {s['jitter_ms_p50']}  p99 {s['jitter_ms_p99']}  max {s['jitter_ms_max']}; "
        f"period std {s['period_ms_std']} ms; overruns {s['overruns']}",
        f"  inference latency ms: p50 {s['latency_ms_p50']}  p99 {s['latency_ms_p99']}"
        + (f" (server p50 {s['server_ms_p50']})" if s["server_ms_p50"] is not None else "") + "; "
        f"delay ticks mean {s['delay_ticks_mean']} max {s['delay_ticks_max']}",
        f"  chunks {s['chunks']}, late actions dropped {s['late_actions_dropped']}, starved ticks {s['starved']}, "
        f"inference errors {s['errors']}, successes {s['successes']}/{s['episodes']}",
        "  safety: " + ", ".join(f"{k} {v}" for k, v in s["safety"].items() if v),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import signal
    import sys

    import robots  # noqa: F401  (registers the drivers for --robot.type)
    from vla.config import parse_config

    cfg: DeployConfig = parse_config(DeployConfig, DeployConfig(), list(argv or []))
    if (cfg.server is None) == (cfg.policy is None):
        print("vla deploy: give exactly one of --server=ws://HOST:PORT or --policy=PATH", file=sys.stderr)
        return 2
    policy = RemotePolicy(cfg.server, cfg.adapter) if cfg.server else LocalPolicy(cfg.policy, cfg.adapter, cfg.device)
    robot = cfg.robot.build()
    stop = threading.Event()
    # Ctrl-C ends the loop at the next tick; the robot is then released by disconnect() (the drivers
    # leave the arm holding its last command).
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        with robot:
            stats = run_deploy(robot, policy, cfg, stop)
    finally:
        policy.close()
    print(format_stats(stats))
    if cfg.stats_json:
        Path(cfg.stats_json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.stats_json).write_text(json.dumps(stats, indent=2))
    return 0
