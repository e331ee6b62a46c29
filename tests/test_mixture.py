"""Dataset mixtures: sampling by weight and rank, padding to the model, per-embodiment statistics."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vla.config import DatasetConfig, PolicyConfig
from vla.data.mixture import (MixtureBatchSampler, apportion, check_mixture, collate_by_dataset, load_mixture,
                              read_specs)
from vla.data.processor import Preprocessor
from vla.data.stats import compute_stats
from vla.presets import get_preset


@pytest.fixture(scope="module")
def two_robots(tmp_path_factory) -> tuple[Path, Path]:
    """Robot A: one camera, state 4, action 3. Robot B: two other cameras at another size, state 6, action 4."""
    from tests.helpers import two_robot_datasets

    return two_robot_datasets(tmp_path_factory.mktemp("mix"), b_episodes=2)


def _policy_cfg(**kw) -> PolicyConfig:
    cfg = get_preset("debug").policy
    cfg.cameras = ["cam0", "cam1"]
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_sampler_weights_ranks_and_resume() -> None:
    sizes, probs = [10, 7, 30], [0.5, 0.25, 0.25]
    s = MixtureBatchSampler(sizes, probs, batch_size=4, seed=3, world_size=2, rank=0)
    assert s.quota == apportion(8, probs) == [4, 2, 2] and sum(s.quota) == 8
    for b in range(12):
        g = s.global_indices(b)
        counts = np.bincount(np.searchsorted(s.offsets, g, side="right") - 1, minlength=3)
        assert counts.tolist() == s.quota  # every global batch has the weights' composition
    # Ranks take their halves of the same global batch: together exactly the global batch, and (away
    # from an epoch boundary, where a frame may come again from the next epoch) no frame twice.
    r0 = MixtureBatchSampler(sizes, probs, 4, seed=3, rank=0, world_size=2)
    r1 = MixtureBatchSampler(sizes, probs, 4, seed=3, rank=1, world_size=2)
    for (a, b_), b in zip(zip(iter(r0), iter(r1)), range(5)):
        assert sorted(a + b_) == sorted(s.global_indices(b))
    big = [MixtureBatchSampler([400, 300], [0.5, 0.5], 8, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for a, b_, _ in zip(iter(big[0]), iter(big[1]), range(20)):
        assert len(set(a) | set(b_)) == 16
    # Without replacement inside a dataset's epoch: dataset 0 (10 frames, 4 per batch) covers all of
    # its frames once in its first 10 draws.
    first = [i for b in range(3) for i in s.global_indices(b) if i < 10][:10]
    assert sorted(first) == list(range(10))
    # Resuming at batch k replays exactly what an uninterrupted sampler yields from k on.
    it = iter(r1)
    straight = [next(it) for _ in range(7)]
    resumed = iter(MixtureBatchSampler(sizes, probs, 4, seed=3, rank=1, world_size=2, start_batch=4))
    assert [next(resumed) for _ in range(3)] == straight[4:]


def test_sampler_rejects_starved_dataset() -> None:
    with pytest.raises(ValueError, match=r"no slot to datasets \['tiny"):
        MixtureBatchSampler([10, 10], [0.97, 0.03], batch_size=4, names=["big", "tiny"])


def test_mixture_batches_pad_and_normalize_per_embodiment(two_robots) -> None:
    a, b = two_robots
    from vla.backbones.tokenizers import pad_batch

    tokenize = lambda texts, n: pad_batch([list(t.encode())[:n] for t in texts], n)  # noqa: E731
    mix = load_mixture([DatasetConfig(root=str(a)), DatasetConfig(root=str(b), weight=3.0)], _policy_cfg(),
                       tokenize)
    assert mix.names == ["robot_a", "robot_b"] and mix.probabilities() == [0.25, 0.75]
    # Each embodiment's statistics come from its own data.
    for name, root in (("robot_a", a), ("robot_b", b)):
        want = compute_stats(root)
        got = mix.preprocessors[name].stats
        assert np.array_equal(got["action"]["mean"], want["action"]["mean"])
    items = [mix.dataset[0], mix.dataset[mix.dataset.offsets[1] + 3], mix.dataset[5]]
    obs, actions, is_pad, dim_mask = mix.preprocess(collate_by_dataset(items), train=True)
    # Grouped by dataset: robot_a's two items first, then robot_b's.
    assert actions.shape == (3, 4, 4) and is_pad.shape == (3, 4)
    assert dim_mask.tolist() == [[True, True, True, False]] * 2 + [[True] * 4]
    assert obs.state.shape == (3, 8) and obs.state_mask.sum(1).tolist() == [4, 4, 6]
    assert (actions[:2, :, 3] == 0).all() and (obs.state[:2, 4:] == 0).all()  # padding is zero, masked
    # robot_a has one camera (slot cam0); robot_b's two cameras fill cam0 and cam1.
    assert obs.image_masks["cam1"].tolist() == [False, False, True]
    assert obs.images["cam0"].shape == (3, 3, 32, 32)  # robot_b's 24 px frames resized to the model's 32
    # robot_b normalized with robot_b's stats (not robot_a's).
    raw = items[1]["action"]  # robot_b's item, last after grouping
    expect = mix.preprocessors["robot_b"].normalizer.normalize("action", raw[None])
    assert torch.allclose(actions[2], expect[0])


def test_checkpoint_keeps_every_embodiment(two_robots) -> None:
    a, b = two_robots
    mix = load_mixture([DatasetConfig(root=str(a)), DatasetConfig(root=str(b), embodiment="arm_b")], _policy_cfg())
    pre = mix.checkpoint_preprocessor("arm_b")
    d = json.loads(json.dumps(pre.state_dict()))
    assert d["embodiment"] == "arm_b" and sorted(d["embodiments"]) == ["arm_b", "robot_a"]
    cfg = _policy_cfg()
    loaded = Preprocessor.from_state_dict(d, cfg)
    assert (loaded.embodiment, loaded.state_dim, loaded.action_dim) == ("arm_b", 6, 4)
    other = loaded.for_embodiment("robot_a")
    assert (other.state_dim, other.action_dim, other.camera_map) == (4, 3, {"observation.images.cam0": "cam0"})
    assert np.array_equal(other.stats["action"]["std"], compute_stats(a)["action"]["std"])
    assert other.embodiment_names == ["arm_b", "robot_a"]
    assert json.loads(json.dumps(other.state_dict()))["embodiments"] == d["embodiments"]  # survives re-saving
    with pytest.raises(KeyError, match=r"unknown embodiment 'robot_c'.*\['arm_b', 'robot_a'\]"):
        loaded.for_embodiment("robot_c")
    # A single-dataset preprocessor's state (no "embodiments") loads as before.
    single = {k: v for k, v in d["embodiments"]["robot_a"].items() if k != "embodiment"}
    assert Preprocessor.from_state_dict(single, cfg).embodiment_names == []


def test_unpaddable_mixture_names_datasets_and_features(two_robots) -> None:
    a, b = two_robots
    cfgs = [DatasetConfig(root=str(a)), DatasetConfig(root=str(b))]
    narrow = _policy_cfg(max_action_dim=3, max_state_dim=5, cameras=["cam0"])
    with pytest.raises(ValueError) as e:
        check_mixture(cfgs, read_specs(cfgs), narrow)
    msg = str(e.value)
    assert "'robot_b'" in msg and "'action' has dim 4 > policy.max_action_dim 3" in msg
    assert "'observation.state' has dim 6 > policy.max_state_dim 5" in msg
    assert "2 cameras" in msg and "robot_a: state 4, action 3" in msg
    assert "'robot_a'" not in msg.split("(datasets:")[0]  # robot_a itself fits
    # One embodiment name for two different robots cannot share statistics.
    same = [DatasetConfig(root=str(a), embodiment="arm"), DatasetConfig(root=str(b), embodiment="arm")]
    with pytest.raises(ValueError, match="embodiment 'arm' names datasets of different shapes"):
        check_mixture(same, read_specs(same), _policy_cfg())
    # A feature the dataset does not have.
    missing = [DatasetConfig(root=str(a), state_key="observation.joints")]
    with pytest.raises(ValueError, match=r"'robot_a'.*observation\.joints"):
        read_specs(missing)
