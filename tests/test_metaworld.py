"""MetaWorld benchmark: expert datasets, closed-loop evaluation, reports, and bad-policy errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("metaworld")
pytestmark = [pytest.mark.sim, pytest.mark.timeout(240)]


class NaNPolicy:
    """Returns a NaN chunk: evaluation must refuse to send it to the simulator."""

    config = type("Config", (), {"n_action_steps": 4})()

    def reset(self) -> None:
        self.calls = 0

    def predict_action_chunk(self, obs):
        return np.full((8, 4), np.nan, dtype=np.float32)


class WrongShapePolicy(NaNPolicy):
    """Returns a (8, 3) chunk: 3 action dims where MetaWorld needs 4."""

    def predict_action_chunk(self, obs):
        return np.zeros((8, 3), dtype=np.float32)


class ShortChunkPolicy(NaNPolicy):
    """Returns 2 actions where n_action_steps asks to execute 4."""

    def predict_action_chunk(self, obs):
        return np.zeros((2, 4), dtype=np.float32)


def test_tasks_instructions_and_variation_split():
    from metaworld.policies import ENV_POLICY_MAP

    from benchmarks.metaworld.tasks import INSTRUCTIONS, MT10, MT50, resolve_tasks, variations

    assert set(MT50) == set(ENV_POLICY_MAP) and len(set(INSTRUCTIONS.values())) == 50
    assert resolve_tasks("mt10") == list(MT10) and resolve_tasks("reach,push-v3") == ["reach-v3", "push-v3"]
    with pytest.raises(ValueError, match="did you mean reach-v3"):
        resolve_tasks("rech")
    train = variations("reach-v3", "train", 5, seed=0)
    assert [v[:2] for v in train] == [v[:2] for v in variations("reach-v3", "train", 5, seed=0)]
    assert [v[:2] for v in train] != [v[:2] for v in variations("reach-v3", "train", 5, seed=1)]
    ev = variations("reach-v3", "eval", 50, seed=0)
    train_vecs = {tuple(np.round(_rand_vec(v[2]), 9)) for v in variations("reach-v3", "train", 50, seed=0)}
    eval_vecs = {tuple(np.round(_rand_vec(v[2]), 9)) for v in ev}
    assert len(train_vecs) == len(eval_vecs) == 50 and not train_vecs & eval_vecs


def _rand_vec(task) -> np.ndarray:
    import pickle

    return np.asarray(pickle.loads(task.data)["rand_vec"])


def test_generate_dataset_reloads_with_features_and_tasks(tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from benchmarks.metaworld.generate import generate_dataset
    from benchmarks.metaworld.tasks import INSTRUCTIONS

    root = tmp_path / "ds"
    summary = generate_dataset(root, ["reach", "drawer-close"], episodes_per_task=1, image_size=64,
                               cameras=("corner2", "topview"), workers=2, progress=False)
    assert summary["episodes_kept"] == 2 and summary["expert_success"] == {"reach-v3": 1.0, "drawer-close-v3": 1.0}
    ds = LeRobotDataset("local/metaworld", root=root, delta_timestamps={"action": [i / 80 for i in range(4)]})
    assert ds.num_episodes == 2 and ds.fps == 80 and ds.num_frames == summary["frames"]
    feats = ds.meta.features
    assert feats["observation.images.corner2"]["shape"] == (64, 64, 3)
    assert feats["observation.images.topview"]["shape"] == (64, 64, 3)
    assert feats["observation.state"]["shape"] == (4,) and feats["observation.environment_state"]["shape"] == (39,)
    assert feats["action"]["shape"] == (4,)
    assert set(ds.meta.tasks.index) == {INSTRUCTIONS["reach-v3"], INSTRUCTIONS["drawer-close-v3"]}
    first, last = ds[0], ds[len(ds) - 1]
    assert first["task"] == INSTRUCTIONS["reach-v3"] and last["task"] == INSTRUCTIONS["drawer-close-v3"]
    assert first["observation.images.corner2"].shape == (3, 64, 64) and first["action"].shape == (4, 4)
    assert float(first["observation.images.corner2"].std()) > 0.05  # a rendered scene, not a blank frame
    assert np.allclose(first["observation.state"].numpy(), first["observation.environment_state"][:4].numpy())
    assert float(first["action"].abs().max()) <= 1.0
    meta = json.loads((root / "meta" / "metaworld_generation.json").read_text())
    assert [e["variation"][0] % 2 for eps in meta["episodes"].values() for e in eps] == [0, 0]  # train pools
    with pytest.raises(FileExistsError, match="already exists"):
        generate_dataset(root, ["reach"], episodes_per_task=1, workers=1, progress=False)


def test_generation_is_deterministic_across_worker_counts(tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from benchmarks.metaworld.generate import generate_dataset

    frames = []
    for workers in (1, 2):
        root = tmp_path / f"w{workers}"
        generate_dataset(root, ["reach"], episodes_per_task=3, image_size=32, seed=3, workers=workers,
                         use_videos=False, progress=False)
        ds = LeRobotDataset("local/metaworld", root=root)
        frames.append([ds[i] for i in range(len(ds))])
    assert len(frames[0]) == len(frames[1])
    for a, b in zip(*frames):
        for key in ("observation.images.corner2", "observation.environment_state", "action"):
            assert (a[key] == b[key]).all(), key


def test_expert_evaluation_and_report(tmp_path):
    from benchmarks.metaworld.evaluate import evaluate
    from benchmarks.metaworld.expert_policy import ScriptedExpertPolicy
    from benchmarks.metaworld.report import write_report

    res = evaluate(ScriptedExpertPolicy, ["reach"], episodes_per_task=6, seed=0, workers=2,
                   video_dir=tmp_path / "videos", videos_per_task=1, image_size=64, progress=False)
    r = res["tasks"]["reach-v3"]
    assert r["success_rate"] > 0.8 and r["episodes"] == 6
    assert 0 <= r["ci95"][0] <= r["success_rate"] <= r["ci95"][1] <= 1
    assert all(v[0] % 2 == 1 for v in r["variations"])  # held-out (odd) variation pools only
    assert len(set(r["seeds"])) == 6 and all(0 < n <= 500 for n in r["episode_lengths"])
    paths = write_report(res, tmp_path)
    video = tmp_path / "videos" / "reach-v3_ep000.mp4"
    for p in (paths["json"], paths["png"], paths["html"], video):
        assert p.exists() and p.stat().st_size > 500, p
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = paths["html"].read_text()
    assert 'src="success_by_task.png"' in page and 'src="videos/reach-v3_ep000.mp4"' in page
    assert json.loads(paths["json"].read_text())["tasks"]["reach-v3"]["successes"] == r["successes"]

    # first_episode=4 runs episodes 4-5 of the same sequence: what the 6-episode run did there, no other ones
    later = evaluate(ScriptedExpertPolicy, ["reach"], episodes_per_task=2, seed=0, workers=1, first_episode=4,
                     video_dir=tmp_path / "later", videos_per_task=1, image_size=64, progress=False)
    t = later["tasks"]["reach-v3"]
    assert later["first_episode"] == 4 and t["episodes"] == 2
    for key in ("variations", "seeds", "episode_lengths", "successful"):
        assert t[key] == r[key][4:], key
    assert [v["path"] for v in t["videos"]] == [str(tmp_path / "later" / "reach-v3_ep004.mp4")]
    with pytest.raises(ValueError, match="first_episode: expected an int >= 0"):
        evaluate(ScriptedExpertPolicy, ["reach"], first_episode=-1, progress=False)


@pytest.mark.parametrize(
    "policy, workers, message",
    [
        (NaNPolicy, 2, r"task 'reach-v3', episode \d+, step 0: policy returned non-finite actions \(NaN/inf\)"),
        (WrongShapePolicy, 1, r"task 'reach-v3', episode 0, step 0: .*shape \(8, 3\); expected shape \(H, 4\)"),
        (ShortChunkPolicy, 1, r"shape \(2, 4\); expected shape \(H, 4\) with H >= n_action_steps = 4"),
    ],
)
def test_bad_policy_output_fails_clearly(policy, workers, message):
    from benchmarks.metaworld.evaluate import PolicyOutputError, evaluate

    with pytest.raises(PolicyOutputError, match=message):
        evaluate(policy, ["reach"], episodes_per_task=3, workers=workers, image_size=32, progress=False)


def test_check_chunk_accepts_tensors_and_policy_errors_name_the_episode():
    import torch

    from benchmarks.metaworld.evaluate import check_chunk, evaluate

    assert check_chunk(torch.zeros(8, 4), 8, "here").shape == (8, 4)

    with pytest.raises(RuntimeError, match=r"task 'reach-v3', episode 0, step 0: the policy raised ZeroDivisionError"):
        evaluate(_RaisingPolicy, ["reach"], episodes_per_task=1, workers=1, image_size=32, progress=False)


class _RaisingPolicy(NaNPolicy):
    def predict_action_chunk(self, obs):
        return 1 / 0
