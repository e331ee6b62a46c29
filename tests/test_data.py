"""Data pipeline: LeRobot datasets (image and video storage), stats, normalization, preprocessing."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from vla.config import BackboneConfig, DatasetConfig, HeadConfig, NormalizationConfig, PolicyConfig
from vla.data import (
    Normalizer,
    Preprocessor,
    compute_stats,
    dataset_spec,
    load_stats,
    make_dataset,
    make_synthetic_dataset,
    resolve_camera_map,
    save_stats,
)

CAMS = ("observation.images.front", "observation.images.wrist")  # two cameras
EP_LEN, N_EP, FPS, H, W, CHUNK = 6, 3, 5, 24, 32, 4  # fps 5: a hard-coded 1/10 s step would fail
# (W >= 25: lerobot's default video codec, SVT-AV1, kills the process with SIGFPE on narrower frames)


def frame_values(ep: int, t: int) -> dict:
    """The ground truth every test checks against. State dim 2 is constant on purpose."""
    level = 20 + 10 * t + 60 * ep  # a flat grey level per frame: survives video compression
    return {
        CAMS[0]: np.full((H, W, 3), level, np.uint8),
        CAMS[1]: np.full((H, W, 3), 255 - level, np.uint8),
        "observation.state": np.array([ep * 100 + t, np.sin(t), 7.0], np.float32),
        "action": np.array([ep * 100 + t + 0.5, -t], np.float32),
        "task": "push the red block" if ep % 2 == 0 else "lift the blue block",
    }


def write_dataset(root, use_videos: bool):
    """Written with lerobot's own API, as a user's recording would be."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    dtype = "video" if use_videos else "image"
    features = {c: {"dtype": dtype, "shape": (H, W, 3), "names": ["height", "width", "channels"]} for c in CAMS}
    features["observation.state"] = {"dtype": "float32", "shape": (3,), "names": None}
    features["action"] = {"dtype": "float32", "shape": (2,), "names": None}
    ds = LeRobotDataset.create(repo_id="test/two_cams", root=root, fps=FPS, features=features, use_videos=use_videos)
    for ep in range(N_EP):
        for t in range(EP_LEN):
            ds.add_frame(frame_values(ep, t))
        ds.save_episode(parallel_encoding=False)
    ds.finalize()
    return root


@pytest.fixture(scope="module", params=["image", "video"])
def root(request, tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp(request.param) / "ds", use_videos=request.param == "video")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("img") / "ds", use_videos=False)


def byte_tokenize(texts: list[str], max_len: int):
    """A stand-in for a backbone's tokenizer: utf-8 bytes, right-padded, too long is an error."""
    ids = [list(t.encode()) for t in texts]
    if max(len(i) for i in ids) > max_len:
        raise ValueError(f"prompt longer than {max_len} tokens")
    n = max(len(i) for i in ids)
    out = torch.zeros(len(ids), n, dtype=torch.long)
    mask = torch.zeros(len(ids), n, dtype=torch.bool)
    for r, i in enumerate(ids):
        out[r, : len(i)] = torch.tensor(i)
        mask[r, : len(i)] = True
    return out, mask


def policy_cfg(**kw) -> PolicyConfig:
    base = dict(backbone=BackboneConfig(), head=HeadConfig(), chunk_size=CHUNK, max_state_dim=6, max_action_dim=5,
                cameras=["cam0", "cam1"], image_size=16, max_prompt_len=32)
    return PolicyConfig(**{**base, **kw})


def make_pre(stats, cfg=None, cmap=None, **kw) -> Preprocessor:
    cmap = {CAMS[0]: "cam0", CAMS[1]: "cam1"} if cmap is None else cmap
    return Preprocessor(cfg or policy_cfg(), cmap, 3, 2, stats, byte_tokenize, **kw)


# --- datasets ---------------------------------------------------------------------------------------


def test_reload_chunked_actions_and_pad(root):
    ds = make_dataset(DatasetConfig(root=str(root)), chunk_size=CHUNK)
    assert len(ds) == N_EP * EP_LEN
    for ep, t in [(0, 0), (0, EP_LEN - 2), (1, EP_LEN - 1), (2, 3)]:
        item = ds[ep * EP_LEN + t]
        want = np.stack([frame_values(ep, min(t + k, EP_LEN - 1))["action"] for k in range(CHUNK)])
        np.testing.assert_allclose(item["action"].numpy(), want)  # past the end lerobot repeats the last action
        assert item["action_is_pad"].tolist() == [t + k >= EP_LEN for k in range(CHUNK)]
        np.testing.assert_allclose(item["observation.state"].numpy(), frame_values(ep, t)["observation.state"])
        assert item["task"] == frame_values(ep, t)["task"]
        for cam in CAMS:
            img = item[cam]
            assert img.shape == (3, H, W) and img.dtype == torch.float32
            level = float(frame_values(ep, t)[cam][0, 0, 0])
            assert abs(float(img.mean()) * 255 - level) < 3, (cam, float(img.mean()) * 255, level)  # video: lossy
    if "video" in str(root):
        with pytest.raises(ValueError, match="video_backend.*'bogus'.*torchcodec"):
            make_dataset(DatasetConfig(root=str(root), video_backend="bogus"), chunk_size=CHUNK)


def test_episode_subset_and_bad_episodes(image_root):
    ds = make_dataset(DatasetConfig(root=str(image_root), episodes=[1]), chunk_size=CHUNK)
    assert len(ds) == EP_LEN
    assert ds[EP_LEN - 1]["action_is_pad"].tolist() == [False, True, True, True]
    np.testing.assert_allclose(ds[0]["action"][0].numpy(), frame_values(1, 0)["action"])
    with pytest.raises(ValueError, match=r"dataset.episodes.*\[0, 3\).*\[7\]"):
        make_dataset(DatasetConfig(root=str(image_root), episodes=[0, 7]), chunk_size=CHUNK)
    with pytest.raises(KeyError, match="observation.joints.*observation.state"):
        make_dataset(DatasetConfig(root=str(image_root), state_key="observation.joints"), chunk_size=CHUNK)
    with pytest.raises(FileNotFoundError, match="info.json"):
        make_dataset(DatasetConfig(root=str(image_root / "nope")), chunk_size=CHUNK)


def test_dataset_spec(image_root):
    spec = dataset_spec(image_root)
    assert spec.cameras == sorted(CAMS)
    assert (spec.state_dim, spec.action_dim, spec.fps) == (3, 2, FPS)
    assert sorted(spec.tasks) == ["lift the blue block", "push the red block"]
    assert (spec.num_frames, spec.num_episodes) == (N_EP * EP_LEN, N_EP)
    sub = dataset_spec(DatasetConfig(root=str(image_root), episodes=[0, 2]))
    assert (sub.num_frames, sub.num_episodes) == (2 * EP_LEN, 2)
    ds = make_dataset(DatasetConfig(root=str(image_root), episodes=[2]), chunk_size=2)
    assert dataset_spec(ds).num_frames == EP_LEN


def test_resolve_camera_map():
    ds_cams, slots = list(CAMS), ["cam0", "cam1", "cam2"]
    assert resolve_camera_map({}, ds_cams, slots) == {CAMS[0]: "cam0", CAMS[1]: "cam1"}
    assert resolve_camera_map({"wrist": "cam2"}, ds_cams, slots) == {CAMS[1]: "cam2"}  # short name, subset
    with pytest.raises(ValueError, match=r"2 cameras.*1 camera slots"):  # never a silent drop
        resolve_camera_map({}, ds_cams, ["cam0"])
    assert resolve_camera_map({CAMS[0]: "cam0"}, ds_cams, ["cam0"]) == {CAMS[0]: "cam0"}  # explicit subset is fine
    with pytest.raises(KeyError, match=r"'observation.images.top'.*observation.images.front.*observation.images.wrist"):
        resolve_camera_map({"observation.images.top": "cam0"}, ds_cams, slots)
    with pytest.raises(KeyError, match=r"'cam9'.*cam0"):
        resolve_camera_map({CAMS[0]: "cam9"}, ds_cams, slots)
    with pytest.raises(ValueError, match="more than one"):
        resolve_camera_map({CAMS[0]: "cam0", CAMS[1]: "cam0"}, ds_cams, slots)


# --- stats and normalization ------------------------------------------------------------------------


def _numpy_arrays(key, episodes=range(N_EP)):
    return np.stack([frame_values(e, t)[key] for e in episodes for t in range(EP_LEN)]).astype(np.float64)


def test_stats_equal_numpy(root):
    t0 = time.perf_counter()
    stats = compute_stats(root)
    assert time.perf_counter() - t0 < 2.0  # parquet columns only, no image decoding
    for key in ("observation.state", "action"):
        x = _numpy_arrays(key)
        st = stats[key]
        for name, ref in [("mean", x.mean(0)), ("std", x.std(0)), ("min", x.min(0)), ("max", x.max(0)),
                          ("q01", np.quantile(x, 0.01, axis=0)), ("q99", np.quantile(x, 0.99, axis=0))]:
            assert st[name].dtype == np.float32 and st[name].shape == (x.shape[1],)
            np.testing.assert_allclose(st[name], ref.astype(np.float32), rtol=1e-6, atol=1e-6, err_msg=f"{key} {name}")
        assert st["count"].tolist() == [len(x)] * x.shape[1]
    # a LeRobotDataset loaded with an episode subset gives the subset's stats
    ds = make_dataset(DatasetConfig(root=str(root), episodes=[0, 2]), chunk_size=2)
    sub = compute_stats(ds)
    np.testing.assert_allclose(sub["action"]["mean"], _numpy_arrays("action", [0, 2]).mean(0), rtol=1e-6)
    with pytest.raises(KeyError, match="observation.joints.*observation.state"):
        compute_stats(root, keys=("observation.joints",))


def test_stats_json_round_trip_is_exact(image_root, tmp_path):
    stats = compute_stats(image_root)
    stats["action"]["mean"] = np.array([np.float32(1 / 3), np.float32(np.pi)], np.float32)  # not short decimals
    back = load_stats(save_stats(stats, tmp_path / "s" / "stats.json"))
    for key, st in stats.items():
        for name, v in st.items():
            assert back[key][name].dtype == v.dtype
            assert np.array_equal(back[key][name], v), (key, name)


@pytest.mark.parametrize("mode", ["mean_std", "quantile"])
def test_constant_feature_stays_finite(image_root, mode):
    stats = compute_stats(image_root)  # state dim 2 is constant (7.0): std 0 and q99 - q01 == 0
    assert stats["observation.state"]["std"][2] == 0
    norm = Normalizer(stats, {"observation.state": mode}, eps=1e-6)
    x = torch.tensor(_numpy_arrays("observation.state"), dtype=torch.float32)
    x_off = x.clone()
    x_off[:, 2] = 7.3  # a value never seen in the data: still 0, not 3e5
    for inp in (x, x_off):
        y = norm.normalize("observation.state", inp)
        assert torch.isfinite(y).all() and (y[:, 2] == 0).all()
        back = norm.unnormalize("observation.state", y)
        assert torch.isfinite(back).all()
        assert torch.allclose(back[:, 2], torch.tensor(7.0))
        assert torch.allclose(back[:, :2], x[:, :2], atol=1e-4)


@pytest.mark.parametrize("mode", ["mean_std", "quantile", "identity"])
def test_normalize_round_trip(mode):
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(500, 4)) * np.array([1, 10, 0.01, 100])
    from vla.data.stats import stats_from_array

    norm = Normalizer({"action": stats_from_array(data)}, {"action": mode})
    x = torch.tensor(rng.normal(3.0, 2.0, size=(2, 3, 4)) * np.array([1, 10, 0.01, 100]), dtype=torch.float32)
    y = norm.normalize("action", x)
    assert y.shape == x.shape
    torch.testing.assert_close(norm.unnormalize("action", y), x, rtol=1e-5, atol=1e-5)
    if mode == "mean_std":
        z = norm.normalize("action", torch.tensor(data, dtype=torch.float32))
        torch.testing.assert_close(z.mean(0), torch.zeros(4), atol=1e-4, rtol=0)
        torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(4), atol=1e-4, rtol=0)
    if mode == "identity":
        assert torch.equal(y, x)


def test_quantile_maps_q01_q99_to_unit_range_without_clipping():
    stats = {"action": {"q01": np.array([0.0, -2.0], np.float32), "q99": np.array([10.0, 2.0], np.float32)}}
    norm = Normalizer(stats, {"action": "quantile"})
    x = torch.tensor([[0.0, -2.0], [10.0, 2.0], [5.0, 0.0], [20.0, -6.0]])
    y = norm.normalize("action", x)
    torch.testing.assert_close(y, torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0], [3.0, -3.0]]))
    torch.testing.assert_close(norm.unnormalize("action", y), x)


def test_normalizer_errors():
    stats = {"action": {"mean": np.zeros(2, np.float32), "std": np.ones(2, np.float32)}}
    with pytest.raises(ValueError, match="minmax.*mean_std"):
        Normalizer(stats, {"action": "minmax"})
    with pytest.raises(KeyError, match="q01"):
        Normalizer(stats, {"action": "quantile"})
    with pytest.raises(ValueError, match=r"action: expected last dim 2.*\(4, 3\)"):
        Normalizer(stats, {"action": "mean_std"}).normalize("action", torch.zeros(4, 3))


# --- preprocessor -----------------------------------------------------------------------------------


def _assert_same_obs(a, b):
    assert a.images.keys() == b.images.keys()
    for k in a.images:
        torch.testing.assert_close(a.images[k], b.images[k], atol=1e-6, rtol=0)
        assert torch.equal(a.image_masks[k], b.image_masks[k])
    torch.testing.assert_close(a.state, b.state)
    assert torch.equal(a.state_mask, b.state_mask)
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.prompt_mask, b.prompt_mask)


def test_preprocessor_batch_equals_single_numpy_observation(image_root):
    ds = make_dataset(DatasetConfig(root=str(image_root)), chunk_size=CHUNK)
    pre = make_pre(compute_stats(image_root))
    idx = [0, 5, 7, 17]
    batch = torch.utils.data.default_collate([ds[i] for i in idx])  # what a DataLoader yields
    obs = pre.observation(batch)
    assert obs.batch_size == 4 and obs.images["cam0"].shape == (4, 3, 16, 16)
    assert obs.prompt_ids.shape[0] == 4
    for row, i in enumerate(idx):
        item = ds[i]
        robot = {  # what a robot sends: numpy, HWC uint8, unbatched, task a str
            CAMS[0]: (item[CAMS[0]].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8),
            CAMS[1]: (item[CAMS[1]].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8),
            "observation.state": item["observation.state"].numpy(),
            "task": item["task"],
        }
        single = pre.observation(robot)
        assert single.batch_size == 1
        ids, mask = byte_tokenize([item["task"]], 32)
        assert torch.equal(single.prompt_ids, ids)
        sliced = type(obs)(
            images={k: v[row : row + 1] for k, v in obs.images.items()},
            image_masks={k: v[row : row + 1] for k, v in obs.image_masks.items()},
            state=obs.state[row : row + 1], state_mask=obs.state_mask[row : row + 1],
            prompt_ids=obs.prompt_ids[row : row + 1, : ids.shape[1]],
            prompt_mask=obs.prompt_mask[row : row + 1, : ids.shape[1]],
        )
        _assert_same_obs(single, sliced)
        _assert_same_obs(pre.observation(item), single)  # an unbatched torch item (3, H, W) float too


def test_state_action_padding_and_masks(image_root):
    stats = compute_stats(image_root)
    pre = make_pre(stats)
    ds = make_dataset(DatasetConfig(root=str(image_root)), chunk_size=CHUNK)
    batch = torch.utils.data.default_collate([ds[i] for i in (3, EP_LEN - 1)])
    obs = pre.observation(batch)
    assert obs.state.shape == (2, 6)
    assert obs.state_mask.tolist() == [[True] * 3 + [False] * 3] * 2
    assert (obs.state[:, 3:] == 0).all()
    mean, std = (torch.tensor(stats["observation.state"][k]) for k in ("mean", "std"))
    torch.testing.assert_close(obs.state[:, :2], ((batch["observation.state"] - mean) / std)[:, :2])
    assert (obs.state[:, 2] == 0).all()  # the constant state dim
    actions, is_pad, dim_mask = pre.actions(batch)
    assert actions.shape == (2, CHUNK, 5) and (actions[..., 2:] == 0).all()
    assert dim_mask.tolist() == [[True, True, False, False, False]] * 2
    assert is_pad.tolist() == [[False] * 3 + [True], [False] + [True] * 3]
    torch.testing.assert_close(pre.unnormalize_actions(actions), batch["action"])
    single, single_pad, _ = pre.actions({"action": batch["action"][0].numpy()})  # (H, A), no is_pad: all real
    torch.testing.assert_close(single, actions[:1])
    assert not single_pad.any()


def test_missing_model_camera_slot_gets_mask_false(image_root):
    cfg = policy_cfg(cameras=["cam0", "cam1", "cam2"])
    pre = make_pre(compute_stats(image_root), cfg=cfg, cmap={CAMS[1]: "cam0", CAMS[0]: "cam2"})
    obs = pre.observation({k: v for k, v in frame_values(0, 1).items() if k != "action"})
    assert obs.image_masks["cam0"].tolist() == [True] and obs.image_masks["cam2"].tolist() == [True]
    assert obs.image_masks["cam1"].tolist() == [False]
    assert obs.images["cam1"].shape == (1, 3, 16, 16) and (obs.images["cam1"] == 0).all()
    torch.testing.assert_close(obs.images["cam0"].mean(), torch.tensor((255 - 30) / 255))  # wrist -> cam0


def test_unused_dataset_camera_is_ignored_only_when_declared(image_root):
    stats = compute_stats(image_root)
    raw = {k: v for k, v in frame_values(0, 1).items() if k != "action"}
    pre = Preprocessor.from_dataset(policy_cfg(cameras=["cam0"]), DatasetConfig(camera_map={"front": "cam0"}),
                                    dataset_spec(image_root), stats, byte_tokenize)
    assert pre.ignored_cameras == [CAMS[1]]
    assert list(pre.observation(raw).images) == ["cam0"]
    strict = make_pre(stats, cmap={CAMS[0]: "cam0"})
    with pytest.raises(KeyError, match=r"observation.images.wrist.*expected camera keys.*observation.images.front"):
        strict.observation(raw)


def test_train_crop(image_root):
    pre = make_pre(compute_stats(image_root), crop_scale=0.5)
    raw = frame_values(0, 1)
    rng_img = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    raw[CAMS[0]] = rng_img
    a = pre.observation(raw, train=True).images["cam0"]
    b = pre.observation(raw, train=True).images["cam0"]
    assert a.shape == (1, 3, 16, 16) and not torch.equal(a, b)  # random crops differ
    e1, e2 = pre.observation(raw).images["cam0"], pre.observation(raw).images["cam0"]
    assert torch.equal(e1, e2)  # eval: deterministic center crop
    with pytest.raises(ValueError, match="crop_scale"):
        make_pre(compute_stats(image_root), crop_scale=0.0)


def _raw():
    return {k: v for k, v in frame_values(0, 1).items()}


BAD_INPUTS = [
    # (name, mutate raw, exception, words the message must contain)
    ("missing state", lambda r: r.pop("observation.state"), KeyError,
     ["'observation.state'", "expected keys", "received keys"]),
    ("missing task", lambda r: r.pop("task"), KeyError, ["'task'"]),
    ("missing camera", lambda r: r.pop(CAMS[1]), KeyError, [CAMS[1]]),
    ("unknown camera", lambda r: r.update({"observation.images.top": r[CAMS[0]]}), KeyError,
     ["observation.images.top", "expected camera keys", CAMS[0], CAMS[1]]),
    ("4 channels", lambda r: r.update({CAMS[0]: np.zeros((H, W, 4), np.uint8)}), ValueError,
     [CAMS[0], "(3, H, W) or (H, W, 3)", f"({H}, {W}, 4)"]),
    ("2-d image", lambda r: r.update({CAMS[0]: np.zeros((H, W), np.uint8)}), ValueError,
     [CAMS[0], "(3, H, W) or (H, W, 3)", f"({H}, {W})"]),
    ("0..255 float image", lambda r: r.update({CAMS[0]: np.full((3, H, W), 200.0, np.float32)}), ValueError,
     [CAMS[0], "[0, 1]", "200"]),
    ("nan image", lambda r: r.update({CAMS[1]: np.full((3, H, W), np.nan, np.float32)}), ValueError,
     [CAMS[1], "NaN", f"(1, 3, {H}, {W})"]),
    ("state dim", lambda r: r.update({"observation.state": np.zeros(4, np.float32)}), ValueError,
     ["observation.state", "(3,)", "(4,)"]),
    ("nan state", lambda r: r.update({"observation.state": np.array([0, np.inf, 0], np.float32)}), ValueError,
     ["observation.state", "NaN/inf", "(1, 3)"]),
]


@pytest.mark.parametrize("name,mutate,exc,words", BAD_INPUTS, ids=[b[0].replace(" ", "_") for b in BAD_INPUTS])
def test_bad_observation_inputs(image_root, name, mutate, exc, words):
    pre = make_pre(compute_stats(image_root))
    raw = _raw()
    mutate(raw)
    with pytest.raises(exc) as info:
        pre.observation(raw)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_bad_batched_inputs_and_actions(image_root):
    pre = make_pre(compute_stats(image_root))
    batch = {CAMS[0]: torch.zeros(2, 3, H, W), CAMS[1]: torch.zeros(3, 3, H, W),
             "observation.state": torch.zeros(2, 3), "task": ["a", "b"]}
    with pytest.raises(ValueError, match=rf"{CAMS[1]}.*\(2, 3, H, W\).*\(3, 3, {H}, {W}\)"):
        pre.observation(batch)
    batch[CAMS[1]] = torch.zeros(2, 3, H, W)
    with pytest.raises(ValueError, match=r"task: expected 2 strings.*got 3"):
        pre.observation({**batch, "task": ["a", "b", "c"]})
    with pytest.raises(ValueError, match=r"action: expected shape \(B, 4, 2\) or \(4, 2\).*got \(2, 4, 3\)"):
        pre.actions({"action": torch.zeros(2, CHUNK, 3)})
    with pytest.raises(ValueError, match=r"action: .*NaN/inf.*\(1, 4, 2\)"):
        pre.actions({"action": np.full((CHUNK, 2), np.nan, np.float32)})
    with pytest.raises(KeyError, match="'action'"):
        pre.actions({"observation.state": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"action_is_pad: expected shape \(2, 4\), got \(2, 3\)"):
        pre.actions({"action": torch.zeros(2, CHUNK, 2), "action_is_pad": torch.zeros(2, 3, dtype=torch.bool)})


def test_dims_larger_than_model_max_are_errors(image_root):
    stats = compute_stats(image_root)
    with pytest.raises(ValueError, match=r"state_dim 3 > policy.max_state_dim 2"):
        make_pre(stats, cfg=policy_cfg(max_state_dim=2))
    with pytest.raises(ValueError, match=r"action_dim 2 > policy.max_action_dim 1"):
        make_pre(stats, cfg=policy_cfg(max_action_dim=1))
    with pytest.raises(ValueError, match=r"stats\['action'\] have dim 2.*dim 4"):
        Preprocessor(policy_cfg(), {}, 3, 4, stats, byte_tokenize)


def test_unnormalize_actions_checks(image_root):
    pre = make_pre(compute_stats(image_root))
    with pytest.raises(ValueError, match="NaN/inf"):
        pre.unnormalize_actions(torch.full((1, CHUNK, 5), float("nan")))
    with pytest.raises(ValueError, match=r"max_action_dim=5.*\(1, 4, 2\)"):
        pre.unnormalize_actions(torch.zeros(1, CHUNK, 2))
    assert pre.unnormalize_actions(torch.zeros(3, 2, CHUNK, 5)).shape == (3, 2, CHUNK, 2)


def test_state_dict_round_trip(image_root):
    cfg = policy_cfg(normalization=NormalizationConfig(state="quantile", action="mean_std"))
    pre = make_pre(compute_stats(image_root), cfg=cfg, crop_scale=0.9)
    d = json.loads(json.dumps(pre.state_dict()))  # json-able
    back = Preprocessor.from_state_dict(d, cfg, byte_tokenize)
    raw = _raw()
    _assert_same_obs(pre.observation(raw), back.observation(raw))
    a = torch.randn(2, CHUNK, 5)
    assert torch.equal(pre.unnormalize_actions(a), back.unnormalize_actions(a))
    assert back.crop_scale == 0.9 and back.camera_map == pre.camera_map
    with pytest.raises(ValueError, match="normalization"):
        Preprocessor.from_state_dict(d, policy_cfg(), byte_tokenize)


# --- synthetic dataset ------------------------------------------------------------------------------


def test_synthetic_dataset_is_fast_and_learnable(tmp_path):
    t0 = time.perf_counter()
    root = make_synthetic_dataset(tmp_path / "syn")
    elapsed = time.perf_counter() - t0
    assert elapsed < 10.0, elapsed  # ~0.3 s here; generous for slow CI
    spec = dataset_spec(root)
    assert spec.cameras == ["observation.images.cam0"] and (spec.state_dim, spec.action_dim) == (4, 3)
    assert (spec.num_episodes, spec.num_frames) == (4, 80)
    # the target is only in the image: recover it from the named colour's pixels and check the action
    from vla.data.synthetic import COLOURS

    ds = make_dataset(DatasetConfig(root=str(root)), chunk_size=1)
    for i in (0, 25, 47, 66):
        item = ds[i]
        img = (item["observation.images.cam0"].permute(1, 2, 0).numpy() * 255).round().astype(int)
        colour = "red" if "red" in item["task"] else "blue"
        ys, xs = np.nonzero((img == np.array(COLOURS[colour])).all(-1))
        target = np.array([xs.mean(), ys.mean()]) / 31 * 2 - 1
        pos = item["observation.state"][:2].numpy()
        expect = np.clip(2 * (target - pos), -1, 1)
        np.testing.assert_allclose(item["action"][0, :2].numpy(), expect, atol=0.2)
    # reuse / error / overwrite
    assert make_synthetic_dataset(root, if_exists="reuse") == root
    with pytest.raises(FileExistsError, match="already exists"):
        make_synthetic_dataset(root)
    make_synthetic_dataset(root, num_episodes=2, if_exists="overwrite")
    assert dataset_spec(root).num_episodes == 2
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not written by make_synthetic_dataset"):
        make_synthetic_dataset(tmp_path / "mine", if_exists="overwrite")
