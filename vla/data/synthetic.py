"""A tiny LEARNABLE LeRobot dataset, written with lerobot's own API, for the debug preset and tests.

The scene (one per episode): one coloured block per task colour at random places on a 2-D table
and a white "gripper" square. The instruction names the target block ("push the red block");
the other blocks are distractors. Each step the gripper moves toward the target:

    a[:2]  = clip(2 * (target - pos), -1, 1)          pos <- pos + 0.1 * a[:2]
    a[j>=2] = code[task, j] * tanh(4 * (0.25 - |target - pos|))   (a "grip/lift" signal per task)
    state  = [pos_x, pos_y, previous action components...]

So the action is a smooth function of the state, the instruction and where the named colour is
in the image: a policy that reads all three drives its loss far down, one that ignores language
or pixels cannot (the target is not in the state). Default size (4 x 20 frames, 32 px) writes in
well under a second.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

COLOURS = {
    "red": (220, 40, 40), "blue": (40, 80, 230), "green": (40, 190, 60), "yellow": (230, 210, 40),
    "magenta": (210, 50, 200), "cyan": (40, 210, 220), "orange": (240, 140, 30), "purple": (120, 60, 200),
}
PARAMS_FILE = "synthetic.json"  # in meta/: marks a folder as ours (reuse / safe overwrite)


def task_colours(tasks: Sequence[str]) -> list[str]:
    """A colour per task: the colour word in the instruction if there is one, else the next unused one."""
    named = [next((c for c in COLOURS if c in t.lower().split()), None) for t in tasks]
    free = [c for c in COLOURS if c not in named]
    out = []
    for c in named:
        if c is None:
            if not free:
                raise ValueError(f"make_synthetic_dataset: at most {len(COLOURS)} distinct task colours")
            c = free.pop(0)
        out.append(c)
    return out


def _px(c: np.ndarray, size: int) -> np.ndarray:
    return np.round((np.clip(c, -1, 1) + 1) / 2 * (size - 1)).astype(int)


def render(pos: np.ndarray, blocks: dict[str, np.ndarray], size: int, view: int = 0) -> np.ndarray:
    """Top view of the table -> (size, size, 3) uint8. ``view`` k>0 gives a second camera (flipped)."""
    img = np.full((size, size, 3), 40 + 15 * view, np.uint8)
    half = max(1, size // 16)
    for name, p in blocks.items():
        x, y = _px(p, size)
        img[max(0, y - half) : y + half + 1, max(0, x - half) : x + half + 1] = COLOURS[name]
    x, y = _px(pos, size)
    g = max(1, half - 1)
    img[max(0, y - g) : y + g + 1, max(0, x - g) : x + g + 1] = 255
    if view % 4 == 1:
        img = img[:, ::-1]
    elif view % 4 == 2:
        img = img[::-1]
    elif view % 4 == 3:
        img = img.transpose(1, 0, 2)
    return np.ascontiguousarray(img)


def expert_action(pos: np.ndarray, target: np.ndarray, code: np.ndarray) -> np.ndarray:
    """The scripted policy the dataset records (see the module doc)."""
    move = np.clip(2.0 * (target - pos), -1.0, 1.0)
    grip = code * np.tanh(4.0 * (0.25 - np.linalg.norm(target - pos)))
    return np.concatenate([move, grip]).astype(np.float32)


def make_synthetic_dataset(
    root: str | Path,
    *,
    num_episodes: int = 4,
    episode_len: int = 20,
    cameras: Sequence[str] = ("observation.images.cam0",),
    image_size: int = 32,
    state_dim: int = 4,
    action_dim: int = 3,
    fps: int = 10,
    use_videos: bool = False,
    tasks: Sequence[str] = ("push the red block", "lift the blue block"),
    seed: int = 0,
    if_exists: str = "error",
) -> Path:
    """Write the dataset to ``root`` (LeRobot v3) and return ``root``.

    if_exists: "error" (default), "reuse" (return an existing synthetic dataset made with the same
    arguments) or "overwrite" (only ever deletes a folder this function wrote).
    """
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = Path(root)
    if state_dim < 2 or action_dim < 2:
        raise ValueError(f"make_synthetic_dataset: state_dim and action_dim must be >= 2 (a 2-D position), "
                         f"got {state_dim} and {action_dim}")
    if num_episodes < 1 or episode_len < 1 or not tasks or not cameras:
        raise ValueError("make_synthetic_dataset: need >= 1 episode, frame, task and camera")
    if use_videos and image_size < 32:
        # Measured: SVT-AV1 (lerobot's default video codec) kills the whole process with SIGFPE on
        # frames narrower than 25 px, so refuse before a Python error is no longer possible.
        raise ValueError(f"make_synthetic_dataset: use_videos needs image_size >= 32, got {image_size}")
    bad = [c for c in cameras if not c.startswith("observation.images.")]
    if bad:
        raise ValueError(f"make_synthetic_dataset: camera keys must start with 'observation.images.', got {bad}")
    params = dict(num_episodes=num_episodes, episode_len=episode_len, cameras=list(cameras), image_size=image_size,
                  state_dim=state_dim, action_dim=action_dim, fps=fps, use_videos=use_videos, tasks=list(tasks),
                  seed=seed)
    marker = root / "meta" / PARAMS_FILE
    if root.exists() and any(root.iterdir()):
        if if_exists == "reuse" and marker.is_file() and json.loads(marker.read_text()) == params:
            return root
        if if_exists == "overwrite" and marker.is_file():
            shutil.rmtree(root)
        else:
            why = "it was not written by make_synthetic_dataset" if not marker.is_file() else (
                "it was made with other arguments" if if_exists == "reuse" else "if_exists='error'")
            raise FileExistsError(f"{str(root)!r} already exists and {why}; choose another root"
                                  + ("" if not marker.is_file() else " or if_exists='overwrite'"))
    elif root.exists():
        root.rmdir()  # lerobot insists on creating the folder itself

    colours = task_colours(tasks)
    scene_colours = list(dict.fromkeys(colours))
    dtype = "video" if use_videos else "image"
    features = {cam: {"dtype": dtype, "shape": (image_size, image_size, 3), "names": ["height", "width", "channels"]}
                for cam in cameras}
    features["observation.state"] = {"dtype": "float32", "shape": (state_dim,), "names": None}
    features["action"] = {"dtype": "float32", "shape": (action_dim,), "names": None}

    rng = np.random.default_rng(seed)
    codes = rng.choice([-1.0, 1.0], size=(len(tasks), action_dim - 2))  # per-task grip signal signs

    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one "Map" bar per episode is noise here
    try:
        ds = LeRobotDataset.create(repo_id=f"synthetic/{root.name}", root=root, fps=fps, features=features,
                                   robot_type="synthetic", use_videos=use_videos)
        for ep in range(num_episodes):
            k = ep % len(tasks)
            blocks = {c: rng.uniform(-0.8, 0.8, size=2) for c in scene_colours}
            target = blocks[colours[k]]
            pos = rng.uniform(-0.8, 0.8, size=2)
            prev = np.zeros(action_dim, np.float32)
            for _ in range(episode_len):
                state = np.zeros(state_dim, np.float32)
                state[:2] = pos
                state[2:] = prev[np.arange(state_dim - 2) % action_dim]
                action = expert_action(pos, target, codes[k])
                frame = {cam: render(pos, blocks, image_size, view=i) for i, cam in enumerate(cameras)}
                frame.update({"observation.state": state, "action": action, "task": tasks[k]})
                ds.add_frame(frame)
                pos = pos + 0.1 * action[:2]
                prev = action
            ds.save_episode(parallel_encoding=False)  # a process pool costs more than it saves here
        ds.finalize()
    finally:
        if bars:
            datasets.enable_progress_bars()
    marker.write_text(json.dumps(params, indent=1))
    return root
