"""Encode every frame of a LeRobot dataset with a frozen policy backbone, once, and cache it.

    cache = encode_dataset(policy, "data/metaworld_mt10_50")        # LatentCache
    cache.save("outputs/post_training/wm/latents.pt"); LatentCache.load(...)
    idx, valid, goal = cache.windows(chunk_size=8)                    # training windows

The cache keeps the two parts of a latent apart (pooled prefix hidden (N, W), normalized state (N, S)),
so each part can be inspected or reweighted without re-encoding. Frames are stored in dataset
order; each episode's frames are contiguous (LeRobot's layout), which ``windows`` relies on and checks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("post_training.latents")


@dataclass
class LatentCache:
    pooled: Tensor  # (N, W) float32 mean-pooled prefix hidden
    state: Tensor  # (N, S) float32 normalized, padded state (what the policy sees)
    actions: Tensor  # (N, A) float32 normalized, padded action taken at each frame
    episode: Tensor  # (N,) long
    frame: Tensor  # (N,) long frame index within its episode
    index: Tensor  # (N,) long dataset index
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def raw_latents(self) -> Tensor:
        """(N, W + S) the world model's unstandardized latent of every frame."""
        return torch.cat([self.pooled, self.state], dim=-1)

    def episode_last(self) -> Tensor:
        """(N,) row of the last frame of each row's episode."""
        ep = self.episode
        change = torch.ones_like(ep, dtype=torch.bool)
        change[:-1] = ep[1:] != ep[:-1]
        ends = torch.nonzero(change).flatten()  # last row of each run
        run = torch.searchsorted(ends, torch.arange(len(ep)))
        return ends[run]

    def windows(self, chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
        """For every row i: rows of the H next frames (N, H), their validity (N, H) and the goal row (N,).

        Row i's action k leads to frame i + k + 1; steps past the episode's last frame are invalid.
        """
        runs = int((self.episode[1:] != self.episode[:-1]).sum()) + 1
        if runs != len(torch.unique(self.episode)):
            raise ValueError("latent cache: an episode's frames are not contiguous (not in dataset order)")
        last = self.episode_last()
        k = torch.arange(1, chunk_size + 1)
        nxt = torch.arange(len(self))[:, None] + k[None]
        valid = nxt <= last[:, None]
        return torch.minimum(nxt, last[:, None]), valid, last

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({k: getattr(self, k) for k in ("pooled", "state", "actions", "episode", "frame", "index", "meta")}, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LatentCache":
        d = torch.load(Path(path), map_location="cpu", weights_only=False)
        return cls(**d)


@torch.no_grad()
def encode_dataset(policy, root: str | Path, *, batch_size: int = 64, episodes: list[int] | None = None,
                   num_workers: int = 0, repo_id: str = "local/dataset", progress: bool = True,
                   bf16: bool = True) -> LatentCache:
    """Run the policy's backbone over every frame (eval preprocessing: center crop, no augmentation).

    ``bf16`` must match the world model's ``bf16_encode`` (the latents it sees at run time).
    """
    from tqdm.auto import tqdm

    from post_training.world_model import pool_prefix
    from vla.config import DatasetConfig
    from vla.data.dataset import make_dataset

    pre = policy._pre()
    ds = make_dataset(DatasetConfig(root=str(root), repo_id=repo_id, episodes=episodes), 1)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    dev = policy.device
    was = policy.training
    policy.eval()
    parts: dict[str, list[Tensor]] = {k: [] for k in ("pooled", "state", "actions", "episode", "frame", "index")}
    try:
        for batch in tqdm(loader, desc="encode frames", disable=not progress, dynamic_ncols=True, mininterval=2.0):
            obs = pre.observation(batch, train=False).to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                prefix = policy.encode(obs)
            actions, _, _ = pre.actions({pre.action_key: _tile(batch[pre.action_key], policy.config.chunk_size)})
            parts["pooled"].append(pool_prefix(prefix).cpu())
            parts["state"].append(obs.state.float().cpu())
            parts["actions"].append(actions[:, 0].cpu())
            for key, name in (("episode_index", "episode"), ("frame_index", "frame"), ("index", "index")):
                parts[name].append(batch[key].long().flatten())
    finally:
        policy.train(was)
    cache = LatentCache(**{k: torch.cat(v) for k, v in parts.items()},
                        meta={"dataset": str(Path(root).resolve()), "num_frames": len(ds), "bf16": bf16})
    order = torch.argsort(cache.index)  # dataset order (a DataLoader without shuffle keeps it; be sure)
    for k in ("pooled", "state", "actions", "episode", "frame", "index"):
        setattr(cache, k, getattr(cache, k)[order])
    return cache


def _tile(action: Tensor, h: int) -> Tensor:
    """(B, 1, A) one action per frame -> (B, H, A) so the preprocessor's chunk check passes."""
    if action.ndim == 2:
        action = action[:, None]
    return action[:, :1].expand(-1, h, -1)
