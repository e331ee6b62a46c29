"""Multi-scale residual vector quantization of action chunks (CARP).

CARP predicts a chunk coarse-to-fine: first one token for the whole chunk, then 2, 3, 4 tokens that
each correct what the coarser scales missed. This tokenizer provides those codes:

    x (N, H, A) --1-D conv encoder--> f (N, D, T)          T = scales[-1] latent steps
    f_hat = 0
    for s in scales (1, 2, 3, 4):                          coarse to fine
        r = interpolate(f - f_hat, length s)               what is still missing, seen at scale s
        k = nearest codebook entries of r                  s codes (one shared codebook, K entries)
        f_hat += interpolate(codebook[k], length T)        add the correction back at full length
    x_hat = decoder(f_hat)  (N, H, A)

Codes are the concatenation over scales (1 + 2 + 3 + 4 = 10 tokens), coarse first; ``vocab_size = K``.

``per_dimension=True`` is CARP's own layout: every action dimension is a separate 1-D signal with its own
encoder, decoder and codebook (grouped convolutions, one group per dimension), so scale s has s * A codes
(position-major: step j's codes for dims 0..A-1, then step j+1's). A gripper that snaps open and shut then
gets codes of its own instead of sharing one joint code with the arm's motion. Code ids index the codebook
of their own dimension.
Training (``fit``, seeded, a few hundred Adam steps) minimizes reconstruction MSE + the VQ-VAE
codebook and commitment terms, with straight-through gradients through the quantizer. The codebook
is initialized from encoder outputs so no entry starts dead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from action_tokenizers.base import ActionTokenizer, TokenizerConfig, as_chunks


@TokenizerConfig.register_subclass("msvq")
@dataclass
class MSVQConfig(TokenizerConfig):
    scales: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # tokens per scale, coarse to fine
    codebook_size: int = 256  # K, shared by all scales
    latent_dim: int = 32  # D
    hidden: int = 64  # conv channels
    steps: int = 400
    batch_size: int = 256
    lr: float = 2e-3
    beta: float = 0.25  # commitment weight
    seed: int = 0
    # CARP: one encoder / decoder / codebook per action dimension, s * A codes at scale s (see above)
    per_dimension: bool = False

    @classmethod
    def tiny(cls) -> "MSVQConfig":
        return cls(codebook_size=32, latent_dim=8, hidden=16, steps=150, batch_size=64, lr=5e-3)

    def build(self) -> "MSVQTokenizer":
        return MSVQTokenizer(self)


def _build_modules(cfg: MSVQConfig, horizon: int, action_dim: int):
    """Encoder, decoder and codebook(s) as one ``nn.ModuleDict`` (its state dict is what is saved).
    G = 1 group (joint) or A groups (per dimension): grouped convs keep the groups' weights apart, and the
    G codebooks are rows ``[g * K, (g + 1) * K)`` of one table. With G = 1 the shapes are the joint layout's."""
    from torch import nn

    import torch.nn.functional as F

    g, hid, d = (action_dim if cfg.per_dimension else 1), cfg.hidden, cfg.latent_dim

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv1d(action_dim, g * hid, 3, padding=1, groups=g), nn.GELU(),
                                     nn.Conv1d(g * hid, g * hid, 3, padding=1, groups=g), nn.GELU(),
                                     nn.Conv1d(g * hid, g * d, 1, groups=g))

        def forward(self, x):  # (N, H, A) -> (N, G*D, T)
            return F.interpolate(self.net(x.transpose(1, 2)), size=cfg.scales[-1], mode="linear", align_corners=False)

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv1d(g * d, g * hid, 3, padding=1, groups=g), nn.GELU(),
                                     nn.Conv1d(g * hid, g * hid, 3, padding=1, groups=g), nn.GELU(),
                                     nn.Conv1d(g * hid, action_dim, 1, groups=g))

        def forward(self, f):  # (N, G*D, T) -> (N, H, A)
            return self.net(F.interpolate(f, size=horizon, mode="linear", align_corners=False)).transpose(1, 2)

    return nn.ModuleDict({"encoder": Encoder(), "decoder": Decoder(),
                          "codebook": nn.Embedding(g * cfg.codebook_size, d)}).double()


def _resize(f, length: int):
    import torch.nn.functional as F

    if f.shape[-1] == length:
        return f
    # "area" averages when shrinking (a coarse scale summarizes its span); linear when growing
    return F.interpolate(f, size=length, mode="area" if length < f.shape[-1] else "linear")


class MSVQTokenizer(ActionTokenizer):
    config: MSVQConfig

    def __init__(self, config: MSVQConfig):
        if not config.scales or any(s < 1 for s in config.scales) or list(config.scales) != sorted(config.scales):
            raise ValueError(f"msvq.scales: expected increasing positive token counts, got {config.scales}")
        if config.codebook_size < 2:
            raise ValueError(f"msvq.codebook_size: expected >= 2, got {config.codebook_size}")
        super().__init__(config)
        self.modules = None  # nn.ModuleDict, built in fit / from_pretrained (needs H and A)

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def groups(self) -> int:
        """G: separately quantized signals, 1 (the joint chunk) or A (``per_dimension``; needs the fitted A)."""
        if not self.config.per_dimension:
            return 1
        if self.action_dim is None:
            raise RuntimeError("msvq per_dimension: the code layout depends on the action dim; fit (or load) the "
                               "tokenizer first")
        return self.action_dim

    @property
    def num_codes(self) -> int:
        """L: codes per chunk (sum of the scales, times A per dimension)."""
        return int(sum(self.scale_sizes()))

    def scale_sizes(self) -> list[int]:
        """Codes at each scale, coarse first: s (joint) or s * A (per dimension)."""
        return [int(s) * self.groups for s in self.config.scales]

    def scale_slices(self) -> list[slice]:
        """Where each scale's codes sit in a code row, coarse first."""
        sizes = self.scale_sizes()
        ends = np.cumsum(sizes)
        return [slice(int(e - n), int(e)) for n, e in zip(sizes, ends)]

    # --- latent (N, G*D, T) <-> tokens (N, s*G, D): position-major, group-minor ----------------------
    def _tokens_at(self, f, s: int):
        """f (N, G*D, T') seen at scale s -> (N, s*G, D)."""
        n, gd, _ = f.shape
        g = self.groups
        return _resize(f, s).view(n, g, gd // g, s).permute(0, 3, 1, 2).reshape(n, s * g, gd // g)

    def _latent_of(self, q):
        """(N, s*G, D) scale tokens -> (N, G*D, T) added at full length."""
        n, sg, d = q.shape
        g = self.groups
        f = q.view(n, sg // g, g, d).permute(0, 2, 3, 1).reshape(n, g * d, sg // g)
        return _resize(f, self.config.scales[-1])

    def _code_rows(self, codes):
        """(N, s*G) code ids -> rows of the (G*K, D) table: each position reads its own group's codebook."""
        import torch

        g = self.groups
        offsets = (torch.arange(codes.shape[1]) % g) * self.config.codebook_size
        return codes + offsets.to(codes.device)

    def _per_group(self, x):
        """(N, s*G, C) -> (G, N*s, C): the rows each group's codebook sees."""
        n, sg, c = x.shape
        g = self.groups
        return x.view(n, sg // g, g, c).permute(2, 0, 1, 3).reshape(g, n * (sg // g), c)

    def _from_groups(self, y, n: int):
        """(G, N*s, C) -> (N, s*G, C), the inverse of ``_per_group``."""
        g, ns, c = y.shape
        return y.view(g, n, ns // n, c).permute(1, 2, 0, 3).reshape(n, (ns // n) * g, c)

    def _book(self):
        """(G, K, D) codebooks."""
        w = self.modules["codebook"].weight
        return w.view(self.groups, self.config.codebook_size, w.shape[1])

    # --- quantization ---------------------------------------------------------------------------
    def _quantize(self, f):
        """f (N, G*D, T) -> f_hat (N, G*D, T), codes (N, L), vq loss (scalar)."""
        import torch

        book, table = self._book(), self.modules["codebook"].weight
        f_hat = torch.zeros_like(f)
        codes, loss = [], f.new_zeros(())
        for s in self.config.scales:
            r = self._tokens_at(f - f_hat.detach(), s)  # (N, s*G, D): what is still missing, at scale s
            k = self._from_groups(torch.cdist(self._per_group(r), book).argmin(-1)[..., None], len(r))[..., 0]
            q = table[self._code_rows(k)]  # (N, s*G, D)
            # codebook term pulls entries to the residuals; commitment keeps the encoder near the entries
            loss = loss + ((q - r.detach()) ** 2).mean() + self.config.beta * ((r - q.detach()) ** 2).mean()
            q_st = r + (q - r).detach()  # straight-through: forward uses q, gradient flows to r
            f_hat = f_hat + self._latent_of(q_st)
            codes.append(k)
        return f_hat, torch.cat(codes, dim=1), loss

    def noisy_codes(self, actions, rate: float, near: int = 4, generator=None):
        """Codes for training a coarse-to-fine head to recover from its own mistakes (scheduled sampling
        without a second forward pass): ``actions`` (N, H, A) -> ``used`` and ``target`` (N, L) long.

        Quantizes like ``encode``, but each code of a scale that is not the finest is, with probability
        ``rate``, replaced in ``used`` by one of its residual's ``near`` next-nearest codebook entries — the
        near-miss a head makes — and the finer scales quantize what is still missing after THAT code. ``target``
        holds the nearest code at every position given what was used before it, so a scale read from a
        mistaken reconstruction learns to correct it. With ``rate=0`` both equal ``encode``'s codes."""
        import torch

        self._require_fitted("noisy_codes")
        if not 0 <= rate < 1:
            raise ValueError(f"rate: expected 0 <= rate < 1, received {rate!r}")
        near = min(int(near), self.config.codebook_size - 1)
        book, table = self._book(), self.modules["codebook"].weight
        x = torch.from_numpy(self._check_shape(as_chunks(actions))).to(table.dtype)
        with torch.no_grad():
            f = self.modules["encoder"](x)
            f_hat, used, target = torch.zeros_like(f), [], []
            for k, s in enumerate(self.config.scales):
                r = self._tokens_at(f - f_hat, s)  # (N, s*G, D)
                order = torch.cdist(self._per_group(r), book).topk(near + 1, largest=False).indices  # (G, N*s, 1+near)
                ranked = self._from_groups(order, len(r))  # (N, s*G, 1+near), nearest first
                best, used_k = ranked[..., 0], ranked[..., 0]
                if k < len(self.config.scales) - 1 and near > 0 and rate > 0:  # the finest scale feeds nothing
                    flip = torch.rand(best.shape, generator=generator) < rate
                    pick = torch.randint(1, near + 1, best.shape, generator=generator)
                    used_k = torch.where(flip, ranked.gather(-1, pick[..., None])[..., 0], best)
                f_hat = f_hat + self._latent_of(table[self._code_rows(used_k)])
                used.append(used_k)
                target.append(best)
        return torch.cat(used, 1), torch.cat(target, 1)

    def _codes_to_latent(self, codes):
        f_hat = self.empty_latent(codes.shape[0])
        for sl in self.scale_slices():
            f_hat = self.add_scale(f_hat, codes[:, sl])
        return f_hat

    # --- fit / encode / decode ------------------------------------------------------------------
    def _fit(self, x: np.ndarray) -> None:
        import torch

        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.modules = _build_modules(cfg, self.horizon, self.action_dim)
        data = torch.from_numpy(x)
        with torch.no_grad():  # codebook init: encoder outputs at random positions (per group), residual-sized
            f = self.modules["encoder"](data[torch.randperm(len(data), generator=g)[:1024]])
            pts = self._per_group(self._tokens_at(f, f.shape[-1]))  # (G, n*T, D)
            idx = torch.randint(pts.shape[1], (self.groups, cfg.codebook_size), generator=g)
            self._book().copy_(torch.gather(pts, 1, idx[..., None].expand(-1, -1, pts.shape[2])))
        opt = torch.optim.Adam(self.modules.parameters(), lr=cfg.lr)
        self.modules.train()
        for step in range(cfg.steps):
            batch = data[torch.randint(len(data), (min(cfg.batch_size, len(data)),), generator=g)]
            f_hat, _, vq_loss = self._quantize(self.modules["encoder"](batch))
            loss = ((self.modules["decoder"](f_hat) - batch) ** 2).mean() + vq_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for group in opt.param_groups:  # cosine decay: the last steps settle the codebook
                group["lr"] = cfg.lr * 0.5 * (1 + np.cos(np.pi * (step + 1) / cfg.steps))
        self.modules.eval()
        self.modules.requires_grad_(False)

    def _encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.no_grad():
            _, codes, _ = self._quantize(self.modules["encoder"](torch.from_numpy(x)))
        codes = codes.numpy()
        return codes, np.ones(codes.shape, dtype=bool)

    def _decode(self, codes: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        valid = self._fixed_length_checks(codes, mask, self.num_codes, self.config.codebook_size)
        safe = torch.from_numpy(np.where(valid[:, None], codes, 0))
        with torch.no_grad():
            out = self.modules["decoder"](self._codes_to_latent(safe))
        return out.numpy(), valid

    # --- scale-by-scale access for the coarse-to-fine head (torch tensors in, torch tensors out) -----
    def empty_latent(self, n: int):
        """(n, G*D, T) zeros: the reconstruction before any scale is known."""
        import torch

        book = self.modules["codebook"].weight
        return torch.zeros(n, self.groups * book.shape[1], self.config.scales[-1], dtype=book.dtype)

    def add_scale(self, f_hat, scale_codes):
        """f_hat (N, G*D, T) + the codes of one scale (N, s*G) -> f_hat with that scale's correction added."""
        q = self.modules["codebook"].weight[self._code_rows(scale_codes.cpu())]  # (N, s*G, D)
        return f_hat + self._latent_of(q)

    def add_expected_scale(self, f_hat, probs):
        """f_hat (N, G*D, T) + the expected codebook vector of one scale under ``probs`` (N, s*G, K) -> f_hat:
        the soft counterpart of ``add_scale`` (a head's ``greedy='expected'`` decoding)."""
        book = self._book()
        p = self._per_group(probs.to(device=book.device, dtype=book.dtype))  # (G, N*s, K)
        return f_hat + self._latent_of(self._from_groups(p @ book, len(probs)))

    def scale_input(self, f_hat, k: int):
        """What scale ``k`` is predicted from: the reconstruction so far, seen at that scale -> (N, s_k*G, D)."""
        return self._tokens_at(f_hat, self.config.scales[k])

    def teacher_inputs(self, codes):
        """Codes (N, L) of a real chunk -> (N, L, D): each scale's input computed from the coarser scales'
        true codes (scale 0's input is all zeros), for training all scales in one pass."""
        import torch

        f_hat, parts = self.empty_latent(codes.shape[0]), []
        for k, sl in enumerate(self.scale_slices()):
            parts.append(self.scale_input(f_hat, k))
            f_hat = self.add_scale(f_hat, codes[:, sl])
        return torch.cat(parts, dim=1)

    def decode_latent(self, f_hat):
        """Decoder only: latent ``(N, G*D, T)`` tensor -> actions ``(N, H, A)`` tensor (for heads that
        predict codes scale by scale and want the partial reconstruction)."""
        return self.modules["decoder"](f_hat.to(self.modules["codebook"].weight.dtype))

    # --- persistence ----------------------------------------------------------------------------
    def _state(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in self.modules.state_dict().items()}

    def _load_state(self, state: dict[str, np.ndarray]) -> None:
        import torch

        self.modules = _build_modules(self.config, self.horizon, self.action_dim)
        self.modules.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        self.modules.eval()
        self.modules.requires_grad_(False)
