"""Where a coarse-to-fine head loses, offline: per-scale accuracy under teacher forcing, and how far its
chunks are from the demonstrated ones when its own codes feed the finer scales.

    python -m benchmarks.coarse_to_fine_errors --dataset data/metaworld_mt10_50 \
        --policy c2f=outputs/heads3k/c2f_pd/checkpoints/last/pretrained_model [--frames 256] [--out FILE.json]

For random dataset frames (seeded) and each policy, the MSE to the dataset's chunk (normalized units, real
steps and dims) of: the tokenizer's own codes (its floor), the argmax codes of a teacher-forced pass decoded
together (each scale predicted from the TRUE coarser codes), and greedy decoding (each scale predicted from the
head's own coarser codes). Greedy well above teacher-forced = errors compound from coarse to fine scales.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import print_table, provenance, write_json


@torch.no_grad()
def measure(policy: Any, batches: Any) -> dict[str, Any]:
    """-> per-scale teacher-forced accuracy and NLL per code, and the three chunk MSEs (see the module doc)."""
    import torch.nn.functional as F

    from policies.coarse_to_fine import CoarseToFineHead

    pre, head = policy._pre(), policy.head
    if not isinstance(head, CoarseToFineHead):
        raise ValueError(f"policy head {policy.config.head.type!r}: expected a coarse_to_fine head")
    tok = head._require_tokenizer()
    sizes = tok.scale_sizes()
    right, nll_sum, count = torch.zeros(len(sizes)), torch.zeros(len(sizes)), torch.zeros(len(sizes))
    sq = {"tokenizer": 0.0, "teacher_forced": 0.0, "greedy": 0.0}
    n_val = 0.0
    for batch in batches:
        obs = pre.observation(batch, train=False).to(policy.device)
        actions, is_pad, dim_mask = (t.to(policy.device) for t in pre.actions(batch))
        prefix = policy.encode(obs, dim_mask)
        codes, _ = head.targets(actions, prefix)
        logits, _ = head.logits(policy.backbone, prefix, codes)
        pred = logits[..., : tok.vocab_size].argmax(-1)
        nll = F.cross_entropy(logits.float().transpose(1, 2), codes, reduction="none")  # (B, L)
        for k, sl in enumerate(tok.scale_slices()):
            right[k] += (pred[:, sl] == codes[:, sl]).sum().item()
            nll_sum[k] += nll[:, sl].sum().item()
            count[k] += codes[:, sl].numel()
        valid = ((~is_pad)[:, :, None] & dim_mask[:, None, :]).float()  # (B, H, A)
        chunks = {"tokenizer": head.decode_codes(codes)[0], "teacher_forced": head.decode_codes(pred)[0],
                  "greedy": head.sample(policy.backbone, prefix, 1, temperature=0.0)[:, 0]}
        for name, x in chunks.items():
            sq[name] += float((((x.float() - actions.float()) ** 2) * valid).sum())
        n_val += float(valid.sum())
    return {"scale_sizes": sizes, "teacher_forced_accuracy": [round(float(x), 4) for x in right / count],
            "nll_per_code": [round(float(x), 4) for x in nll_sum / count],
            "chunk_mse": {k: round(v / n_val, 5) for k, v in sq.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="local LeRobot root (the policy's training data)")
    p.add_argument("--policy", action="append", required=True, help="NAME=CHECKPOINT (pretrained_model/)")
    p.add_argument("--frames", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/coarse_to_fine_errors.json"))
    args = p.parse_args(argv)
    from vla.config import DatasetConfig
    from vla.data.dataset import make_dataset
    from vla.policy import VLAPolicy

    started = time.time()
    torch.set_num_threads(args.threads)
    rows = []
    for spec in args.policy:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--policy: expected NAME=CHECKPOINT, received {spec!r}")
        policy = VLAPolicy.from_pretrained(path).eval()
        ds = make_dataset(DatasetConfig(root=args.dataset), policy.config.chunk_size)
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed))[: args.frames].tolist()
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=args.batch_size)
        rows.append({"policy": name, "path": path, "frames": len(idx), **measure(policy, loader)})
    print_table([{**r, **{f"mse {k}": v for k, v in r["chunk_mse"].items()}} for r in rows],
                ["policy", "scale_sizes", "teacher_forced_accuracy", "mse tokenizer", "mse teacher_forced",
                 "mse greedy"])
    out = write_json(args.out, {"rows": rows, "dataset": args.dataset, "seed": args.seed, **provenance(started)})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
