"""Tiny random vision-language models, built offline from their transformers ``*Config`` classes.

Tests, presets and CI cannot download a VLM, so they build one here: the REAL architecture of each family
(SmolVLM2/Idefics3, PaliGemma, Qwen2-VL, Qwen2.5-VL) with random weights, shrunk until a forward pass takes
milliseconds on a CPU (2 language-model layers of width 64, a 2-layer vision tower of width 32, 32-64 px
images). The tokenizer is a byte-level BPE trained in-process on a few robot instructions, with the special
tokens each family's processor looks for. The processor is the family's own, so a tiny model saved with
:func:`build_tiny_vlm` loads through ``AutoModelForImageTextToText`` / ``AutoProcessor`` exactly like a
downloaded checkpoint, and the code under test is the code that runs a real model.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import torch

from vla.registry import UnknownNameError, unknown_name_message

# Text-model geometry shared by every family: small enough to be fast, big enough to exercise GQA
# (4 query heads share 2 key/value heads) and a multi-layer cache.
_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
_TOKENIZER_VOCAB = 384  # BPE merges stop here (plus the family's special tokens)

# The corpus the toy tokenizer is trained on: words a robot prompt is made of, so prompts tokenize short.
_CORPUS = [
    "pick up the red cube and place it in the bowl",
    "open the top drawer of the cabinet",
    "push the green button on the left",
    "close the door and turn the faucet handle",
    "reach the goal position with the gripper",
    "insert the peg into the hole on the side",
    "slide the puck to the blue target",
    "sweep the block into the bin, then press the lever",
    "what is on the table? describe the scene. 0 1 2 3 4 5 6 7 8 9",
]


def _train_tokenizer_json(specials: tuple[str, ...]) -> str:
    """A byte-level BPE (any text encodes; nothing is unknown) trained on ``_CORPUS``; returns its JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TOKENIZER_VOCAB + len(specials),
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return tok.to_str()


# Training takes ~0.1 s; the JSON is cached so building the same family twice gives the same ids, fast.
_train_tokenizer_json = functools.lru_cache(maxsize=None)(_train_tokenizer_json)


def _tokenizer(specials: tuple[str, ...], **special_tokens: str):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_train_tokenizer_json(specials)), **special_tokens
    )


# --- one builder per family: returns (model config, processor) -----------------------------------

def _smolvlm() -> tuple[Any, Any]:
    """SmolVLM2 (``model_type="smolvlm"``, the SmolVLA backbone): Llama text model + SigLIP-style vision."""
    from transformers import SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    specials = ("<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                "<image>", "<global-img>", "<video>")
    tok = _tokenizer(specials, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                     pad_token="<|endoftext|>")
    image_size, patch, scale = 64, 8, 2
    seq_len = (image_size // patch) ** 2 // scale**2  # 16 image tokens per camera after pixel shuffle
    # No image splitting: each camera becomes one global image, as SmolVLA feeds its cameras.
    size = {"longest_edge": image_size}
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(do_image_splitting=False, size=size, max_image_size=size),
        tokenizer=tok,
        video_processor=SmolVLMVideoProcessor(size=size, max_image_size=size, do_image_splitting=False),
        image_seq_len=seq_len,
    )
    config = SmolVLMConfig(
        text_config=dict(model_type="llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **_TEXT),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch),
        scale_factor=scale,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
    )
    return config, processor


def _paligemma() -> tuple[Any, Any]:
    """PaliGemma (the pi0 backbone): Gemma text model + SigLIP vision tower, 16 image tokens at 32 px."""
    from transformers import PaliGemmaConfig, PaliGemmaProcessor, SiglipImageProcessor

    tok = _tokenizer(("<pad>", "<eos>", "<bos>", "<unk>", "<image>"), bos_token="<bos>", eos_token="<eos>",
                     pad_token="<pad>", unk_token="<unk>")
    image_size, patch = 32, 8
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    image_processor.image_seq_length = (image_size // patch) ** 2  # the processor refuses to start without it
    # The processor adds PaliGemma's 1024 <locXXXX> + 128 <segXXX> tokens: build it before sizing the vocab.
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    text = dict(_TEXT, num_key_value_heads=1)  # PaliGemma (Gemma-2B) uses multi-query attention
    config = PaliGemmaConfig(
        text_config=dict(model_type="gemma", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **text),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=image_size, patch_size=patch,
                           vision_use_head=False),
        projection_dim=_TEXT["hidden_size"],
        hidden_size=_TEXT["hidden_size"],
        vocab_size=len(tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
    )
    return config, processor


def _qwen(version: str) -> tuple[Any, Any]:
    """Qwen2-VL / Qwen2.5-VL: ViT with 2x2 patch merging (2.5: windowed attention, SwiGLU) + Qwen2 text model
    with multimodal (3-D) RoPE."""
    import transformers as tf
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>")
    tok = _tokenizer(specials, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    # patch 8 (not 14) so a 64 px camera gives 8x8 patches -> 4x4 = 16 merged tokens; pixel budget kept small.
    vision = dict(patch_size=8, merge_size=2, temporal_patch_size=2)
    pixels = dict(min_pixels=16 * 16, max_pixels=128 * 128)
    processor_cls = tf.Qwen2_5_VLProcessor if version == "2.5" else tf.Qwen2VLProcessor
    processor = processor_cls(
        image_processor=tf.Qwen2VLImageProcessor(**vision, **pixels),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**vision, **pixels),
    )
    if version == "2.5":
        config_cls = tf.Qwen2_5_VLConfig
        vision_config = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                             window_size=32, fullatt_block_indexes=[1])
    else:
        config_cls = tf.Qwen2VLConfig
        vision_config = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2)
    ids = tok.convert_tokens_to_ids
    config = config_cls(
        text_config=dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                            "mrope_section": [2, 3, 3]}, **_TEXT),
        vision_config=dict(vision_config, patch_size=8, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return config, processor


_FAMILIES: dict[str, Callable[[], tuple[Any, Any]]] = {
    "paligemma": _paligemma,
    "qwen2_5_vl": functools.partial(_qwen, "2.5"),
    "qwen2_vl": functools.partial(_qwen, "2"),
    "smolvlm": _smolvlm,
}
TINY_FAMILIES: tuple[str, ...] = tuple(sorted(_FAMILIES))


def check_tiny_family(name: str) -> str:
    """Return ``name`` if a tiny builder exists for it, else raise listing the known names."""
    if name not in _FAMILIES:
        raise UnknownNameError(unknown_name_message("tiny VLM family", name, _FAMILIES))
    return name


def tiny_vlm_config_and_processor(family: str) -> tuple[Any, Any]:
    """The model config and processor of a tiny ``family`` (no weights yet)."""
    return _FAMILIES[check_tiny_family(family)]()


def tiny_vlm(family: str, seed: int = 0, attn_implementation: Any = "sdpa",
             dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """(model, processor) of a tiny random ``family`` VLM; same ``seed`` -> same weights, without touching
    the global RNG state."""
    from transformers import AutoModelForImageTextToText

    config, processor = tiny_vlm_config_and_processor(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, attn_implementation=attn_implementation,
                                                        dtype=dtype)
    return model.eval(), processor


def build_tiny_vlm(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny random ``family`` VLM (weights + config + processor) into ``out_dir``.

    The folder loads with ``AutoModelForImageTextToText.from_pretrained(out_dir)`` and
    ``AutoProcessor.from_pretrained(out_dir)``, i.e. with ``HFVLMConfig(path=out_dir)``, like a real download.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, processor = tiny_vlm(family, seed=seed)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
