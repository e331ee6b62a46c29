"""``vla post-train preferences``: preference pairs scored by the world model and the data (NORA-1.5).

    vla post-train preferences --dataset data/metaworld_mt10_50 --policy POLICY \\
        --world_model outputs/post_training/wm/checkpoints/last/world_model \\
        --out outputs/post_training/prefs --num_obs 2000 --samples 8 --min_margin 1.0

For ``num_obs`` dataset frames (seeded sample): ONE backbone pass, K chunks sampled from the policy,
each scored by
  * goal progress: the world model's predicted approach to the goal latent (the episode's last frame),
  * action deviation: the L2 distance (normalized units) to the dataset's own chunk at that frame,
  * their weighted sum, each component divided by its within-observation spread over all candidates.
The best and the worst candidate become a (chosen, rejected) pair when their scores differ by at least
``min_margin`` (in those spread units). Everything is stored: ``pairs.pt`` (indices, chunks, scores)
and ``meta.json`` (what made it); :func:`PreferenceSet.load` reloads and checks it.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from post_training.rewards import action_deviation, combine, parse_weights, within_scale

log = logging.getLogger("post_training.preferences")
PAIRS_NAME = "pairs.pt"
META_NAME = "meta.json"


@dataclass
class PreferenceSet:
    """index (M,) dataset frame; candidates (M, K, H, A) normalized; chosen/rejected (M,) candidate ids;
    scores (M, K) combined; components name -> (M, K) raw; kept (M,) bool (margin reached)."""

    index: Tensor
    candidates: Tensor
    scores: Tensor
    components: dict[str, Tensor]
    chosen_id: Tensor
    rejected_id: Tensor
    kept: Tensor
    meta: dict = field(default_factory=dict)

    @property
    def chosen(self) -> Tensor:
        """(M, H, A) the chosen chunk of every observation."""
        return self.candidates[torch.arange(len(self.index)), self.chosen_id]

    @property
    def rejected(self) -> Tensor:
        return self.candidates[torch.arange(len(self.index)), self.rejected_id]

    def pairs(self) -> tuple[Tensor, Tensor, Tensor]:
        """Only the kept pairs: (index (P,), chosen (P, H, A), rejected (P, H, A))."""
        k = self.kept
        return self.index[k], self.chosen[k], self.rejected[k]

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"index": self.index, "candidates": self.candidates, "scores": self.scores,
                    "components": self.components, "chosen_id": self.chosen_id, "rejected_id": self.rejected_id,
                    "kept": self.kept}, out / PAIRS_NAME)
        (out / META_NAME).write_text(json.dumps(self.meta, indent=2))
        return out

    @classmethod
    def load(cls, path: str | Path) -> "PreferenceSet":
        path = Path(path)
        if not (path / PAIRS_NAME).exists():
            raise FileNotFoundError(f"{path} is not a preference set: no {PAIRS_NAME} in it "
                                    "(make one with `vla post-train preferences`)")
        d = torch.load(path / PAIRS_NAME, map_location="cpu", weights_only=True)
        meta = json.loads((path / META_NAME).read_text()) if (path / META_NAME).exists() else {}
        ps = cls(**d, meta=meta)
        m, k = ps.scores.shape
        if ps.candidates.shape[:2] != (m, k) or ps.index.shape != (m,) or ps.kept.shape != (m,):
            raise ValueError(f"{path}: inconsistent shapes: index {tuple(ps.index.shape)}, candidates "
                             f"{tuple(ps.candidates.shape)}, scores {tuple(ps.scores.shape)}")
        return ps


def load_frames(ds, indices: list[int]) -> dict:
    """Dataset items at ``indices`` collated into one LeRobot-keyed batch."""
    from torch.utils.data import default_collate

    return default_collate([ds[int(i)] for i in indices])


def episode_last_index(ds) -> dict[int, int]:
    """episode index -> dataset index of its last frame."""
    eps = ds.meta.episodes
    return {int(e): int(t) - 1 for e, t in zip(eps["episode_index"], eps["dataset_to_index"])}


@torch.no_grad()
def score_batch(policy, wm, ds, indices: list[int], last: dict[int, int], samples: int,
                generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """K policy chunks for each frame and their raw reward components.

    -> candidates (B, K, H, A) normalized; {"goal_progress": (B, K), "action": (B, K) = -deviation}.
    """
    pre = policy._pre()
    dev = policy.device
    batch = load_frames(ds, indices)
    obs = pre.observation(batch, train=False).to(dev)
    actions, is_pad, dim_mask = (t.to(dev) for t in pre.actions(batch))
    prefix = policy.encode(obs, dim_mask)
    chunks = policy.head.sample(policy.backbone, prefix, num_samples=samples, generator=generator)  # (B, K, H, A)
    goal_batch = load_frames(ds, [last[int(e)] for e in batch["episode_index"]])
    goal_obs = pre.observation(goal_batch, train=False).to(dev)
    gp = wm.reward(wm.encode(obs), chunks.float(), wm.encode(goal_obs))
    dev_ = action_deviation(chunks.float(), actions, is_pad, dim_mask)
    return chunks.float().cpu(), {"goal_progress": gp.float().cpu(), "action": -dev_.float().cpu()}


def select_pairs(components: dict[str, Tensor], weights: dict[str, float], min_margin: float):
    """-> scores (M, K), chosen_id (M,), rejected_id (M,), kept (M,), scales {name: float}."""
    scales = {k: within_scale(v) for k, v in components.items()}
    scores = combine(components, weights, scales)
    best, worst = scores.argmax(1), scores.argmin(1)
    rows = torch.arange(scores.shape[0])
    kept = (scores[rows, best] - scores[rows, worst]) >= min_margin
    return scores, best, worst, kept, scales


def build_preferences(args) -> PreferenceSet:
    from tqdm.auto import tqdm

    from post_training.world_model import WorldModel
    from vla.config import DatasetConfig
    from vla.data.dataset import make_dataset
    from vla.policy import VLAPolicy

    if args.samples < 2:
        raise ValueError(f"--samples: expected >= 2 chunks per observation, received {args.samples}")
    if args.num_obs < 1:
        raise ValueError(f"--num_obs: expected >= 1, received {args.num_obs}")
    weights = parse_weights(args.weights)
    policy = VLAPolicy.from_pretrained(args.policy, device=args.device)
    wm = WorldModel.from_pretrained(args.world_model, device=args.device)
    if wm.cfg.chunk_size != policy.config.chunk_size or wm.cfg.action_dim != policy.config.max_action_dim:
        raise ValueError(f"world model (chunk {wm.cfg.chunk_size}, action dim {wm.cfg.action_dim}) does not fit the "
                         f"policy (chunk {policy.config.chunk_size}, action dim {policy.config.max_action_dim})")
    ds = make_dataset(DatasetConfig(root=str(args.dataset)), policy.config.chunk_size)
    last = episode_last_index(ds)
    g = torch.Generator().manual_seed(args.seed)
    pool = torch.arange(len(ds))
    if args.episodes:
        from post_training.world_model_train import parse_episodes

        keep = set(parse_episodes(args.episodes, args.dataset))
        eps = ds.meta.episodes
        pool = torch.cat([torch.arange(int(f), int(t)) for e, f, t in zip(eps["episode_index"],
                          eps["dataset_from_index"], eps["dataset_to_index"]) if int(e) in keep])
    n = min(args.num_obs, len(pool))
    chosen_rows = pool[torch.randperm(len(pool), generator=g)[:n]].sort().values.tolist()
    torch.manual_seed(args.seed)  # the policy's sampling noise
    cands, comps = [], {}
    t0 = time.perf_counter()
    for i in tqdm(range(0, n, args.batch_size), desc="preferences", dynamic_ncols=True, mininterval=2.0):
        part = chosen_rows[i : i + args.batch_size]
        c, parts = score_batch(policy, wm, ds, part, last, args.samples)
        cands.append(c)
        for k, v in parts.items():
            comps.setdefault(k, []).append(v)
    components = {k: torch.cat(v) for k, v in comps.items()}
    candidates = torch.cat(cands)
    scores, best, worst, kept, scales = select_pairs(components, weights, args.min_margin)
    meta = {"dataset": str(Path(args.dataset).resolve()), "policy": str(Path(args.policy).resolve()),
            "world_model": str(Path(args.world_model).resolve()), "samples": args.samples, "num_obs": n,
            "weights": weights, "scales": scales, "min_margin": args.min_margin, "seed": args.seed,
            "kept": int(kept.sum()), "seconds": round(time.perf_counter() - t0, 1),
            "goal": "the episode's last frame", "chunks": "normalized with the policy's statistics"}
    ps = PreferenceSet(index=torch.tensor(chosen_rows), candidates=candidates, scores=scores, components=components,
                       chosen_id=best, rejected_id=worst, kept=kept, meta=meta)
    return ps


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vla post-train preferences", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--policy", required=True, help="policy checkpoint that samples the candidate chunks")
    p.add_argument("--world_model", required=True, help="world model from `vla post-train world-model`")
    p.add_argument("--out", default="outputs/post_training/preferences")
    p.add_argument("--num_obs", type=int, default=2000)
    p.add_argument("--samples", type=int, default=8, help="K candidate chunks per observation")
    p.add_argument("--weights", default="goal_progress=1,action=1", help="NAME=W,... over goal_progress, action")
    p.add_argument("--min_margin", type=float, default=1.0, help="best - worst combined score to keep a pair")
    p.add_argument("--episodes", default=None, help="restrict to episodes: 'every:K' or comma-separated")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ps = build_preferences(args)
    out = ps.save(args.out)
    m = ps.meta
    print(f"preferences: {m['kept']} pairs kept of {m['num_obs']} observations (K={m['samples']}, "
          f"margin >= {m['min_margin']}) -> {out}")
    return 0
