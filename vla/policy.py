"""``VLAPolicy``: a backbone + an action head + the pre/post-processors, with save/load.

    policy = VLAPolicy.from_pretrained("outputs/train/checkpoints/last/pretrained_model")
    chunk = policy.predict_action_chunk(raw_obs)   # LeRobot-keyed numpy obs -> (H, A) numpy

The head is looked up by name through the config registry; ``vla`` core never imports a head.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from vla.config import PolicyConfig, check_override_fields, from_dict, parse_config, to_dict
from vla.plugins import load_plugins
from vla.types import Observation, Prefix

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PREPROCESSOR_NAME = "preprocessor.json"
ASSETS_DIR = "backbone"
SELECTOR_DIR = "selector"  # fitted test-time selectors of this checkpoint (the CFN), read on demand
HEAD_ASSETS_DIR = "head"  # head-owned files that are not tensors (e.g. a fitted FAST tokenizer's BPE)


class VLAPolicy(nn.Module):
    def __init__(self, config: PolicyConfig, preprocessor: Any | None = None, assets_dir: Path | None = None):
        super().__init__()
        load_plugins()
        self.config = config
        self.backbone = config.backbone.build(assets_dir=assets_dir)
        self.head = config.head.build(self.backbone, config)
        self.preprocessor = preprocessor

    # --- model-level API (normalized tensors) ------------------------------------------------
    def encode(self, obs: Observation, action_dim_mask: Tensor | None = None) -> Prefix:
        """One backbone pass; the state and masks ride along in ``prefix.extras`` for the head."""
        prefix = self.backbone.encode_prefix(obs)
        prefix.extras["state"] = obs.state
        if obs.state_mask is not None:
            prefix.extras["state_mask"] = obs.state_mask
        if action_dim_mask is not None:
            prefix.extras["action_dim_mask"] = action_dim_mask
        return prefix

    def loss(self, obs: Observation, actions: Tensor, is_pad: Tensor, action_dim_mask: Tensor | None = None, **kw) -> Tensor:
        """-> (B, H) unreduced per-step loss (zero on padded steps)."""
        return self.head.loss(self.backbone, self.encode(obs, action_dim_mask), actions, is_pad, **kw)

    def forward(self, batch: Mapping[str, Any], train: bool = True) -> Tensor:
        """A raw LeRobot batch -> (B, H) per-step loss."""
        pre = self._pre()
        obs = pre.observation(batch, train=train)
        actions, is_pad, dim_mask = pre.actions(batch)
        return self.loss(obs, actions, is_pad, dim_mask)

    @torch.no_grad()
    def sample_actions(self, obs: Observation, num_samples: int = 1, generator: torch.Generator | None = None, **kw) -> Tensor:
        """-> (B, N, H, A) normalized chunks from ONE backbone pass."""
        return self.head.sample(self.backbone, self.encode(obs, self._dim_mask(obs.batch_size, obs.device)),
                                num_samples=num_samples, generator=generator, **kw)

    # --- robot-level API (raw numpy in, unnormalized numpy out) ------------------------------
    @torch.no_grad()
    def predict_action_chunk(self, raw_obs: Mapping[str, Any], num_samples: int = 1,
                             generator: torch.Generator | None = None, selector: Any = None,
                             inpaint: Any = None, inpaint_weights: Any = None,
                             max_guidance: float = 5.0, reference: Any = None, reference_start: int = 0) -> np.ndarray:
        """LeRobot-keyed observation -> unnormalized chunk.

        Unbatched input (state of shape (S,)) gives (H, A); batched input (B, S) gives (B, H, A);
        with ``num_samples > 1`` a candidate axis N is inserted after the batch axis.
        A is the dataset's action dim (padding removed). Raises if the result is not finite.

        ``selector`` (a name — "first", "consistency", "cfn", "world_model" —, a ``SelectorConfig`` or a
        ``ChunkSelector``, docs/selectors.md): the N candidates from one backbone pass are scored and only
        the chosen chunk is returned ((H, A) or (B, H, A)); its scores (B, N) are in ``self.last_scores``.

        ``inpaint`` (H', A) or (B, H', A) raw actions, H' <= chunk_size: real-time chunking — the chunk is
        guided to agree with these committed actions on its first H' steps, weighted by
        ``inpaint_weights`` ((H',) or (B, H') in [0, 1], default 1; ``policies.rtc.rtc_weights`` gives
        RTC's soft mask). Flow-matching heads only.

        ``reference`` (H', A) or (B, H', A) raw actions: what the previous chunk still plans for this
        chunk's ticks ``reference_start .. reference_start + H' - 1`` (0 = the observation's tick; an
        asynchronous client skips the ticks that will have passed when the chunk arrives), for selectors
        that prefer agreeing with it (``coherence``); needs a selector.
        """
        pre = self._pre()
        was_training = self.training
        self.eval()
        try:
            obs = pre.observation(raw_obs, train=False).to(self.device)
            with self._inference_autocast():
                chunks = self._chunks(obs, num_samples, generator, selector, inpaint, inpaint_weights, max_guidance,
                                      reference, reference_start)
            out = pre.unnormalize_actions(chunks.float()).cpu().numpy()
        finally:
            self.train(was_training)
        if num_samples == 1 or selector is not None:
            out = out[:, 0]
        unbatched = np.ndim(raw_obs["observation.state"]) == 1
        return out[0] if unbatched else out

    def _chunks(self, obs: Observation, num_samples: int, generator: torch.Generator | None, selector: Any,
                inpaint: Any, inpaint_weights: Any, max_guidance: float, reference: Any,
                reference_start: int) -> Tensor:
        """predict_action_chunk's model part -> (B, N, H, A) normalized (N = 1 with a selector)."""
        kw = {} if inpaint is None else {
            "guide": self._inpaint_guide(inpaint, inpaint_weights, obs.batch_size, max_guidance)}
        if reference is None and reference_start:
            raise ValueError(f"reference_start={reference_start}: only with a reference (the plan it positions)")
        if selector is None:
            if reference is not None:
                raise ValueError("reference: the previous plan is only used to choose among candidates; "
                                 "pass a selector (e.g. selector='coherence')")
            chunks = self.sample_actions(obs, num_samples=num_samples, generator=generator, **kw)  # (B, N, H, A)
        else:  # lazy: vla core reaches policies only by name
            from policies.selectors import sample_and_select

            ref = None if reference is None else self._normalized_actions(reference, obs.batch_size, "reference")
            chunk, scores = sample_and_select(self, obs, num_samples, selector, generator, reference=ref,
                                              reference_start=reference_start, **kw)
            self.last_scores = scores.float().cpu().numpy()
            chunks = chunk[:, None]
        return chunks

    def _inference_autocast(self):
        """bf16 autocast around the model at inference when ``config.inference_bf16`` (else a no-op)."""
        from contextlib import nullcontext

        if not getattr(self.config, "inference_bf16", False):
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @torch.no_grad()
    def sample_candidates(self, raw_obs: Mapping[str, Any], num_samples: int,
                          generator: torch.Generator | None = None, selector: Any = None) -> dict[str, Tensor]:
        """N candidates from ONE backbone pass, with what a selector would see of them (an unbatched obs is B = 1).

        -> ``actions`` (B, N, H, A) in the dataset's units, ``normalized`` (B, N, H, A_max), the head's
        ``features`` (B, N, T, W) and the observation ``summary`` (B, C) the ``dagger`` selector reads. For
        fitting selectors from outcomes (``benchmarks/metaworld/value_data.py``). With a ``selector`` (as in
        ``predict_action_chunk``) also its ``scores`` (B, N): which candidate a selecting policy would execute.
        """
        from policies.selectors.dagger import observation_summary

        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples: expected an int >= 1, received {num_samples!r}")
        pre = self._pre()
        was_training = self.training
        self.eval()
        try:
            obs = pre.observation(raw_obs, train=False).to(self.device)
            with self._inference_autocast():
                prefix = self.encode(obs, self._dim_mask(obs.batch_size, obs.device))
                cands, feats = self.head.sample(self.backbone, prefix, num_samples=num_samples, generator=generator,
                                                return_features=True)
                summary = observation_summary(prefix, obs)
            scores = None
            if selector is not None:
                from policies.selectors import resolve_selector

                scores = resolve_selector(selector, self).select(cands, obs=obs, prefix=prefix, features=feats)[1]
        finally:
            self.train(was_training)
        # fp32 out, also under inference_bf16 (callers turn these into numpy)
        out = {"actions": pre.unnormalize_actions(cands.float()), "normalized": cands.float(), "features": feats.float(),
               "summary": summary.float()}
        if scores is not None:
            out["scores"] = scores.float()
        return out

    def normalize_actions(self, actions: Any) -> Tensor:
        """Raw (H', A) or (B, H', A) actions, 1 <= H' <= chunk_size -> (B, H', max_action_dim) in the head's
        normalized, zero-padded units (e.g. a reference chunk compared with ``sample_candidates``' output)."""
        a = np.asarray(actions)
        return self._normalized_actions(actions, int(a.shape[0]) if a.ndim == 3 else 1, "actions")

    def reset(self) -> None:
        """Called at episode start (stateless policy: nothing to clear; brokers keep the queues)."""

    # --- helpers -------------------------------------------------------------------------------
    def _inpaint_guide(self, actions: Any, weights: Any, batch: int, max_guidance: float):
        """Raw committed actions (+ weights) -> the head's ``InpaintGuide`` in normalized, padded units."""
        import inspect

        from policies.rtc import InpaintGuide

        if "guide" not in inspect.signature(self.head.sample).parameters:
            raise ValueError(f"inpaint: real-time chunking needs a flow-matching head; this policy's head is "
                             f"{type(self.head).__name__}")
        h, a_max = self.config.chunk_size, self.config.max_action_dim
        ref = self._normalized_actions(actions, batch, "inpaint")  # (B, H', A_max)
        k = ref.shape[1]
        w = np.ones((batch, k), np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
        w = np.broadcast_to(w, (batch, k)) if w.ndim == 1 and w.shape[0] == k else w
        if w.shape != (batch, k):
            raise ValueError(f"inpaint_weights: expected shape ({k},) or {(batch, k)}, received {w.shape}")
        target = torch.zeros(batch, h, a_max, device=self.device)
        target[:, :k] = ref
        wt = torch.zeros(batch, h, a_max)
        wt[:, :k, : self._pre().action_dim] = torch.tensor(w)[..., None]
        return InpaintGuide(target, wt.to(self.device), max_guidance)

    def _normalized_actions(self, actions: Any, batch: int, field: str) -> Tensor:
        """Raw (H', A) or (B, H', A) actions, 1 <= H' <= chunk_size -> (B, H', max_action_dim) normalized,
        zero-padded like the head's chunks. ``field`` names the argument in errors."""
        pre, h, a_max = self._pre(), self.config.chunk_size, self.config.max_action_dim
        a = np.asarray(actions, dtype=np.float32)
        a = a[None] if a.ndim == 2 else a
        if a.ndim != 3 or a.shape[0] != batch or not 1 <= a.shape[1] <= h or a.shape[2] != pre.action_dim:
            raise ValueError(f"{field}: expected (H', {pre.action_dim}) or ({batch}, H', {pre.action_dim}) actions with "
                             f"1 <= H' <= chunk_size={h}, received shape {np.shape(actions)}")
        if not np.isfinite(a).all():
            raise ValueError(f"{field}: the actions have NaN/inf values")
        out = torch.zeros(batch, a.shape[1], a_max)
        out[..., : a.shape[2]] = pre.normalizer.normalize(pre.action_key, torch.from_numpy(a)).float()
        return out.to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _pre(self):
        if self.preprocessor is None:
            raise RuntimeError("this VLAPolicy has no preprocessor (normalization stats); "
                               "load it with VLAPolicy.from_pretrained or pass preprocessor=")
        return self.preprocessor

    def _dim_mask(self, b: int, device) -> Tensor | None:
        if self.preprocessor is None:
            return None
        m = torch.zeros(b, self.config.max_action_dim, dtype=torch.bool, device=device)
        m[:, : self.preprocessor.action_dim] = True
        return m

    # --- save / load ---------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        """Write config, weights (safetensors), normalization stats and backbone assets into ``path``."""
        from safetensors.torch import save_model

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(to_dict(self.config), indent=2))
        # save_model (not save_file): tied weights (e.g. PaliGemma's LM head) are stored once.
        save_model(self, str(path / WEIGHTS_NAME))
        if self.preprocessor is not None:
            (path / PREPROCESSOR_NAME).write_text(json.dumps(self.preprocessor.state_dict(), indent=1))
        (path / ASSETS_DIR).mkdir(exist_ok=True)
        self.backbone.save_assets(path / ASSETS_DIR)
        if hasattr(self.head, "save_assets"):
            (path / HEAD_ASSETS_DIR).mkdir(exist_ok=True)
            self.head.save_assets(path / HEAD_ASSETS_DIR)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        embodiment: str | None = None, overrides: Sequence[str] = ()) -> "VLAPolicy":
        """Load a policy saved by :meth:`save_pretrained` (or a LoRA adapter checkpoint).

        ``embodiment`` picks the normalization statistics of one robot of a mixture-pretrained checkpoint
        (``vla pretrain --mixture``); None = its default. An unknown name lists the known ones.
        ``overrides``: ``--field=value`` strings over the saved config, for execution settings that need no
        retraining (``--head.temperature=0``, ``--head.greedy=expected``, ``--head.num_steps=5``,
        ``--n_action_steps=4``); an unknown field is an error naming it."""
        path = Path(path)
        from vla.lora import ADAPTER_CONFIG_NAME, load_adapter_checkpoint

        if (path / ADAPTER_CONFIG_NAME).exists():
            if overrides:
                raise ValueError(f"overrides {list(overrides)}: not supported for a LoRA adapter checkpoint ({path}); "
                                 "override the base checkpoint's config instead")
            return load_adapter_checkpoint(path, device, embodiment)
        config = load_policy_config(path, overrides)
        policy = cls(config, assets_dir=path / ASSETS_DIR)
        load_weights(policy, path / WEIGHTS_NAME)
        policy.selector_dir = path / SELECTOR_DIR  # fitted test-time selectors (e.g. the CFN), read on demand
        if hasattr(policy.head, "load_assets"):
            policy.head.load_assets(path / HEAD_ASSETS_DIR)
        if (path / PREPROCESSOR_NAME).exists():
            from vla.data.processor import Preprocessor

            policy.preprocessor = Preprocessor.from_state_dict(
                json.loads((path / PREPROCESSOR_NAME).read_text()), config, policy.backbone.tokenize,
                embodiment=embodiment)
        return policy.to(device).eval()


def load_policy_config(path: str | Path, overrides: Sequence[str] = ()) -> PolicyConfig:
    """A checkpoint folder's ``config.json`` with ``--field=value`` overrides applied (``from_pretrained``):
    an unknown field or a value that does not parse is a ValueError naming it."""
    path = Path(path)
    if not (path / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{path} is not a policy checkpoint: no {CONFIG_NAME} in it")
    load_plugins()
    config = from_dict(PolicyConfig, json.loads((path / CONFIG_NAME).read_text()))
    if overrides:
        check_override_fields(config, overrides)
        try:
            config = parse_config(PolicyConfig, config, list(overrides), aliases=False)
        except (SystemExit, Exception) as e:  # draccus: DecodingError, or argparse's exit
            raise ValueError(f"overrides {list(overrides)}: a value does not parse: {e}") from e
    return config


def load_weights(policy: nn.Module, file: Path) -> None:
    """Load a full-policy safetensors file; every key must match (tied weights handled)."""
    from safetensors.torch import load_model

    missing, unexpected = load_model(policy, str(file), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{file}: missing keys {sorted(missing)[:5]}, unexpected keys {sorted(unexpected)[:5]}")
