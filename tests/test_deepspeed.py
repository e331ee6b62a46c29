"""`vla pretrain` with DeepSpeed: 2 CPU processes over gloo, ZeRO-2 and ZeRO-3, a two-robot mixture.

Each test launches real processes with torchrun (one torch thread each): a few steps of the `debug`
model, so the whole file takes a few minutes on 2 cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def robots(tmp_path_factory) -> tuple[Path, Path]:
    """Robot A: one 32 px camera, state 4, action 3. Robot B: two 24 px cameras, state 6, action 4."""
    from tests.helpers import two_robot_datasets

    return two_robot_datasets(tmp_path_factory.mktemp("robots"), b_episodes=3)


def _args(out: Path, robots: tuple[Path, Path], *extra: str) -> list[str]:
    a, b = robots
    return ["--preset=debug", f"--output_dir={out}", "--batch_size=4", "--log_every=1", "--save_every=0",
            "--warmup_steps=2", "--policy.cameras=[cam0,cam1]",
            f"--mixture=[{{root: {a}}}, {{root: {b}, weight: 2.0}}]", *extra]


def _launch(nproc: int, args: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "vla.train_deepspeed", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def _raw(state_dim: int, cams: list[str], size: int) -> dict:
    rng = np.random.default_rng(0)
    raw = {c: (rng.random((size, size, 3)) * 255).astype(np.uint8) for c in cams}
    raw["observation.state"] = rng.standard_normal(state_dim).astype(np.float32)
    raw["task"] = "push the red block"
    return raw


@pytest.mark.parametrize("stage, extra", [
    # optimizer states and step on the CPU (DeepSpeedCPUAdam), 2 micro-batches per step, bf16 autocast
    (2, ("--deepspeed.offload_optimizer=true", "--grad_accum=2", "--bf16=true")),
    # every parameter partitioned (no small ones kept whole), blocks recomputed in backward
    (3, ("--deepspeed.param_persistence_threshold=0", "--deepspeed.activation_checkpointing=true")),
], ids=["zero2-offload-accum-bf16", "zero3-checkpointing"])
def test_two_processes_train_export_and_resume(tmp_path: Path, robots, stage: int, extra: tuple[str, ...]) -> None:
    from safetensors.torch import load_file

    from vla.policy import VLAPolicy

    steps = 6
    common = (f"--steps={steps}", f"--deepspeed.zero_stage={stage}", *extra)
    straight, split = tmp_path / "straight", tmp_path / "split"
    _launch(2, _args(straight, robots, *common))
    _launch(2, _args(split, robots, *common, "--stop_after=3"))
    _launch(2, _args(split, robots, *common, "--resume=true"))

    a, b = _losses(straight), _losses(split)
    assert len(a) == len(b) == steps
    # Learning: the debug model on the two-robot mixture.
    assert np.mean(a[-2:]) < np.mean(a[:2]) and a[-1] < a[0], a
    # Stopped after 3 steps and resumed: model, optimizer, scheduler, data position and every rank's
    # RNG come back, so the curve continues as if never stopped.
    assert np.allclose(a, b, rtol=0, atol=1e-5), (a, b)
    w_a = load_file(straight / "checkpoints/last/pretrained_model/model.safetensors")
    w_b = load_file(split / "checkpoints/last/pretrained_model/model.safetensors")
    assert all(np.allclose(w_a[k].numpy(), w_b[k].numpy(), atol=1e-5) for k in w_a)

    # The consolidated export loads in this one process and predicts for both robots.
    policy = VLAPolicy.from_pretrained(straight / "checkpoints/last/pretrained_model")
    assert sum(p.numel() for p in policy.parameters()) > 100_000  # full weights, not ZeRO partitions
    assert policy.preprocessor.embodiment == "robot_a"
    chunk = policy.predict_action_chunk(_raw(4, ["observation.images.cam0"], 32))
    assert chunk.shape == (policy.config.chunk_size, 3) and np.isfinite(chunk).all()
    policy = VLAPolicy.from_pretrained(straight / "checkpoints/last/pretrained_model", embodiment="robot_b")
    assert policy.preprocessor.embodiment == "robot_b"
    with pytest.raises((KeyError, ValueError), match="robot_a"):  # the error lists the known embodiments
        VLAPolicy.from_pretrained(straight / "checkpoints/last/pretrained_model", embodiment="robot_c")
    chunk = policy.predict_action_chunk(_raw(6, ["observation.images.top", "observation.images.wrist"], 24))
    assert chunk.shape == (policy.config.chunk_size, 4) and np.isfinite(chunk).all()
    # Per-rank memory is logged.
    rec = json.loads((straight / "train_log.jsonl").read_text().splitlines()[-1])
    assert rec["world_size"] == 2 and len(rec["peak_rss_mb"]) == 2


def test_unpaddable_mixture_fails_before_training(tmp_path: Path, robots) -> None:
    from vla.train_deepspeed import main

    with pytest.raises(ValueError) as e:
        main(_args(tmp_path / "out", robots, "--policy.max_action_dim=3", "--steps=2"))
    msg = str(e.value)
    assert "'robot_b'" in msg and "feature 'action' has dim 4 > policy.max_action_dim 3" in msg, msg
    assert not (tmp_path / "out" / "checkpoints").exists()
