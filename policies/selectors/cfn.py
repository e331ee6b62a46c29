"""``cfn``: pick the candidate chunk with the largest pseudo-count (TACO, anti-exploration at test time).

The pseudo-count comes from a coin-flip network (CFN, Lobel et al. 2023): every training sample i gets
a fixed random vector c_i in {-1, +1}^d and a network f is regressed onto it by MSE. A point seen n
times has the mean of n independent fair coin vectors as its regression target, whose per-dim second
moment is 1/n, so

    mean_j f_j(x)^2  ~=  1 / n(x)        pseudo-count n(x) = 1 / mean_j f_j(x)^2

Nearby points share their flips through the network's smoothness, so familiar regions get small
outputs and unfamiliar ones do not. Far from the data a trained MLP can still output small values by
accident; a frozen random "prior" network (normalized to unit variance per output on the training
features) is added to the output, so the trainable part must learn to cancel it where the data is and
cannot cancel it elsewhere: unseen inputs keep a magnitude ~1 (pseudo-count ~1).

TACO scores each candidate by the action expert's internal representation of the chunk (the hidden
state of the last denoising step), trained on the features of the candidate closest to the dataset
action ("high-fidelity feature search", ``post_training/cfn_train.py``). Here the features (B, N, H, W)
are pooled over the H action tokens and standardized with the training features' mean/std. With
``center`` (the default of ``vla post-train cfn``) the CFN scores each candidate's deviation from the
mean of its N candidates: on raw features the count mostly says how familiar the observation is,
which is the same for every candidate (docs/selectors.md has the measurement).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policies.selectors.base import SELECTOR_DIR, ChunkSelector, SelectorConfig
from vla.types import Observation, Prefix

CFN_WEIGHTS = "cfn.safetensors"
CFN_CONFIG = "cfn_config.json"
POOLS = ("mean", "first")


def pool_features(features: Tensor, how: str = "mean") -> Tensor:
    """(..., H, W) per-action-token features -> (..., W). "first": TACO's first action token."""
    if how == "mean":
        return features.mean(-2)
    if how == "first":
        return features[..., 0, :]
    raise ValueError(f"cfn pool: expected one of {POOLS}, received {how!r}")


def _mlp(in_dim: int, hidden: int, depth: int, out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.SiLU()]
        d = hidden
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class CoinFlipNetwork(nn.Module):
    """f(x) = trained(z) + (prior(z) - prior_mean) / prior_std, z = standardized features (W,) -> (d,)."""

    def __init__(self, in_dim: int, flips: int = 32, hidden: int = 256, depth: int = 2):
        super().__init__()
        for name, v in (("in_dim", in_dim), ("flips", flips), ("hidden", hidden), ("depth", depth)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"CoinFlipNetwork: {name} must be an int >= 1, received {v!r}")
        self.in_dim, self.flips, self.hidden, self.depth = in_dim, flips, hidden, depth
        self.net = _mlp(in_dim, hidden, depth, flips)
        self.prior = _mlp(in_dim, hidden, depth, flips)  # independent random init, never trained
        self.prior.requires_grad_(False)
        self.register_buffer("feat_mean", torch.zeros(in_dim))
        self.register_buffer("feat_std", torch.ones(in_dim))
        self.register_buffer("prior_mean", torch.zeros(flips))
        self.register_buffer("prior_std", torch.ones(flips))

    def _check(self, x: Tensor) -> None:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"CoinFlipNetwork: features must have width {self.in_dim} (the width it was fitted "
                             f"on), received shape {tuple(x.shape)}")

    def standardize(self, x: Tensor) -> Tensor:
        return (x.float() - self.feat_mean) / self.feat_std

    @torch.no_grad()
    def calibrate(self, features: Tensor) -> None:
        """Fix the input standardization and the prior's normalization from the training features (M, W)."""
        self._check(features)
        x = features.float()
        self.feat_mean.copy_(x.mean(0))
        std = x.std(0)
        # Floor tiny stds: a near-constant feature dim would otherwise amplify float noise into "novelty".
        self.feat_std.copy_(std.clamp_min(max(float(std.median()) * 1e-2, 1e-6)))
        p = torch.cat([self.prior(self.standardize(c)) for c in x.split(4096)])
        self.prior_mean.copy_(p.mean(0))
        self.prior_std.copy_(p.std(0).clamp_min(1e-6))

    def forward(self, features: Tensor) -> Tensor:
        """(..., W) -> predicted coin flips (..., d)."""
        self._check(features)
        z = self.standardize(features)
        prior = (self.prior(z) - self.prior_mean) / self.prior_std
        return self.net(z) + prior.detach()

    @torch.no_grad()
    def inverse_count(self, features: Tensor) -> Tensor:
        """(..., W) -> (...,) mean squared predicted flip ~ 1 / pseudo-count (low = familiar)."""
        return self(features).pow(2).mean(-1)

    @torch.no_grad()
    def pseudo_count(self, features: Tensor) -> Tensor:
        return 1.0 / self.inverse_count(features).clamp_min(1e-8)

    # --- persistence ----------------------------------------------------------------------------
    def save(self, path: Path, pool: str, center: bool = False, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path / CFN_WEIGHTS))
        meta = {"in_dim": self.in_dim, "flips": self.flips, "hidden": self.hidden, "depth": self.depth, "pool": pool,
                "center": center}
        (path / CFN_CONFIG).write_text(json.dumps({**meta, **(extra or {})}, indent=2))

    @classmethod
    def load(cls, path: Path) -> tuple[CoinFlipNetwork, dict]:
        from safetensors.torch import load_file

        for f in (CFN_CONFIG, CFN_WEIGHTS):
            if not (path / f).is_file():
                raise FileNotFoundError(f"{path} holds no fitted CFN: {f} is missing "
                                        "(fit one with `vla post-train cfn --policy ... --dataset ...`)")
        meta = json.loads((path / CFN_CONFIG).read_text())
        net = cls(int(meta["in_dim"]), int(meta["flips"]), int(meta["hidden"]), int(meta["depth"]))
        net.load_state_dict(load_file(str(path / CFN_WEIGHTS)))
        return net.eval(), {"pool": str(meta.get("pool", "mean")), "center": bool(meta.get("center", False))}


def coin_flips(n: int, d: int, seed: int) -> Tensor:
    """(n, d) fixed random +-1 targets, one vector per training sample."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n, d), generator=g).float() * 2 - 1


def fit_cfn(features: Tensor, *, flips: int = 32, hidden: int = 256, depth: int = 2, steps: int = 2000,
            batch_size: int = 256, lr: float = 1e-3, seed: int = 0, log_every: int = 0) -> tuple[CoinFlipNetwork, dict]:
    """Fit a CFN on pooled training features (M, W). Returns the network and a small fit report."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"fit_cfn: features must be (M, W) with M >= 2, received {tuple(features.shape)}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("fit_cfn: features contain NaN/inf")
    torch.manual_seed(seed)
    x = features.detach().float().cpu()
    m = x.shape[0]
    net = CoinFlipNetwork(x.shape[1], flips, hidden, depth)
    net.calibrate(x)
    targets = coin_flips(m, flips, seed + 1)
    opt = torch.optim.Adam(net.net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=lr * 0.1)
    g = torch.Generator().manual_seed(seed + 2)
    t0, losses = time.time(), []
    net.train()
    for step in range(steps):
        idx = torch.randint(0, m, (min(batch_size, m),), generator=g)
        loss = F.mse_loss(net(x[idx]), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"  cfn step {step + 1}/{steps}  loss {sum(losses[-log_every:]) / log_every:.4f}", flush=True)
    net.eval()
    with torch.no_grad():
        noise = net.feat_mean + net.feat_std * torch.randn(min(m, 2048), x.shape[1], generator=g)
        report = {
            "samples": m, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
            "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 5) if losses else None,
            "inverse_count_train": round(float(net.inverse_count(x).mean()), 5),
            "inverse_count_noise": round(float(net.inverse_count(noise).mean()), 5),
            "fit_s": round(time.time() - t0, 2),
        }
    return net, report


def candidate_features(features: Tensor, pool: str = "mean", center: bool = False) -> Tensor:
    """(B, N, H, W) head features -> (B, N, W) what the CFN scores.

    center: subtract the mean over the N candidates of the same observation. The observation explains
    most of the feature variance; what tells one candidate from another is its deviation, so a CFN on
    deviations ranks candidates, while one on raw features mostly measures how familiar the
    observation is (the same for every candidate)."""
    pooled = pool_features(features.float(), pool)
    return pooled - pooled.mean(1, keepdim=True) if center else pooled


class CfnSelector(ChunkSelector):
    """score = pseudo-count of the candidate's pooled head features (higher = more familiar)."""

    name = "cfn"
    needs_features = True

    def __init__(self, net: CoinFlipNetwork, pool: str = "mean", path: str | None = None, center: bool = False):
        if pool not in POOLS:
            raise ValueError(f"cfn pool: expected one of {POOLS}, received {pool!r}")
        self.net, self.pool, self.path, self.center = net.eval(), pool, path, bool(center)

    def score(self, candidates: Tensor, *, obs: Observation | None, prefix: Prefix | None,
              features: Tensor | None) -> Tensor:
        assert features is not None  # checked by select()
        pooled = candidate_features(features, self.pool, self.center)  # (B, N, W)
        if self.net.feat_mean.device != pooled.device:
            self.net.to(pooled.device)
        with torch.no_grad():
            return self.net.pseudo_count(pooled)

    def config(self) -> CfnConfig:
        return CfnConfig(path=self.path)

    def _save_assets(self, path: Path) -> None:
        self.net.save(path, self.pool, self.center)
        self.path = str(path)


@SelectorConfig.register_subclass("cfn")
@dataclass
class CfnConfig(SelectorConfig):
    # Folder with a fitted CFN (cfn.safetensors + cfn_config.json); None = the one saved with the policy
    # (pretrained_model/selector/, written by `vla post-train cfn --policy P --dataset D`).
    path: str | None = None

    def build(self, policy: Any = None) -> CfnSelector:
        if self.path is not None:
            folder = Path(self.path)
        else:
            folder = getattr(policy, "selector_dir", None)
            if folder is None:
                raise ValueError("selector 'cfn' needs a fitted coin-flip network: pass --selector.path=DIR "
                                 "or load the policy with VLAPolicy.from_pretrained from a checkpoint that has "
                                 f"{SELECTOR_DIR}/ (fit it with `vla post-train cfn --policy P --dataset D`)")
            folder = Path(folder)
            if not (folder / CFN_WEIGHTS).is_file():
                raise FileNotFoundError(f"selector 'cfn': no fitted CFN is saved with this policy (expected "
                                        f"{folder / CFN_WEIGHTS}); fit one with `vla post-train cfn --policy "
                                        f"{folder.parent} --dataset ROOT` or pass --selector.path=DIR")
        net, meta = CoinFlipNetwork.load(folder)
        return CfnSelector(net, meta["pool"], str(folder), meta["center"])
