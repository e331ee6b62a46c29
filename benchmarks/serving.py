"""Serving on localhost: end-to-end latency of `vla serve`, and control-loop timing of `vla deploy`.

    python -m benchmarks.serving [--policy PATH] [--requests 200] [--seconds 10] [--threads 1]

1. Latency: the server runs in its own process (`python -m vla.cli serve`), a client on this computer
   sends observations shaped like the policy's inputs (one 128 px camera image, the state, the task)
   and times observation sent -> actions received. Reported with the server's own split (queue,
   inference) so the transport overhead is the difference; also with 4 clients at once, and the
   round trip of an empty ping.
2. Control loop: `run_deploy` drives a mock robot (no I/O cost, so what is measured is the loop) at
   10 Hz and 30 Hz against that server, with asynchronous inference, and at 30 Hz synchronously for
   comparison. Jitter is the lateness of each tick's start against its schedule.
3. For a MetaWorld policy (the default): closed-loop episodes on the `metaworld` robot through the
   server, synchronous and asynchronous (the simulator keeps stepping while a chunk is computed).

The policy defaults to the demo's trained MetaWorld checkpoint (the CPU-default model) when it exists,
else the `debug` preset trained for 2 steps on synthetic data. Prints tables and writes
benchmarks/results/serving.json.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import print_table, provenance, write_json

REPO = Path(__file__).resolve().parents[1]
DEMO_CKPT = REPO / "outputs/demo/train/checkpoints/last/pretrained_model"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _debug_checkpoint(tmp: Path) -> Path:
    from vla.config import TrainConfig, parse_config
    from vla.data.synthetic import make_synthetic_dataset
    from vla.presets import get_preset
    from vla.train import train

    data = make_synthetic_dataset(tmp / "data", num_episodes=2, episode_len=10, state_dim=4, action_dim=4,
                                  cameras=("observation.images.corner2",))
    return train(parse_config(TrainConfig, get_preset("debug"), [
        f"--output_dir={tmp / 'run'}", f"--dataset.root={data}", "--dataset.synthetic=false", "--steps=2",
        "--batch_size=4", "--save_every=0", "--warmup_steps=1"]))


class ServerProcess:
    """`vla serve` in a subprocess, ready when /healthz answers."""

    def __init__(self, policy: Path, threads: int) -> None:
        from robots.client import health

        self.port = _free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen([sys.executable, "-m", "vla.cli", "serve", f"--policy={policy}",
                                      f"--port={self.port}", f"--threads={threads}"], cwd=REPO, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 180
        while True:
            try:
                health(self.url, timeout=1)
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"vla serve did not start: {self.proc.stderr.read()[-2000:]}")
                time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def _observation(meta: dict[str, Any], size: int = 128, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    obs: dict[str, Any] = {cam: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for cam in meta["cameras"]}
    obs["observation.state"] = rng.standard_normal(meta["state_dim"]).astype(np.float32) * 0.1
    obs["task"] = "pull the drawer open"
    return obs


def _pcts(xs: list[float]) -> dict[str, float]:
    return {"p50": round(float(np.percentile(xs, 50)), 2), "p99": round(float(np.percentile(xs, 99)), 2),
            "mean": round(float(np.mean(xs)), 2)}


def measure_latency(url: str, requests: int, clients: int) -> dict[str, Any]:
    from robots.client import PolicyClient

    rows: list[list[dict]] = [[] for _ in range(clients)]

    def run(i: int) -> None:
        with PolicyClient(url) as c:
            obs = _observation(c.adapter_metadata(), seed=i)
            for _ in range(5):  # warm-up
                c.infer(obs)
            for _ in range(requests // clients):
                r = c.infer(obs)
                rows[i].append({"latency": r.latency_ms, **r.timing})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [r for rs in rows for r in rs]
    lat = [r["latency"] for r in flat]
    overhead = [r["latency"] - r["infer_ms"] - r["queue_ms"] for r in flat]
    return {"clients": clients, "requests": len(flat), "latency_ms": _pcts(lat),
            "server_total_ms": _pcts([r["total_ms"] for r in flat]), "infer_ms": _pcts([r["infer_ms"] for r in flat]),
            "queue_ms": _pcts([r["queue_ms"] for r in flat]), "transport_ms": _pcts(overhead)}


def measure_ping(url: str, n: int) -> dict[str, float]:
    from robots.client import PolicyClient

    with PolicyClient(url) as c:
        return _pcts([c.ping() for _ in range(n)])


def measure_loop(url: str, fps: float, seconds: float, asynchronous: bool) -> dict[str, Any]:
    from robots import make_robot
    from robots.client import PolicyClient
    from robots.deploy import DeployConfig, RemotePolicy, run_deploy

    with PolicyClient(url) as c:
        meta = c.adapter_metadata()
    cam = meta["cameras"][0].removeprefix("observation.images.")
    robot = make_robot("mock", state_dim=meta["state_dim"], action_dim=meta["action_dim"], cameras=[cam],
                       image_height=128, image_width=128, dynamics="none")
    policy = RemotePolicy(url)
    cfg = DeployConfig(fps=fps, max_steps=int(fps * seconds), asynchronous=asynchronous, task="pull the drawer open",
                       hold="zero")
    try:
        with robot:
            return run_deploy(robot, policy, cfg)
    finally:
        policy.close()


def measure_metaworld(url: str, task: str, episodes: int, fps: float, asynchronous: bool) -> dict[str, Any]:
    """Closed loop on the `metaworld` robot through the server: the simulator keeps stepping at ``fps``
    while a chunk is computed (as a real arm would), unlike `vla eval metaworld`, which waits."""
    from robots import make_robot
    from robots.client import PolicyClient
    from robots.deploy import DeployConfig, RemotePolicy, run_deploy

    with PolicyClient(url) as c:
        cams = [k.removeprefix("observation.images.") for k in c.adapter_metadata()["cameras"]]
    robot = make_robot("metaworld", task=task, cameras=cams, image_size=128, fps=fps, max_steps=300)
    policy = RemotePolicy(url)
    try:
        with robot:
            stats = run_deploy(robot, policy, DeployConfig(episodes=episodes, max_steps=300, asynchronous=asynchronous))
    finally:
        policy.close()
    return {"task": task, **stats}


def _is_metaworld_policy(url: str) -> bool:
    from robots.client import PolicyClient

    with PolicyClient(url) as c:
        meta = c.adapter_metadata()
    mw_cams = {"corner2", "topview", "corner", "corner3", "corner4", "behindGripper", "gripperPOV"}
    cams = {k.removeprefix("observation.images.") for k in meta["cameras"]}
    return meta["action_dim"] == 4 and meta["state_dim"] == 4 and cams <= mw_cams


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", default=None, help=f"checkpoint to serve (default: {DEMO_CKPT.relative_to(REPO)} "
                                                   "if present, else a tiny debug policy)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=10.0, help="control-loop run per setting")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server process")
    ap.add_argument("--metaworld_tasks", nargs="*", default=["drawer-open-v3", "window-close-v3"],
                    help="closed-loop tasks for a MetaWorld policy (the demo's MT10 tasks it solves)")
    ap.add_argument("--metaworld_episodes", type=int, default=5, help="per task and mode; 0 skips")
    ap.add_argument("--metaworld_fps", type=float, default=20.0)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/serving.json"))
    args = ap.parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(args.policy) if args.policy else (DEMO_CKPT if DEMO_CKPT.exists() else _debug_checkpoint(Path(tmp)))
        server = ServerProcess(policy, args.threads)
        try:
            ping = measure_ping(server.url, args.requests)
            latency = [measure_latency(server.url, args.requests, n) for n in (1, 4)]
            loops = [measure_loop(server.url, fps, args.seconds, asyn) for fps, asyn in
                     ((10, True), (30, True), (30, False))]
            sim = []
            if args.metaworld_episodes > 0 and _is_metaworld_policy(server.url):
                sim = [measure_metaworld(server.url, task, args.metaworld_episodes, args.metaworld_fps, asyn)
                       for task in args.metaworld_tasks for asyn in (False, True)]
        finally:
            server.close()
    print(f"\npolicy {policy} served by `vla serve --threads {args.threads}` on localhost; ping {ping} ms\n")
    print_table([{"clients": r["clients"], "requests": r["requests"],
                  "latency p50/p99 ms": f"{r['latency_ms']['p50']} / {r['latency_ms']['p99']}",
                  "infer p50 ms": r["infer_ms"]["p50"], "queue p50 ms": r["queue_ms"]["p50"],
                  "transport p50/p99 ms": f"{r['transport_ms']['p50']} / {r['transport_ms']['p99']}"} for r in latency],
                ["clients", "requests", "latency p50/p99 ms", "infer p50 ms", "queue p50 ms", "transport p50/p99 ms"])
    print()
    cols = ["fps", "inference", "ticks", "achieved_hz", "jitter p50/p99/max ms", "period_ms_std", "overruns",
            "starved", "latency p50/p99 ms", "delay_ticks_mean", "chunks"]
    print_table([{**s, "inference": "async" if s["asynchronous"] else "sync",
                  "jitter p50/p99/max ms": f"{s['jitter_ms_p50']} / {s['jitter_ms_p99']} / {s['jitter_ms_max']}",
                  "latency p50/p99 ms": f"{s['latency_ms_p50']} / {s['latency_ms_p99']}"} for s in loops], cols)
    if sim:
        print(f"\nMetaWorld closed loop through the server at {args.metaworld_fps:g} Hz, "
              f"{args.metaworld_episodes} held-out episodes per task and mode")
        print_table([{**s, "inference": "async" if s["asynchronous"] else "sync",
                      "success": f"{s['successes']}/{s['episodes']}",
                      "latency p50 ms": s["latency_ms_p50"]} for s in sim],
                    ["task", "inference", "success", "ticks", "achieved_hz", "latency p50 ms", "delay_ticks_mean",
                     "starved", "overruns"])
    out = write_json(Path(args.out), {
        "benchmark": "serving", "policy": str(policy), "server_threads": args.threads, "ping_ms": ping,
        "latency": latency, "control_loop": loops, "metaworld_closed_loop": sim, **provenance(started)})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
