"""World model: API shapes, save/load, and training below the copy-last-frame baseline on a tiny dataset."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from post_training.world_model import WorldModel, world_model_for
from tests.helpers import backbone_variants, head_variants, random_observation, tiny_checkpoint, tiny_policy_config
from vla.policy import VLAPolicy


@pytest.fixture(scope="module")
def trained_policy(tmp_path_factory) -> Path:
    """A tiny policy checkpoint (with normalization stats) on a synthetic LeRobot dataset."""
    return tiny_checkpoint(tmp_path_factory.mktemp("wm"), 20, 16)[0]


def test_api_shapes_and_copy_last_at_init() -> None:
    cfg = tiny_policy_config(backbone_variants()["timm_lm"], head_variants()["flow_matching"])
    policy = VLAPolicy(cfg).eval()
    obs = random_observation(policy, batch=2)
    wm = world_model_for(policy, bf16_encode=False)  # fp32, so the prefix route below matches exactly
    chunks = torch.randn(2, 5, cfg.chunk_size, cfg.max_action_dim)
    fut = wm.predict(obs, chunks)
    assert fut.shape == (2, 5, cfg.chunk_size, wm.cfg.latent_dim)
    # Zero-initialized output layer: an untrained world model is exactly the copy-last baseline.
    z = wm.encode(obs)
    assert torch.allclose(fut, z[:, None, None].expand_as(fut))
    assert wm.reward(obs, chunks).shape == (2, 5)
    assert wm.reward(z, chunks, goal=obs).shape == (2, 5)
    # The same latent from a prefix the policy already computed (what a selector has at hand).
    assert torch.allclose(wm.latent_from_prefix(policy.encode(obs)), z, atol=1e-6)
    assert wm.predict(z, chunks[:, 0]).shape == (2, cfg.chunk_size, wm.cfg.latent_dim)
    with pytest.raises(ValueError, match="chunks"):
        wm.predict(z, torch.randn(2, 5, cfg.chunk_size + 1, cfg.max_action_dim))
    with pytest.raises(ValueError, match="latent"):
        wm.predict(torch.randn(2, 3), chunks)
    # The encoder policy is not frozen in place (it may be the policy being fine-tuned).
    assert all(p.requires_grad for p in policy.head.parameters())


def test_world_model_trains_below_copy_last_and_reloads(tmp_path: Path, trained_policy: Path) -> None:
    from post_training.world_model_train import main

    data = trained_policy.parents[3] / "data"
    out = tmp_path / "wm"
    rc = main(["--dataset", str(data), "--policy", str(trained_policy), "--output_dir", str(out),
               "--steps", "150", "--batch_size", "32", "--lr", "1e-3", "--width", "64", "--num_layers", "2",
               "--val_every", "3", "--eval_every", "50", "--save_every", "100", "--state_weight", "3"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())["validation"]
    # Held-out episodes: the learned dynamics beat "nothing changes" (measured ratio ~0.71 here; 20
    # episodes of a random-weight backbone's latents leave little to generalize from).
    assert metrics["dynamics"] < 0.85 * metrics["copy_last"], metrics
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [50, 100, 150]
    path = out / "checkpoints" / "last" / "world_model"
    wm = WorldModel.from_pretrained(path)
    assert (out / "checkpoints" / "step_000100" / "world_model").exists()
    policy = VLAPolicy.from_pretrained(trained_policy)
    obs = random_observation(policy, batch=3)
    chunks = torch.randn(3, 4, policy.config.chunk_size, policy.config.max_action_dim)
    r = wm.reward(obs, chunks).detach()
    assert r.shape == (3, 4) and torch.isfinite(r).all()
    # Different chunks get different predicted futures once trained.
    assert float(r.std()) > 0
    with pytest.raises(FileNotFoundError, match="world_model_config.json"):
        WorldModel.from_pretrained(tmp_path)
