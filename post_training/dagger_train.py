"""``vla post-train dagger``: fit the ``dagger`` selector's expert-chunk predictor and save it with the policy.

    python -m benchmarks.metaworld.value_data --policy P --tasks mt10 --episodes 60 --stride 1 --no-rollouts \\
        --seed 1 --out outputs/dagger_data.pt
    vla post-train dagger --policy P --data outputs/dagger_data.pt      # -> P/selector/dagger/

The data holds, per state the policy visited, the observation summary, the N candidates (pooled head
features and normalized chunks) and the scripted expert's own chunk from that state. The network
(policies/selectors/dagger.py) regresses the expert chunk minus the candidates' mean chunk (mean
squared error, normalized units). Whole episodes are held out to report: the error of the prediction
next to the candidates' mean (what the network must beat), and, ranking each state's candidates by
their distance to the prediction, the within-state Spearman with the true closeness to the expert and
the closeness gained by the chosen candidate next to the first candidate, the medoid and the oracle.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from post_training.value_train import load_data, save_fitted, selection_report, split_episodes, train_loop

DAGGER_KEYS = ("features", "summary", "candidates", "expert", "expert_chunk", "episode", "task")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vla post-train dagger", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="the policy checkpoint the data was collected with")
    p.add_argument("--data", required=True, nargs="+", type=Path,
                   help="files of `python -m benchmarks.metaworld.value_data` (with expert chunks)")
    p.add_argument("--out", type=Path, default=None, help="selector folder (default: <policy>/selector/dagger)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=256, help="states per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--mixtures", type=int, default=0,
                   help="0: predict one expert chunk (squared error; the score is minus the distance to it); K >= 1: a "
                        "K-component Gaussian mixture over the expert chunk (negative log-likelihood; the score is minus "
                        "the distance to the most probable component, or with the selector's mixture_score='likelihood' "
                        "the log density), for experts whose next chunk is multi-modal from what the network sees")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out share of the episodes")
    p.add_argument("--seed", type=int, default=0)
    return p


def fit_dagger(inputs: torch.Tensor, candidates: torch.Tensor, expert_chunk: torch.Tensor, *, hidden: int = 512,
               depth: int = 2, dropout: float = 0.1, steps: int = 4000, batch_size: int = 256, lr: float = 1e-3,
               weight_decay: float = 1e-4, seed: int = 0, log_every: int = 0, mixtures: int = 0):
    """inputs (M, D) (``dagger_inputs``), candidates (M, N, H, A'), expert_chunk (M, H, A') -> (network, report).

    The network predicts ``expert_chunk - candidates.mean(1)`` (``predict_expert`` adds the mean back); with
    ``mixtures`` K >= 1, K such corrections with per-number log stds and weights, fitted by the expert chunk's
    negative log-likelihood (``mixture_log_prob``, per number)."""
    from policies.selectors.dagger import expert_mixture, mixture_log_prob, predict_expert
    from policies.selectors.value import ChunkValueNet

    if candidates.ndim != 4:
        raise ValueError(f"fit_dagger: candidates must be (M, N, H, A), received shape {tuple(candidates.shape)}")
    m, _, h, a = candidates.shape
    if inputs.ndim != 2 or len(inputs) != m or tuple(expert_chunk.shape) != (m, h, a):
        raise ValueError(f"fit_dagger: expected inputs (M, D), candidates (M, N, H, A) and expert_chunk (M, H, A) with "
                         f"one M, received {tuple(inputs.shape)}, {tuple(candidates.shape)}, {tuple(expert_chunk.shape)}")
    if not all(bool(torch.isfinite(t).all()) for t in (inputs, candidates, expert_chunk)):
        raise ValueError("fit_dagger: inputs, candidates or expert chunks contain NaN/inf")
    if not isinstance(mixtures, int) or mixtures < 0:
        raise ValueError(f"fit_dagger: mixtures (--mixtures) must be an int >= 0 (0 = one predicted chunk), received "
                         f"{mixtures!r}")
    torch.manual_seed(seed)
    x, c, e = inputs.float(), candidates.float(), expert_chunk.float()
    out_dim = h * a if mixtures == 0 else mixtures * (1 + 2 * h * a)
    net = ChunkValueNet(x.shape[-1], (h, a), hidden, depth, dropout, out_dim=out_dim, name="dagger")
    net.calibrate(x)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        if mixtures:
            log_w, mean, log_std = expert_mixture(net, x[idx], c[idx])
            nll = -mixture_log_prob(e[idx, None], log_w, mean, log_std).mean()
            # The likelihood alone lets every component sit on the average of the modes with a wide std (each mean's
            # gradient from the two modes cancels): the closest component's squared error ("winner takes all",
            # multiple-choice learning) pulls each component onto the targets it is nearest to.
            wta = ((mean - e[idx, None]) ** 2).mean((-1, -2)).min(1).values.mean()
            return nll + wta
        return ((predict_expert(net, x[idx], c[idx]) - e[idx]) ** 2).mean()

    t0 = time.time()
    losses = train_loop(net, batch_loss, m, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                        seed=seed, log_every=log_every, label="dagger")
    tail = losses[-50:]
    report = {"states": m, "steps": steps, "lr": lr, "seed": seed, "mixtures": mixtures,
              "final_loss": round(sum(tail) / len(tail), 5) if tail else None, "fit_s": round(time.time() - t0, 2)}
    return net, report


def dagger_report(net, inputs: torch.Tensor, candidates: torch.Tensor, expert_chunk: torch.Tensor,
                  closeness: torch.Tensor) -> dict[str, float]:
    """Prediction error next to the candidates' mean chunk, and the selection it implies (``selection_report``
    on ``closeness`` (M, N), the simulator's own closeness of each candidate to the expert)."""
    from policies.selectors.dagger import (
        dagger_scores,
        expert_mixture,
        mixture_components,
        mixture_log_prob,
        predict_expert,
    )

    with torch.no_grad():
        pred = predict_expert(net, inputs, candidates)
        scores = dagger_scores(net, inputs, candidates)
        mixture = {}
        if mixture_components(net.out_dim, net.chunk_shape):  # the likelihood, and the other way to score with it
            nll = -mixture_log_prob(expert_chunk[:, None], *expert_mixture(net, inputs, candidates)).mean()
            lik = selection_report(dagger_scores(net, inputs, candidates, "likelihood"), closeness, candidates,
                                   name="dagger")
            mixture = {"nll": round(float(nll), 5), "likelihood_spearman": lik["spearman"],
                       "likelihood_gain_dagger": lik["gain_dagger"]}
    mean_chunk = candidates.float().mean(1)
    return {"mse_prediction": round(float(((pred - expert_chunk) ** 2).mean()), 5),
            "mse_candidate_mean": round(float(((mean_chunk - expert_chunk) ** 2).mean()), 5), **mixture,
            **selection_report(scores, closeness, candidates, name="dagger")}


def task_names(metas: list[dict], n: int) -> list[str]:
    """Names of the ``task`` ids of data files collected on the same tasks (their ``meta.tasks``), else the ids."""
    lists = {tuple(m.get("tasks") or ()) for m in metas}
    names = list(lists.pop()) if len(lists) == 1 else []
    return names if len(names) >= n else [str(i) for i in range(n)]


def fit_and_save(args: argparse.Namespace) -> dict:
    from policies.selectors.base import SELECTOR_DIR
    from policies.selectors.dagger import DAGGER_SUBDIR, DaggerSelector, dagger_inputs

    for name in ("steps", "batch_size", "hidden", "depth"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= 1, received {getattr(args, name)}")
    data = load_data(args.data, DAGGER_KEYS, optional=(), command="dagger")
    cands, expert = data["candidates"], data["expert_chunk"]
    inputs = dagger_inputs(data["summary"], data["features"], cands, cands.shape[-1])
    val, n_val = split_episodes(data["episode"], args.val_fraction, args.seed)
    net, report = fit_dagger(inputs[~val], cands[~val], expert[~val], hidden=args.hidden, depth=args.depth,
                             dropout=args.dropout, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             weight_decay=args.weight_decay, seed=args.seed, log_every=max(args.steps // 5, 1),
                             mixtures=args.mixtures)
    report["train"] = dagger_report(net, inputs[~val], cands[~val], expert[~val], data["expert"][~val])
    if bool(val.any()):
        report["heldout"] = dagger_report(net, inputs[val], cands[val], expert[val], data["expert"][val])
        report["heldout_episodes"] = n_val
        # per task: where the predictor is weak (MetaWorld peg-insert: the task it loses closed loop)
        names = task_names(data["meta"], int(data["task"].max()) + 1)
        report["heldout_per_task"] = {
            names[t]: dagger_report(net, inputs[m], cands[m], expert[m], data["expert"][m])
            for t in data["task"][val].unique().tolist() for m in [val & (data["task"] == t)]}
    out = Path(args.out) if args.out is not None else Path(args.policy) / SELECTOR_DIR / DAGGER_SUBDIR
    save_fitted(DaggerSelector(net), out, {**report, "policy": str(args.policy), "data": [str(f) for f in args.data],
                                           "collected": data["meta"]})
    return {"out": str(out), **report}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    s = fit_and_save(args)
    for split in ("train", "heldout"):
        if split in s:
            r = s[split]
            print(f"dagger ({split}, {r['states']} states): expert-chunk MSE {r['mse_prediction']:.4f} (candidates' mean "
                  f"{r['mse_candidate_mean']:.4f}); Spearman within state {r['spearman']:.3f}; closeness to the expert "
                  f"above the candidates' mean — first {r['gain_first']:+.4f}, consistency {r['gain_consistency']:+.4f}, "
                  f"dagger {r['gain_dagger']:+.4f}, oracle {r['gain_oracle']:+.4f}"
                  + (f"; NLL per number {r['nll']:.3f}; scored by likelihood instead of the mode: Spearman "
                     f"{r['likelihood_spearman']:.3f}, gain {r['likelihood_gain_dagger']:+.4f}" if "nll" in r else ""))
    for task, r in s.get("heldout_per_task", {}).items():
        print(f"  {task:24s} {r['states']:6d} states: MSE {r['mse_prediction']:.3f} (mean {r['mse_candidate_mean']:.3f}), "
              f"Spearman {r['spearman']:.3f}, gain first / dagger / oracle {r['gain_first']:+.3f} / "
              f"{r['gain_dagger']:+.3f} / {r['gain_oracle']:+.3f}")
    print(f"dagger: saved to {s['out']} (use --selector dagger); {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
