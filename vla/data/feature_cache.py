"""Frozen-encoder feature cache: run the vision encoder once per frame, then train from memory.

With a frozen encoder (``backbone.freeze_vision``) its output depends on the pixels alone, yet plain
training decodes the video frame and runs the encoder again every time a sample is drawn. On the
2-core CPU machine that is about a third of a MetaWorld step (AV1 decoding in the loader worker
competing for the same cores + the EfficientNet forward): the cache takes the `metaworld` preset from
~76–79 to ~116 samples/s. ``vla train --cache_features=K`` instead:

1. decodes every frame once and encodes it under ``K`` random crops (the train-time augmentation,
   ``dataset.crop_scale``; with ``crop_scale=1`` every view is the same and ``K=1`` suffices);
2. keeps the feature maps (in the encoder's output dtype: bf16 under ``--bf16``), the normalized
   state, the prompt tokens and the raw action chunks in memory;
3. serves each training sample with one of its ``K`` views drawn at random (the global RNG, so
   ``--resume`` stays exact; building the cache uses its own seeded torch RNG and leaves the global
   one untouched; lerobot's item loading draws no random numbers).

Memory: frames x K x F x h x w values — MetaWorld MT10 x 50 (40,872 frames, 112 x 8 x 8 bf16
features) with K=4 is 2.3 GB. The model trained this way is the same model: evaluation and robots
still run the encoder on live images.

``--cache_dir=DIR`` keeps the cache on disk under a key of everything its tensors depend on (the dataset's
files, the preprocessing that reaches the encoder, the encoder's weights and buffers, K, the seed, the
batch size, bf16, the device type): a later run with the same key — another head on the same data, a
resumed run — loads it in seconds instead of re-encoding for minutes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from vla.types import Observation

log = logging.getLogger(__name__)


def check_cacheable(backbone: torch.nn.Module) -> None:
    """The cache is only correct when the encoder is frozen and is a separate step of the backbone."""
    name = type(backbone).__name__
    if not hasattr(backbone, "encode_images"):
        raise ValueError(f"cache_features: backbone {name} has no separate image encoder to cache "
                         "(supported: timm_lm); set --cache_features=0")
    trainable = [n for n, p in backbone.vision.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(f"cache_features: the vision encoder must be frozen (--policy.backbone.freeze_vision=true, "
                         f"and no LoRA on it), got {len(trainable)} trainable encoder tensors, e.g. {trainable[0]!r}")
    # A stochastic encoder (dropout / drop-path active in training) has no single output to cache.
    dropout = torch.nn.modules.dropout._DropoutNd  # Dropout, Dropout2d, ... (timm's DropPath has drop_prob)
    noisy = [n for n, m in backbone.vision.named_modules()
             if float(m.p if isinstance(m, dropout) else getattr(m, "drop_prob", 0.0)) > 0]
    if noisy:
        raise ValueError(f"cache_features: the vision encoder is stochastic in training (dropout/drop-path in "
                         f"{noisy[:3]}); its output cannot be cached")


@dataclass
class FeatureCache:
    """Everything a training step reads, for every frame of the dataset.

    features:    camera slot -> (K, N, F, h, w) encoder output of K augmented views of N frames
    image_masks: camera slot -> (N,) bool
    state, state_mask: (N, S) normalized and padded, as the preprocessor makes them
    prompt_ids, prompt_mask: (N, L) right-padded to the policy's max_prompt_len
    actions:     raw action fields (``<action_key>`` (N, H, A) and ``<action_key>_is_pad`` (N, H)),
                 normalized per batch by ``Preprocessor.actions`` like uncached training does
    """

    features: dict[str, Tensor]
    image_masks: dict[str, Tensor]
    state: Tensor
    state_mask: Tensor
    prompt_ids: Tensor
    prompt_mask: Tensor
    actions: dict[str, Tensor]

    @property
    def num_views(self) -> int:
        return int(next(iter(self.features.values())).shape[0])

    def __len__(self) -> int:
        return int(self.state.shape[0])

    def batch(self, indices: list[int]) -> tuple[Observation, dict[str, Tensor]]:
        """One training batch: (Observation with ``image_features``, raw action fields)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        mask = self.prompt_mask[idx]
        width = max(1, int(mask.sum(1).max()))  # trim the shared right padding, as the tokenizer does
        obs = Observation(
            images={}, image_masks={c: m[idx] for c, m in self.image_masks.items()},
            state=self.state[idx], state_mask=self.state_mask[idx],
            prompt_ids=self.prompt_ids[idx, :width], prompt_mask=mask[:, :width],
            # a random augmented view per sample and camera
            image_features={c: f[torch.randint(self.num_views, (len(idx),)), idx] for c, f in self.features.items()},
        )
        return obs, {k: v[idx] for k, v in self.actions.items()}


CACHE_FORMAT = 1  # bump when what is stored, or how it is built, changes


def _dataset_identity(dataset) -> dict:
    """The dataset's folder, episode selection and every file's size and modification time."""
    root = getattr(dataset, "root", None)
    files = []
    if root is not None and Path(root).is_dir():
        for dirpath, _, names in os.walk(root):
            for n in sorted(names):
                st = os.stat(os.path.join(dirpath, n))
                files.append([os.path.relpath(os.path.join(dirpath, n), root), st.st_size, st.st_mtime_ns])
    return {"root": str(Path(root).resolve()) if root is not None else repr(dataset), "frames": len(dataset),
            "episodes": getattr(dataset, "episodes", None), "files": sorted(files)}


def cache_key(dataset, preprocessor, backbone, *, views: int, seed: int, batch_size: int, bf16: bool,
              device: torch.device | str) -> str:
    """A hex digest of everything the cached tensors depend on, and nothing else: the head (and its
    config) is not part of it, so heads trained on the same data and encoder share one cache."""
    from vla.config import to_dict

    cfg = preprocessor.cfg
    meta = {"format": CACHE_FORMAT, "views": views, "seed": seed, "batch_size": batch_size, "bf16": bool(bf16),
            "device": torch.device(device).type, "torch": torch.__version__, "dataset": _dataset_identity(dataset),
            "preprocessor": preprocessor.state_dict(), "crop_scale": preprocessor.crop_scale,
            "policy": {k: getattr(cfg, k) for k in ("cameras", "image_size", "max_prompt_len", "max_state_dim")},
            "backbone": to_dict(cfg.backbone)}
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for name, t in sorted(backbone.vision.state_dict().items()):  # weights and BatchNorm statistics
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def save_feature_cache(cache: FeatureCache, path: Path) -> None:
    """Write atomically (a temporary file, then a rename): a killed run never leaves half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(asdict(cache), tmp)
    os.replace(tmp, path)


def load_feature_cache(path: Path) -> FeatureCache:
    return FeatureCache(**torch.load(path, weights_only=True))


@torch.no_grad()
def build_feature_cache(dataset, preprocessor, backbone, *, views: int, seed: int = 0, batch_size: int = 64,
                        num_workers: int = 0, bf16: bool = False, device: torch.device | str = "cpu",
                        cache_dir: str | Path | None = None) -> FeatureCache:
    """Decode and encode every frame of ``dataset`` (``views`` random crops each) -> :class:`FeatureCache`.

    ``cache_dir``: load the cache from there when one with the same :func:`cache_key` exists, else build
    it and store it there."""
    if views < 1:
        raise ValueError(f"cache_features: expected the number of augmented views >= 1, got {views}")
    check_cacheable(backbone)
    path = None
    if cache_dir is not None:
        key = cache_key(dataset, preprocessor, backbone, views=views, seed=seed, batch_size=batch_size, bf16=bf16,
                        device=device)
        path = Path(cache_dir) / f"features-{key}.pt"
    if path is not None and path.is_file():
        t0 = time.perf_counter()
        cache = load_feature_cache(path)
        log.info("feature cache: loaded %s (%d frames x %d views) in %.1f s", path, len(cache), cache.num_views,
                 time.perf_counter() - t0)
        return cache
    cache = _encode_all(dataset, preprocessor, backbone, views, seed, batch_size, num_workers, bf16, device)
    if path is not None:
        save_feature_cache(cache, path)
        log.info("feature cache: saved to %s", path)
    return cache


def _encode_all(dataset, preprocessor, backbone, views: int, seed: int, batch_size: int, num_workers: int,
                bf16: bool, device: torch.device | str) -> FeatureCache:
    from tqdm.auto import tqdm

    device = torch.device(device)
    if views > 1 and preprocessor.crop_scale >= 1.0:
        log.warning("cache_features=%d with dataset.crop_scale=1: every view is the same image (use 1 view, or "
                    "crop_scale < 1 for augmentation)", views)
    max_len = preprocessor.cfg.max_prompt_len
    act_key = preprocessor.action_key
    pad_key = f"{act_key}_is_pad"
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    parts: dict[str, list] = {}
    # The features (nearly all of the cache) go straight into their final tensors: collecting per-batch
    # pieces and concatenating them at the end held both copies at once (2x the cache at peak).
    features: dict[str, Tensor] = {}
    done = 0
    was_training = backbone.training
    backbone.eval()
    t0 = time.perf_counter()
    # Its own RNG stream: the crops are reproducible (a resumed run rebuilds the same cache) and the
    # training run's global RNG is not consumed.
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), autocast:
        torch.manual_seed(seed)
        for batch in tqdm(loader, desc=f"feature cache ({views} views)", dynamic_ncols=True, mininterval=2.0):
            per_view = [preprocessor.observation(batch, train=True) for _ in range(views)]
            first = per_view[0]
            b = first.state.shape[0]
            for slot in first.images:
                feats = torch.stack([backbone.encode_images(o.images[slot].to(device)).cpu() for o in per_view])
                if slot not in features:  # (K, N, F, h, w), allocated once the encoder's output shape is known
                    features[slot] = torch.empty((views, len(dataset), *feats.shape[2:]), dtype=feats.dtype)
                features[slot][:, done:done + b] = feats
                parts.setdefault(f"m:{slot}", []).append(first.image_masks[slot].cpu())
            done += b
            parts.setdefault("state", []).append(first.state.cpu())
            parts.setdefault("state_mask", []).append(first.state_mask.cpu())
            right = (0, max_len - first.prompt_ids.shape[1])  # pad every batch's prompts to one width
            parts.setdefault("ids", []).append(F.pad(first.prompt_ids.cpu(), right, value=0))
            parts.setdefault("pmask", []).append(F.pad(first.prompt_mask.cpu(), right, value=False))
            parts.setdefault("action", []).append(torch.as_tensor(batch[act_key]))
            if pad_key in batch:
                parts.setdefault("is_pad", []).append(torch.as_tensor(batch[pad_key]))
    backbone.train(was_training)
    if done != len(dataset):
        raise RuntimeError(f"feature cache: the loader gave {done} frames, the dataset has {len(dataset)}")
    actions = {act_key: torch.cat(parts["action"])}
    if "is_pad" in parts:
        actions[pad_key] = torch.cat(parts["is_pad"])
    cache = FeatureCache(
        features=features,
        image_masks={s: torch.cat(parts[f"m:{s}"]) for s in features},
        state=torch.cat(parts["state"]), state_mask=torch.cat(parts["state_mask"]),
        prompt_ids=torch.cat(parts["ids"]), prompt_mask=torch.cat(parts["pmask"]), actions=actions,
    )
    size = sum(f.numel() * f.element_size() for f in cache.features.values())
    log.info("feature cache: %d frames x %d views, %.2f GB of features, built in %.0f s", len(cache), views,
             size / 1e9, time.perf_counter() - t0)
    return cache
