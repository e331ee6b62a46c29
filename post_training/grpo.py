"""GRPO inside the world model (World-Env's idea: the world model as a virtual environment).

    python -m post_training.grpo --policy POLICY --world_model WM --dataset data/metaworld_mt10_50 \\
        --output_dir outputs/post_training/grpo --steps 100 --group 8

Each step: B dataset frames; the CURRENT policy samples a group of K chunks per frame (one backbone
pass); the world model scores them (goal progress to the episode's last frame, optionally mixed with the
deviation from the dataset's chunk, as for preference pairs); advantages are group-relative,
A = (r - mean_K r) / (std_K r + eps). The update maximizes sum_k A_k * log pi(chunk_k) with a KL penalty
to a frozen reference head:
  * token heads: log pi is exact (-loss.sum(-1)); KL by the k3 estimator exp(q) - q - 1, q = log ref - log pi.
  * flow heads: -e (the per-sample flow-matching error at one noise/time draw, shared by the whole group
    and by the reference) is the ELBO surrogate of log pi, as in Diffusion-DPO; the KL term is
    (e - e_ref)^2. This is a surrogate policy gradient, not an exact one.
One update per sampled group (on-policy), so PPO's ratio is 1 and clipping never triggers; it is omitted.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from post_training.dpo_loss import _per_sample, likelihood_kind
from post_training.preferences import episode_last_index, load_frames
from post_training.rewards import action_deviation, combine, parse_weights

log = logging.getLogger("post_training.grpo")


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B, K) rewards -> (B, K) group-normalized advantages (zero for a group of equal rewards)."""
    centered = rewards - rewards.mean(1, keepdim=True)
    return centered / (rewards.std(1, keepdim=True) + eps)


def grpo_terms(head, ref, backbone, prefix, chunks, adv, *, kl_weight: float, generator=None):
    """chunks (B, K, H, A), adv (B, K); prefix of B frames -> (loss, metrics)."""
    b, k, h, a = chunks.shape
    kind = likelihood_kind(head)
    flat = chunks.reshape(b * k, h, a)
    is_pad = torch.zeros(b * k, h, dtype=torch.bool, device=chunks.device)
    pre = prefix.repeat(k)
    kw = {}
    if kind == "flow":
        dev = chunks.device
        noise = torch.randn(b, 1, h, a, generator=generator, device="cpu" if generator is not None else dev).to(dev)
        time = head.sample_time(b, dev, generator=generator)
        kw = {"noise": noise.expand(b, k, h, a).reshape(b * k, h, a), "time": time.repeat_interleave(k)}
    s = _per_sample(head.loss(backbone, pre, flat, is_pad, **kw), is_pad, kind).view(b, k)  # -log pi (surrogate)
    with torch.no_grad():
        s_ref = _per_sample(ref.loss(backbone, pre.detach(), flat, is_pad, **kw), is_pad, kind).view(b, k)
    pg = (adv * s).mean()  # minimizing it raises log pi where A > 0
    if kind == "exact":
        q = s - s_ref  # log ref - log pi
        kl = (torch.exp(q) - q - 1).mean()
    else:
        kl = (s - s_ref).pow(2).mean()
    loss = pg + kl_weight * kl
    return loss, {"loss": float(loss.detach()), "pg": float(pg.detach()), "kl": float(kl.detach())}


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    from post_training.dpo import prepare_policy
    from post_training.world_model import WorldModel
    from vla.checkpoint import MODEL_DIR, save_checkpoint
    from vla.config import DatasetConfig
    from vla.data.dataset import make_dataset

    p = argparse.ArgumentParser(prog="python -m post_training.grpo", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True)
    p.add_argument("--world_model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--output_dir", default="outputs/post_training/grpo")
    p.add_argument("--train", default="head", help="full, lora or head")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=8, help="frames per step")
    p.add_argument("--group", type=int, default=8, help="K chunks per frame")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--kl_weight", type=float, default=1.0)
    p.add_argument("--weights", default="goal_progress=1", help="reward mix over goal_progress, action")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.group < 2:
        raise ValueError(f"--group: expected >= 2 chunks per frame, received {args.group}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    weights = parse_weights(args.weights)
    policy, ref, lora_cfg = prepare_policy(args.policy, args.train, 16, 32, "cpu")
    wm = WorldModel.from_pretrained(args.world_model)
    ds = make_dataset(DatasetConfig(root=args.dataset), policy.config.chunk_size)
    last = episode_last_index(ds)
    pre = policy._pre()
    opt = torch.optim.AdamW([q for q in policy.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "train_log.jsonl").open("w")
    t0 = time.perf_counter()
    for step in tqdm(range(1, args.steps + 1), desc="grpo", dynamic_ncols=True):
        idx = torch.randint(len(ds), (args.batch_size,), generator=g).tolist()
        batch = load_frames(ds, idx)
        obs = pre.observation(batch, train=False)
        actions, is_pad, dim_mask = pre.actions(batch)
        with torch.no_grad():
            prefix = policy.encode(obs, dim_mask)
            chunks = policy.head.sample(policy.backbone, prefix, num_samples=args.group).float()
            goal = wm.encode(pre.observation(load_frames(ds, [last[int(e)] for e in batch["episode_index"]])))
            comps = {"goal_progress": wm.reward(wm.encode(obs), chunks, goal),
                     "action": -action_deviation(chunks, actions, is_pad, dim_mask)}
            # Per-group standardization makes the components' units irrelevant: mix the standardized ones.
            reward = combine({k: group_advantages(v) for k, v in comps.items()}, weights)
            adv = group_advantages(reward)
        prefix = policy.encode(obs, dim_mask)  # with gradients (when the backbone trains)
        loss, m = grpo_terms(policy.head, ref, policy.backbone, prefix, chunks, adv, kl_weight=args.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([q for q in policy.parameters() if q.requires_grad], 1.0)
        opt.step()
        log_file.write(json.dumps({"step": step, **m, "reward": float(comps["goal_progress"].mean()),
                                   "seconds": round(time.perf_counter() - t0, 1)}) + "\n")
        log_file.flush()
    log_file.close()

    def write_model(path: Path) -> None:
        if lora_cfg is not None:
            from vla.lora import save_adapter_checkpoint

            save_adapter_checkpoint(policy, path, args.policy, lora_cfg)
        else:
            policy.save_pretrained(path)

    final = save_checkpoint(out / "checkpoints", args.steps, write_model, {"step": args.steps}, vars(args))
    print(f"checkpoint: {final / MODEL_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
