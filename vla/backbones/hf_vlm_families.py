"""What differs between VLM families: how a camera image becomes LM tokens, and how a prompt is tokenized.

:class:`~vla.backbones.hf_vlm.HFVLMBackbone` runs the language model itself (one pass, custom attention mask,
explicit positions) instead of calling the HF model's ``forward``, which would re-derive masks and positions
from token ids. Everything family-specific lives here, one small class per family:

* ``encode(images)``: images (N, 3, H, W) in [0, 1] -> projected image tokens (N, n, D) and the
  :class:`ImageBlock` telling which special tokens surround them, exactly as the family's processor lays
  out one image (without SmolVLM's image splitting: one global image per camera, as SmolVLA does).
* ``prompt_ids(texts)``: the prompt as the processor would place it after the images.
* position bookkeeping: PaliGemma counts positions from 1; Qwen2.5-VL gives image tokens 3-D (t, h, w)
  multimodal-RoPE positions.

Preprocessing is done with torch ops on the batch (resize with the processor's interpolation, normalize
with its mean/std, Qwen's patch flattening), never with a per-image PIL round trip.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ImageBlock:
    """One camera's tokens: ``pre`` ids, ``num_tokens`` image slots, ``post`` ids.

    ``grid`` = (rows, cols) of the image tokens when the family uses multimodal RoPE (Qwen), else None.
    """

    pre: tuple[int, ...]
    num_tokens: int
    post: tuple[int, ...]
    grid: tuple[int, int] | None = None


def _resize(images: Tensor, size: tuple[int, int], resample: Any) -> Tensor:
    """Resize (N, 3, H, W) float images like the processor's torchvision backend (antialiased)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as tvF

    # PIL codes: 0 nearest, 1 lanczos, 2 bilinear, 3 bicubic. Lanczos runs on CPU only; on GPU the processor
    # itself falls back to bicubic, and so do we.
    code = 3 if resample is None else int(resample)
    if code == 1 and images.device.type != "cpu":
        code = 3
    modes = {0: InterpolationMode.NEAREST, 1: InterpolationMode.LANCZOS, 2: InterpolationMode.BILINEAR}
    mode = modes.get(code, InterpolationMode.BICUBIC)
    return tvF.resize(images, list(size), interpolation=mode, antialias=True)


class VLMFamily:
    """Base: subclasses set the module names and implement ``encode``/``_block``."""

    model_types: tuple[str, ...] = ()
    position_offset = 0  # position id of the first token
    mrope = False  # positions are (3, B, T) (temporal, height, width) instead of (B, T)

    def __init__(self, model: nn.Module, processor: Any, image_size: int | None = None) -> None:
        self.base = model.model  # the *Model inside *ForConditionalGeneration
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.image_size = image_size  # user override of the per-camera resolution (None = family default)
        ip = self.image_processor
        self._mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)

    # --- modules ----------------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.base.language_model

    def vision_modules(self) -> list[nn.Module]:
        """The vision encoder (frozen by ``freeze_vision``); the projector into the LM stays trainable."""
        raise NotImplementedError

    # --- text -------------------------------------------------------------------------------------
    def prompt_ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == self.tokenizer.unk_token_id:
            raise ValueError(f"{type(self).__name__}: the tokenizer has no {token!r} token, which the model needs")
        return int(tid)

    # --- images -----------------------------------------------------------------------------------
    def _normalize(self, images: Tensor) -> Tensor:
        mean, std = self._mean.to(images.device), self._std.to(images.device)
        return (images.float() - mean) / std

    def encode(self, images: Tensor) -> tuple[Tensor, ImageBlock]:
        """(N, 3, H, W) in [0, 1] -> (image tokens (N, n, D) in the LM's embedding space, layout)."""
        raise NotImplementedError

    def _vision_dtype(self, module: nn.Module) -> torch.dtype:
        return next(module.parameters()).dtype


class SmolVLMFamily(VLMFamily):
    """SmolVLM / SmolVLM2 (Idefics3 architecture): SigLIP -> pixel shuffle -> linear -> Llama-style LM.

    One camera = ``<fake_token_around_image><global-img><image>*n<fake_token_around_image>``, the processor's
    layout for an unsplit image; the image is resized to a square of ``max_image_size`` (the vision tower's
    resolution) like the processor does when ``do_image_splitting=False``.
    """

    model_types = ("smolvlm", "idefics3")

    def __init__(self, model: nn.Module, processor: Any, image_size: int | None = None) -> None:
        super().__init__(model, processor, image_size)
        vcfg = model.config.vision_config
        self.patch, self.scale = int(vcfg.patch_size), int(model.config.scale_factor)
        self.side = int(image_size or self.image_processor.max_image_size["longest_edge"])
        per_side = self.side // self.patch
        if self.side % self.patch or per_side % self.scale:
            raise ValueError(
                f"image_size={self.side}: SmolVLM needs a multiple of patch_size*scale_factor="
                f"{self.patch * self.scale} (vision tower native size is {vcfg.image_size})"
            )
        self.block = ImageBlock(
            pre=(self.token_id("<fake_token_around_image>"), self.token_id("<global-img>")),
            num_tokens=(per_side // self.scale) ** 2,
            post=(self.token_id("<fake_token_around_image>"),),
        )

    @property
    def language_model(self) -> nn.Module:
        return self.base.text_model

    def vision_modules(self) -> list[nn.Module]:
        return [self.base.vision_model]

    def encode(self, images: Tensor) -> tuple[Tensor, ImageBlock]:
        x = _resize(images, (self.side, self.side), self.image_processor.resample)
        x = self._normalize(x).to(self._vision_dtype(self.base.vision_model))
        # Called directly (not get_image_features), which would drop any image whose normalized pixels are all
        # exactly 0 (a plain gray frame) as "padding" and break the token count.
        hidden = self.base.vision_model(pixel_values=x).last_hidden_state
        return self.base.connector(hidden), self.block


class PaliGemmaFamily(VLMFamily):
    """PaliGemma 1/2: SigLIP -> linear -> Gemma. Images come first with no framing tokens, then
    ``<bos> prompt \\n`` (the processor's layout); positions start at 1."""

    model_types = ("paligemma",)
    position_offset = 1

    def __init__(self, model: nn.Module, processor: Any, image_size: int | None = None) -> None:
        super().__init__(model, processor, image_size)
        vcfg = model.config.vision_config
        self.patch, self.native = int(vcfg.patch_size), int(vcfg.image_size)
        size = self.image_processor.size
        self.hw = (int(image_size), int(image_size)) if image_size else (int(size["height"]), int(size["width"]))
        if self.hw[0] % self.patch or self.hw[1] % self.patch:
            raise ValueError(f"image_size={self.hw}: PaliGemma needs a multiple of patch_size={self.patch}")
        self.block = ImageBlock(pre=(), num_tokens=(self.hw[0] // self.patch) * (self.hw[1] // self.patch), post=())
        self.bos = self.tokenizer.bos_token_id

    def vision_modules(self) -> list[nn.Module]:
        return [self.base.vision_tower]

    def prompt_ids(self, texts: list[str]) -> list[list[int]]:
        rows = self.tokenizer([t + "\n" for t in texts], add_special_tokens=False)["input_ids"]
        return [[self.bos, *r] for r in rows]

    def encode(self, images: Tensor) -> tuple[Tensor, ImageBlock]:
        x = _resize(images, self.hw, self.image_processor.resample)
        x = self._normalize(x).to(self._vision_dtype(self.base.vision_tower))
        # Other resolutions than the tower's own interpolate its position embeddings.
        interp = self.hw != (self.native, self.native)
        hidden = self.base.vision_tower(pixel_values=x, interpolate_pos_encoding=interp).last_hidden_state
        return self.base.multi_modal_projector(hidden), self.block


class QwenVLFamily(VLMFamily):
    """Qwen2-VL / Qwen2.5-VL: (windowed) ViT on 14 px patches (2 frames per patch for video compatibility), 2x2 patch
    merger, Qwen2 LM with multimodal RoPE. One camera = ``<|vision_start|><|image_pad|>*n<|vision_end|>``;
    the image keeps (about) its own size: ``smart_resize`` to multiples of patch*merge within the
    processor's pixel budget, so n depends on the camera resolution."""

    model_types = ("qwen2_5_vl", "qwen2_vl")
    mrope = True

    def __init__(self, model: nn.Module, processor: Any, image_size: int | None = None) -> None:
        super().__init__(model, processor, image_size)
        ip = self.image_processor
        self.patch, self.merge, self.temporal = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
        self.min_pixels, self.max_pixels = int(ip.size["shortest_edge"]), int(ip.size["longest_edge"])
        self.start, self.end = self.token_id("<|vision_start|>"), self.token_id("<|vision_end|>")

    def vision_modules(self) -> list[nn.Module]:
        # The merger projects into the LM; it stays trainable like the other families' projectors.
        return [m for name, m in self.base.visual.named_children() if name != "merger"]

    def target_size(self, h: int, w: int) -> tuple[int, int]:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        if self.image_size:
            h = w = self.image_size
        return smart_resize(h, w, factor=self.patch * self.merge, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels)

    def patchify(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N * gh * gw, C * temporal * P * P), the processor's patch order (merge-window major)."""
        n, c, h, w = x.shape
        p, m = self.patch, self.merge
        gh, gw = h // p, w // p
        x = x.reshape(n, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        # A still image is repeated over the temporal patch (the ViT's 3-D patch embedding expects frames).
        x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, self.temporal, -1, -1)
        return x.reshape(n * gh * gw, c * self.temporal * p * p)

    def encode(self, images: Tensor) -> tuple[Tensor, ImageBlock]:
        n = images.shape[0]
        h, w = self.target_size(int(images.shape[-2]), int(images.shape[-1]))
        x = self._normalize(_resize(images, (h, w), self.image_processor.resample))
        visual = self.base.visual
        pixels = self.patchify(x).to(self._vision_dtype(visual))
        gh, gw = h // self.patch, w // self.patch
        grid = torch.tensor([[1, gh, gw]] * n, dtype=torch.long, device=images.device)
        tokens = visual(pixels, grid_thw=grid).pooler_output  # (n * tokens, D), image-major
        rows, cols = gh // self.merge, gw // self.merge
        block = ImageBlock(pre=(self.start,), num_tokens=rows * cols, post=(self.end,), grid=(rows, cols))
        return tokens.view(n, rows * cols, -1), block


FAMILIES: tuple[type[VLMFamily], ...] = (SmolVLMFamily, PaliGemmaFamily, QwenVLFamily)


def family_for(model: nn.Module, processor: Any, image_size: int | None = None) -> VLMFamily:
    """The adapter for ``model.config.model_type``; unsupported types fail listing the supported ones."""
    model_type = model.config.model_type
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam(model, processor, image_size)
    known = sorted(t for fam in FAMILIES for t in fam.model_types)
    raise ValueError(f"hf_vlm: model_type {model_type!r} is not supported; supported model types: {', '.join(known)}")
