"""End-to-end training on LeRobot datasets made in the test: checkpoints, exact resume, LoRA."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vla.config import TrainConfig, parse_config
from vla.policy import VLAPolicy
from vla.presets import get_preset
from vla.train import train


def _cfg(tmp: Path, data: Path, *args: str) -> TrainConfig:
    return parse_config(TrainConfig, get_preset("debug"), [
        f"--output_dir={tmp}", f"--dataset.root={data}", "--dataset.synthetic=false", "--batch_size=4",
        "--log_every=1", "--save_every=0", "--warmup_steps=1", *args])


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    from vla.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", num_episodes=3, episode_len=12)


def _raw_obs(policy: VLAPolicy, cams: list[str]) -> dict:
    size = 24  # any size: the preprocessor resizes
    raw = {c: (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8) for c in cams}
    raw["observation.state"] = np.zeros(policy.preprocessor.state_dim, np.float32)
    raw["task"] = "push the red block"
    return raw


def test_train_checkpoint_reload_predict(tmp_path: Path, synthetic: Path) -> None:
    ckpt = train(_cfg(tmp_path / "run", synthetic, "--steps=3", "--bf16=true", "--grad_accum=2"))
    assert (ckpt / "model.safetensors").exists() and (ckpt / "preprocessor.json").exists()
    policy = VLAPolicy.from_pretrained(ckpt)
    chunk = policy.predict_action_chunk(_raw_obs(policy, ["observation.images.cam0"]))
    assert chunk.shape == (policy.config.chunk_size, 3) and np.isfinite(chunk).all()
    # Stats came from the dataset and were saved inside the checkpoint.
    assert "action" in json.loads((ckpt / "preprocessor.json").read_text())["stats"]
    # Bad input at inference is an error naming the key, never a silent zero or a NaN action.
    raw = _raw_obs(policy, ["observation.images.cam0"])
    raw["observation.state"] = np.array([0, np.nan, 0, 0], np.float32)
    with pytest.raises(ValueError, match="observation.state"):
        policy.predict_action_chunk(raw)
    raw = _raw_obs(policy, ["observation.images.top"])
    with pytest.raises(KeyError, match="observation.images.top"):
        policy.predict_action_chunk(raw)
    raw = _raw_obs(policy, ["observation.images.cam0"])
    raw["observation.state"] = np.zeros(7, np.float32)
    with pytest.raises(ValueError, match=r"observation.state.*\(4,\).*\(7,\)"):
        policy.predict_action_chunk(raw)


@pytest.mark.parametrize("extra", [
    (),
    # the metaworld preset's settings: bf16 autocast, random-crop augmentation, a data-loader worker
    ("--bf16=true", "--dataset.crop_scale=0.8", "--num_workers=1"),
    ("--lora.enabled=true", "--lora.r=4"),
    ("--ema_decay=0.9",),
    # frozen-encoder feature cache: 2 crop views per frame, drawn at random per sample
    ("--cache_features=2", "--policy.backbone.freeze_vision=true", "--dataset.crop_scale=0.8", "--bf16=true"),
], ids=["fp32", "bf16-crop-worker", "lora", "ema", "feature-cache"])
def test_resume_continues_exactly(tmp_path: Path, synthetic: Path, extra: tuple[str, ...]) -> None:
    straight = tmp_path / "straight"
    train(_cfg(straight, synthetic, "--steps=4", *extra))
    split = tmp_path / "split"
    train(_cfg(split, synthetic, "--steps=4", "--stop_after=2", *extra))
    train(_cfg(split, synthetic, "--steps=4", "--resume=true", *extra))
    a, b = _losses(straight), _losses(split)
    assert len(a) == len(b) == 4
    assert np.allclose(a, b, rtol=0, atol=1e-6), (a, b)
    assert len(set(a)) > 1  # the losses really change from step to step


def test_lora_saves_only_the_adapter(tmp_path: Path, synthetic: Path) -> None:
    out = tmp_path / "lora"
    ckpt = train(_cfg(out, synthetic, "--steps=2", "--lora.enabled=true", "--lora.r=4"))
    assert (ckpt / "adapter.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    from safetensors.torch import load_file

    adapter = load_file(str(ckpt / "adapter.safetensors"))
    assert any("lora_" in k for k in adapter)
    assert not any(k.startswith("backbone.") and "lora_" not in k for k in adapter), "base weights leaked in"
    base = VLAPolicy.from_pretrained(out / "lora_base")
    tuned = VLAPolicy.from_pretrained(ckpt)
    # LoRA's B starts at zero: non-zero means the adapter trained. The head trained too; the base did not.
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    w = "backbone.blocks.0.q_proj"
    assert torch.equal(base.state_dict()[f"{w}.weight"], tuned.state_dict()[f"{w}.base_layer.weight"])
    assert not torch.equal(base.state_dict()["head.action_out.weight"], tuned.state_dict()["head.action_out.weight"])
    # The adapter points at its base by a relative path: the whole output folder can move.
    import shutil

    moved = tmp_path / "moved"
    shutil.move(str(out), moved)
    again = VLAPolicy.from_pretrained(moved / ckpt.relative_to(out))
    assert again.selector_dir == moved / ckpt.relative_to(out) / "selector"  # the adapter's CFN, not the base's
    assert torch.equal(again.state_dict()["head.action_out.weight"], tuned.state_dict()["head.action_out.weight"])
    raw = _raw_obs(tuned, ["observation.images.cam0"])
    assert np.isfinite(tuned.predict_action_chunk(raw)).all()


@pytest.mark.slow
def test_video_dataset_with_two_cameras_trains(tmp_path: Path) -> None:
    from vla.data.synthetic import make_synthetic_dataset

    cams = ("observation.images.top", "observation.images.wrist")
    data = make_synthetic_dataset(tmp_path / "vid", num_episodes=2, episode_len=10, cameras=cams, use_videos=True)
    ckpt = train(_cfg(tmp_path / "run", data, "--steps=2", "--policy.cameras=[cam0,cam1]"))
    policy = VLAPolicy.from_pretrained(ckpt)
    assert policy.preprocessor.camera_map == {cams[0]: "cam0", cams[1]: "cam1"}
    chunk = policy.predict_action_chunk(_raw_obs(policy, list(cams)))
    assert chunk.shape == (policy.config.chunk_size, 3) and np.isfinite(chunk).all()


def test_fresh_run_refuses_an_output_dir_with_checkpoints(tmp_path: Path, synthetic: Path) -> None:
    train(_cfg(tmp_path / "run", synthetic, "--steps=1"))
    with pytest.raises(FileExistsError, match="--resume=true"):
        train(_cfg(tmp_path / "run", synthetic, "--steps=1"))


def test_init_from_checks_the_architecture(tmp_path: Path, synthetic: Path) -> None:
    ckpt = train(_cfg(tmp_path / "a", synthetic, "--steps=1"))
    # Same architecture, different execution settings: fine-tunes.
    train(_cfg(tmp_path / "b", synthetic, "--steps=1", f"--init_from={ckpt}", "--head.num_steps=2"))
    # Decoding settings are execution settings too (the list load-time overrides use).
    tok = train(_cfg(tmp_path / "d", synthetic, "--steps=1", "--head.type=discrete", "--head.temperature=0"))
    train(_cfg(tmp_path / "e", synthetic, "--steps=1", f"--init_from={tok}", "--head.type=discrete",
               "--head.temperature=0", "--head.greedy=expected", "--head.resample_temperature=0.5"))
    with pytest.raises(ValueError, match=r"head.width: checkpoint 32, run 16"):
        train(_cfg(tmp_path / "c", synthetic, "--steps=1", f"--init_from={ckpt}", "--head.width=16"))


def test_init_from_follows_the_runs_freeze_settings(tmp_path: Path, synthetic: Path) -> None:
    """Fine-tuning with a frozen encoder from a checkpoint trained without one: the encoder must not move
    (freeze_vision is applied when the modules are built, so it has to reach the build)."""
    from vla.policy import VLAPolicy

    ckpt = train(_cfg(tmp_path / "a", synthetic, "--steps=1", "--policy.backbone.freeze_vision=false"))
    out = train(_cfg(tmp_path / "b", synthetic, "--steps=2", f"--init_from={ckpt}",
                     "--policy.backbone.freeze_vision=true"))
    before, after = VLAPolicy.from_pretrained(ckpt), VLAPolicy.from_pretrained(out)
    assert after.config.backbone.freeze_vision
    for (name, p), q in zip(before.backbone.vision.named_parameters(), after.backbone.vision.parameters()):
        assert torch.equal(p, q), name
    assert not all(torch.equal(p, q) for p, q in zip(before.head.parameters(), after.head.parameters()))
