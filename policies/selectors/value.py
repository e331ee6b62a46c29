"""``value``: pick the candidate a learned critic ranks highest (value-guided selection, V-GPS style).

The CFN asks "how familiar is this chunk?", the medoid "which chunk do the others agree with?"; neither
is ever told which chunks WORKED. This selector is: a small network scores each candidate from what
the policy already computed for it, and is trained (``vla post-train value``) to order the N
candidates of one observation the way the environment orders their outcomes. Its training data comes
from a simulator that can roll every candidate from the same saved state
(``python -m benchmarks.metaworld.value_data``: states visited by the policy on TRAINING variations,
N candidates each, MetaWorld's dense reward of each rolled chunk).

Inputs per candidate (``value_inputs``): the head's features pooled over its action tokens (for the flow
head, the action expert's hidden state at the last denoising step), their deviation from the mean of
the N candidates, and the candidate's normalized actions with their deviation from the candidates'
mean. The raw halves say what situation this is, the deviations what this candidate does differently
in it — the CFN measurement (docs/selectors.md) showed that raw features alone mostly describe the
observation, which is the same for every candidate.

Training is listwise (``listwise_loss``): per state, the softmax of the scores is pulled toward the
softmax of the centered returns, so only the order and spacing WITHIN a state matter, never how good
the state itself is. The backbone still runs once per observation; scoring 16 candidates is one small
MLP call.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from policies.selectors.base import SELECTOR_DIR, ChunkSelector, SelectorConfig
from policies.selectors.cfn import POOLS, _mlp, pool_features
from vla.types import Observation, Prefix

logger = logging.getLogger(__name__)

VALUE_WEIGHTS = "value.safetensors"
VALUE_CONFIG = "value_config.json"
VALUE_SUBDIR = "value"  # <policy>/selector/value/: next to a CFN saved in <policy>/selector/


def value_inputs(pooled: Tensor, candidates: Tensor, action_dim: int | None = None) -> Tensor:
    """Pooled head features (B, N, W) and normalized candidates (B, N, H, A) -> (B, N, 2W + 2 H A') inputs.

    ``action_dim``: the real action dims A' (padded dims carry no information and are dropped)."""
    f = pooled.float()
    c = candidates.float()
    if action_dim is not None:
        c = c[..., :action_dim]
    c = c.flatten(2)
    return torch.cat([f, f - f.mean(1, keepdim=True), c, c - c.mean(1, keepdim=True)], -1)


def listwise_loss(scores: Tensor, returns: Tensor, temperature: float) -> Tensor:
    """(M, N) scores and outcomes -> (M,) per-state loss: cross-entropy from softmax(returns / T) to
    softmax(scores). Adding a constant to a state's returns changes nothing (ListNet)."""
    target = ((returns - returns.mean(1, keepdim=True)) / temperature).softmax(1)
    return -(target * scores.log_softmax(1)).sum(1)


class ChunkValueNet(nn.Module):
    """(..., D) standardized inputs -> (...,) score (``out_dim`` 1) or (..., out_dim). D = 2 W + 2 H A' for the
    value critic (``value_inputs``); the ``dagger`` selector uses the same MLP with out_dim H A'."""

    def __init__(self, in_dim: int, chunk_shape: tuple[int, int], hidden: int = 256, depth: int = 2,
                 dropout: float = 0.1, out_dim: int = 1, name: str = "value"):
        super().__init__()
        for label, v in (("in_dim", in_dim), ("hidden", hidden), ("depth", depth), ("out_dim", out_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ChunkValueNet: {label} must be an int >= 1, received {v!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"ChunkValueNet: dropout must be in [0, 1), received {dropout!r}")
        self.in_dim, self.hidden, self.depth, self.dropout, self.out_dim = in_dim, hidden, depth, dropout, out_dim
        self.name = name  # the selector it belongs to, for error messages
        self.chunk_shape = (int(chunk_shape[0]), int(chunk_shape[1]))  # (H, A') the inputs were built from
        layers: list[nn.Module] = []
        for layer in _mlp(in_dim, hidden, depth, out_dim):
            layers.append(layer)
            if isinstance(layer, nn.SiLU) and dropout:
                layers.append(nn.Dropout(dropout))  # a few thousand states: regularize
        self.net = nn.Sequential(*layers)
        self.register_buffer("in_mean", torch.zeros(in_dim))
        self.register_buffer("in_std", torch.ones(in_dim))

    @torch.no_grad()
    def calibrate(self, inputs: Tensor) -> None:
        """Fix the input standardization from training inputs (M, D)."""
        self._check(inputs)
        x = inputs.float()
        std = x.std(0)
        self.in_mean.copy_(x.mean(0))
        self.in_std.copy_(std.clamp_min(max(float(std.median()) * 1e-2, 1e-6)))

    def _check(self, x: Tensor) -> None:
        if x.shape[-1] != self.in_dim:
            what = "the observation summary, " if self.name == "dagger" else ""
            raise ValueError(f"selector {self.name!r}: inputs must have width {self.in_dim} ({what}features and a chunk of "
                             f"shape {self.chunk_shape}, as fitted), received shape {tuple(x.shape)}")

    def forward(self, inputs: Tensor) -> Tensor:
        self._check(inputs)
        out = self.net((inputs.float() - self.in_mean) / self.in_std)
        return out.squeeze(-1) if self.out_dim == 1 else out

    def save(self, path: Path, pool: str, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path / VALUE_WEIGHTS))
        meta = {"in_dim": self.in_dim, "chunk_shape": list(self.chunk_shape), "hidden": self.hidden,
                "depth": self.depth, "dropout": self.dropout, "out_dim": self.out_dim, "pool": pool}
        (path / VALUE_CONFIG).write_text(json.dumps({**meta, **(extra or {})}, indent=2))

    @classmethod
    def load(cls, path: Path, name: str = "value") -> tuple[ChunkValueNet, str]:
        """-> (network, pool) from a folder written by :meth:`save`; ``name``: the selector (and post-train command)."""
        from safetensors.torch import load_file

        for f in (VALUE_CONFIG, VALUE_WEIGHTS):
            if not (path / f).is_file():
                raise FileNotFoundError(f"{path} holds no fitted {name} network: {f} is missing (fit one with "
                                        f"`vla post-train {name} --policy P --data D`)")
        meta = json.loads((path / VALUE_CONFIG).read_text())
        net = cls(int(meta["in_dim"]), tuple(meta["chunk_shape"]), int(meta["hidden"]), int(meta["depth"]),
                  float(meta.get("dropout", 0.0)), int(meta.get("out_dim", 1)), name)
        net.load_state_dict(load_file(str(path / VALUE_WEIGHTS)))
        return net.eval(), str(meta.get("pool", "mean"))


class ValueSelector(ChunkSelector):
    """score = the value network's output for each candidate (higher = expected to do better)."""

    name = "value"
    needs_features = True

    def __init__(self, net: ChunkValueNet, pool: str = "mean", path: str | None = None):
        if pool not in POOLS:
            raise ValueError(f"value pool: expected one of {POOLS}, received {pool!r}")
        self.net, self.pool, self.path = net.eval(), pool, path

    def score(self, candidates: Tensor, *, obs: Observation | None, prefix: Prefix | None,
              features: Tensor | None) -> Tensor:
        assert features is not None  # checked by select()
        h, a = self.net.chunk_shape
        if candidates.shape[2] != h or candidates.shape[3] < a:
            raise ValueError(f"selector 'value': fitted on chunks of {h} steps x {a} action dims, received candidates "
                             f"of shape {tuple(candidates.shape)} (B, N, H, A)")
        x = value_inputs(pool_features(features.float(), self.pool), candidates, a)
        if self.net.in_mean.device != x.device:
            self.net.to(x.device)
        with torch.no_grad():
            return self.net(x)

    def config(self) -> ValueConfig:
        return ValueConfig(path=self.path)

    def _save_assets(self, path: Path) -> None:
        self.net.save(path, self.pool)
        self.path = str(path)


@SelectorConfig.register_subclass("value")
@dataclass
class ValueConfig(SelectorConfig):
    # Folder with a fitted value network (value.safetensors + value_config.json); None = the one saved with
    # the policy (pretrained_model/selector/value/, written by `vla post-train value --policy P --data D`).
    path: str | None = None

    def build(self, policy: Any = None) -> ValueSelector:
        if self.path is not None:
            folder = Path(self.path)
        else:
            sel_dir = getattr(policy, "selector_dir", None)
            if sel_dir is None:
                raise ValueError("selector 'value' needs a fitted value network: pass --selector.path=DIR or load the "
                                 f"policy with VLAPolicy.from_pretrained from a checkpoint that has "
                                 f"{SELECTOR_DIR}/{VALUE_SUBDIR}/ (fit it with `vla post-train value`)")
            folder = Path(sel_dir) / VALUE_SUBDIR
            if not (folder / VALUE_WEIGHTS).is_file():
                raise FileNotFoundError(f"selector 'value': no fitted value network is saved with this policy "
                                        f"(expected {folder / VALUE_WEIGHTS}); collect outcomes with `python -m "
                                        "benchmarks.metaworld.value_data`, fit with `vla post-train value --policy "
                                        f"{Path(sel_dir).parent} --data FILE`, or pass --selector.path=DIR")
        net, pool = ChunkValueNet.load(folder)
        check_sampling(folder, policy, "value")
        return ValueSelector(net, pool, str(folder))


# Head settings that shape the candidates a selector reads: the flow head's Euler steps, a token head's draws.
SAMPLING_FIELDS = ("num_steps", "temperature", "top_k", "greedy_first")


def sampling_settings(head_cfg: Any) -> dict[str, Any]:
    """The head config's SAMPLING_FIELDS that it has ({} for None): recorded with selector training data."""
    return {f: getattr(head_cfg, f) for f in SAMPLING_FIELDS if hasattr(head_cfg, f)}


def check_sampling(folder: Path, policy: Any, name: str) -> None:
    """Warn when the policy samples its candidates otherwise than the fit data's (``meta.sampling`` of the
    ``value_data`` files, ``meta.num_steps`` in older ones, kept in the fit report): other Euler steps, another
    temperature, top_k or greedy_first. The network reads the candidates' pooled features and mean chunk, and
    both shift with how the candidates are drawn, so a predictor belongs to one sampling setting as it belongs
    to one checkpoint."""
    now = sampling_settings(getattr(getattr(policy, "config", None), "head", None))
    try:
        collected = json.loads((folder / VALUE_CONFIG).read_text()).get("fit", {}).get("collected") or []
    except (OSError, ValueError):
        return
    fitted: dict[str, set] = {}
    for m in (c for c in (collected if isinstance(collected, list) else [collected]) if isinstance(c, dict)):
        settings = m.get("sampling") or ({"num_steps": m["num_steps"]} if m.get("num_steps") is not None else {})
        for k, v in settings.items():
            fitted.setdefault(k, set()).add(v)
    off = {k: v for k, v in now.items() if k in fitted and v not in fitted[k]}
    if off:
        logger.warning("selector '%s' (%s): fitted on candidates sampled with %s, the policy now samples with %s; "
                       "collect data with %s and refit for this setting", name, folder,
                       ", ".join(f"head.{k}={'/'.join(map(str, sorted(fitted[k])))}" for k in off),
                       ", ".join(f"head.{k}={v}" for k, v in off.items()),
                       " ".join(f"--policy.head.{k}={v}" for k, v in off.items()))
