"""Loading LeRobot (v3) datasets with action chunks, and reading what is in them.

    ds = make_dataset(DatasetConfig(root="data/debug"), chunk_size=8)
    ds[i]["action"]          # (8, A): the actions at t, t+1/fps, ..., t+7/fps
    ds[i]["action_is_pad"]   # (8,) True where t + k runs past the episode's end

``lerobot`` does the reading (parquet, PNG or video decoding); this file only builds the
``delta_timestamps`` that turn one action per frame into a chunk, and fails early with clear
messages when the config names episodes, keys or cameras the dataset does not have.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from vla.config import DatasetConfig

IMAGE_PREFIX = "observation.images."


@dataclass
class DatasetSpec:
    """What a dataset holds, read from its metadata (no frame is decoded).

    cameras: dataset camera keys (``observation.images.<cam>``), sorted
    """

    cameras: list[str]
    state_dim: int
    action_dim: int
    fps: int
    tasks: list[str]
    num_frames: int
    num_episodes: int


def _check_local_root(root: str | Path) -> Path:
    root = Path(root)
    if not (root / "meta" / "info.json").is_file():
        raise FileNotFoundError(
            f"dataset root {str(root)!r} is not a LeRobot dataset: expected {str(root / 'meta' / 'info.json')!r}. "
            "Create one with vla.data.make_synthetic_dataset or lerobot's LeRobotDataset.create."
        )
    return root


def load_metadata(root: str | Path | None, repo_id: str = "local/dataset"):
    """``LeRobotDatasetMetadata`` of a local folder (``root``) or, with ``root=None``, of a hub id."""
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    if root is not None:
        root = _check_local_root(root)
    return LeRobotDatasetMetadata(repo_id, root=root)


def _feature_dim(features: dict, key: str, what: str) -> int:
    if key not in features:
        known = sorted(k for k in features if not k.startswith(IMAGE_PREFIX))
        raise KeyError(f"{what} key {key!r} is not in the dataset; its non-image features are {known}")
    shape = tuple(features[key]["shape"])
    if len(shape) != 1:
        raise ValueError(f"{what} key {key!r}: expected a 1-D feature (D,), got shape {shape}")
    return int(shape[0])


def dataset_spec(root_or_ds: Any, *, state_key: str = "observation.state", action_key: str = "action") -> DatasetSpec:
    """Read a :class:`DatasetSpec` from a local root, a ``LeRobotDataset``, its metadata or a ``DatasetConfig``.

    For a ``LeRobotDataset`` loaded with an episode subset, counts are those of the subset.
    """
    num_frames = num_episodes = None
    if isinstance(root_or_ds, (str, Path)):
        meta = load_metadata(root_or_ds)
    elif isinstance(root_or_ds, DatasetConfig):
        meta = load_metadata(root_or_ds.root, root_or_ds.repo_id)
        state_key, action_key = root_or_ds.state_key, root_or_ds.action_key
        if root_or_ds.episodes is not None:
            num_episodes = len(root_or_ds.episodes)
            num_frames = sum(int(meta.episodes[e]["length"]) for e in root_or_ds.episodes)
    elif hasattr(root_or_ds, "meta") and hasattr(root_or_ds, "num_frames"):  # LeRobotDataset
        meta = root_or_ds.meta
        num_frames, num_episodes = int(root_or_ds.num_frames), int(root_or_ds.num_episodes)
    elif hasattr(root_or_ds, "info") and hasattr(root_or_ds, "features"):  # LeRobotDatasetMetadata
        meta = root_or_ds
    else:
        raise TypeError(
            "dataset_spec: expected a dataset root path, a LeRobotDataset, a LeRobotDatasetMetadata or a "
            f"DatasetConfig, got {type(root_or_ds).__name__}"
        )
    features = meta.features
    return DatasetSpec(
        cameras=sorted(meta.camera_keys),
        state_dim=_feature_dim(features, state_key, "state"),
        action_dim=_feature_dim(features, action_key, "action"),
        fps=int(meta.fps),
        tasks=[str(t) for t in meta.tasks.index] if meta.tasks is not None else [],
        num_frames=int(meta.total_frames) if num_frames is None else num_frames,
        num_episodes=int(meta.total_episodes) if num_episodes is None else num_episodes,
    )


def make_dataset(cfg: DatasetConfig, chunk_size: int, *, image_transforms=None):
    """A ``LeRobotDataset`` whose items carry ``chunk_size`` future actions and ``<action>_is_pad``.

    The fps comes from the dataset's own metadata: a wrong fps would make lerobot look up
    timestamps that do not exist (or, worse, skip frames).
    """
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    if chunk_size < 1:
        raise ValueError(f"make_dataset: chunk_size must be >= 1, got {chunk_size}")
    meta = load_metadata(cfg.root, cfg.repo_id)
    _feature_dim(meta.features, cfg.state_key, "dataset.state_key")
    _feature_dim(meta.features, cfg.action_key, "dataset.action_key")
    if cfg.episodes is not None:
        bad = [e for e in cfg.episodes if not 0 <= int(e) < meta.total_episodes]
        if bad or not cfg.episodes:
            raise ValueError(
                f"dataset.episodes: expected a non-empty list of episode indices in [0, {meta.total_episodes}), "
                f"got {list(cfg.episodes)} (out of range: {bad})"
            )
    for key in cfg.camera_map:
        _check_camera_key(key, sorted(meta.camera_keys))
    if meta.video_keys:
        _check_video_backend(cfg.video_backend)
    fps = meta.fps
    delta_timestamps = {cfg.action_key: [i / fps for i in range(chunk_size)]}
    return LeRobotDataset(
        cfg.repo_id,
        root=cfg.root,
        episodes=None if cfg.episodes is None else [int(e) for e in cfg.episodes],
        delta_timestamps=delta_timestamps,
        image_transforms=image_transforms,
        video_backend=cfg.video_backend,
    )


def _check_video_backend(backend: str | None) -> None:
    """Fail at load time, not at the first decoded frame inside a DataLoader worker."""
    if backend in (None, "torchcodec"):
        try:
            from torchcodec.decoders import VideoDecoder  # noqa: F401  (loads the FFmpeg libraries)
        except Exception as e:  # OSError/RuntimeError from the native loader
            raise RuntimeError(
                "this dataset stores videos and decoding them needs torchcodec with FFmpeg's shared libraries; "
                "on Debian 12: apt-get install libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 "
                f"libavdevice59 libavfilter8 ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from e
        return
    import torchvision.io

    if backend in ("pyav", "video_reader") and not hasattr(torchvision.io, "VideoReader"):
        # lerobot 0.4.4 decodes these through torchvision.io.VideoReader, removed in torchvision 0.26+
        raise ValueError(f"dataset.video_backend={backend!r} needs torchvision.io.VideoReader, which this "
                         f"torchvision lacks; use 'torchcodec' (or leave it unset)")
    if backend not in ("pyav", "video_reader"):
        raise ValueError(f"dataset.video_backend: unknown {backend!r}; known: torchcodec, pyav, video_reader")


def _check_camera_key(key: str, dataset_cameras: Sequence[str]) -> str:
    """Map a config camera name to a dataset key; ``top`` is accepted for ``observation.images.top``."""
    if key in dataset_cameras:
        return key
    if IMAGE_PREFIX + key in dataset_cameras:
        return IMAGE_PREFIX + key
    raise KeyError(f"dataset.camera_map: unknown dataset camera {key!r}; "
                   f"the dataset's cameras are {list(dataset_cameras)}")


def resolve_camera_map(
    camera_map: dict[str, str], dataset_cameras: Sequence[str], model_cameras: Sequence[str]
) -> dict[str, str]:
    """-> {dataset camera key: model camera slot}.

    An empty ``camera_map`` assigns dataset cameras to model slots in order (sorted dataset keys
    -> ``policy.cameras``). Model slots left without a camera are the designed "missing camera"
    (zero image, mask False). More dataset cameras than model slots is an error rather than a
    silent drop: say which cameras to use with an explicit map (a subset is fine).
    """
    dataset_cameras, model_cameras = list(dataset_cameras), list(model_cameras)
    if not camera_map:
        if len(dataset_cameras) > len(model_cameras):
            raise ValueError(
                f"the dataset has {len(dataset_cameras)} cameras {dataset_cameras} but the model has "
                f"{len(model_cameras)} camera slots {model_cameras}; choose which to use with "
                "--dataset.camera_map (e.g. '{\"" + (dataset_cameras[0] if dataset_cameras else "observation.images.x")
                + "\": \"" + (model_cameras[0] if model_cameras else "cam0") + "\"}') or add slots to policy.cameras"
            )
        return dict(zip(dataset_cameras, model_cameras))
    out: dict[str, str] = {}
    for key, slot in camera_map.items():
        full = _check_camera_key(key, dataset_cameras)
        if slot not in model_cameras:
            raise KeyError(f"dataset.camera_map[{key!r}]: unknown model camera slot {slot!r}; "
                           f"policy.cameras are {model_cameras}")
        if full in out:
            raise ValueError(f"dataset.camera_map: camera {full!r} is mapped twice")
        out[full] = slot
    slots = list(out.values())
    dup = sorted({s for s in slots if slots.count(s) > 1})
    if dup:
        raise ValueError(f"dataset.camera_map: model slots {dup} receive more than one dataset camera: {out}")
    return out
