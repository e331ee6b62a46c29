"""``vla post-train dpo``: DPO of a policy on stored preference pairs (NORA-1.5's post-training).

    vla post-train dpo --policy POLICY --preferences outputs/post_training/prefs \\
        --output_dir outputs/post_training/dpo --steps 300 --beta 200 --train full   # or lora, head

Each step: a batch of (frame, chosen chunk, rejected chunk) pairs; ONE backbone pass per frame; the
trained head and a frozen reference copy of it (made before training) read that prefix; the loss is
exact DPO for token heads and Diffusion-DPO for flow heads (``dpo_loss.py``), optionally plus
``sft_weight`` times the flow/NLL loss of the chosen chunk. ``--train``: ``full`` (every trainable
tensor of the checkpoint; a frozen vision encoder stays frozen), ``lora`` (LoRA adapters on the
backbone + the head; adapter-only checkpoints pointing at ``--policy``) or ``head`` (backbone frozen).
A held-out tenth of the pairs gives the preference accuracy the trained policy reaches on unseen pairs.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from post_training.dpo_loss import dpo_terms, frozen_reference, likelihood_kind
from post_training.preferences import PreferenceSet, load_frames

log = logging.getLogger("post_training.dpo")
TRAIN_MODES = ("full", "lora", "head")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vla post-train dpo", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="the policy checkpoint to improve (also the reference)")
    p.add_argument("--preferences", required=True, help="folder from `vla post-train preferences`")
    p.add_argument("--dataset", default=None, help="LeRobot dataset root (default: the one the pairs came from)")
    p.add_argument("--output_dir", default="outputs/post_training/dpo")
    p.add_argument("--train", default="full", help=f"what trains: one of {list(TRAIN_MODES)}")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--warmup_steps", type=int, default=20)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--beta", type=float, default=100.0, help="DPO temperature (flow: scales mean-squared errors)")
    p.add_argument("--sft_weight", type=float, default=0.0, help="+ weight * the policy's loss on chosen chunks")
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--lora_alpha", type=int, default=32)
    p.add_argument("--val_fraction", type=float, default=0.1)
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--save_every", type=int, default=0)
    p.add_argument("--bf16", default="true", help="bf16 autocast (true/false)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    return p


def _bool(text: str, name: str) -> bool:
    t = str(text).lower()
    if t not in ("true", "false", "1", "0"):
        raise ValueError(f"--{name}: expected true or false, received {text!r}")
    return t in ("true", "1")


def prepare_policy(path: str, mode: str, lora_r: int, lora_alpha: int, device: str):
    """Load the policy, make the frozen reference head, set what trains. -> (policy, ref_head, lora_cfg)."""
    from vla.config import LoraConfig
    from vla.policy import VLAPolicy

    if mode not in TRAIN_MODES:
        raise ValueError(f"--train: expected one of {list(TRAIN_MODES)}, received {mode!r}")
    policy = VLAPolicy.from_pretrained(path, device=device)
    # DPO and GRPO read log pi from the train-mode loss: coarse_to_fine's code_noise / scale_loss would make it inexact
    if getattr(getattr(policy.head, "cfg", None), "code_noise", 0):
        print(f"post-training: head.code_noise {policy.head.cfg.code_noise} -> 0 (exact likelihoods)")
        policy.head.cfg.code_noise = 0.0
    if getattr(getattr(policy.head, "cfg", None), "scale_loss", "token") != "token":
        print(f"post-training: head.scale_loss {policy.head.cfg.scale_loss!r} -> 'token' (exact likelihoods)")
        policy.head.cfg.scale_loss = "token"
    ref = frozen_reference(policy.head)  # before any update: the reference is the starting policy
    lora_cfg = None
    if mode == "lora":
        from vla.lora import apply_lora

        lora_cfg = LoraConfig(enabled=True, r=lora_r, alpha=lora_alpha)
        apply_lora(policy, lora_cfg)
    elif mode == "head":
        policy.backbone.requires_grad_(False)
    policy.to(device).train()
    return policy, ref, lora_cfg


def split_pairs(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val_fraction: expected in [0, 1), received {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    k = int(round(n * val_fraction))
    return perm[k:], perm[:k]


def dpo_step_terms(policy, ref, ds, index, chosen, rejected, rows, beta, sft_weight, autocast, generator=None):
    """Load the frames of ``rows``, encode them once, and return the DPO terms of those pairs."""
    pre = policy._pre()
    dev = policy.device
    batch = load_frames(ds, index[rows].tolist())
    obs = pre.observation(batch, train=False).to(dev)
    _, _, dim_mask = pre.actions(batch)
    with autocast():
        prefix = policy.encode(obs, dim_mask.to(dev))
        return dpo_terms(policy.head, ref, policy.backbone, prefix, chosen[rows].to(dev), rejected[rows].to(dev),
                         beta=beta, sft_weight=sft_weight, generator=generator)


@torch.no_grad()
def evaluate_pairs(policy, ref, ds, index, chosen, rejected, rows, beta, autocast, batch_size=64) -> dict:
    """Held-out preference accuracy / margin, with a fixed noise generator (comparable across steps)."""
    if len(rows) == 0:
        return {}
    was = policy.training
    policy.eval()
    g = torch.Generator().manual_seed(1234)
    acc, margin, n = 0.0, 0.0, 0
    for i in range(0, len(rows), batch_size):
        part = rows[i : i + batch_size]
        out = dpo_step_terms(policy, ref, ds, index, chosen, rejected, part, beta, 0.0, autocast, g)
        acc += float((out.logits > 0).float().sum())
        margin += float(out.logits.sum())
        n += len(part)
    policy.train(was)
    return {"val_accuracy": acc / n, "val_margin": margin / n}


def run_dpo(args) -> Path:
    from tqdm.auto import tqdm

    from vla.checkpoint import save_checkpoint
    from vla.config import DatasetConfig
    from vla.data.dataset import make_dataset
    from vla.schedule import make_optimizer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    bf16 = _bool(args.bf16, "bf16")
    ps = PreferenceSet.load(args.preferences)
    index, chosen, rejected = ps.pairs()
    if len(index) == 0:
        raise ValueError(f"{args.preferences}: no preference pair passed the margin; lower --min_margin when "
                         "building it")
    root = args.dataset or ps.meta.get("dataset")
    if root is None:
        raise ValueError("--dataset: the preference set does not name its dataset; pass --dataset")
    policy, ref, lora_cfg = prepare_policy(args.policy, args.train, args.lora_r, args.lora_alpha, args.device)
    ds = make_dataset(DatasetConfig(root=str(root)), policy.config.chunk_size)
    train_rows, val_rows = split_pairs(len(index), args.val_fraction, args.seed)
    kind = likelihood_kind(policy.head)
    n_train = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    log.info("DPO (%s likelihood, train=%s): %d train / %d held-out pairs, %.2fM trainable parameters, beta %g",
             kind, args.train, len(train_rows), len(val_rows), n_train / 1e6, args.beta)
    opt, sched = make_optimizer(policy, args.lr, args.weight_decay, args.warmup_steps, args.steps, 0.1)
    dev = torch.device(args.device)

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(vars(args), likelihood=kind)

    def save(step: int, metrics: dict) -> Path:
        def write_model(path: Path) -> None:
            if lora_cfg is not None:
                from vla.lora import save_adapter_checkpoint

                save_adapter_checkpoint(policy, path, args.policy, lora_cfg)
            else:
                policy.save_pretrained(path)

        return save_checkpoint(out / "checkpoints", step, write_model, {"step": step, "metrics": metrics}, config)

    val0 = evaluate_pairs(policy, ref, ds, index, chosen, rejected, val_rows, args.beta, autocast)
    log.info("held-out pairs at step 0: %s", val0)
    log_file = (out / "train_log.jsonl").open("w")
    log_file.write(json.dumps({"step": 0, **val0}) + "\n")
    g = torch.Generator().manual_seed(args.seed)
    bar = tqdm(total=args.steps, desc="dpo", dynamic_ncols=True, mininterval=1.0)
    acc: dict[str, float] = {}
    count = 0
    t0 = time.perf_counter()
    metrics: dict = dict(val0)
    for step in range(1, args.steps + 1):
        rows = train_rows[torch.randint(len(train_rows), (min(args.batch_size, len(train_rows)),), generator=g)]
        terms = dpo_step_terms(policy, ref, ds, index, chosen, rejected, rows, args.beta, args.sft_weight, autocast)
        if not torch.isfinite(terms.loss):
            raise FloatingPointError(f"non-finite DPO loss {float(terms.loss)} at step {step}")
        opt.zero_grad(set_to_none=True)
        terms.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        for k, v in terms.metrics().items():
            acc[k] = acc.get(k, 0.0) + v
        count += 1
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            rec = {"step": step, **{k: v / count for k, v in acc.items()},
                   "grad_norm": float(grad_norm), "lr": max(sched.get_last_lr()),
                   "seconds": round(time.perf_counter() - t0, 1)}
            if step == args.steps:
                rec.update(evaluate_pairs(policy, ref, ds, index, chosen, rejected, val_rows, args.beta, autocast))
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['accuracy']:.2f}")
            metrics, acc, count = rec, {}, 0
        if args.save_every and step % args.save_every == 0 and step != args.steps:
            save(step, metrics)
    bar.close()
    log_file.close()
    final = save(args.steps, metrics)
    log.info("final: %s -> %s", {k: metrics.get(k) for k in ("loss", "accuracy", "val_accuracy", "val_margin")},
             final)
    from vla.checkpoint import MODEL_DIR

    return final / MODEL_DIR


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = run_dpo(args)
    print(f"checkpoint: {path}")
    return 0
