"""Shared builders for tests: tiny policies and random observations."""
from __future__ import annotations


from vla.config import BackboneConfig, HeadConfig, PolicyConfig
from vla.plugins import load_plugins
from vla.registry import choice_names
from vla.testing import random_observation  # noqa: F401  (re-exported for tests)


def backbone_variants() -> dict[str, BackboneConfig]:
    """Every tiny variant of every registered backbone, by id (e.g. "hf_vlm:smolvlm")."""
    load_plugins()
    out = {}
    for name in choice_names(BackboneConfig):
        out.update(BackboneConfig.get_choice_class(name).tiny_variants())
    return out


def head_variants() -> dict[str, HeadConfig]:
    load_plugins()
    return {name: HeadConfig.get_choice_class(name).tiny() for name in choice_names(HeadConfig)}


def tiny_policy_config(backbone: BackboneConfig, head: HeadConfig, **kw) -> PolicyConfig:
    base = dict(chunk_size=4, n_action_steps=2, max_state_dim=5, max_action_dim=3,
                cameras=["cam0", "cam1"], image_size=32, max_prompt_len=24)
    base.update(kw)
    return PolicyConfig(backbone=backbone, head=head, **base)


def fit_head(policy, num: int = 64, seed: int = 0) -> None:
    """Token heads need a fitted action tokenizer: fit it on random normalized chunks (no-op otherwise)."""
    import numpy as np

    if hasattr(policy.head, "fit_tokenizer"):
        cfg = policy.config
        rng = np.random.default_rng(seed)
        policy.head.fit_tokenizer(rng.standard_normal((num, cfg.chunk_size, cfg.max_action_dim)))


def tiny_checkpoint(root, num_episodes: int = 2, episode_len: int = 10, *args: str):
    """Synthetic LeRobot dataset under ``root`` -> a 2-step ``debug`` policy checkpoint (with normalization
    stats). Returns ``(checkpoint pretrained_model path, dataset root)``. Extra CLI ``args`` override."""
    from pathlib import Path

    from vla.config import TrainConfig, parse_config
    from vla.data.synthetic import make_synthetic_dataset
    from vla.presets import get_preset
    from vla.train import train

    root = Path(root)
    data = make_synthetic_dataset(root / "data", num_episodes=num_episodes, episode_len=episode_len)
    cfg = parse_config(TrainConfig, get_preset("debug"), [
        f"--output_dir={root / 'run'}", f"--dataset.root={data}", "--dataset.synthetic=false", "--batch_size=4",
        "--steps=2", "--save_every=0", "--warmup_steps=1", *args])
    return train(cfg), data


def two_robot_datasets(base, b_episodes: int = 3):
    """Robot A: one 32 px camera, state 4, action 3. Robot B: two 24 px cameras (top, wrist), state 6,
    action 4, another task. Returns the two dataset roots under ``base``."""
    from vla.data.synthetic import make_synthetic_dataset

    a = make_synthetic_dataset(base / "robot_a", num_episodes=3, episode_len=12, image_size=32)
    b = make_synthetic_dataset(base / "robot_b", num_episodes=b_episodes, episode_len=10, image_size=24, state_dim=6,
                               action_dim=4, cameras=("observation.images.top", "observation.images.wrist"),
                               tasks=("lift the green block",), seed=1)
    return a, b


class RandomCandidatePolicy:
    """A MetaWorld stand-in for ``VLAPolicy.sample_candidates`` (importable, so simulator workers can build
    it): N random chunks in [-1, 1] with random features; chunk 8, 4 executed, W = 5, summary C = 6."""

    config = type("Config", (), {"n_action_steps": 4, "chunk_size": 8})()

    def reset(self) -> None:
        pass

    def predict_action_chunk(self, raw_obs):
        return self.sample_candidates(raw_obs, 1)["actions"][0, 0].numpy()

    def sample_candidates(self, raw_obs, num_samples, generator=None, selector=None):
        import torch

        a = torch.rand(1, num_samples, 8, 4, generator=generator) * 2 - 1
        out = {"actions": a, "normalized": a, "features": torch.randn(1, num_samples, 8, 5, generator=generator),
               "summary": torch.randn(1, 6, generator=generator)}
        if selector is not None:  # any name: prefer the chunk with the largest first action (testable)
            out["scores"] = a[..., 0, 0]
        return out

    def normalize_actions(self, actions):
        import torch

        return torch.as_tensor(actions, dtype=torch.float32)[None]  # raw == normalized here
