"""Action-conditioned latent world model (NORA-1.5's reward model; World-Env's virtual environment).

Observations become latents with a FROZEN encoder (the backbone of a policy checkpoint); a small
causal transformer predicts the latents after each action of a chunk from the current latent and
the actions. A second small network predicts the episode's final latent (the "goal") from the current
one, for callers that have no goal frame (test-time selection on a robot).

    wm = WorldModel.from_pretrained("outputs/post_training/wm/checkpoints/last/world_model")
    z = wm.encode(obs)                          # Observation (normalized) -> (B, D) latent
    z = wm.latent_from_prefix(prefix)           # same, from a Prefix of the SAME frozen backbone
    futures = wm.predict(obs, chunks)           # chunks (B, N, H, A) normalized -> (B, N, H, D)
    r = wm.reward(obs, chunks, goal)            # -> (B, N) goal progress (higher is better)
    r = wm.reward(obs, chunks)                  # goal=None: the goal head's predicted final latent

Public API (stable; the ``world_model`` chunk selector builds on it):

* ``encode(obs) -> (B, D)``; ``latent_from_prefix(prefix) -> (B, D)``
* ``predict(obs_or_latent, chunks, is_pad=None) -> (B, N, H, D)``: latent after action k at [..., k, :].
  ``obs_or_latent``: an :class:`~vla.types.Observation`, a :class:`~vla.types.Prefix` or a (B, D) latent.
  ``chunks``: (B, N, H, A) or (B, H, A) normalized with the encoder policy's statistics
  (A = the policy's max_action_dim; padded dims are zero).
* ``predict_goal(obs_or_latent) -> (B, D)``
* ``reward(obs_or_latent, chunks, goal=None) -> (B, N)``: ``||z - g|| - ||z_hat_H - g||``, the distance
  to the goal latent the chunk is predicted to remove. ``goal``: Observation, Prefix, (B, D) latent or None.
* ``save_pretrained(path)`` / ``from_pretrained(path, device, encoder=None)``.

Latent: the mean over valid prefix tokens of the backbone's last hidden state, concatenated with the
normalized robot state, standardized per dimension with statistics of the training set (so every
dimension is on one scale), the state dimensions then multiplied by ``state_weight`` (their say in
distances: W hidden dims would otherwise outvote S state dims). Why the frozen
backbone: a fixed target space cannot collapse, and the policy already computes the prefix, so a
selector gets the current latent for free. The encoder checkpoint is referenced, not copied: the
world model keeps the backbone it was trained with even after the policy is fine-tuned (DPO).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from vla.types import Observation, Prefix

WM_CONFIG_NAME = "world_model_config.json"
WM_WEIGHTS_NAME = "world_model.safetensors"


@dataclass
class WorldModelConfig:
    latent_dim: int = 0  # D, filled in from the encoder (hidden_size + max_state_dim)
    hidden_dim: int = 0  # W, the encoder backbone's hidden size (the first W latent dims)
    action_dim: int = 0  # A, the policy's max_action_dim
    chunk_size: int = 0  # H, the policy's chunk size
    width: int = 256
    num_layers: int = 3
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    state_weight: float = 1.0  # weight of the state dims in the standardized latent (distances, losses)
    # Encode under bf16 autocast (~3x faster on a CPU with avx512_bf16); training latents were made the
    # same way, so encode() must match how the cache was built.
    bf16_encode: bool = True

    def check(self) -> None:
        for name in ("latent_dim", "hidden_dim", "action_dim", "chunk_size", "width", "num_layers", "num_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"world_model.{name}: expected a positive int, received {v!r}")
        if self.width % self.num_heads:
            raise ValueError(f"world_model.width {self.width} is not divisible by num_heads {self.num_heads}")


def pool_prefix(prefix: Prefix) -> Tensor:
    """Mean of the last hidden state over valid prefix tokens: (B, T, W) -> (B, W) float32."""
    m = prefix.mask[..., None].float()
    return (prefix.hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)


class WorldModel(nn.Module):
    def __init__(self, cfg: WorldModelConfig, encoder=None, encoder_path: str | None = None):
        """``encoder``: a VLAPolicy whose backbone (frozen here) and preprocessor define the latent."""
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.encoder_path = encoder_path
        # Kept out of the module tree: the encoder is not part of this model's weights or optimizer.
        # Never frozen in place here: the caller may be fine-tuning that very policy (encode() runs
        # under no_grad instead).
        self._encoder = [encoder] if encoder is not None else []
        w, d, h = cfg.width, cfg.latent_dim, cfg.chunk_size
        self.register_buffer("latent_mean", torch.zeros(d))
        self.register_buffer("latent_std", torch.ones(d))
        self.latent_in = nn.Linear(d, w)
        self.action_in = nn.Linear(cfg.action_dim, w)
        self.step_embed = nn.Parameter(torch.zeros(h + 1, w))
        nn.init.normal_(self.step_embed, std=0.02)
        layer = nn.TransformerEncoderLayer(w, cfg.num_heads, int(w * cfg.mlp_ratio), cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(w)
        self.delta_out = nn.Linear(w, d)
        # Zero-initialized output: at step 0 the model IS the copy-last-frame baseline, and training
        # only has to learn the change a chunk causes.
        nn.init.zeros_(self.delta_out.weight)
        nn.init.zeros_(self.delta_out.bias)
        self.goal_net = nn.Sequential(nn.Linear(d, w), nn.GELU(), nn.Linear(w, w), nn.GELU(), nn.Linear(w, d))
        nn.init.zeros_(self.goal_net[-1].weight)
        nn.init.zeros_(self.goal_net[-1].bias)
        # Token 0 is the current latent; action token k sees it and actions 0..k (causal in time).
        n = h + 1
        self.register_buffer("causal", torch.triu(torch.ones(n, n, dtype=torch.bool), 1), persistent=False)

    # --- latents -------------------------------------------------------------------------------
    @property
    def encoder(self):
        if not self._encoder:
            raise RuntimeError("this WorldModel has no encoder policy: pass encoder= or load it with "
                               "WorldModel.from_pretrained, or give latents (B, D) instead of observations")
        return self._encoder[0]

    def standardize(self, raw: Tensor) -> Tensor:
        """(.., D) raw latent -> per-dim standardized, state dims times ``state_weight``."""
        z = (raw - self.latent_mean) / self.latent_std
        w = self.cfg.hidden_dim
        return torch.cat([z[..., :w], self.cfg.state_weight * z[..., w:]], dim=-1)

    @property
    def state_dim(self) -> int:
        return self.cfg.latent_dim - self.cfg.hidden_dim

    def raw_latent_from_prefix(self, prefix: Prefix) -> Tensor:
        """(B, W + S) unstandardized latent: pooled prefix hidden + normalized state."""
        state = prefix.extras.get("state")
        if state is None:
            raise KeyError("prefix.extras has no 'state': build the prefix with VLAPolicy.encode")
        return torch.cat([pool_prefix(prefix), state.float()], dim=-1)

    def latent_from_prefix(self, prefix: Prefix) -> Tensor:
        """(B, D) standardized latent from a prefix computed by the world model's own encoder backbone."""
        z = self.raw_latent_from_prefix(prefix)
        if z.shape[-1] != self.cfg.latent_dim:
            raise ValueError(f"latent dim: the world model expects {self.cfg.latent_dim}, the prefix gives "
                             f"{z.shape[-1]} (a prefix from a different backbone?)")
        return self.standardize(z.to(self.latent_mean.device))

    @torch.no_grad()
    def encode(self, obs: Observation) -> Tensor:
        """Observation (normalized, as the policy's preprocessor makes it) -> (B, D) latent."""
        enc = self.encoder
        dev = enc.device
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.cfg.bf16_encode):
            prefix = enc.encode(obs.to(dev))
        return self.latent_from_prefix(prefix)

    def _latent(self, x) -> Tensor:
        if isinstance(x, Observation):
            return self.encode(x)
        if isinstance(x, Prefix):
            return self.latent_from_prefix(x)
        if isinstance(x, Tensor):
            if x.ndim != 2 or x.shape[-1] != self.cfg.latent_dim:
                raise ValueError(f"latent: expected shape (B, {self.cfg.latent_dim}), received {tuple(x.shape)}")
            return x
        raise TypeError(f"expected an Observation, a Prefix or a (B, D) latent tensor, received {type(x).__name__}")

    # --- dynamics ------------------------------------------------------------------------------
    def forward(self, z: Tensor, chunks: Tensor) -> Tensor:
        """z (M, D) standardized, chunks (M, H, A) -> (M, H, D) predicted latents after each action."""
        _, h, a = chunks.shape
        if h != self.cfg.chunk_size or a != self.cfg.action_dim:
            raise ValueError(f"chunks: expected (.., {self.cfg.chunk_size}, {self.cfg.action_dim}) "
                             f"(chunk_size, action_dim), received {tuple(chunks.shape)}")
        p = self.latent_mean.dtype
        tok = torch.cat([self.latent_in(z.to(p))[:, None], self.action_in(chunks.to(p))], dim=1)
        tok = tok + self.step_embed[None]
        out = self.norm(self.blocks(tok, mask=self.causal))
        # Output k+1 (after action k) = current latent + cumulative change predicted at that token.
        return z[:, None].to(p) + self.delta_out(out[:, 1:])

    def predict(self, obs_or_latent, chunks: Tensor) -> Tensor:
        """-> (B, N, H, D) latents after each action of each chunk (N axis added if chunks is (B, H, A))."""
        z = self._latent(obs_or_latent)
        squeeze = chunks.ndim == 3
        c = chunks[:, None] if squeeze else chunks
        if c.ndim != 4 or c.shape[0] != z.shape[0]:
            raise ValueError(f"chunks: expected (B, N, H, A) or (B, H, A) with B={z.shape[0]}, "
                             f"received {tuple(chunks.shape)}")
        b, n = c.shape[:2]
        out = self(z.repeat_interleave(n, 0), c.reshape(b * n, *c.shape[2:]).to(z.device))
        out = out.view(b, n, *out.shape[1:])
        return out[:, 0] if squeeze else out

    def predict_goal(self, obs_or_latent) -> Tensor:
        """(B, D) predicted latent of the episode's last frame."""
        z = self._latent(obs_or_latent)
        return z + self.goal_net(z)

    def reward(self, obs_or_latent, chunks: Tensor, goal=None) -> Tensor:
        """(B, N) goal progress of each chunk: distance to the goal before minus predicted after."""
        z = self._latent(obs_or_latent)
        g = self.predict_goal(z) if goal is None else self._latent(goal)
        c = chunks[:, None] if chunks.ndim == 3 else chunks
        final = self.predict(z, c)[:, :, -1]  # (B, N, D)
        before = (z - g).norm(dim=-1)  # (B,)
        return before[:, None] - (final - g[:, None]).norm(dim=-1)

    # --- save / load -----------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        enc = None
        if self.encoder_path is not None:
            # Relative to the world-model folder (as LoRA adapters do) so a moved output tree still loads.
            enc = os.path.relpath(Path(self.encoder_path).resolve(), path.resolve())
        (path / WM_CONFIG_NAME).write_text(json.dumps({"config": asdict(self.cfg), "encoder": enc}, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path / WM_WEIGHTS_NAME))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", encoder=None) -> "WorldModel":
        """Load a world model; its encoder policy is loaded from the saved pointer unless given."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / WM_CONFIG_NAME).exists():
            raise FileNotFoundError(f"{path} is not a world-model checkpoint: no {WM_CONFIG_NAME} in it")
        meta = json.loads((path / WM_CONFIG_NAME).read_text())
        enc_path = None
        if meta.get("encoder") is not None:
            enc_path = (path / meta["encoder"]).resolve()
            if encoder is None:
                if not enc_path.exists():
                    raise FileNotFoundError(f"world model {path} needs its encoder policy {enc_path}, which does "
                                            "not exist (pass encoder=)")
                from vla.policy import VLAPolicy

                encoder = VLAPolicy.from_pretrained(enc_path, device=device)
        wm = cls(WorldModelConfig(**meta["config"]), encoder=encoder, encoder_path=str(enc_path) if enc_path else None)
        missing, unexpected = wm.load_state_dict(load_file(str(path / WM_WEIGHTS_NAME)), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        return wm.to(device).eval()


def world_model_for(policy, encoder_path: str | None = None, **overrides) -> WorldModel:
    """A fresh world model whose latent space is ``policy``'s frozen backbone (+ its state)."""
    pc = policy.config
    cfg = WorldModelConfig(latent_dim=policy.backbone.hidden_size + pc.max_state_dim,
                           hidden_dim=policy.backbone.hidden_size,
                           action_dim=pc.max_action_dim, chunk_size=pc.chunk_size, **overrides)
    return WorldModel(cfg, encoder=policy, encoder_path=encoder_path)
