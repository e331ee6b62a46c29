"""Discrete-token and coarse-to-fine heads: cached decoding equals the teacher-forced pass, the
coarse-to-fine mask is block-causal by scale, the per-step loss is the exact sequence NLL, heads learn
a chunk, invalid code rows never reach the caller, and `vla train` fits/saves/reloads the tokenizer."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from action_tokenizers.base import TokenizerConfig
from policies.coarse_to_fine import CoarseToFineConfig, block_causal_mask, scale_groups
from policies.discrete import DiscreteConfig
from tests.helpers import backbone_variants, fit_head, random_observation, tiny_policy_config
from vla.policy import VLAPolicy

def _tok(name: str, **kw):
    cfg = TokenizerConfig.get_choice_class(name).tiny()
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


HEADS = {
    "ar_uniform": DiscreteConfig(tokenizer=_tok("uniform")),
    "ar_adaptive": DiscreteConfig(tokenizer=_tok("adaptive_grid")),
    # SpatialVLA's spherical translation grid: the 3 action dims are ONE joint token per step.
    "ar_spherical": DiscreteConfig(tokenizer=_tok("adaptive_grid", spherical_dims=[0, 1, 2], spherical_bins=[4, 6, 3])),
    "ar_fast": DiscreteConfig(tokenizer=_tok("fast")),
    "parallel_uniform": DiscreteConfig(tokenizer=_tok("uniform"), decoding="parallel"),
    "coarse_to_fine": CoarseToFineConfig.tiny(),
    # A repeated scale = a second residual level at that resolution (the finer MetaWorld tokenizer).
    "coarse_to_fine_repeated": CoarseToFineConfig(tokenizer=_tok("msvq", scales=[1, 2, 2])),
    # CARP's layout: one codebook per action dimension, s * A codes at scale s.
    "coarse_to_fine_per_dim": CoarseToFineConfig(tokenizer=_tok("msvq", per_dimension=True)),
    # Trained on near-miss coarser codes (scheduled sampling); evaluation is unchanged.
    "coarse_to_fine_code_noise": CoarseToFineConfig(tokenizer=_tok("msvq", per_dimension=True), code_noise=0.1),
}


def _policy(head, seed: int = 0) -> VLAPolicy:
    torch.manual_seed(seed)
    backbone = next(v for k, v in backbone_variants().items() if k.startswith("timm_lm"))
    policy = VLAPolicy(tiny_policy_config(backbone, copy.deepcopy(head)))  # tests may change head.cfg
    fit_head(policy, num=128, seed=seed)
    return policy.eval()


@pytest.mark.parametrize("name", sorted(HEADS))
def test_cached_decoding_matches_teacher_forcing(name: str) -> None:
    """Greedy codes from the KV-cached sampler are the argmax of the one-pass teacher-forced logits
    on those same codes: the cache holds exactly what the joint pass computes."""
    policy = _policy(HEADS[name])
    head = policy.head
    obs = random_observation(policy, batch=2)
    prefix = policy.encode(obs)
    if name.startswith("coarse_to_fine"):  # record the greedy codes scale by scale as the sampler picks them
        recorded = []
        orig_pick = head.pick

        def spy(logits, temperature, top_k, generator, *rest):
            out = orig_pick(logits, temperature, top_k, generator, *rest)
            recorded.append(out)
            return out

        head.pick = spy
        head.sample(policy.backbone, prefix, num_samples=1, temperature=0)
        head.pick = orig_pick
        codes = torch.cat(recorded, 1)
        logits_tf, _ = head.logits(policy.backbone, prefix, codes)
        assert torch.equal(logits_tf.argmax(-1), codes)
        assert head.tokenizer.num_codes == codes.shape[1]
        return
    if head.variable:  # compare with the plain argmax (the length budget is tested on its own below)
        head.cfg.constrain_length = False
    codes, mask, feats, _ = head._sample_codes(policy.backbone, prefix, 1, 0.0, 0, None)
    logits, h = head.logits(policy.backbone, prefix, codes)
    pred = logits.masked_fill(~head.allowed_ids(logits.device)[: codes.shape[1]], float("-inf")).argmax(-1)
    for row in range(len(codes)):
        n = int(mask[row].sum())  # the real codes; a variable-length row then ends with EOS
        assert torch.equal(pred[row, :n], codes[row, :n])
        if head.variable:
            assert int(pred[row, n]) == head.eos
    if head.cfg.decoding == "autoregressive":
        torch.testing.assert_close(feats, h[:, : feats.shape[1]], atol=1e-4, rtol=1e-4)


def test_coarse_to_fine_mask_is_block_causal_by_scale() -> None:
    scales = [1, 2, 3, 4]
    m = block_causal_mask(scales)
    g = scale_groups(scales)
    for i in range(len(g)):
        for j in range(len(g)):
            assert bool(m[i, j]) == bool(g[j] <= g[i]), (i, j)
    # Through the model: changing scale-1 codes changes the inputs of scales 2 and 3 only, so the
    # logits of scales 0 and 1 must not move (they would if a scale could see a finer one).
    policy = _policy(CoarseToFineConfig.tiny())
    head = policy.head
    prefix = policy.encode(random_observation(policy, batch=2))
    codes = torch.randint(0, head.tokenizer.vocab_size, (2, sum(scales)))
    other = codes.clone()
    other[:, 1:3] = (other[:, 1:3] + 7) % head.tokenizer.vocab_size
    a, _ = head.logits(policy.backbone, prefix, codes)
    b, _ = head.logits(policy.backbone, prefix, other)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


@pytest.mark.parametrize("name", ["ar_uniform", "ar_fast", "coarse_to_fine", "coarse_to_fine_repeated",
                                  "coarse_to_fine_per_dim"])
def test_per_step_loss_is_exact_sequence_nll(name: str) -> None:
    policy = _policy(HEADS[name])
    head = policy.head
    obs = random_observation(policy, batch=3)
    prefix = policy.encode(obs)
    actions = torch.randn(3, policy.config.chunk_size, policy.config.max_action_dim)
    is_pad = torch.zeros(3, policy.config.chunk_size, dtype=torch.bool)
    per_step = head.loss(policy.backbone, prefix, actions, is_pad)
    if name.startswith("coarse_to_fine"):
        codes, mask = head.encode_actions(actions, None)
    else:
        codes, mask = head.targets(actions, prefix)
    logits, _ = head.logits(policy.backbone, prefix, codes)
    logp = F.log_softmax(logits.float(), -1).gather(-1, codes[..., None])[..., 0]
    torch.testing.assert_close(per_step.sum(-1), -(logp * mask).sum(-1), atol=1e-4, rtol=1e-5)
    is_pad[0, -2:] = True
    per_step = head.loss(policy.backbone, prefix, actions, is_pad)
    assert (per_step[0, -2:] == 0).all() and (per_step[0, :-2] > 0).all()


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_learns_a_chunk(name: str) -> None:
    """Overfit one observation -> chunk; greedy decoding then reproduces it within the tokenizer's error."""
    policy = _policy(HEADS[name]).train()
    obs = random_observation(policy, batch=1)
    h, a = policy.config.chunk_size, policy.config.max_action_dim
    target = torch.linspace(-1, 1, h)[:, None].repeat(1, a)[None] * torch.tensor([1.0, -0.5, 0.3])
    is_pad = torch.zeros(1, h, dtype=torch.bool)
    recon, valid = policy.head.decode_codes(*policy.head.encode_actions(target, None))
    assert bool(valid.all())
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    for _ in range(60):
        loss = policy.loss(obs, target, is_pad).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()
    out = policy.head.sample(policy.backbone, policy.encode(obs), temperature=0)[:, 0]
    torch.testing.assert_close(out, recon, atol=1e-5, rtol=0)


def test_invalid_rows_are_resampled_then_raise(monkeypatch) -> None:
    policy = _policy(HEADS["ar_uniform"])
    head = policy.head
    prefix = policy.encode(random_observation(policy, batch=2))
    calls = {"n": 0}
    real = head.tokenizer.decode

    def flaky(codes, mask=None):  # the first decode fails for every row, later ones succeed
        acts, valid = real(codes, mask)
        calls["n"] += 1
        return (np.full_like(acts, np.nan), np.zeros_like(valid)) if calls["n"] == 1 else (acts, valid)

    monkeypatch.setattr(head.tokenizer, "decode", flaky)
    out = head.sample(policy.backbone, prefix, num_samples=2)
    assert torch.isfinite(out).all() and calls["n"] > 1
    monkeypatch.setattr(head.tokenizer, "decode", lambda c, m=None: (np.full((len(c), 4, 3), np.nan), np.zeros(len(c), bool)))
    with pytest.raises(RuntimeError, match="do not decode"):
        head.sample(policy.backbone, prefix, num_samples=2)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_fast_decoding_is_constrained_to_decodable_rows(temperature: float, monkeypatch) -> None:
    """An untrained FAST head almost never spells exactly H*A coefficients on its own; the length
    budget makes every row decode on the first draw (no re-samples), greedy or sampled, and each row's
    BPE tokens add up to H*A characters."""
    policy = _policy(HEADS["ar_fast"])
    head = policy.head
    prefix = policy.encode(random_observation(policy, batch=2))
    decoded = []
    real = head.decode_codes

    def spy(codes, mask=None):
        out = real(codes, mask)
        decoded.append((codes, mask, out[1]))
        return out

    monkeypatch.setattr(head, "decode_codes", spy)
    gen = torch.Generator().manual_seed(0)
    out = head.sample(policy.backbone, prefix, num_samples=8, temperature=temperature, generator=gen)
    assert out.shape == (2, 8, policy.config.chunk_size, policy.config.max_action_dim)
    assert torch.isfinite(out).all() and len(decoded) == 1  # one draw, nothing re-sampled
    codes, mask, valid = decoded[0]
    lengths, total = head.tokenizer.length_constraint()
    lengths = torch.from_numpy(lengths)
    assert bool(valid.all())
    assert ((lengths[codes.clamp(max=len(lengths) - 1)] * mask).sum(1) == total).all()
    # The same head without the budget: the rows do not decode (what the constraint is for).
    head.cfg.constrain_length = False
    decoded.clear()
    with pytest.raises(RuntimeError, match="do not decode"):
        head.sample(policy.backbone, prefix, num_samples=8, temperature=temperature, generator=gen)
    assert not bool(decoded[0][2].all())


def test_greedy_resamples_are_drawn_at_a_temperature(monkeypatch) -> None:
    """A greedy re-draw would repeat the invalid row; re-samples after temperature 0 use
    ``resample_temperature``."""
    policy = _policy(HEADS["ar_uniform"])
    head = policy.head
    prefix = policy.encode(random_observation(policy, batch=1))
    temps = []
    real = head._sample_codes

    def spy(backbone, prefix, n, temp, top_k, generator, keep_logits=False, greedy_first=False):
        temps.append(temp)
        return real(backbone, prefix, n, temp, top_k, generator, keep_logits, greedy_first)

    calls = {"n": 0}
    real_decode = head.tokenizer.decode

    def first_fails(codes, mask=None):
        acts, valid = real_decode(codes, mask)
        calls["n"] += 1
        return (np.full_like(acts, np.nan), np.zeros_like(valid)) if calls["n"] == 1 else (acts, valid)

    monkeypatch.setattr(head, "_sample_codes", spy)
    monkeypatch.setattr(head.tokenizer, "decode", first_fails)
    head.cfg.resample_temperature = 0.7
    out = head.sample(policy.backbone, prefix, temperature=0)
    assert torch.isfinite(out).all() and temps == [0, 0.7]


@pytest.mark.parametrize("name", sorted(HEADS))
def test_greedy_first_puts_the_greedy_chunk_among_the_draws(name: str) -> None:
    """head.greedy_first at temperature 1: candidate 0 of every observation is the temperature-0 chunk, the
    others are draws (not all equal to it); at N=1 the head is then the greedy policy."""
    policy = _policy(HEADS[name])
    head = policy.head
    prefix = policy.encode(random_observation(policy, batch=2))
    greedy = head.sample(policy.backbone, prefix, temperature=0)[:, 0]  # (B, H, A)
    head.cfg.greedy_first = True
    gen = torch.Generator().manual_seed(0)
    draws = head.sample(policy.backbone, prefix, num_samples=8, temperature=1.0, generator=gen)  # (B, 8, H, A)
    assert torch.equal(draws[:, 0], greedy)
    assert (draws[:, 1:] - greedy[:, None]).abs().amax((2, 3)).max() > 1e-3
    assert torch.equal(head.sample(policy.backbone, prefix, temperature=1.0, generator=gen)[:, 0], greedy)
    head.cfg.greedy_first = False  # off: candidate 0 is a draw like the others
    off = head.sample(policy.backbone, prefix, num_samples=8, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(off, draws)


def test_config_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="fixed-length tokenizer"):
        _policy(DiscreteConfig(tokenizer=_tok("fast"), decoding="parallel"))
    with pytest.raises(ValueError, match="head.decoding"):
        _policy(DiscreteConfig(decoding="beam"))
    backbone = next(v for k, v in backbone_variants().items() if k.startswith("timm_lm"))
    policy = VLAPolicy(tiny_policy_config(backbone, DiscreteConfig.tiny()))
    with pytest.raises(RuntimeError, match="not fitted"):
        policy.sample_actions(random_observation(policy, batch=1))


@pytest.mark.parametrize("name", ["ar_uniform", "ar_adaptive", "parallel_uniform"])
def test_expected_greedy_is_the_mean_under_the_predicted_distribution(name: str) -> None:
    """greedy='expected': each position decodes to sum_k p_k * value_k, with p the head's distribution at
    that position (autoregressive: conditioned on the argmax codes before it), not to the argmax's value."""
    cfg = copy.deepcopy(HEADS[name])
    cfg.greedy = "expected"
    policy = _policy(cfg)
    head, tok = policy.head, policy.head.tokenizer
    prefix = policy.encode(random_observation(policy, batch=2))
    got = head.sample(policy.backbone, prefix, temperature=0)[:, 0]  # (B, H, A_max)
    codes = head._sample_codes(policy.backbone, prefix, 1, 0.0, 0, None)[0]  # the argmax path
    logits, _ = head.logits(policy.backbone, prefix, codes)  # teacher forcing on it
    logits = logits.masked_fill(~head.allowed_ids(logits.device)[: codes.shape[1]], float("-inf"))
    p = logits[..., : tok.vocab_size].detach().double().softmax(-1).numpy()
    want = (p * tok.code_values()[None]).sum(-1).reshape(2, tok.horizon, tok.action_dim)
    np.testing.assert_allclose(got[..., : tok.action_dim].numpy(), want, atol=1e-5)
    argmax = head.decode_codes(codes)[0][..., : tok.action_dim].numpy()
    assert np.abs(want - argmax).max() > 1e-3  # an untrained head hesitates: the two decodings differ


def test_coarse_to_fine_expected_greedy_adds_mean_codebook_vectors() -> None:
    """greedy='expected' on coarse-to-fine: a sure head (peaked logits) decodes as the argmax does; an unsure
    one decodes to a blend of codebook vectors, which is not what its argmax codes decode to."""
    cfg = copy.deepcopy(HEADS["coarse_to_fine"])
    cfg.greedy = "expected"
    policy = _policy(cfg)
    head = policy.head
    prefix = policy.encode(random_observation(policy, batch=2))
    soft = head.sample(policy.backbone, prefix, temperature=0)
    head.cfg.greedy = "argmax"
    hard = head.sample(policy.backbone, prefix, temperature=0)
    assert torch.isfinite(soft).all() and (soft - hard).abs().max() > 1e-3
    with torch.no_grad():  # logits x 1e7: the same argmax, probability ~1 on it
        head.code_out.weight.mul_(1e7)
        head.code_out.bias.mul_(1e7)
    sure_hard = head.sample(policy.backbone, prefix, temperature=0)
    head.cfg.greedy = "expected"
    sure_soft = head.sample(policy.backbone, prefix, temperature=0)
    assert torch.allclose(sure_soft, sure_hard, atol=1e-4)


def test_expected_greedy_config_errors() -> None:
    with pytest.raises(ValueError, match="head.greedy: expected one of"):
        _policy(DiscreteConfig(tokenizer=_tok("uniform"), greedy="mean"))
    with pytest.raises(ValueError, match="one value per position"):
        _policy(DiscreteConfig(tokenizer=_tok("fast"), greedy="expected"))
    cfg = copy.deepcopy(HEADS["ar_spherical"])
    cfg.greedy = "expected"
    with pytest.raises(ValueError, match="spherical grid's joint token"):
        _policy(cfg)
    with pytest.raises(ValueError, match="head.top_k: expected an int >= 0"):
        _policy(DiscreteConfig(tokenizer=_tok("uniform"), top_k=-1))
    with pytest.raises(ValueError, match="head.temperature: expected >= 0"):
        _policy(CoarseToFineConfig(tokenizer=_tok("msvq"), temperature=-0.5))
    with pytest.raises(ValueError, match="head.greedy_first=true decodes candidate 0 by argmax"):
        _policy(DiscreteConfig(tokenizer=_tok("uniform"), greedy="expected", greedy_first=True))
    with pytest.raises(ValueError, match="head.greedy_first: expected true or false, received 'yes'"):
        _policy(CoarseToFineConfig(tokenizer=_tok("msvq"), greedy_first="yes"))


def test_coarse_to_fine_per_dimension_mask_is_block_causal_over_all_dims_of_a_scale() -> None:
    """Per dimension, scale k is s_k * A tokens: changing the scale-1 codes of ONE dimension moves the logits
    of scales >= 2 of every dimension, never those of scales 0-1 (a block by scale, not by dimension)."""
    policy = _policy(HEADS["coarse_to_fine_per_dim"])
    head = policy.head
    a = head.tokenizer.action_dim
    sizes, mask, slot, dim = head.layout()
    assert sizes == [s * a for s in head.scales] and mask.shape == (1 + sum(sizes),) * 2
    assert dim[:sizes[0]].tolist() == list(range(a)) and slot[sizes[0]:sizes[0] + 2 * a].tolist() == [1] * a + [2] * a
    prefix = policy.encode(random_observation(policy, batch=2))
    codes = torch.randint(0, head.tokenizer.vocab_size, (2, sum(sizes)))
    other = codes.clone()
    other[:, sizes[0] + 1] = (other[:, sizes[0] + 1] + 5) % head.tokenizer.vocab_size  # scale 1, step 0, dim 1
    x, _ = head.logits(policy.backbone, prefix, codes)
    y, _ = head.logits(policy.backbone, prefix, other)
    seen = sizes[0] + sizes[1]
    torch.testing.assert_close(x[:, :seen], y[:, :seen])
    assert not torch.allclose(x[:, seen:], y[:, seen:])


def test_coarse_to_fine_per_dimension_with_fewer_dims_than_max_action_dim() -> None:
    """A dataset with A < max_action_dim: A codes per position, padded action dims stay 0, and the cached
    sampler still agrees with teacher forcing."""
    torch.manual_seed(0)
    backbone = next(v for k, v in backbone_variants().items() if k.startswith("timm_lm"))
    policy = VLAPolicy(tiny_policy_config(backbone, copy.deepcopy(HEADS["coarse_to_fine_per_dim"]))).eval()
    a = policy.config.max_action_dim - 1
    policy.head.fit_tokenizer(np.random.default_rng(0).standard_normal((128, policy.config.chunk_size, a)))
    head = policy.head
    assert head.layout()[0] == [s * a for s in head.scales]
    prefix = policy.encode(random_observation(policy, batch=2))
    recorded, orig_pick = [], head.pick
    head.pick = lambda *args: recorded.append(orig_pick(*args)) or recorded[-1]
    out = head.sample(policy.backbone, prefix, num_samples=1, temperature=0)
    head.pick = orig_pick
    assert out.shape[-1] == policy.config.max_action_dim and (out[..., a:] == 0).all()
    codes = torch.cat(recorded, 1)
    assert torch.equal(head.logits(policy.backbone, prefix, codes)[0].argmax(-1), codes)


def test_coarse_to_fine_code_noise_trains_on_near_misses_only_in_train_mode(tmp_path: Path) -> None:
    """code_noise changes the training loss (other inputs, other targets), not the eval-mode NLL, which stays
    the exact sequence NLL, nor post-training's (DPO / GRPO read the train-mode loss); out-of-range values are
    refused."""
    clean, noisy = _policy(HEADS["coarse_to_fine_per_dim"]), _policy(HEADS["coarse_to_fine_code_noise"])
    obs = random_observation(clean, batch=4)
    actions = torch.randn(4, clean.config.chunk_size, clean.config.max_action_dim).clamp(-2, 2)
    is_pad = torch.zeros(4, clean.config.chunk_size, dtype=torch.bool)
    torch.testing.assert_close(noisy.loss(obs, actions, is_pad), clean.loss(obs, actions, is_pad))  # eval mode
    noisy.train()
    torch.manual_seed(0)
    train_loss = noisy.loss(obs, actions, is_pad)
    assert not torch.allclose(train_loss, clean.loss(obs, actions, is_pad))
    train_loss.sum().backward()
    assert noisy.head.code_out.weight.grad.abs().sum() > 0
    # inputs from the used codes, cross-entropy on the targets (not on the used codes)
    tok = noisy.head.tokenizer
    codes = torch.from_numpy(tok.encode(actions[..., : tok.action_dim].numpy())[0])
    used, target = codes.clone(), codes.clone()
    used[:, 0] = (used[:, 0] + 1) % tok.vocab_size
    target[:, -1] = (target[:, -1] + 1) % tok.vocab_size
    noisy.head.tokenizer.noisy_codes = lambda *a, **k: (used, target)
    prefix = noisy.encode(obs)
    with torch.no_grad():
        logits, _ = noisy.head.logits(noisy.backbone, prefix, used)
        want = noisy.head.step_loss(F.cross_entropy(logits.float().transpose(1, 2), target, reduction="none"),
                                    torch.ones_like(target, dtype=torch.bool), is_pad)
        torch.testing.assert_close(noisy.head.loss(noisy.backbone, prefix, actions, is_pad), want)
    del noisy.head.tokenizer.noisy_codes
    noisy.save_pretrained(tmp_path / "ckpt")  # post-training (DPO, GRPO) turns it off: it needs exact log pi
    from post_training.dpo import prepare_policy

    loaded = prepare_policy(str(tmp_path / "ckpt"), "head", 16, 32, "cpu")[0]
    assert loaded.training and loaded.head.cfg.code_noise == 0
    torch.testing.assert_close(loaded.loss(obs, actions, is_pad), clean.loss(obs, actions, is_pad))
    from vla.train import check_same_architecture  # a training setting: --init_from may change it, not the scales

    check_same_architecture(clean.config, noisy.config, "ckpt")
    other = copy.deepcopy(noisy.config)
    other.head.tokenizer.scales = [1, 2]
    with pytest.raises(ValueError, match="different architecture"):
        check_same_architecture(clean.config, other, "ckpt")
    cfg = copy.deepcopy(HEADS["coarse_to_fine_code_noise"])
    cfg.code_noise = 1.0
    with pytest.raises(ValueError, match="head.code_noise: expected 0 <= code_noise < 1"):
        _policy(cfg)


def test_coarse_to_fine_scale_loss_weighs_each_scale_alike_in_train_mode(tmp_path: Path) -> None:
    """scale_loss='scale' reweighs the codes' NLL so every scale sums to the same weight (the total stays the number
    of codes); eval mode keeps the exact sequence NLL; an unknown value names the field and the choices."""
    clean = _policy(HEADS["coarse_to_fine_per_dim"])
    cfg = copy.deepcopy(HEADS["coarse_to_fine_per_dim"])
    cfg.scale_loss = "scale"
    weighted = _policy(cfg)
    obs = random_observation(clean, batch=3)
    actions = torch.randn(3, clean.config.chunk_size, clean.config.max_action_dim).clamp(-2, 2)
    is_pad = torch.zeros(3, clean.config.chunk_size, dtype=torch.bool)
    torch.testing.assert_close(weighted.loss(obs, actions, is_pad), clean.loss(obs, actions, is_pad))  # eval mode
    head = weighted.head
    sizes = head.layout()[0]
    weighted.train()
    w = head.code_weights(sum(sizes), "cpu")
    per_scale = torch.stack([c.sum() for c in w.split(sizes)])
    torch.testing.assert_close(per_scale, torch.full_like(per_scale, sum(sizes) / len(sizes)))
    assert w[0] > w[-1]  # a coarse code outweighs a fine one
    prefix = weighted.encode(obs)
    codes, mask = head.targets(actions, prefix)
    with torch.no_grad():
        nll = F.cross_entropy(head.logits(weighted.backbone, prefix, codes)[0].float().transpose(1, 2), codes,
                              reduction="none")
        torch.testing.assert_close(head.loss(weighted.backbone, prefix, actions, is_pad),
                                   head.step_loss(nll * w, mask, is_pad))
    weighted.save_pretrained(tmp_path / "ckpt")  # post-training (DPO, GRPO) needs the exact log pi: back to "token"
    from post_training.dpo import prepare_policy

    loaded = prepare_policy(str(tmp_path / "ckpt"), "head", 16, 32, "cpu")[0]
    assert loaded.training and loaded.head.cfg.scale_loss == "token"
    assert loaded.head.code_weights(sum(sizes), "cpu") is None
    cfg.scale_loss = "uniform"
    with pytest.raises(ValueError, match=r"head.scale_loss: expected one of \('token', 'scale'\), received 'uniform'"):
        _policy(cfg)


def test_coarse_to_fine_refuses_a_tokenizer_of_another_layout(tmp_path: Path) -> None:
    """head.tokenizer_path pointing at a per-dimension tokenizer for a joint head (or other scales) is an error,
    not silently wrong slot embeddings."""
    per_dim = _policy(HEADS["coarse_to_fine_per_dim"]).head.tokenizer
    per_dim.save_pretrained(tmp_path / "tok")
    cfg = copy.deepcopy(HEADS["coarse_to_fine"])
    cfg.tokenizer_path = str(tmp_path / "tok")
    with pytest.raises(ValueError, match="per_dimension=True; the head was built for .*per_dimension=False"):
        _policy(cfg)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_save_reload_keeps_the_tokenizer(name: str, tmp_path: Path) -> None:
    policy = _policy(HEADS[name])
    obs = random_observation(policy, batch=2)
    actions = torch.randn(2, policy.config.chunk_size, policy.config.max_action_dim)
    is_pad = torch.zeros(2, policy.config.chunk_size, dtype=torch.bool)
    loss_before = policy.loss(obs, actions, is_pad)
    policy.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "head" / "tokenizer").is_dir()
    again = VLAPolicy.from_pretrained(tmp_path / "ckpt")
    torch.testing.assert_close(again.loss(obs, actions, is_pad), loss_before)
    before = policy.sample_actions(obs, num_samples=2, generator=torch.Generator().manual_seed(0))
    after = again.sample_actions(obs, num_samples=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(before, after)


@pytest.mark.parametrize("head_args", [
    ["--head.type=discrete", "--head.tokenizer.type=adaptive_grid", "--head.tokenizer.n_bins=32"],
    ["--head.type=coarse_to_fine", "--head.tokenizer.steps=20", "--head.tokenizer.codebook_size=16"],
])
def test_vla_train_fits_saves_and_resumes(head_args, tmp_path: Path) -> None:
    from vla.config import TrainConfig, parse_config
    from vla.data.synthetic import make_synthetic_dataset
    from vla.presets import get_preset
    from vla.train import train

    data = make_synthetic_dataset(tmp_path / "syn", num_episodes=2, episode_len=12)
    args = [f"--output_dir={tmp_path / 'run'}", f"--dataset.root={data}", "--dataset.synthetic=false",
            "--batch_size=4", "--log_every=1", "--save_every=2", "--warmup_steps=1", "--steps=4", *head_args]
    cfg = parse_config(TrainConfig, get_preset("debug"), args + ["--stop_after=2"])
    train(cfg)
    ckpt = train(parse_config(TrainConfig, get_preset("debug"), args + ["--resume=true"]))
    saved = json.loads((ckpt / "head" / "tokenizer" / "tokenizer_config.json").read_text())
    assert saved["type"] == cfg.policy.head.tokenizer.type
    policy = VLAPolicy.from_pretrained(ckpt)
    chunk = policy.predict_action_chunk({
        "observation.images.cam0": np.zeros((24, 24, 3), np.uint8),
        "observation.state": np.zeros(policy.preprocessor.state_dim, np.float32), "task": "push"})
    assert chunk.shape == (policy.config.chunk_size, policy.preprocessor.action_dim) and np.isfinite(chunk).all()


def test_refit_moves_embeddings_with_their_bins() -> None:
    """Adaptive grid re-fit (SpatialVLA): a token's new embedding is the old embeddings interpolated at
    its new bin centre."""
    policy = _policy(HEADS["ar_adaptive"])
    head, tok = policy.head, policy.head.tokenizer
    old_centres = tok.centres.copy()
    old_emb = head.code_emb.weight.detach().clone()
    rng = np.random.default_rng(1)
    chunks = rng.standard_normal((256, policy.config.chunk_size, policy.config.max_action_dim))
    head.refit_tokenizer(chunks)
    new_centres = tok.centres
    a, j = 0, tok.config.n_bins // 2
    # find the old bins around the new centre and check the interpolation
    c = new_centres[a, j]
    i = int(np.clip(np.searchsorted(old_centres[a], c, side="right") - 1, 0, tok.config.n_bins - 2))
    w = (c - old_centres[a, i]) / (old_centres[a, i + 1] - old_centres[a, i])
    assert 0 <= w <= 1, "the middle bin's new centre lies inside the old grid"
    want = (1 - w) * old_emb[i] + w * old_emb[i + 1]
    torch.testing.assert_close(head.code_emb.weight[j].detach(), want.float(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot carry embeddings"):
        _policy(HEADS["ar_uniform"]).head.refit_tokenizer(chunks)


def test_coarse_to_fine_errors_benchmark_writes_its_table(tmp_path: Path) -> None:
    """benchmarks.coarse_to_fine_errors on a tiny trained checkpoint: one accuracy per scale, the tokenizer's
    own codes closer to the data than an untrained head's greedy chunks; a flow checkpoint is refused by name."""
    from benchmarks.coarse_to_fine_errors import main
    from tests.helpers import tiny_checkpoint

    ckpt, data = tiny_checkpoint(tmp_path / "c2f", 2, 10, "--head.type=coarse_to_fine",
                                 "--head.tokenizer.per_dimension=true", "--head.tokenizer.steps=30")
    out = tmp_path / "errors.json"
    assert main(["--dataset", str(data), "--policy", f"c2f={ckpt}", "--frames", "8", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert len(row["teacher_forced_accuracy"]) == len(row["scale_sizes"]) == 4 and row["frames"] == 8
    assert all(0 <= a <= 1 for a in row["teacher_forced_accuracy"])
    mse = row["chunk_mse"]
    assert all(np.isfinite(list(mse.values()))) and mse["tokenizer"] < mse["greedy"]
    flow, _ = tiny_checkpoint(tmp_path / "flow", 2, 10)
    with pytest.raises(ValueError, match="expected a coarse_to_fine head"):
        main(["--dataset", str(data), "--policy", f"flow={flow}", "--frames", "4", "--out", str(out)])
