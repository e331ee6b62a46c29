"""Action tokenizers: the generic contract over the registry, then each tokenizer's own guarantees."""
from __future__ import annotations

import json
import functools

import numpy as np
import pytest
import torch

from action_tokenizers import ActionTokenizer, make_chunks, tokenizer_config_class, tokenizer_names
from action_tokenizers.fast import dct_dequantize, dct_quantize
from vla.registry import UnknownNameError

H, A = 8, 3


def smooth_chunks(n: int = 200, seed: int = 0) -> np.ndarray:
    """(n, H, A) sinusoid pieces in about [-0.8, 0.8]: smooth like real action chunks."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, H)[None, :, None]
    return 0.8 * np.sin(2 * np.pi * (t * rng.uniform(0.3, 1.0, (n, 1, A)) + rng.uniform(0, 1, (n, 1, A))))


DATA = smooth_chunks()


@functools.lru_cache(maxsize=None)
def fitted(name: str) -> ActionTokenizer:
    tok = tokenizer_config_class(name).tiny().build()
    tok.fit(DATA)
    return tok


def test_registry_has_the_four_tokenizers():
    assert {"uniform", "adaptive_grid", "fast", "msvq"} <= set(tokenizer_names())


@pytest.mark.parametrize("name", tokenizer_names())
def test_contract_round_trip_and_save_load(name, tmp_path):
    tok = fitted(name)
    codes, mask = tok.encode(DATA)
    assert codes.dtype == np.int64 and mask.dtype == bool and codes.shape == mask.shape and codes.shape[0] == len(DATA)
    assert (codes[mask] >= 0).all() and (codes[mask] < tok.vocab_size).all()
    actions, valid = tok.decode(codes, mask)
    assert actions.shape == DATA.shape and valid.all() and np.isfinite(actions).all()
    # torch input gives the same codes
    codes_t, _ = tok.encode(torch.from_numpy(DATA))
    np.testing.assert_array_equal(codes_t, codes)

    tok.save_pretrained(tmp_path / "tok")
    loaded = ActionTokenizer.from_pretrained(tmp_path / "tok")
    assert type(loaded) is type(tok) and loaded.config == tok.config and loaded.vocab_size == tok.vocab_size
    codes2, mask2 = loaded.encode(DATA)
    np.testing.assert_array_equal(codes2, codes)
    np.testing.assert_array_equal(mask2, mask)
    np.testing.assert_array_equal(loaded.decode(codes, mask)[0], actions)


@pytest.mark.parametrize("name", tokenizer_names())
def test_contract_padded_row_is_invalid_and_nan(name):
    tok = fitted(name)
    codes, mask = tok.encode(DATA[:4])
    mask = mask.copy()
    mask[1, :] = False  # nothing left to decode in row 1
    actions, valid = tok.decode(codes, mask)
    assert valid.tolist() == [True, False, True, True]
    assert np.isnan(actions[1]).all() and np.isfinite(actions[[0, 2, 3]]).all()


@pytest.mark.parametrize("name", tokenizer_names())
def test_contract_bad_input_is_a_clear_error(name):
    tok = fitted(name)
    with pytest.raises(ValueError, match=r"\(N, 8, 3\)"):
        tok.encode(np.zeros((2, H, A + 1)))
    bad = DATA[:2].copy()
    bad[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite.*chunk 1, step 2, dim 0"):
        tok.encode(bad)
    with pytest.raises(RuntimeError, match="not fitted"):
        tokenizer_config_class(name).tiny().build().encode(DATA)


def test_unknown_type_lists_known_names(tmp_path):
    with pytest.raises(UnknownNameError, match=r"known tokenizers: adaptive_grid, fast, msvq, uniform.*'fast'"):
        tokenizer_config_class("fsat")
    fitted("uniform").save_pretrained(tmp_path)
    cfg = (tmp_path / "tokenizer_config.json").read_text().replace('"uniform"', '"unifrom"')
    (tmp_path / "tokenizer_config.json").write_text(cfg)
    with pytest.raises(UnknownNameError, match="Did you mean 'uniform'"):
        ActionTokenizer.from_pretrained(tmp_path)


def test_uniform_error_within_half_bin_and_invalid_codes():
    tok = fitted("uniform")
    x = np.clip(DATA, tok.low, tok.high)  # "in range": inside the q01..q99 grid
    y, valid = tok.decode(*tok.encode(x))
    assert valid.all()
    assert (np.abs(y - x) <= tok.bin_width / 2 + 1e-12).all()
    assert (np.abs(y - x) > tok.bin_width / 4).any()  # the bound is not trivially loose
    codes, mask = tok.encode(DATA[:3])
    codes[0, 5] = tok.vocab_size  # out of range
    codes[2, 0] = -1
    assert tok.decode(codes, mask)[1].tolist() == [False, True, False]
    with pytest.raises(ValueError, match="exactly 24 codes"):
        tok.decode(codes[:, :-1])


def test_adaptive_grid_bins_equal_probability_and_half_bin_error():
    rng = np.random.default_rng(1)
    x = rng.normal([0.2, -0.5, 0.0], [0.3, 0.1, 1e-9], size=(400, H, A))  # dim 2 is constant: sigma floor
    tok = tokenizer_config_class("adaptive_grid")(n_bins=16).build()
    tok.fit(x)
    codes, mask = tok.encode(x)
    counts = np.bincount(codes[:, 0::A].ravel(), minlength=16)  # dim 0 tokens
    assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()
    y, valid = tok.decode(codes, mask)
    assert valid.all() and np.isfinite(y).all()
    e = tok.edges  # (A, n+1)
    k = codes.reshape(-1, H, A) - np.arange(A) * 16
    width = e[np.arange(A), k + 1] - e[np.arange(A), k]
    inside = (x >= e[:, 0]) & (x <= e[:, -1])
    assert (np.abs(y - x)[inside] <= width[inside] / 2 + 1e-12).all()
    # a code from another dimension's token set, or beyond the vocabulary, is invalid
    bad = codes[:3].copy()
    bad[0, 0] = 16 + 3  # dimension 1's token at a dimension-0 position
    bad[1, 1] = tok.vocab_size
    assert tok.decode(bad, mask[:3])[1].tolist() == [False, False, True]


def test_adaptive_grid_conditional_mean_beats_midpoint_on_gaussian_data():
    x = np.random.default_rng(2).normal(0.0, 0.5, size=(300, H, 1))
    err = {}
    for centre in ("midpoint", "conditional_mean"):
        tok = tokenizer_config_class("adaptive_grid")(n_bins=8, centre=centre).build()
        tok.fit(x)
        err[centre] = ((tok.decode(*tok.encode(x))[0] - x) ** 2).mean()
    assert err["conditional_mean"] < err["midpoint"]


def test_adaptive_grid_refit_interpolates_embeddings_onto_new_centres():
    tok = tokenizer_config_class("adaptive_grid")(n_bins=16).build()
    tok.fit(DATA)
    old_c = tok.centres.copy()  # (A, n)
    # an embedding that is exactly linear in the bin's value: interpolation must reproduce it exactly
    old_emb = np.stack([old_c.ravel(), 2 * old_c.ravel() + 1], axis=1)  # (A * n, 2)
    new_emb = tok.refit(DATA * 0.5 + 0.1, old_emb)
    new_c = np.clip(tok.centres, old_c[:, :1], old_c[:, -1:]).ravel()  # clamped to the old grid's ends
    assert not np.allclose(tok.centres, old_c)
    np.testing.assert_allclose(new_emb[:, 0], new_c, atol=1e-12)
    np.testing.assert_allclose(new_emb[:, 1], 2 * new_c + 1, atol=1e-12)
    emb_t = tok.refit(DATA, torch.from_numpy(new_emb).float().requires_grad_())
    assert isinstance(emb_t, torch.Tensor) and emb_t.shape == (A * 16, 2) and emb_t.requires_grad
    with pytest.raises(ValueError, match=r"old_embeddings: expected shape \(48, D\)"):
        tok.refit(DATA, np.zeros((10, 2)))


def _spherical(**kw):
    return tokenizer_config_class("adaptive_grid")(n_bins=16, spherical_dims=[0, 1, 2], spherical_bins=[8, 12, 6],
                                                   **kw).build()


def test_spherical_grid_one_joint_token_per_step_and_half_bin_error():
    """SpatialVLA's translation grid: (x, y, z) -> one (theta, phi, r) token; error <= half a bin per coordinate."""
    from action_tokenizers.spherical import cartesian_to_spherical

    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0.1, 0.5, size=(300, H, 3)), rng.choice([-1.0, 1.0], size=(300, H, 1))], -1)
    tok = _spherical()
    tok.fit(x)
    assert tok.tokens_per_step == 2 and tok.vocab_size == 8 * 12 * 6 + 16
    codes, mask = tok.encode(x)
    assert codes.shape == (300, H * 2)
    assert codes[:, 0::2].max() < 8 * 12 * 6 <= codes[:, 1::2].min()  # slot 0: translation, slot 1: gripper
    y, valid = tok.decode(codes, mask)
    assert valid.all() and np.isfinite(y).all()
    assert np.allclose(y[..., 3], x[..., 3], atol=0.05)  # the gripper keeps its own 1-D grid
    sx, sy = cartesian_to_spherical(x[..., :3]), cartesian_to_spherical(y[..., :3])
    kt, kp, kr = tok.sphere.split(codes[:, 0::2].reshape(300, H))
    for i, k in enumerate((kt, kp, kr)):
        e = tok.sphere.edges[i]
        width = e[k + 1] - e[k]
        assert (np.abs(sy[..., i] - sx[..., i]) <= width / 2 + 1e-9).all(), i
    # Equal-probability bins along theta: every theta bin is used.
    assert len(np.unique(kt)) == 8
    # A gripper token in the translation slot is invalid; masks forbid it too.
    bad = codes[:2].copy()
    bad[0, 0] = 8 * 12 * 6 + 1
    assert tok.decode(bad, mask[:2])[1].tolist() == [False, True]
    allowed = tok.allowed_codes(4)
    assert allowed[0, : 8 * 12 * 6].all() and not allowed[0, 8 * 12 * 6:].any() and allowed[1, -16:].all()
    # Save / load reproduces the grid exactly.
    import tempfile

    from action_tokenizers.base import ActionTokenizer

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        again = ActionTokenizer.from_pretrained(d)
        assert np.array_equal(again.encode(x)[0], codes)


def test_spherical_grid_config_errors():
    with pytest.raises(ValueError, match="spherical_dims: expected 3 distinct"):
        tokenizer_config_class("adaptive_grid")(spherical_dims=[0, 1]).build()
    with pytest.raises(ValueError, match="spherical_bins"):
        tokenizer_config_class("adaptive_grid")(spherical_dims=[0, 1, 2], spherical_bins=[8, 1, 4]).build()
    with pytest.raises(ValueError, match="action_dim 2"):
        _spherical().fit(np.zeros((4, H, 2)))


def test_spherical_refit_moves_joint_embeddings_trilinearly():
    """An embedding linear in (theta, phi, r) of the bin centre is reproduced exactly on the new grid."""
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(0.0, 0.5, size=(300, H, 3)), rng.normal(size=(300, H, 1))], -1)
    tok = _spherical()
    tok.fit(x)

    def linear_rows(t):
        c = t.sphere.centres
        kt, kp, kr = t.sphere.split(np.arange(t.sphere.vocab_size))
        joint = np.stack([c[0][kt] + 2 * c[1][kp] - 3 * c[2][kr], np.ones_like(c[0][kt])], 1)
        own = np.stack([t.centres[3], np.ones(16)], 1)
        return np.concatenate([joint, own])

    old = linear_rows(tok)
    old_centres = [c.copy() for c in tok.sphere.centres]
    new = tok.refit(x * 0.7 + 0.05, old)
    assert new.shape == old.shape
    # inside the old grid's range (clamping happens outside it) the linear function is reproduced
    c = tok.sphere.centres
    kt, kp, kr = tok.sphere.split(np.arange(tok.sphere.vocab_size))
    inside = ((c[0][kt] >= old_centres[0][0]) & (c[0][kt] <= old_centres[0][-1]) & (c[1][kp] >= old_centres[1][0])
              & (c[1][kp] <= old_centres[1][-1]) & (c[2][kr] >= old_centres[2][0]) & (c[2][kr] <= old_centres[2][-1]))
    assert inside.sum() > 50
    np.testing.assert_allclose(new[: len(kt)][inside], linear_rows(tok)[: len(kt)][inside], atol=1e-9)
    np.testing.assert_allclose(new[:, 1], 1.0, atol=1e-12)  # weights sum to one everywhere


def test_fast_is_exact_up_to_dct_rounding_and_compresses():
    tok = fitted("fast")
    codes, mask = tok.encode(DATA)
    y, valid = tok.decode(codes, mask)
    assert valid.all()
    scale = tok.config.scale
    np.testing.assert_array_equal(y, dct_dequantize(dct_quantize(DATA, scale), scale))  # BPE is lossless
    # orthonormal DCT: per (chunk, dim) the L2 error is the rounding's, at most sqrt(H) * 0.5 / scale
    assert (np.linalg.norm(y - DATA, axis=1) <= np.sqrt(H) * 0.5 / scale + 1e-9).all()
    assert mask.sum(1).mean() < H * A / 1.5  # smooth chunks: far fewer tokens than bins would need


def test_fast_garbage_sequences_are_invalid():
    tok = fitted("fast")
    codes, mask = tok.encode(DATA[:1])
    n = int(mask.sum())
    garbage = np.zeros((4, n + 5), dtype=np.int64)
    gmask = np.zeros(garbage.shape, dtype=bool)
    garbage[0, :n] = codes[0, :n]  # the real sequence, padded: valid
    gmask[0, :n] = True
    garbage[1, :3] = codes[0, :3]  # truncated: too few coefficients
    gmask[1, :3] = True
    garbage[2, : n + 5] = np.r_[codes[0, :n], codes[0, :5]]  # too many coefficients
    gmask[2] = True
    garbage[3, :n] = codes[0, :n]
    garbage[3, 0] = tok.vocab_size + 7  # an id outside the vocabulary
    gmask[3, :n] = True
    y, valid = tok.decode(garbage, gmask)
    assert valid.tolist() == [True, False, False, False]
    np.testing.assert_array_equal(y[0], tok.decode(codes, mask)[0][0])
    assert np.isnan(y[1:]).all()


def test_fast_vocab_smaller_than_alphabet_is_a_clear_error():
    tok = tokenizer_config_class("fast")(vocab_size=4).build()
    with pytest.raises(ValueError, match="fast.vocab_size: .*expected vocab_size >="):
        tok.fit(DATA)


def test_msvq_learns_better_than_the_mean_and_codes_are_coarse_to_fine():
    tok = fitted("msvq")
    codes, mask = tok.encode(DATA)
    assert codes.shape == (len(DATA), 1 + 2 + 3 + 4) and mask.all()
    assert [s.stop - s.start for s in tok.scale_slices()] == [1, 2, 3, 4]
    y, valid = tok.decode(codes, mask)
    baseline = ((DATA - DATA.mean(0)) ** 2).mean()
    assert valid.all() and ((y - DATA) ** 2).mean() < 0.5 * baseline
    # the codebook is used, not collapsed onto one entry
    assert len(np.unique(codes[:, 0])) > 1
    bad = codes[:2].copy()
    bad[0, -1] = tok.vocab_size
    assert tok.decode(bad)[1].tolist() == [False, True]


@pytest.mark.parametrize("name", tokenizer_names())
def test_code_values_are_what_each_code_decodes_to(name):
    """``code_values()[l, k]`` is the value id k decodes to at position l (per-position tokenizers), so a
    head's expected value under a one-hot distribution is the decoded code; other tokenizers give None."""
    tok = fitted(name)
    table = tok.code_values()
    if name in ("fast", "msvq"):
        assert table is None
        return
    codes, mask = tok.encode(DATA[:16])
    acts, valid = tok.decode(codes, mask)
    assert table.shape == (codes.shape[1], tok.vocab_size) and valid.all()
    picked = np.take_along_axis(table, codes.T, axis=1).T  # (N, L): the table at each code
    np.testing.assert_allclose(picked.reshape(acts.shape), acts, atol=1e-12)
    allowed = tok.allowed_codes(codes.shape[1])
    if allowed is not None:  # ids a position never holds carry no value
        assert (table[~allowed] == 0).all()


def test_spherical_grid_has_no_per_position_values():
    cfg = tokenizer_config_class("adaptive_grid").tiny()
    cfg.spherical_dims, cfg.spherical_bins = [0, 1, 2], [4, 6, 3]
    tok = cfg.build()
    tok.fit(DATA)
    assert tok.code_values() is None


def test_msvq_joint_layout_keeps_the_saved_shapes():
    """per_dimension=False must load checkpoints saved before the option existed: same state-dict keys and
    shapes (ungrouped convs, one (K, D) codebook)."""
    tok = fitted("msvq")
    cfg = tok.config
    shapes = {k: tuple(v.shape) for k, v in tok.modules.state_dict().items()}
    assert shapes == {
        "encoder.net.0.weight": (cfg.hidden, A, 3), "encoder.net.0.bias": (cfg.hidden,),
        "encoder.net.2.weight": (cfg.hidden, cfg.hidden, 3), "encoder.net.2.bias": (cfg.hidden,),
        "encoder.net.4.weight": (cfg.latent_dim, cfg.hidden, 1), "encoder.net.4.bias": (cfg.latent_dim,),
        "decoder.net.0.weight": (cfg.hidden, cfg.latent_dim, 3), "decoder.net.0.bias": (cfg.hidden,),
        "decoder.net.2.weight": (cfg.hidden, cfg.hidden, 3), "decoder.net.2.bias": (cfg.hidden,),
        "decoder.net.4.weight": (A, cfg.hidden, 1), "decoder.net.4.bias": (A,),
        "codebook.weight": (cfg.codebook_size, cfg.latent_dim)}


@functools.lru_cache(maxsize=None)
def msvq_per_dim() -> ActionTokenizer:
    cfg = tokenizer_config_class("msvq").tiny()
    cfg.per_dimension = True
    tok = cfg.build()
    tok.fit(DATA)
    return tok


def test_msvq_per_dimension_codes_each_dimension_on_its_own(tmp_path):
    """CARP's layout: s * A codes at scale s, position-major; a code of dimension a decodes into dimension a
    only (its own encoder, codebook and decoder), and the reconstruction beats the mean."""
    tok = msvq_per_dim()
    codes, mask = tok.encode(DATA)
    assert codes.shape == (len(DATA), (1 + 2 + 3 + 4) * A) and mask.all()
    assert [s.stop - s.start for s in tok.scale_slices()] == [1 * A, 2 * A, 3 * A, 4 * A]
    y, valid = tok.decode(codes, mask)
    assert valid.all() and ((y - DATA) ** 2).mean() < 0.5 * ((DATA - DATA.mean(0)) ** 2).mean()
    for dim in range(A):
        other = codes[:4].copy()
        other[:, A * 1 + dim] = (other[:, A * 1 + dim] + 3) % tok.vocab_size  # scale 1, first position
        moved = np.abs(tok.decode(other)[0] - y[:4]).max(axis=(0, 1))  # (A,)
        assert moved[dim] > 1e-6 and np.delete(moved, dim).max() == 0, (dim, moved)
    tok.save_pretrained(tmp_path / "tok")
    again = ActionTokenizer.from_pretrained(tmp_path / "tok")
    np.testing.assert_array_equal(again.encode(DATA[:8])[0], codes[:8])
    # encoder side: changing one input dimension changes only that dimension's codes (position l is dim l % A)
    for dim in range(A):
        x = DATA[:16].copy()
        x[..., dim] = x[..., ::-1, dim]  # reverse that dimension in time
        changed = (tok.encode(x)[0] != codes[:16]).any(0)
        assert changed[dim::A].any() and not np.delete(changed.reshape(-1, A), dim, axis=1).any(), dim
    with pytest.raises(RuntimeError, match="fit .*first"):
        tokenizer_config_class("msvq")(per_dimension=True).build().num_codes


@pytest.mark.parametrize("per_dimension", [False, True])
def test_msvq_expected_scale_with_one_hot_probabilities_is_add_scale(per_dimension):
    tok = msvq_per_dim() if per_dimension else fitted("msvq")
    codes = torch.from_numpy(tok.encode(DATA[:5])[0])
    f_hard = f_soft = tok.empty_latent(5)
    for sl in tok.scale_slices():
        f_hard = tok.add_scale(f_hard, codes[:, sl])
        f_soft = tok.add_expected_scale(f_soft, torch.nn.functional.one_hot(codes[:, sl], tok.vocab_size).double())
    assert torch.allclose(f_hard, f_soft, atol=1e-6)
    np.testing.assert_allclose(tok.decode_latent(f_soft).detach().numpy(), tok.decode(codes.numpy())[0], atol=1e-5)


@pytest.mark.parametrize("per_dimension", [False, True])
def test_msvq_noisy_codes_finer_scales_correct_the_coarse_near_misses(per_dimension):
    """noisy_codes: rate 0 is encode; otherwise coarse codes in ``used`` are near misses, never at the finest
    scale, and the finer targets correct them: decoding ``used`` with those finer codes beats keeping the
    mistakes and the clean encoding's finer codes."""
    tok = msvq_per_dim() if per_dimension else fitted("msvq")
    codes = tok.encode(DATA)[0]
    used, target = tok.noisy_codes(DATA, 0.0)
    np.testing.assert_array_equal(used.numpy(), codes)
    np.testing.assert_array_equal(target.numpy(), codes)
    used, target = tok.noisy_codes(DATA, 0.5, generator=torch.Generator().manual_seed(0))
    finest, coarse = tok.scale_slices()[-1], slice(0, tok.scale_slices()[-1].start)
    assert torch.equal(used[:, finest], target[:, finest])
    assert 0.3 < (used[:, coarse] != target[:, coarse]).float().mean() < 0.7
    # recomputed here: every target is the nearest code of what is missing after the USED coarser codes, and
    # every used code is one of the 4 next-nearest (rank 1..4) where it differs from the target
    f = tok.modules["encoder"](torch.from_numpy(DATA))
    f_hat, book, g = tok.empty_latent(len(DATA)), tok._book(), tok.groups
    for k, sl in enumerate(tok.scale_slices()):
        r = tok.scale_input(f - f_hat, k)  # (N, s*G, D)
        for p in range(r.shape[1]):
            dist = torch.cdist(r[:, p], book[p % g])  # (N, K), position p reads its own dimension's codebook
            assert torch.equal(dist.argmin(-1), target[:, sl][:, p]), (k, p)
            rank = (dist < dist.gather(1, used[:, sl][:, p:p + 1])).sum(1)
            assert int(rank.max()) <= 4 and bool(((rank > 0) == (used[:, sl][:, p] != target[:, sl][:, p])).all())
        f_hat = tok.add_scale(f_hat, used[:, sl])
    err = lambda c: ((tok.decode(c)[0] - DATA) ** 2).mean()  # noqa: E731
    kept = used.numpy().copy()
    kept[:, finest] = codes[:, finest]  # the mistakes, then what the clean encoding would have added
    assert err(used.numpy()) < 0.9 * err(kept)
    with pytest.raises(ValueError, match="rate: expected 0 <= rate < 1"):
        tok.noisy_codes(DATA, 1.0)


def test_make_chunks_never_crosses_episodes():
    actions = np.arange(10, dtype=float)[:, None]
    ep = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    chunks = make_chunks(actions, ep, horizon=3)
    assert chunks[..., 0].tolist() == [[0, 1, 2], [1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with pytest.raises(ValueError, match="no episode has 5 frames"):
        make_chunks(actions, ep, horizon=5)


def test_vla_tokenizer_fit_cli(tmp_path) -> None:
    """`vla tokenizer fit` on a LeRobot dataset: saves a tokenizer that reloads and round-trips."""
    from action_tokenizers import ActionTokenizer
    from vla.cli import main
    from vla.data.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", num_episodes=3, episode_len=12)
    out = tmp_path / "tok"
    assert main(["tokenizer", "fit", "--tokenizer.type=uniform", f"--dataset={data}", f"--out={out}",
                 "--horizon=4"]) == 0
    summary = json.loads((out / "fit_summary.json").read_text())
    assert summary["valid"] == 1.0 and summary["tokens_per_chunk"] == 4 * 3
    # 256 bins over q01-q99 of the normalized actions (the 2% outside are clipped: max error is larger)
    assert summary["mean_abs_err"] < 0.05
    tok = ActionTokenizer.from_pretrained(out)
    assert tok.horizon == 4 and (out / "action_stats.json").exists()
