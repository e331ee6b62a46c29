"""``hf_vlm``: any transformers image-text-to-text VLM (SmolVLM2, PaliGemma, Qwen2.5-VL) as a backbone.

The prefix is ``[camera 0 tokens][camera 1 tokens]...[prompt tokens]``, each camera laid out as the model's
own processor would lay out one image (see ``hf_vlm_families.py``). The language model runs ONCE over it
with a custom 4-D mask: valid prefix tokens attend to each other bidirectionally (pi0 style; or causally
with ``prefix_attention="causal"``), padding and missing cameras are never attended, and positions skip
them (``cumsum(mask) - 1``), so a sample with a missing camera reads exactly as if that camera were absent.

The language model always runs with ``sdpa`` (or ``eager``): the custom masks (bidirectional prefix,
masked cameras, action-expert blocks) are 4-D, which flash-attention cannot take. ``flash_attention_2``
(when ``flash_attn`` imports and CUDA is present) goes to the vision tower, where most of the tokens are.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vla.backbones.base import Backbone, KVSpec
from vla.backbones.hf_vlm_families import ImageBlock, VLMFamily, family_for
from vla.config import BackboneConfig
from vla.types import KVCache, Observation, Prefix

_DTYPES = ("float32", "bfloat16", "float16")
_ATTN = ("auto", "sdpa", "eager", "flash_attention_2")


@BackboneConfig.register_subclass("hf_vlm")
@dataclass
class HFVLMConfig(BackboneConfig):
    path: str | None = None  # local folder or hub id (hub only when online; never in tests)
    tiny: str | None = None  # "smolvlm" | "paligemma" | "qwen2_5_vl": a tiny random model, built offline
    seed: int = 0  # weights of a `tiny` model
    revision: str | None = None  # hub revision for `path`
    num_layers: int | None = None  # keep only the first N language-model layers (SmolVLA: 16 of 32); None = all
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2 (vision tower; the LM: sdpa/eager)
    dtype: str = "float32"  # float32 | bfloat16 | float16 (weights and activations)
    freeze_vision: bool = False  # no gradients into the vision encoder (the projector still trains)
    freeze_language: bool = False  # no gradients into the language model (embeddings + layers)
    image_size: int | None = None  # per-camera resolution fed to the vision tower; None = the processor's
    prefix_attention: str = "bidirectional"  # bidirectional (pi0) | causal (the LM's pretraining mask)

    def validate(self) -> None:
        from vla.backbones.tiny_vlm import check_tiny_family

        if (self.path is None) == (self.tiny is None):
            raise ValueError(
                f"hf_vlm: set exactly one of `path` (a local folder or hub id) or `tiny` (a tiny random model); "
                f"got path={self.path!r}, tiny={self.tiny!r}"
            )
        if self.tiny is not None:
            check_tiny_family(self.tiny)
        for name, value, allowed in (("dtype", self.dtype, _DTYPES), ("attn_implementation",
                                     self.attn_implementation, _ATTN),
                                     ("prefix_attention", self.prefix_attention, ("bidirectional", "causal"))):
            if value not in allowed:
                raise ValueError(f"hf_vlm: {name} must be one of {', '.join(allowed)}; got {value!r}")
        for name in ("num_layers", "image_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"hf_vlm: {name} must be >= 1 or None; got {value}")

    def resolved_attn(self) -> tuple[str, str]:
        """(vision tower, language model) attention implementations."""
        impl = self.attn_implementation
        if impl == "auto":
            impl = "flash_attention_2" if _flash_attn_usable() else "sdpa"
        return impl, ("eager" if impl == "eager" else "sdpa")

    @classmethod
    def tiny_variants(cls) -> dict[str, "HFVLMConfig"]:
        """One tiny random model per supported family, for the parametrized contract tests."""
        from vla.backbones.tiny_vlm import TINY_FAMILIES

        return {f"hf_vlm:{family}": cls(tiny=family) for family in TINY_FAMILIES}

    def build(self, assets_dir: str | Path | None = None) -> "HFVLMBackbone":
        """Load the model (pretrained from ``path``, or a seeded tiny one). With ``assets_dir`` (written by
        ``save_assets``) rebuild the architecture from the files there with random weights: a checkpoint's
        own weights are loaded next, and the original ``path`` may not exist on this machine."""
        self.validate()
        model, processor = _load(self, None if assets_dir is None else Path(assets_dir))
        return HFVLMBackbone(model, processor, self)


def _flash_attn_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


def _truncate_text_config(config: Any, num_layers: int | None) -> None:
    text = config.get_text_config()
    have = int(text.num_hidden_layers)
    if num_layers is None or num_layers == have:
        return
    if num_layers > have:
        raise ValueError(f"hf_vlm: num_layers={num_layers} but the language model has only {have} layers")
    text.num_hidden_layers = num_layers
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = list(text.layer_types)[:num_layers]


def _load(cfg: HFVLMConfig, assets_dir: Path | None) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from vla.backbones.tiny_vlm import tiny_vlm_config_and_processor

    vision_attn, lm_attn = cfg.resolved_attn()
    kw = dict(dtype=getattr(torch, cfg.dtype), attn_implementation={"": vision_attn, "vision_config": vision_attn,
                                                                     "text_config": lm_attn})
    if assets_dir is not None or cfg.tiny is not None:
        if assets_dir is not None:
            config, processor = AutoConfig.from_pretrained(assets_dir), AutoProcessor.from_pretrained(assets_dir)
        else:
            config, processor = tiny_vlm_config_and_processor(cfg.tiny)
        _truncate_text_config(config, cfg.num_layers)
        with torch.random.fork_rng(devices=[]):  # deterministic, and the caller's RNG stream is untouched
            torch.manual_seed(cfg.seed)
            model = AutoModelForImageTextToText.from_config(config, **kw)
    else:
        config = AutoConfig.from_pretrained(cfg.path, revision=cfg.revision)
        # Truncating the config first means the dropped layers are never materialized.
        _truncate_text_config(config, cfg.num_layers)
        model = AutoModelForImageTextToText.from_pretrained(cfg.path, config=config, revision=cfg.revision, **kw)
        processor = AutoProcessor.from_pretrained(cfg.path, revision=cfg.revision)
    return model, processor


class HFVLMBackbone(Backbone):
    """A transformers VLM behind the :class:`Backbone` contract. ``self.model`` is the full HF model
    (``*ForConditionalGeneration``, LM head included for token heads: see :meth:`logits`)."""

    def __init__(self, model: nn.Module, processor: Any, cfg: HFVLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.processor = processor
        self.family: VLMFamily = family_for(model, processor, cfg.image_size)
        self.tokenizer = processor.tokenizer
        text = model.config.get_text_config()
        self.hidden_size = int(text.hidden_size)
        self.vocab_size = int(self.lm.get_input_embeddings().num_embeddings)
        heads = int(text.num_attention_heads)
        rope = getattr(text, "rope_parameters", None) or {}
        self.kv_spec = KVSpec(
            num_layers=len(self.lm.layers),
            num_heads=heads,
            num_kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(text, "head_dim", None) or self.hidden_size // heads),
            rope_theta=float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))),
            rope_type=str(rope.get("rope_type", "default")),
        )
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._lm_eager = text._attn_implementation == "eager"
        if cfg.freeze_vision:
            for module in self.family.vision_modules():
                module.requires_grad_(False)
        if cfg.freeze_language:
            self.lm.requires_grad_(False)

    @property
    def lm(self) -> nn.Module:
        """The decoder-only language model (embeddings, layers, final norm)."""
        return self.family.language_model

    # --- text -------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"tokenize: texts must be a list of str; got {type(texts).__name__}")
        rows = self.family.prompt_ids(list(texts))
        for i, row in enumerate(rows):
            if len(row) > max_length:
                raise ValueError(f"tokenize: prompt {i} is {len(row)} tokens, longer than max_length={max_length}: "
                                 f"{texts[i]!r}")
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        return ids, mask

    def embed_tokens(self, ids: Tensor) -> Tensor:
        """(B, L) -> (B, L, D), what the LM takes as ``inputs_embeds`` (Gemma's sqrt(D) scale included)."""
        return self.lm.get_input_embeddings()(ids)

    def logits(self, hidden: Tensor) -> Tensor:
        """(B, T, D) final hidden states -> (B, T, vocab) next-token logits of the VLM's own LM head."""
        return self.model.lm_head(hidden)

    # --- the prefix -------------------------------------------------------------------------------
    def _check_obs(self, obs: Observation) -> None:
        if not obs.images:
            raise ValueError("hf_vlm: the observation has no images")
        batch = obs.prompt_ids.shape[0]
        if obs.prompt_ids.shape != obs.prompt_mask.shape:
            raise ValueError(f"hf_vlm: prompt_ids {tuple(obs.prompt_ids.shape)} and prompt_mask "
                             f"{tuple(obs.prompt_mask.shape)} differ in shape")
        for cam, img in obs.images.items():
            if img.ndim != 4 or img.shape[0] != batch or img.shape[1] != 3:
                raise ValueError(f"hf_vlm: images[{cam!r}] must be (B={batch}, 3, H, W); got {tuple(img.shape)}")
            if not img.is_floating_point():
                raise ValueError(f"hf_vlm: images[{cam!r}] must be float in [0, 1]; got dtype {img.dtype}")
            lo, hi = torch.aminmax(img.detach())
            if not (lo >= 0 and hi <= 1):  # also catches NaN
                raise ValueError(f"hf_vlm: images[{cam!r}] must be in [0, 1]; got values in [{lo:.3g}, {hi:.3g}]")
            m = obs.image_masks.get(cam)
            if m is None or tuple(m.shape) != (batch,):
                raise ValueError(f"hf_vlm: image_masks[{cam!r}] must be a (B={batch},) bool tensor; got "
                                 f"{None if m is None else tuple(m.shape)}")

    def _encode_images(self, obs: Observation) -> list[tuple[Tensor, ImageBlock]]:
        """Per camera (in insertion order): (tokens (B, n, D), layout). Cameras of one size share one pass."""
        cams = list(obs.images)
        sizes = {tuple(obs.images[c].shape[-2:]) for c in cams}
        if len(sizes) == 1:
            batch = obs.images[cams[0]].shape[0]
            feats, block = self.family.encode(torch.cat([obs.images[c] for c in cams]))
            return [(f, block) for f in feats.split(batch)]
        return [self.family.encode(obs.images[c]) for c in cams]

    def _prefix_inputs(self, obs: Observation) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """-> embeds (B, T, D), valid (B, T) bool, ids (B, T) (image slots hold the image token id),
        positions ((3,) B, T) and next position (B,)."""
        self._check_obs(obs)
        device = obs.prompt_ids.device
        b = obs.prompt_ids.shape[0]
        embed = self.lm.get_input_embeddings()
        image_id = int(self.model.config.image_token_id)
        pieces, valid, ids, steps, offsets = [], [], [], [], []

        def text(tok: tuple[int, ...] | Tensor, mask: Tensor) -> None:
            t = torch.as_tensor(tok, dtype=torch.long, device=device).expand(b, -1)
            pieces.append(embed(t))
            ids.append(t)
            valid.append(mask.to(device).bool().view(b, 1).expand(b, t.shape[1]) if mask.ndim == 1 else mask)
            steps.append(torch.ones(t.shape[1], dtype=torch.long, device=device))
            offsets.append(torch.zeros(3, t.shape[1], dtype=torch.long, device=device))

        for cam, (feats, block) in zip(obs.images, self._encode_images(obs)):
            cam_mask = obs.image_masks[cam].to(device).bool()
            text(block.pre, cam_mask)
            n = block.num_tokens
            pieces.append(feats.to(pieces[-1].dtype))
            ids.append(torch.full((b, n), image_id, dtype=torch.long, device=device))
            valid.append(cam_mask.view(b, 1).expand(b, n))
            step, off = torch.ones(n, dtype=torch.long, device=device), torch.zeros(3, n, dtype=torch.long,
                                                                                   device=device)
            if block.grid is not None:  # multimodal RoPE: (t, h, w) = start + (0, row, col); advance max(rows, cols)
                rows, cols = block.grid
                r = torch.arange(n, device=device)
                off[1], off[2] = r // cols, r % cols
                step.zero_()
                step[-1] = max(rows, cols)
            steps.append(step)
            offsets.append(off)
            text(block.post, cam_mask)
        text(obs.prompt_ids, obs.prompt_mask.bool())
        valid_t, step_t = torch.cat(valid, 1), torch.cat(steps)
        advance = step_t * valid_t  # (B, T): masked tokens do not move the position counter
        start = torch.cumsum(advance, 1) - advance + self.family.position_offset
        pos = start.unsqueeze(0) + torch.cat(offsets, 1).unsqueeze(1)  # (3, B, T)
        pos = pos if self.family.mrope else pos[0]
        nxt = advance.sum(1) + self.family.position_offset
        return torch.cat(pieces, 1), valid_t, torch.cat(ids, 1), pos, nxt

    def prefix_token_ids(self, obs: Observation) -> Tensor:
        """(B, T) the prefix as token ids (image slots = the image token): the layout, for inspection/tests."""
        return self._prefix_inputs(obs)[2]

    def _attention(self, allowed: Tensor) -> Tensor:
        """(B, Tq, Tk) bool (True = may attend) -> the 4-D mask the LM's attention takes.

        A query row that may attend nothing (padding, a missing camera) gets its own key: some kernels return
        NaN for an all-masked softmax, and a NaN value would poison valid rows through 0 * NaN.
        """
        tq, tk = allowed.shape[-2:]
        q = torch.arange(tq, device=allowed.device).unsqueeze(1) + (tk - tq)  # a query's own key column
        own = q == torch.arange(tk, device=allowed.device)
        allowed = allowed | (own & ~allowed.any(-1, keepdim=True))
        allowed = allowed.unsqueeze(1)
        if not self._lm_eager:
            return allowed
        dtype = self.lm.get_input_embeddings().weight.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)

    def _run_lm(self, embeds: Tensor, allowed: Tensor, positions: Tensor, kv: KVCache | None
                ) -> tuple[Tensor, KVCache]:
        """One LM pass over ``embeds`` (after the cached ``kv``): final-normed hidden and the full cache."""
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=kv) if kv else DynamicCache()
        out = self.lm(inputs_embeds=embeds, attention_mask=self._attention(allowed), position_ids=positions,
                      past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        return out.last_hidden_state, tuple((layer.keys, layer.values) for layer in cache.layers)

    def _prefix_allowed(self, valid: Tensor) -> Tensor:
        allowed = valid.unsqueeze(1) & valid.unsqueeze(2)
        if self.cfg.prefix_attention == "causal":
            allowed = allowed & torch.ones(allowed.shape[-2:], dtype=torch.bool, device=valid.device).tril()
        return allowed

    def _encode_prefix(self, obs: Observation) -> Prefix:
        embeds, valid, _, pos, nxt = self._prefix_inputs(obs)
        hidden, kv = self._run_lm(embeds, self._prefix_allowed(valid), pos, None)
        hidden = hidden * valid.unsqueeze(-1).to(hidden.dtype)  # nothing leaks from padding rows
        return Prefix(hidden=hidden, mask=valid, kv=kv, positions=nxt, extras={})

    def extend(self, embeds: Tensor, prefix: Prefix, attn_mask: Tensor | None = None, *,
               return_prefix: bool = False) -> Tensor | tuple[Tensor, Prefix]:
        b, t, d = embeds.shape
        if d != self.hidden_size or b != prefix.batch_size:
            raise ValueError(f"extend: embeds must be (B={prefix.batch_size}, T, {self.hidden_size}); "
                             f"got {tuple(embeds.shape)}")
        device = embeds.device
        if attn_mask is None:
            new = torch.ones(t, t, dtype=torch.bool, device=device).tril()
        elif attn_mask.dtype != torch.bool or tuple(attn_mask.shape[-2:]) != (t, t) or attn_mask.ndim not in (2, 3):
            raise ValueError(f"extend: attn_mask must be bool ({t}, {t}) or ({b}, {t}, {t}); got "
                             f"{attn_mask.dtype} {tuple(attn_mask.shape)}")
        else:
            new = attn_mask.to(device)
        allowed = torch.cat([prefix.mask.unsqueeze(1).expand(b, t, -1), new.expand(b, t, t)], dim=-1)
        pos = prefix.positions.unsqueeze(1) + torch.arange(t, device=device)
        if self.family.mrope:  # text tokens: the same position on the t, h and w axes
            pos = pos.unsqueeze(0).expand(3, b, t)
        hidden, kv = self._run_lm(embeds, allowed, pos, prefix.kv)
        if not return_prefix:
            return hidden
        grown = Prefix(
            hidden=torch.cat([prefix.hidden, hidden], 1),
            mask=torch.cat([prefix.mask, torch.ones(b, t, dtype=torch.bool, device=device)], 1),
            kv=kv,
            positions=prefix.positions + t,
            extras=dict(prefix.extras),
        )
        return hidden, grown

    # --- checkpoints ------------------------------------------------------------------------------
    def save_assets(self, path: Path) -> None:
        """HF config (with the truncated layer count) + processor/tokenizer files: enough for
        ``HFVLMConfig.build(assets_dir=path)`` to rebuild the architecture without the original model."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.config.save_pretrained(path)
        self.processor.save_pretrained(path)

    @classmethod
    def lora_targets(cls) -> str:
        """The language model's attention projections (all supported families name them alike)."""
        return r".*(text_model|language_model)\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
