"""``vla post-train cfn``: fit the coin-flip network of the ``cfn`` selector and save it with the policy.

    vla post-train cfn --policy outputs/run/checkpoints/last/pretrained_model --dataset data/metaworld-mt10

Training data, as in TACO ("high-fidelity feature search"): for each of up to ``--max-observations``
training frames, the head samples ``--num-samples`` candidate chunks from one backbone pass; the
features of the candidate closest to the dataset's own action chunk (normalized, real steps and dims
only) are kept. A flow head never sees a clean action during sampling, so the closest candidate's
features are the best available stand-in for "the features of the demonstrated chunk". The CFN is
then fitted on those features (policies/selectors/cfn.py) and written to ``<policy>/selector/``
(or ``--out``), where ``--selector.type=cfn`` finds it.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vla post-train cfn", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="policy checkpoint (pretrained_model/)")
    p.add_argument("--dataset", required=True, help="the policy's training dataset (local LeRobot root)")
    p.add_argument("--out", type=Path, default=None, help="selector folder (default: <policy>/selector)")
    p.add_argument("--max-observations", type=int, default=2000, help="training frames to sample (seeded subset)")
    p.add_argument("--num-samples", type=int, default=16, help="candidates per frame for the feature search")
    p.add_argument("--batch-size", type=int, default=32, help="frames per backbone pass")
    p.add_argument("--pool", default="mean", choices=["mean", "first"], help="pooling of the H action tokens")
    p.add_argument("--no-center", dest="center", action="store_false",
                   help="score raw pooled features (TACO) instead of their deviation from the candidates' mean")
    p.add_argument("--flips", type=int, default=32, help="coin-flip dimensions d")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--steps", type=int, default=2000, help="CFN optimizer steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out frames for the fit report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--features-cache", type=Path, default=None,
                   help="a .pt file: load the collected candidate features from it if present, else save them there "
                        "(refit with other CFN settings without sampling again)")
    return p


@torch.no_grad()
def collect_features(policy: Any, batches: Any, num_samples: int, pool: str, seed: int = 0,
                     log: bool = True) -> dict[str, torch.Tensor]:
    """Sample N candidates per frame and measure them against the dataset's action chunk.

    -> ``features`` (M, N, W) pooled per candidate, ``mse`` (M, N) to the dataset chunk over real steps
    and dims, ``medoid`` (M,) the consistency selector's choice; the CFN trains on the closest
    candidate's features, the rest measures selectors offline on held-out frames.
    """
    from policies.selectors import make_selector
    from policies.selectors.cfn import pool_features

    pre, head, medoid = policy._pre(), policy.head, make_selector("consistency")
    g = torch.Generator().manual_seed(seed)
    feats, errs, meds, t0 = [], [], [], time.time()
    for i, batch in enumerate(batches):
        obs = pre.observation(batch, train=False).to(policy.device)
        actions, is_pad, dim_mask = (t.to(policy.device) for t in pre.actions(batch))
        prefix = policy.encode(obs, dim_mask)
        try:
            cands, f = head.sample(policy.backbone, prefix, num_samples=num_samples, generator=g, return_features=True)
        except TypeError as e:
            raise TypeError(f"head {policy.config.head.type!r} cannot return features for the CFN "
                            f"(sample(..., return_features=True)): {e}") from e
        valid = (~is_pad)[:, None, :, None] & dim_mask[:, None, None, :]  # (B, 1, H, A)
        err = ((cands.float() - actions[:, None].float()) ** 2 * valid).sum((-1, -2))  # (B, N)
        errs.append((err / valid.sum((-1, -2)).clamp_min(1)).cpu())
        feats.append(pool_features(f.float(), pool).cpu())  # (B, N, W), centered later if asked
        meds.append(medoid.select(cands, prefix=prefix)[1].argmax(1).cpu())
        if log and (i + 1) % 10 == 0:
            print(f"  features: {sum(len(x) for x in feats)} frames, {time.time() - t0:.0f} s", flush=True)
    if not feats:
        raise ValueError("collect_features: the dataset gave no frames")
    return {"features": torch.cat(feats), "mse": torch.cat(errs), "medoid": torch.cat(meds),
            "collect_s": torch.tensor(time.time() - t0)}


def offline_selection_mse(net: Any, data: dict[str, torch.Tensor], center: bool) -> dict[str, float]:
    """Mean MSE to the dataset chunk of each selector's choice on these frames (lower = closer to the
    demonstration): first, consistency, cfn, and the oracle (the closest candidate)."""
    mse = data["mse"]
    rows = torch.arange(len(mse))
    f = data["features"]
    cfn = net.pseudo_count(f - f.mean(1, keepdim=True) if center else f).argmax(1)
    return {"first": round(float(mse[:, 0].mean()), 5), "consistency": round(float(mse[rows, data["medoid"]].mean()), 5),
            "cfn": round(float(mse[rows, cfn].mean()), 5), "oracle": round(float(mse.min(1).values.mean()), 5),
            "mean_candidate": round(float(mse.mean()), 5)}


def fit_and_save(args: argparse.Namespace) -> dict:
    from policies.selectors.base import SELECTOR_DIR
    from policies.selectors.cfn import CfnSelector, fit_cfn
    from vla.config import DatasetConfig
    from vla.data.dataset import make_dataset
    from vla.policy import VLAPolicy

    for name in ("max_observations", "num_samples", "batch_size", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= 1, received {getattr(args, name)}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise ValueError(f"--val-fraction: expected a value in [0, 1), received {args.val_fraction}")
    g = torch.Generator().manual_seed(args.seed)
    cache = args.features_cache
    if cache is not None and Path(cache).is_file():
        data = torch.load(cache)
        print(f"cfn: {len(data['mse'])} frames' candidate features from {cache}", flush=True)
    else:
        policy = VLAPolicy.from_pretrained(args.policy, device=args.device)
        ds = make_dataset(DatasetConfig(root=str(args.dataset)), policy.config.chunk_size)
        idx = torch.randperm(len(ds), generator=g)[: args.max_observations].sort().values.tolist()
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=args.batch_size)
        print(f"cfn: {len(idx)} of {len(ds)} frames, {args.num_samples} candidates each", flush=True)
        data = collect_features(policy, loader, args.num_samples, args.pool, args.seed)
        if cache is not None:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            torch.save(data, cache)
    m = len(data["mse"])
    feats = data["features"]  # (M, N, W)
    if args.center:
        feats = feats - feats.mean(1, keepdim=True)
    best = feats[torch.arange(m), data["mse"].argmin(1)]  # (M, W): the closest candidate's features
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(args.seed + 1))  # train / held-out split
    n_val = int(m * args.val_fraction)
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    net, report = fit_cfn(best[train_idx], flips=args.flips, hidden=args.hidden, depth=args.depth, steps=args.steps,
                          lr=args.lr, seed=args.seed, log_every=max(args.steps // 5, 1))
    collect = {"frames": m, "collect_s": round(float(data["collect_s"]), 2)}
    if n_val:
        report["inverse_count_heldout"] = round(float(net.inverse_count(best[val_idx]).mean()), 5)
        report["heldout_selection_mse"] = offline_selection_mse(net, {k: v[val_idx] for k, v in data.items()
                                                                      if k != "collect_s"}, args.center)
    out = Path(args.out) if args.out is not None else Path(args.policy) / SELECTOR_DIR
    sel = CfnSelector(net, args.pool, center=args.center)
    sel.save_pretrained(out)
    meta_file = out / "cfn_config.json"
    meta = json.loads(meta_file.read_text())
    meta["fit"] = {**report, **collect, "policy": str(args.policy), "dataset": str(args.dataset),
                   "num_samples": args.num_samples, "max_observations": args.max_observations, "center": args.center}
    meta_file.write_text(json.dumps(meta, indent=2))
    return {"out": str(out), **meta["fit"]}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    summary = fit_and_save(args)
    print(f"cfn: 1/count train {summary['inverse_count_train']:.4f}, held-out "
          f"{summary.get('inverse_count_heldout', float('nan')):.4f}, noise {summary['inverse_count_noise']:.4f} "
          f"(lower = more familiar); {time.time() - t0:.0f} s")
    if "heldout_selection_mse" in summary:
        print("cfn: held-out MSE to the dataset chunk of the chosen candidate:",
              ", ".join(f"{k} {v:.4f}" for k, v in summary["heldout_selection_mse"].items()))
    print(f"cfn: saved to {summary['out']} (use --selector.type=cfn)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
