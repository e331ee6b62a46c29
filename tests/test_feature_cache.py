"""The frozen-encoder feature cache: the same losses as live encoding, exact resume, clear refusals."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vla.config import TrainConfig, parse_config
from vla.data.feature_cache import build_feature_cache
from vla.presets import get_preset
from vla.train import build_data


def _setup(tmp: Path, data: Path, *args: str):
    from vla.data.processor import Preprocessor
    from vla.policy import VLAPolicy

    cfg = parse_config(TrainConfig, get_preset("debug"), [
        f"--output_dir={tmp}", f"--dataset.root={data}", "--dataset.synthetic=false",
        "--policy.backbone.freeze_vision=true", *args])
    dataset, spec, stats = build_data(cfg)
    policy = VLAPolicy(cfg.policy)
    policy.preprocessor = Preprocessor.from_dataset(cfg.policy, cfg.dataset, spec, stats, policy.backbone.tokenize)
    return cfg, dataset, policy


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    from vla.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", num_episodes=2, episode_len=10)


@pytest.mark.parametrize("bf16", [False, True])
def test_cached_batches_give_the_live_loss(tmp_path: Path, synthetic: Path, bf16: bool) -> None:
    _, dataset, policy = _setup(tmp_path, synthetic)  # crop_scale 1: every view is the live image
    pre = policy.preprocessor
    cache = build_feature_cache(dataset, pre, policy.backbone, views=2, batch_size=7, bf16=bf16)
    assert len(cache) == len(dataset) and cache.num_views == 2
    indices = [3, 0, 17, 8]
    raw = torch.utils.data.default_collate([dataset[i] for i in indices])
    live = pre.observation(raw, train=True)
    cached, raw_actions = cache.batch(indices)
    assert not cached.images and set(cached.image_features) == set(live.images)
    assert torch.equal(cached.prompt_ids, live.prompt_ids) and torch.equal(cached.state, live.state)
    assert torch.equal(raw_actions["action"], raw["action"])

    def loss(obs):
        torch.manual_seed(0)  # the same noise and flow time for both
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return policy.loss(obs, *pre.actions(raw_actions))

    assert torch.equal(loss(cached), loss(live))  # bit-identical, in bf16 too


def test_views_are_different_crops(tmp_path: Path, synthetic: Path) -> None:
    _, dataset, policy = _setup(tmp_path, synthetic, "--dataset.crop_scale=0.7")
    a = build_feature_cache(dataset, policy.preprocessor, policy.backbone, views=2, seed=1).features["cam0"]
    b = build_feature_cache(dataset, policy.preprocessor, policy.backbone, views=2, seed=1).features["cam0"]
    assert torch.equal(a, b), "the cache must be reproducible for a seed (a resumed run rebuilds it)"
    assert not torch.equal(a[0], a[1]), "the two views should be different random crops"


def test_refuses_a_trainable_encoder(tmp_path: Path, synthetic: Path) -> None:
    _, dataset, policy = _setup(tmp_path, synthetic, "--policy.backbone.freeze_vision=false")
    with pytest.raises(ValueError, match="freeze_vision=true"):
        build_feature_cache(dataset, policy.preprocessor, policy.backbone, views=1)
    policy.backbone.vision.requires_grad_(False)
    with pytest.raises(ValueError, match="views >= 1, got 0"):
        build_feature_cache(dataset, policy.preprocessor, policy.backbone, views=0)
    policy.backbone.vision.add_module("drop", torch.nn.Dropout2d(0.1))  # a stochastic encoder
    with pytest.raises(ValueError, match="stochastic.*drop"):
        build_feature_cache(dataset, policy.preprocessor, policy.backbone, views=1)


def test_train_refuses_a_cache_without_a_frozen_encoder(tmp_path: Path, synthetic: Path) -> None:
    from vla.train import train

    cfg = parse_config(TrainConfig, get_preset("debug"), [
        f"--output_dir={tmp_path}", f"--dataset.root={synthetic}", "--dataset.synthetic=false", "--cache_features=2"])
    with pytest.raises(ValueError, match=r"--cache_features=2.*freeze_vision=true"):
        train(cfg)  # the debug preset trains its encoder
    assert not (tmp_path / "checkpoints").exists()


def test_pretrain_takes_the_metaworld_preset_without_the_train_only_options() -> None:
    from vla.train_deepspeed import parse_args

    cfg, _ = parse_args(["--preset=metaworld", "--steps=5"])
    assert get_preset("metaworld").cache_features > 0 and get_preset("metaworld").ema_decay > 0
    assert (cfg.cache_features, cfg.ema_decay, cfg.steps) == (0, 0.0, 5)
    cfg, _ = parse_args(["--preset=metaworld", "--cache_features=2"])  # explicit: kept, and refused by pretrain
    assert cfg.cache_features == 2


def test_cache_dir_stores_once_and_loads_by_key(tmp_path: Path, synthetic: Path, monkeypatch) -> None:
    """``cache_dir``: the first build writes the cache under its key; the same key loads it without encoding a
    frame (equal tensors); anything the features depend on (views, seed, encoder weights) gives another key,
    the head does not."""
    from vla.data.feature_cache import cache_key

    cfg, dataset, policy = _setup(tmp_path, synthetic, "--cache_features=2", "--dataset.crop_scale=0.8")
    kw = dict(views=2, seed=0, batch_size=8, cache_dir=tmp_path / "cache")
    first = build_feature_cache(dataset, policy.preprocessor, policy.backbone, **kw)
    files = list((tmp_path / "cache").glob("features-*.pt"))
    assert len(files) == 1 and not list((tmp_path / "cache").glob("*.tmp*"))
    monkeypatch.setattr(policy.backbone, "encode_images", lambda *a: (_ for _ in ()).throw(AssertionError("encoded")))
    again = build_feature_cache(dataset, policy.preprocessor, policy.backbone, **kw)
    for slot, f in first.features.items():
        assert torch.equal(f, again.features[slot])
    assert torch.equal(first.state, again.state) and torch.equal(first.prompt_ids, again.prompt_ids)
    for k, v in first.actions.items():
        assert torch.equal(v, again.actions[k])

    def key(**over):
        args = {"views": 2, "seed": 0, "batch_size": 8, "bf16": False, "device": "cpu", **over}
        return cache_key(dataset, policy.preprocessor, policy.backbone, **args)

    base = key()
    assert base == files[0].stem.split("-", 1)[1]
    assert len({base, key(views=3), key(seed=1), key(batch_size=4), key(bf16=True)}) == 5
    _, _, other_head = _setup(tmp_path, synthetic, "--cache_features=2", "--dataset.crop_scale=0.8",
                              "--policy.head.type=discrete")
    other_head.backbone.load_state_dict(policy.backbone.state_dict())
    assert cache_key(dataset, other_head.preprocessor, other_head.backbone, views=2, seed=0, batch_size=8,
                     bf16=False, device="cpu") == base  # another head shares the cache
    with torch.no_grad():
        next(policy.backbone.vision.parameters()).add_(1e-3)
    assert key() != base


def test_cache_dir_without_the_cache_is_an_error(tmp_path: Path, synthetic: Path) -> None:
    from vla.train import train

    cfg = parse_config(TrainConfig, get_preset("debug"), [
        f"--output_dir={tmp_path}", f"--dataset.root={synthetic}", "--dataset.synthetic=false",
        f"--cache_dir={tmp_path / 'c'}"])
    with pytest.raises(ValueError, match="--cache_dir=.*add --cache_features=K"):
        train(cfg)
