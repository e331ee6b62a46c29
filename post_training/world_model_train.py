"""``vla post-train world-model``: fit the action-conditioned latent world model on a LeRobot dataset.

    vla post-train world-model --dataset data/metaworld_mt10_50 \\
        --policy outputs/metaworld_long/checkpoints/step_003600/pretrained_model \\
        --output_dir outputs/post_training/wm --steps 3000

1. Every frame is encoded once by the policy's frozen backbone (cached in ``output_dir/latents.pt``).
2. Episodes are split into train / validation (every ``--val_every``-th episode is held out).
3. The dynamics transformer learns the latents after each action of the dataset's chunks; the goal
   head learns the episode's last latent. Both are MSE in standardized latent units, on valid steps.
4. Validation: latent prediction error vs. the copy-last-frame baseline (predict "nothing changes").
   A world model that does not beat it has learned nothing about actions.
Checkpoints: ``output_dir/checkpoints/step_XXXXXX/world_model/`` (+ ``last``), ``train_log.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from torch import Tensor

from post_training.latents import LatentCache, encode_dataset
from post_training.world_model import WorldModel, world_model_for

log = logging.getLogger("post_training.world_model_train")
WM_DIR = "world_model"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vla post-train world-model", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="LeRobot dataset root")
    p.add_argument("--policy", required=True, help="policy checkpoint whose frozen backbone encodes observations")
    p.add_argument("--output_dir", default="outputs/post_training/world_model")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--num_layers", type=int, default=3)
    p.add_argument("--state_weight", type=float, default=1.0)
    p.add_argument("--goal_weight", type=float, default=0.2, help="weight of the goal head's loss")
    p.add_argument("--val_every", type=int, default=10, help="hold out every N-th episode for validation")
    p.add_argument("--eval_every", type=int, default=250)
    p.add_argument("--save_every", type=int, default=1000)
    p.add_argument("--encode_batch", type=int, default=64)
    p.add_argument("--episodes", type=str, default=None,
                   help="episode subset: comma-separated indices, or 'every:K' for every K-th episode (default: all)")
    p.add_argument("--fp32_encode", action="store_true", help="encode in fp32 instead of bf16 autocast")
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    return p


def load_or_encode(policy, args, out: Path) -> LatentCache:
    """The frame latents of ``args.dataset`` under ``policy``; re-used when the cache matches."""
    path = out / "latents.pt"
    want = {"dataset": str(Path(args.dataset).resolve()), "policy": str(Path(args.policy).resolve()),
            "episodes": args.episodes, "bf16": not args.fp32_encode}
    if path.exists():
        cache = LatentCache.load(path)
        if all(cache.meta.get(k) == v for k, v in want.items()):
            log.info("re-using the latent cache %s (%d frames)", path, len(cache))
            return cache
        log.info("latent cache %s was made for %s; re-encoding", path, {k: cache.meta.get(k) for k in want})
    eps = parse_episodes(args.episodes, args.dataset)
    t0 = time.perf_counter()
    cache = encode_dataset(policy, args.dataset, batch_size=args.encode_batch, episodes=eps,
                           num_workers=args.num_workers, bf16=not args.fp32_encode)
    cache.meta.update(want, encode_seconds=time.perf_counter() - t0)
    cache.save(path)
    log.info("encoded %d frames in %.0f s -> %s", len(cache), cache.meta["encode_seconds"], path)
    return cache


def parse_episodes(text: str | None, root: str) -> list[int] | None:
    """None (all), "0,3,7" or "every:K" (episodes 0, K, 2K, ...)."""
    if not text:
        return None
    if text.startswith("every:"):
        from vla.data.dataset import dataset_spec

        try:
            k = int(text.split(":", 1)[1])
        except ValueError:
            k = 0
        if k < 1:
            raise ValueError(f"--episodes: expected every:K with K >= 1, received {text!r}")
        return list(range(0, dataset_spec(root).num_episodes, k))
    try:
        return [int(e) for e in text.split(",")]
    except ValueError:
        raise ValueError(f"--episodes: expected comma-separated ints or every:K, received {text!r}") from None


def split_rows(cache: LatentCache, val_every: int) -> tuple[Tensor, Tensor]:
    """Row indices of train and validation frames, split by episode (no frame of a held-out episode trains)."""
    if val_every < 2:
        raise ValueError(f"--val_every: expected >= 2 (hold out every N-th episode), received {val_every}")
    eps = torch.unique(cache.episode)
    val_eps = eps[::val_every]
    is_val = torch.isin(cache.episode, val_eps)
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()


def losses(wm: WorldModel, z: Tensor, actions: Tensor, nxt: Tensor, valid: Tensor, goal_row: Tensor,
           rows: Tensor) -> dict[str, Tensor]:
    """Dynamics / copy-last / goal MSE (standardized units) on ``rows``; per valid step and latent dim."""
    h = nxt.shape[1]
    r_nxt, r_valid = nxt[rows], valid[rows]
    # Action k of row i is the action recorded at frame i + k (clamped at the episode end, masked there).
    act_rows = torch.minimum(rows[:, None] + torch.arange(h)[None], goal_row[rows][:, None])
    pred = wm(z[rows], actions[act_rows])  # (B, H, D)
    target = z[r_nxt]
    m = r_valid[..., None].float()
    denom = (m.sum() * z.shape[-1]).clamp(min=1.0)
    dyn = ((pred - target).pow(2) * m).sum() / denom
    copy = ((z[rows][:, None] - target).pow(2) * m).sum() / denom
    goal = (wm.predict_goal(z[rows]) - z[goal_row[rows]]).pow(2).mean()
    goal_copy = (z[rows] - z[goal_row[rows]]).pow(2).mean()
    return {"dynamics": dyn, "copy_last": copy, "goal": goal, "goal_copy": goal_copy}


@torch.no_grad()
def evaluate(wm: WorldModel, z, actions, nxt, valid, goal_row, rows: Tensor, batch: int = 2048) -> dict[str, float]:
    was = wm.training
    wm.eval()
    sums: dict[str, float] = {}
    for i in range(0, len(rows), batch):
        part = rows[i : i + batch]
        for k, v in losses(wm, z, actions, nxt, valid, goal_row, part).items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(part)
    wm.train(was)
    out = {k: v / max(len(rows), 1) for k, v in sums.items()}
    out["dynamics_vs_copy"] = out["dynamics"] / max(out["copy_last"], 1e-12)
    return out


def train_world_model(args) -> Path:
    from tqdm.auto import tqdm

    from vla.checkpoint import save_checkpoint
    from vla.policy import VLAPolicy

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy = VLAPolicy.from_pretrained(args.policy, device=args.device)
    cache = load_or_encode(policy, args, out)
    wm = world_model_for(policy, encoder_path=args.policy, width=args.width, num_layers=args.num_layers,
                         state_weight=args.state_weight, bf16_encode=not args.fp32_encode).to(args.device)
    train_rows, val_rows = split_rows(cache, args.val_every)
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise ValueError(f"dataset {args.dataset}: {len(torch.unique(cache.episode))} episodes leave no train or "
                         f"validation episode with --val_every={args.val_every}")
    raw = cache.raw_latents()
    # Standardize with TRAIN statistics; a constant dimension keeps std 1 (no division by ~0).
    std = raw[train_rows].std(0)
    wm.latent_mean.copy_(raw[train_rows].mean(0))
    wm.latent_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))
    z = wm.standardize(raw.to(args.device))
    actions = cache.actions.to(args.device)
    nxt, valid, goal_row = cache.windows(wm.cfg.chunk_size)
    log.info("world model: %d train / %d validation frames, latent dim %d, %.2fM parameters",
             len(train_rows), len(val_rows), wm.cfg.latent_dim, sum(p.numel() for p in wm.parameters()) / 1e6)

    opt = torch.optim.AdamW(wm.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=max(args.steps, 1),
                                                pct_start=0.05, anneal_strategy="cos")
    g = torch.Generator().manual_seed(args.seed)
    log_file = (out / "train_log.jsonl").open("w")
    config = {k: v for k, v in vars(args).items()}

    def save(step: int, metrics: dict) -> Path:
        return save_checkpoint(out / "checkpoints", step, lambda p: wm.save_pretrained(p.parent / WM_DIR),
                               {"step": step, "optimizer": opt.state_dict(), "metrics": metrics}, config)

    metrics = evaluate(wm, z, actions, nxt, valid, goal_row, val_rows)
    log.info("step 0 validation: %s", json.dumps({k: round(v, 5) for k, v in metrics.items()}))
    bar = tqdm(total=args.steps, desc="world model", dynamic_ncols=True, mininterval=1.0)
    wm.train()
    for step in range(1, args.steps + 1):
        rows = train_rows[torch.randint(len(train_rows), (args.batch_size,), generator=g)]
        parts = losses(wm, z, actions, nxt, valid, goal_row, rows)
        loss = parts["dynamics"] + args.goal_weight * parts["goal"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(wm.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.update(1)
        if step % args.eval_every == 0 or step == args.steps:
            metrics = evaluate(wm, z, actions, nxt, valid, goal_row, val_rows)
            rec = {"step": step, "train_dynamics": float(parts["dynamics"].detach()),
                   "train_goal": float(parts["goal"].detach()),
                   **{f"val_{k}": v for k, v in metrics.items()}}
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            bar.set_postfix(val=f"{metrics['dynamics']:.4f}", copy=f"{metrics['copy_last']:.4f}")
        if args.save_every and step % args.save_every == 0 and step != args.steps:
            save(step, metrics)
    bar.close()
    log_file.close()
    final = save(args.steps, metrics)
    (out / "metrics.json").write_text(json.dumps({"validation": metrics, "train_frames": len(train_rows),
                                                  "val_frames": len(val_rows)}, indent=2))
    log.info("validation: dynamics %.5f vs copy-last %.5f (ratio %.3f); goal %.4f vs copy %.4f -> %s",
             metrics["dynamics"], metrics["copy_last"], metrics["dynamics_vs_copy"], metrics["goal"],
             metrics["goal_copy"], final / WM_DIR)
    return final / WM_DIR


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = train_world_model(args)
    print(f"world model: {path}")
    return 0
