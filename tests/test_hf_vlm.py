"""The ``hf_vlm`` backbone on tiny random SmolVLM2 / PaliGemma / Qwen2-VL / Qwen2.5-VL models (offline, CPU)."""
from __future__ import annotations

import draccus
import pytest
import torch

from vla.backbones.hf_vlm import HFVLMBackbone, HFVLMConfig
from vla.backbones.tiny_vlm import TINY_FAMILIES, build_tiny_vlm
from vla.config import BackboneConfig, from_dict, to_dict
from vla.registry import UnknownNameError
from vla.types import Observation

FAMILIES = ["smolvlm", "paligemma", "qwen2_5_vl", "qwen2_vl"]
PROMPTS = ["pick up the red cube and place it in the bowl", "open the drawer", "push the green button"]
# The text the family's own processor expects for two images + a prompt.
PROCESSOR_TEXT = {
    "smolvlm": "<image><image>{}",
    "paligemma": "<image><image>{}",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>" * 2 + "{}",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>" * 2 + "{}",
}


@pytest.fixture(scope="module", params=FAMILIES)
def bb(request) -> HFVLMBackbone:
    return HFVLMConfig(tiny=request.param).build()


def make_obs(bb: HFVLMBackbone, prompts=PROMPTS, size: int = 64, wrist_mask=None, seed: int = 0) -> Observation:
    g = torch.Generator().manual_seed(seed)
    b = len(prompts)
    ids, mask = bb.tokenize(list(prompts), max_length=32)
    return Observation(
        images={"top": torch.rand(b, 3, size, size, generator=g), "wrist": torch.rand(b, 3, size, size, generator=g)},
        image_masks={"top": torch.ones(b, dtype=torch.bool),
                     "wrist": torch.ones(b, dtype=torch.bool) if wrist_mask is None else torch.tensor(wrist_mask)},
        state=torch.zeros(b, 4),
        prompt_ids=ids,
        prompt_mask=mask,
    )


def select(obs: Observation, i: int, cams=("top", "wrist")) -> Observation:
    """Sample ``i`` alone, with only ``cams``, its prompt cut to its own length (no padding at all)."""
    n = int(obs.prompt_mask[i].sum())
    return Observation(images={c: obs.images[c][i:i + 1] for c in cams},
                       image_masks={c: torch.ones(1, dtype=torch.bool) for c in cams},
                       state=obs.state[i:i + 1], prompt_ids=obs.prompt_ids[i:i + 1, :n],
                       prompt_mask=obs.prompt_mask[i:i + 1, :n])


@torch.no_grad()
def test_encode_prefix_shapes(bb):
    obs = make_obs(bb, wrist_mask=[True, False, True])
    before = bb.prefix_passes
    p = bb.encode_prefix(obs)
    assert bb.prefix_passes == before + 1
    b, t = p.mask.shape
    assert p.hidden.shape == (b, t, bb.hidden_size) and p.hidden.dtype == torch.float32
    assert p.mask.dtype == torch.bool and p.positions.shape == (b,) and p.positions.dtype == torch.long
    assert len(p.kv) == bb.kv_spec.num_layers == 2
    s = bb.kv_spec
    for k, v in p.kv:
        assert k.shape == v.shape == (b, s.num_kv_heads, t, s.head_dim)
    assert torch.isfinite(p.hidden).all() and all(torch.isfinite(k).all() and torch.isfinite(v).all() for k, v in p.kv)
    assert (p.hidden[~p.mask] == 0).all()  # padding rows carry nothing
    # the missing camera's tokens (the whole block, framing tokens included) are masked out
    assert p.mask[0].sum() - p.mask[2].sum() == (obs.prompt_mask[0].sum() - obs.prompt_mask[2].sum())
    per_cam = (t - obs.prompt_ids.shape[1]) // 2
    assert not p.mask[1, per_cam:2 * per_cam].any() and p.mask[1, :per_cam].all()


@torch.no_grad()
def test_prefix_matches_the_hf_model_own_forward():
    """Golden check: our layout, preprocessing (incl. a resize), positions and LM pass reproduce the HF model's
    own forward on its processor's output, bit for bit (PaliGemma: its bidirectional prefix; others: causal)."""
    for fam in FAMILIES:
        attn = "bidirectional" if fam == "paligemma" else "causal"
        bb = HFVLMConfig(tiny=fam, prefix_attention=attn).build()
        obs = make_obs(bb, prompts=PROMPTS[:1], size=50)
        images = [obs.images["top"][0], obs.images["wrist"][0]]
        inputs = bb.processor(images=[images] if fam == "smolvlm" else images, return_tensors="pt",
                              text=[PROCESSOR_TEXT[fam].format(PROMPTS[0])], do_rescale=False)
        assert torch.equal(bb.prefix_token_ids(obs), inputs["input_ids"]), fam
        kwargs = {k: v for k, v in inputs.items() if k != "labels"}
        if fam == "paligemma":
            kwargs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])  # all prefix
        ref = bb.model.model(**kwargs, use_cache=True)
        p = bb.encode_prefix(obs)
        torch.testing.assert_close(p.hidden, ref.last_hidden_state, rtol=0, atol=1e-6, msg=fam)
        for (k, v), layer in zip(p.kv, ref.past_key_values.layers):
            torch.testing.assert_close(k, layer.keys, rtol=0, atol=1e-6)
            torch.testing.assert_close(v, layer.values, rtol=0, atol=1e-6)
        if fam.startswith("qwen"):  # multimodal RoPE positions and the next free position
            pos, _ = bb.model.model.get_rope_index(inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"],
                                                   mm_token_type_ids=inputs["mm_token_type_ids"])
            assert torch.equal(bb._prefix_inputs(obs)[3], pos) and p.positions.item() == pos.max() + 1


@torch.no_grad()
def test_missing_camera_and_padding_are_invisible(bb):
    full = make_obs(bb)
    part = make_obs(bb, wrist_mask=[True, False, True])
    p_full, p_part = bb.encode_prefix(full), bb.encode_prefix(part)
    # the other samples do not notice
    for i in (0, 2):
        torch.testing.assert_close(p_part.hidden[i], p_full.hidden[i], rtol=0, atol=1e-6)
    # the sample reads exactly as if the camera were not there (and its pixels do not matter)
    part.images["wrist"][1] = 1.0 - part.images["wrist"][1]
    p_part = bb.encode_prefix(part)
    alone = bb.encode_prefix(select(part, 1, cams=("top",)))
    torch.testing.assert_close(p_part.hidden[1][p_part.mask[1]], alone.hidden[0], rtol=0, atol=1e-5)
    assert p_part.positions[1] == alone.positions[0]
    # prompt padding: sample 1 (short prompt, padded in the batch) equals sample 1 encoded alone
    alone = bb.encode_prefix(select(full, 1))
    torch.testing.assert_close(p_full.hidden[1][p_full.mask[1]], alone.hidden[0], rtol=0, atol=1e-5)
    for (k, _), (ka, _) in zip(p_full.kv, alone.kv):
        torch.testing.assert_close(k[1][:, p_full.mask[1]], ka[0], rtol=0, atol=1e-5)


def _joint_pass(bb, obs, new_embeds, new_mask):
    """The prefix and the new tokens in ONE LM pass with the equivalent block mask."""
    embeds, valid, _, pos, nxt = bb._prefix_inputs(obs)
    b, t, k = valid.shape[0], valid.shape[1], new_embeds.shape[1]
    allowed = torch.zeros(b, t + k, t + k, dtype=torch.bool)
    allowed[:, :t, :t] = bb._prefix_allowed(valid)
    allowed[:, t:, :t] = valid.unsqueeze(1)
    allowed[:, t:, t:] = new_mask
    new_pos = nxt.unsqueeze(1) + torch.arange(k)
    new_pos = new_pos.expand(3, b, k) if bb.family.mrope else new_pos
    hidden, _ = bb._run_lm(torch.cat([embeds, new_embeds], 1), allowed, torch.cat([pos, new_pos], -1), None)
    return hidden[:, t:]


@torch.no_grad()
def test_extend_equals_one_pass(bb):
    obs = make_obs(bb, wrist_mask=[True, False, True])
    prefix = bb.encode_prefix(obs)
    kv_len = prefix.kv[0][0].shape[2]
    k = 5
    new = bb.embed_tokens(torch.randint(0, bb.vocab_size, (3, k)))
    causal = torch.ones(k, k, dtype=torch.bool).tril()
    h, grown = bb.extend(new, prefix, return_prefix=True)
    torch.testing.assert_close(h, _joint_pass(bb, obs, new, causal), rtol=0, atol=1e-5)
    assert prefix.kv[0][0].shape[2] == kv_len  # the prefix cache is not mutated
    assert grown.kv[0][0].shape[2] == kv_len + k and grown.mask[:, -k:].all()
    assert torch.equal(grown.positions, prefix.positions + k)
    # a custom mask among the new tokens (here: bidirectional block)
    full = torch.ones(k, k, dtype=torch.bool)
    torch.testing.assert_close(bb.extend(new, prefix, full), _joint_pass(bb, obs, new, full), rtol=0, atol=1e-5)
    # chaining: extending the grown prefix == extending the original by all tokens at once
    more = bb.embed_tokens(torch.randint(0, bb.vocab_size, (3, 2)))
    both = bb.extend(torch.cat([new, more], 1), prefix)
    torch.testing.assert_close(bb.extend(more, grown), both[:, k:], rtol=0, atol=1e-5)
    torch.testing.assert_close(bb.extend(new, prefix, causal.expand(3, k, k)), h, rtol=0, atol=0)  # (B, T, T)
    with pytest.raises(ValueError, match="attn_mask"):
        bb.extend(new, prefix, torch.ones(k, k))


def test_no_query_row_attends_to_nothing(bb):
    """Some attention kernels return NaN for an all-masked row, and 0 * NaN would reach valid rows through the
    values: every row of the mask the LM gets must allow at least one key (its own, for padding rows)."""
    valid = torch.tensor([[True, True, False, False], [False, False, False, False]])
    mask = bb._attention(bb._prefix_allowed(valid))
    allowed = mask if mask.dtype == torch.bool else mask == 0
    assert allowed.any(-1).all()
    assert allowed[0, 0, :2, :2].all() and not allowed[0, 0, :2, 2:].any()  # valid rows never see padding
    assert allowed[1, 0].equal(torch.eye(4, dtype=torch.bool).view(4, 4))


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_tiny_loads_by_path(family, tmp_path):
    out = build_tiny_vlm(family, tmp_path / family)
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    a, b = HFVLMConfig(tiny=family).build(), HFVLMConfig(path=str(out)).build()
    obs = make_obs(a)
    assert torch.equal(obs.prompt_ids, b.tokenize(PROMPTS, 32)[0])
    with torch.no_grad():
        assert torch.equal(a.encode_prefix(obs).hidden, b.encode_prefix(obs).hidden)


@pytest.mark.parametrize("family", FAMILIES)
def test_assets_rebuild_without_the_original_model(family, tmp_path):
    from safetensors.torch import load_model, save_model

    src = build_tiny_vlm(family, tmp_path / "hub")
    a = HFVLMConfig(path=str(src), num_layers=1).build()
    a.save_assets(tmp_path / "assets")
    save_model(a, str(tmp_path / "policy.safetensors"))  # tied embeddings (PaliGemma) need save_model
    assert not list((tmp_path / "assets").glob("*.safetensors"))  # assets are not weights
    # the checkpoint's config still names the original path, which is gone on the machine that reloads it
    b = HFVLMConfig(path=str(tmp_path / "gone"), num_layers=1, seed=7).build(assets_dir=tmp_path / "assets")
    assert b.kv_spec == a.kv_spec
    obs = make_obs(a)
    with torch.no_grad():
        assert not torch.equal(a.encode_prefix(obs).hidden, b.encode_prefix(obs).hidden)
        load_model(b, str(tmp_path / "policy.safetensors"))
        torch.testing.assert_close(a.encode_prefix(obs).hidden, b.encode_prefix(obs).hidden, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_num_layers_keeps_the_first_layers(family, tmp_path):
    full = HFVLMConfig(tiny=family).build()
    src = build_tiny_vlm(family, tmp_path)
    one = HFVLMConfig(path=str(src), num_layers=1).build()
    assert one.kv_spec.num_layers == 1 and len(one.lm.layers) == 1
    assert len(one.encode_prefix(make_obs(one)).kv) == 1
    for (name, w), w_full in zip(one.lm.layers[0].state_dict().items(), full.lm.layers[0].state_dict().values()):
        assert torch.equal(w, w_full), name
    assert HFVLMConfig(tiny=family, num_layers=1).build().kv_spec.num_layers == 1
    with pytest.raises(ValueError, match="num_layers=3 but the language model has only 2"):
        HFVLMConfig(tiny=family, num_layers=3).build()


def test_config_errors():
    with pytest.raises(UnknownNameError) as err:
        HFVLMConfig(tiny="smolvml").build()
    msg = str(err.value)
    assert all(name in msg for name in TINY_FAMILIES) and "Did you mean 'smolvlm'" in msg
    with pytest.raises(ValueError, match="exactly one of `path`"):
        HFVLMConfig().build()
    with pytest.raises(ValueError, match="exactly one of `path`"):
        HFVLMConfig(path="/x", tiny="smolvlm").build()
    with pytest.raises(ValueError, match="dtype must be one of"):
        HFVLMConfig(tiny="smolvlm", dtype="fp32").build()
    with pytest.raises(ValueError, match="prefix_attention"):
        HFVLMConfig(tiny="smolvlm", prefix_attention="full").build()


def test_tokenize(bb):
    ids, mask = bb.tokenize(["push", "open the drawer"], max_length=16)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape
    assert mask[1].all() and mask[0].sum() < mask[1].sum() and not mask[0, -1]  # right padded
    assert (ids[0][~mask[0]] == bb.pad_id).all()
    n = int(mask[1].sum())
    with pytest.raises(ValueError, match=f"prompt 1 is {n} tokens, longer than max_length={n - 1}"):
        bb.tokenize(["push", "open the drawer"], max_length=n - 1)
    with pytest.raises(TypeError):
        bb.tokenize("open the drawer", max_length=16)
    if bb.cfg.tiny == "paligemma":  # the processor's layout: <bos> prompt \n
        assert ids[1, 0] == bb.tokenizer.bos_token_id
        assert bb.tokenizer.decode(ids[1, 1:n]) == "open the drawer\n"
    assert bb.embed_tokens(ids).shape == (2, ids.shape[1], bb.hidden_size)
    assert bb.logits(torch.zeros(1, 3, bb.hidden_size)).shape == (1, 3, bb.vocab_size)


def test_bad_images_are_named(bb):
    obs = make_obs(bb)
    obs.images["wrist"] = obs.images["wrist"] * 255
    with pytest.raises(ValueError, match=r"images\['wrist'\] must be in \[0, 1\]"):
        bb.encode_prefix(obs)
    obs = make_obs(bb)
    obs.image_masks["top"] = torch.ones(2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"image_masks\['top'\]"):
        bb.encode_prefix(obs)
    obs = make_obs(bb)
    obs.images["top"] = obs.images["top"][:, :1]
    with pytest.raises(ValueError, match=r"images\['top'\] must be \(B=3, 3, H, W\)"):
        bb.encode_prefix(obs)


@pytest.mark.parametrize("family,size,per_cam", [("smolvlm", 32, 2 + 4 + 1), ("paligemma", 16, 4),
                                                 ("qwen2_5_vl", 32, 1 + 4 + 1)])
def test_image_size_override(family, size, per_cam):
    bb = HFVLMConfig(tiny=family, image_size=size).build()
    obs = make_obs(bb)
    with torch.no_grad():
        p = bb.encode_prefix(obs)
    assert p.mask.shape[1] == 2 * per_cam + obs.prompt_ids.shape[1] and torch.isfinite(p.hidden).all()


def test_build_is_deterministic_and_keeps_the_global_rng():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    a = HFVLMConfig(tiny="qwen2_5_vl").build()
    assert torch.equal(torch.rand(3), expected)
    b = HFVLMConfig(tiny="qwen2_5_vl").build()
    c = HFVLMConfig(tiny="qwen2_5_vl", seed=1).build()
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("family", ["smolvlm", "paligemma", "qwen2_5_vl"])
def test_eager_attention_matches_sdpa(family):
    obs = None
    out = {}
    for impl in ("sdpa", "eager"):
        bb = HFVLMConfig(tiny=family, attn_implementation=impl).build()
        obs = obs or make_obs(bb, wrist_mask=[True, False, True])
        with torch.no_grad():
            p = bb.encode_prefix(obs)
            out[impl] = (p.hidden, bb.extend(bb.embed_tokens(obs.prompt_ids[:, :3]), p))
    torch.testing.assert_close(out["eager"], out["sdpa"], rtol=1e-5, atol=1e-5)


def test_bfloat16_runs():
    bb = HFVLMConfig(tiny="smolvlm", dtype="bfloat16").build()
    with torch.no_grad():
        p = bb.encode_prefix(make_obs(bb))
    assert p.hidden.dtype == torch.bfloat16 and p.kv[0][0].dtype == torch.bfloat16 and torch.isfinite(p.hidden).all()


@pytest.mark.parametrize("family", ["smolvlm", "paligemma", "qwen2_5_vl"])
def test_freeze_vision_and_gradients(family):
    bb = HFVLMConfig(tiny=family, freeze_vision=True).build()
    prefix = bb.encode_prefix(make_obs(bb))
    (prefix.hidden.square().mean() + sum(k.mean() for k, _ in prefix.kv)).backward()
    vision = {id(p) for m in bb.family.vision_modules() for p in m.parameters()}
    assert vision and all(not p.requires_grad for m in bb.family.vision_modules() for p in m.parameters())
    lm_grads = [p.grad for p in bb.lm.layers.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in lm_grads)
    projector = [p for n, p in bb.model.named_parameters() if id(p) not in vision and not n.startswith(
        ("model.text_model", "model.language_model", "lm_head"))]
    assert projector and all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector)
    frozen = HFVLMConfig(tiny=family, freeze_language=True).build()
    assert not any(p.requires_grad for p in frozen.lm.parameters())


def test_lora_targets_match_the_lm_attention(bb):
    import re

    names = [n for n, _ in bb.named_modules() if re.fullmatch(bb.lora_targets(), n)]
    assert len(names) == 4 * bb.kv_spec.num_layers and all("self_attn" in n for n in names)


def test_registered_and_parsed_through_draccus():
    cfg = draccus.decode(BackboneConfig, {"type": "hf_vlm", "tiny": "paligemma", "num_layers": 1})
    assert isinstance(cfg, HFVLMConfig) and cfg.type == "hf_vlm"
    assert from_dict(BackboneConfig, to_dict(cfg)) == cfg
    bb = cfg.build()
    assert isinstance(bb, HFVLMBackbone) and bb.kv_spec.num_layers == 1
    with pytest.raises(Exception, match="bogus"):
        draccus.decode(BackboneConfig, {"type": "hf_vlm", "tiny": "paligemma", "bogus": 1})
