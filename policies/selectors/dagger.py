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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from policies.selectors.base import SELECTOR_DIR, ChunkSelector, SelectorConfig
from policies.selectors.cfn import POOLS, pool_features
from policies.selectors.value import VALUE_WEIGHTS, ChunkValueNet, check_sampling_steps
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
    """-> (B, H, A') predicted expert chunk (normalized): the candidates' mean chunk + the network's correction."""
    h, a = net.chunk_shape
    return finite_mean(candidates[..., :a], candidates) + net(inputs).view(-1, h, a)


def expert_distance(candidates: Tensor, expert: Tensor) -> Tensor:
    """candidates (B, N, H, A >= A'), expert (B, H, A') -> (B, N) mean squared distance over the real dims.

    In normalized units and unclipped: the expert chunk was clipped to the robot's limits before it was
    normalized, a candidate is not, so a candidate beyond a limit pays for the overshoot the robot would
    clip away (the simulator's ``expert`` closeness clips both)."""
    a = expert.shape[-1]
    return ((candidates.float()[..., :a] - expert.float()[:, None]) ** 2).mean((-1, -2))


class DaggerSelector(ChunkSelector):
    """score = minus the distance of each candidate to the expert chunk predicted for this observation."""

    name = "dagger"
    needs_features = True

    def __init__(self, net: ChunkValueNet, pool: str = "mean", path: str | None = None):
        if pool not in POOLS:
            raise ValueError(f"dagger pool: expected one of {POOLS}, received {pool!r}")
        h, a = net.chunk_shape
        if net.out_dim != h * a:
            raise ValueError(f"selector 'dagger': the network must output a chunk of {h} x {a} = {h * a} numbers, it "
                             f"outputs {net.out_dim} (a `value` critic's folder? fit one with `vla post-train dagger`)")
        self.net, self.pool, self.path = net.eval(), pool, path

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
        with torch.no_grad():
            return -expert_distance(candidates, predict_expert(self.net, x, candidates))

    def config(self) -> DaggerConfig:
        return DaggerConfig(path=self.path)

    def _save_assets(self, path: Path) -> None:
        self.net.save(path, self.pool)
        self.path = str(path)


@SelectorConfig.register_subclass("dagger")
@dataclass
class DaggerConfig(SelectorConfig):
    # Folder with a fitted network (value.safetensors + value_config.json); None = the one saved with the
    # policy (pretrained_model/selector/dagger/, written by `vla post-train dagger --policy P --data D`).
    path: str | None = None

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
        check_sampling_steps(folder, policy, "dagger")
        return DaggerSelector(net, pool, str(folder))
