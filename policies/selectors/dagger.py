"""``dagger``: execute the candidate closest to the expert's chunk, as predicted for the policy's OWN states.

Why this exists: a simulator that picks, among the policy's 16 candidates, the one closest to what the
scripted expert would do from the same state lifts MT10 from 64 to 93% (``oracle_selection --by expert``),
so the candidates hold the answer. The ``value`` critic, trained to *rank* candidates by that closeness,
reached a held-out Spearman of 0.59 and no closed-loop gain: it has to rediscover from 16 ranks per state
what the target is made of. This selector is given that structure instead. A network regresses the
expert's chunk itself (H x A' numbers per state) from DAgger data (the states the policy visits, each
labelled with the expert's chunk from that very state, ``benchmarks.metaworld.value_data``), and a
candidate's score is minus its mean squared distance to the prediction. The prediction never reaches
the robot; it only chooses among chunks the policy sampled, so selection stays on the policy's support.

Inputs per observation (``dagger_inputs``): the observation summary (``observation_summary``: the
backbone's last hidden states averaged over the real prefix tokens, and the normalized proprio state),
the head's pooled features averaged over the N candidates, and the candidates' mean chunk. The network
outputs a correction to that mean chunk, so an untrained or uninformed network falls back to "closest to
the candidates' mean" (about the medoid).

    vla post-train dagger --policy P --data outputs/value_data.pt     # -> P/selector/dagger/
    vla eval metaworld --policy P --selector dagger --num-samples 16
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from policies.selectors.base import SELECTOR_DIR, ChunkSelector, SelectorConfig
from policies.selectors.cfn import POOLS, pool_features
from policies.selectors.value import VALUE_WEIGHTS, ChunkValueNet, check_sampling
from vla.types import Observation, Prefix

DAGGER_SUBDIR = "dagger"  # <policy>/selector/dagger/


def observation_summary(prefix: Prefix, obs: Observation) -> Tensor:
    """-> (B, D + S): the prefix's last hidden states (B, T, D) averaged over its real tokens, and the
    normalized proprio state (B, S) (padded dims are zero). What the selector knows of the observation."""
    m = prefix.mask.float().unsqueeze(-1)
    pooled = (prefix.hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)
    return torch.cat([pooled, obs.state.float().to(pooled.device)], -1)


def finite_mean(x: Tensor, candidates: Tensor) -> Tensor:
    """(B, N, ...) -> (B, ...) mean over the candidates whose chunk (B, N, H, A) is finite: one NaN candidate
    must not poison the inputs of all the others (``select`` then never picks it)."""
    ok = torch.isfinite(candidates.float()).flatten(2).all(-1)  # (B, N)
    w = ok.float().view(*ok.shape, *([1] * (x.dim() - 2)))
    return torch.where(w > 0, x.float(), torch.zeros_like(x, dtype=torch.float32)).sum(1) / w.sum(1).clamp_min(1.0)


def dagger_inputs(summary: Tensor, pooled: Tensor, candidates: Tensor, action_dim: int) -> Tensor:
    """summary (B, C), pooled head features (B, N, W), normalized candidates (B, N, H, A) -> (B, C + W + H A')."""
    mean_chunk = finite_mean(candidates[..., :action_dim], candidates).flatten(1)
    return torch.cat([summary.float(), finite_mean(pooled, candidates), mean_chunk], -1)


def predict_expert(net: ChunkValueNet, inputs: Tensor, candidates: Tensor) -> Tensor:
    """-> (B, H, A') predicted expert chunk (normalized): the candidates' mean chunk + the network's correction
    (for a mixture, its mean: the components' means weighted by their weights)."""
    h, a = net.chunk_shape
    if mixture_components(net.out_dim, net.chunk_shape):
        log_w, mean, _ = expert_mixture(net, inputs, candidates)
        return (log_w.exp()[..., None, None] * mean).sum(1)
    return finite_mean(candidates[..., :a], candidates) + net(inputs).view(-1, h, a)


# A mixture component's per-number log std, squashed into this range: below e^-4 (0.02 normalized units) a
# component would reward candidates for matching noise; above e^2 it would say nothing.
LOG_SIGMA_RANGE = (-4.0, 2.0)


def mixture_components(out_dim: int, chunk_shape: tuple[int, int]) -> int:
    """K of a network's output: 0 for a point prediction (H A' numbers), K for a K-component diagonal Gaussian
    mixture (K x (1 + 2 H A'): a weight logit, a correction to the candidates' mean chunk and a log std)."""
    h, a = chunk_shape
    if out_dim == h * a:
        return 0
    k, rest = divmod(out_dim, 1 + 2 * h * a)
    if rest or k < 1:
        raise ValueError(f"selector 'dagger': the network must output a chunk of {h} x {a} = {h * a} numbers, or "
                         f"K x {1 + 2 * h * a} for a K-component mixture; it outputs {out_dim} (a `value` critic's "
                         "folder? fit one with `vla post-train dagger`)")
    return k


def expert_mixture(net: ChunkValueNet, inputs: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """-> (log weights (B, K), means (B, K, H, A'), log stds (B, K, H, A')) of the predicted expert chunk.

    Why a mixture: a point prediction trained by squared error lands between the modes where the expert's next
    chunk is bimodal given what the network sees (re-grasp or push in), and the candidate nearest that average
    is neither. The log stds also weigh each step and dim by how sure the prediction is."""
    h, a = net.chunk_shape
    k = mixture_components(net.out_dim, net.chunk_shape)
    if k == 0:
        raise ValueError("expert_mixture: this network predicts one chunk (fitted without --mixtures)")
    out = net(inputs).view(-1, k, 1 + 2 * h * a)
    mean = finite_mean(candidates[..., :a], candidates)[:, None] + out[..., 1:1 + h * a].reshape(-1, k, h, a)
    lo, hi = LOG_SIGMA_RANGE
    log_std = lo + (hi - lo) * torch.sigmoid(out[..., 1 + h * a:].reshape(-1, k, h, a))
    return out[..., 0].log_softmax(-1), mean, log_std


def mixture_log_prob(chunks: Tensor, log_w: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """chunks (B, N, H, >= A') -> (B, N) log density under the mixture, per number (divided by H A')."""
    _, _, h, a = mean.shape
    x = chunks.float()[..., :a][:, :, None]  # (B, N, 1, H, A')
    z = (x - mean[:, None]) * torch.exp(-log_std[:, None])
    comp = (-0.5 * z ** 2 - log_std[:, None]).sum((-1, -2)) - 0.5 * h * a * math.log(2 * math.pi)  # (B, N, K)
    return torch.logsumexp(log_w[:, None] + comp, -1) / (h * a)


def expert_distance(candidates: Tensor, expert: Tensor) -> Tensor:
    """candidates (B, N, H, A >= A'), expert (B, H, A') -> (B, N) mean squared distance over the real dims.

    In normalized units and unclipped: the expert chunk was clipped to the robot's limits before it was
    normalized, a candidate is not, so a candidate beyond a limit pays for the overshoot the robot would
    clip away (the simulator's ``expert`` closeness clips both)."""
    a = expert.shape[-1]
    return ((candidates.float()[..., :a] - expert.float()[:, None]) ** 2).mean((-1, -2))


# How a mixture scores a candidate. "mode": minus its distance to the most probable component's mean — one
# coherent guess of what the expert does, never the average of two. "likelihood": its log density under the
# whole mixture; measured held out on MetaWorld it ranks far worse (Spearman 0.33 against 0.75 for "mode"): the
# smallest learned stds (the gripper's) dominate the density, and the arm's motion hardly counts.
MIXTURE_SCORES = ("mode", "likelihood")


def dagger_scores(net: ChunkValueNet, inputs: Tensor, candidates: Tensor, mixture_score: str = "mode") -> Tensor:
    """(B, N) scores of the candidates (B, N, H, A): minus the distance to the predicted chunk, or for a mixture
    (``MIXTURE_SCORES``) minus the distance to its most probable component's mean, or the log density."""
    if mixture_score not in MIXTURE_SCORES:
        raise ValueError(f"dagger mixture_score: expected one of {MIXTURE_SCORES}, received {mixture_score!r}")
    with torch.no_grad():
        if not mixture_components(net.out_dim, net.chunk_shape):
            return -expert_distance(candidates, predict_expert(net, inputs, candidates))
        log_w, mean, log_std = expert_mixture(net, inputs, candidates)
        if mixture_score == "likelihood":
            return mixture_log_prob(candidates, log_w, mean, log_std)
        return -expert_distance(candidates, mean[torch.arange(len(mean)), log_w.argmax(1)])


class DaggerSelector(ChunkSelector):
    """score = minus the distance of each candidate to the expert chunk predicted for this observation (for a
    predictor fitted with ``--mixtures K``: to the most probable component's mean, or the log density)."""

    name = "dagger"
    needs_features = True

    def __init__(self, net: ChunkValueNet, pool: str = "mean", path: str | None = None, mixture_score: str = "mode"):
        if pool not in POOLS:
            raise ValueError(f"dagger pool: expected one of {POOLS}, received {pool!r}")
        if mixture_score not in MIXTURE_SCORES:
            raise ValueError(f"selector 'dagger': mixture_score must be one of {MIXTURE_SCORES}, received "
                             f"{mixture_score!r}")
        self.mixtures = mixture_components(net.out_dim, net.chunk_shape)  # checks the output width
        self.net, self.pool, self.path, self.mixture_score = net.eval(), pool, path, mixture_score

    def score(self, candidates: Tensor, *, obs: Observation | None, prefix: Prefix | None,
              features: Tensor | None) -> Tensor:
        assert features is not None  # checked by select()
        if obs is None or prefix is None:
            raise ValueError("selector 'dagger' reads the observation: pass obs= and prefix= to select() "
                             "(sample_and_select and VLAPolicy.predict_action_chunk do)")
        h, a = self.net.chunk_shape
        if candidates.shape[2] != h or candidates.shape[3] < a:
            raise ValueError(f"selector 'dagger': fitted on chunks of {h} steps x {a} action dims, received candidates "
                             f"of shape {tuple(candidates.shape)} (B, N, H, A)")
        x = dagger_inputs(observation_summary(prefix, obs), pool_features(features.float(), self.pool), candidates, a)
        if self.net.in_mean.device != x.device:
            self.net.to(x.device)
        return dagger_scores(self.net, x, candidates, self.mixture_score)

    def config(self) -> DaggerConfig:
        return DaggerConfig(path=self.path, mixture_score=self.mixture_score)

    def _save_assets(self, path: Path) -> None:
        self.net.save(path, self.pool)
        self.path = str(path)


@SelectorConfig.register_subclass("dagger")
@dataclass
class DaggerConfig(SelectorConfig):
    # Folder with a fitted network (value.safetensors + value_config.json); None = the one saved with the
    # policy (pretrained_model/selector/dagger/, written by `vla post-train dagger --policy P --data D`).
    path: str | None = None
    # A predictor fitted with --mixtures K: "mode" (closest to the most probable component) or "likelihood".
    mixture_score: str = "mode"

    def build(self, policy: Any = None) -> DaggerSelector:
        if self.path is not None:
            folder = Path(self.path)
        else:
            sel_dir = getattr(policy, "selector_dir", None)
            if sel_dir is None:
                raise ValueError("selector 'dagger' needs a fitted network: pass --selector.path=DIR or load the policy "
                                 f"with VLAPolicy.from_pretrained from a checkpoint that has {SELECTOR_DIR}/"
                                 f"{DAGGER_SUBDIR}/ (fit it with `vla post-train dagger`)")
            folder = Path(sel_dir) / DAGGER_SUBDIR
            if not (folder / VALUE_WEIGHTS).is_file():
                raise FileNotFoundError(f"selector 'dagger': no fitted network is saved with this policy (expected "
                                        f"{folder / VALUE_WEIGHTS}); collect expert-labelled states with `python -m "
                                        "benchmarks.metaworld.value_data`, fit with `vla post-train dagger --policy "
                                        f"{Path(sel_dir).parent} --data FILE`, or pass --selector.path=DIR")
        net, pool = ChunkValueNet.load(folder, "dagger")
        check_sampling(folder, policy, "dagger")
        return DaggerSelector(net, pool, str(folder), self.mixture_score)
