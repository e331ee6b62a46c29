"""Raw LeRobot-keyed data -> the model's normalized, padded, batched tensors (and back for actions).

    pre = Preprocessor(policy_cfg, {"observation.images.top": "cam0"}, state_dim=4, action_dim=3,
                       stats=compute_stats(root), tokenize=backbone.tokenize)
    obs = pre.observation(batch, train=True)          # Observation (always batched)
    actions, is_pad, dim_mask = pre.actions(batch)    # (B, H, A_max), (B, H), (B, A_max)
    raw_chunk = pre.unnormalize_actions(model_out)    # (..., A_max) -> (..., action_dim)

One object serves training and the robot, so the two can never disagree on normalization,
camera mapping or image size. It accepts a DataLoader batch (tensors with a batch dim, images
(B, 3, H, W) float in [0, 1], task a list of str) and a single robot observation (numpy, images
(H, W, 3) uint8 or (3, H, W) float, state (S,), task str). Anything else fails loudly, naming the
key, the expected and the received shape: silent zeros or NaN would train or drive a robot on garbage.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vla.config import DatasetConfig, NormalizationConfig, PolicyConfig
from vla.data.dataset import IMAGE_PREFIX, DatasetSpec, resolve_camera_map
from vla.data.normalize import Normalizer
from vla.data.stats import stats_from_jsonable, stats_to_jsonable
from vla.types import Observation

Tokenize = Callable[[list[str], int], tuple[Tensor, Tensor]]
STATE_DICT_VERSION = 1


class MissingKeyError(KeyError):
    """A KeyError whose message prints without KeyError's extra quotes."""

    def __str__(self) -> str:
        return str(self.args[0])


def _as_tensor(x: Any, key: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{key}: expected an array or tensor, got {type(x).__name__}") from e


def _check_finite(t: Tensor, key: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{key}: {n} NaN/inf values in input of shape {tuple(t.shape)}; expected finite values")


class Preprocessor:
    def __init__(
        self,
        policy_cfg: PolicyConfig,
        camera_map: Mapping[str, str],
        state_dim: int,
        action_dim: int,
        stats: Mapping[str, Mapping[str, np.ndarray]],
        tokenize: Tokenize | None = None,
        *,
        crop_scale: float = 1.0,
        state_key: str = "observation.state",
        action_key: str = "action",
        ignored_cameras: Sequence[str] = (),
        embodiment: str | None = None,
    ):
        """
        camera_map:      dataset camera key -> model slot (from :func:`resolve_camera_map`)
        crop_scale:      train-time random crop of this fraction of each side (eval: center crop)
        ignored_cameras: dataset cameras deliberately left out by the map; present in a batch, they
                         are skipped instead of raising "unknown camera"
        embodiment:      the name of the robot/dataset these statistics belong to (mixtures: one
                         pretrained model serves several robots, each with its own stats, dims, cameras)
        """
        cfg = policy_cfg
        if state_dim > cfg.max_state_dim:
            raise ValueError(f"state_dim {state_dim} > policy.max_state_dim {cfg.max_state_dim}: raise max_state_dim "
                             "(state is never silently truncated)")
        if action_dim > cfg.max_action_dim:
            raise ValueError(f"action_dim {action_dim} > policy.max_action_dim {cfg.max_action_dim}: raise "
                             "max_action_dim (actions are never silently truncated)")
        if state_dim < 1 or action_dim < 1:
            raise ValueError(f"state_dim and action_dim must be >= 1, got {state_dim} and {action_dim}")
        if not 0.0 < crop_scale <= 1.0:
            raise ValueError(f"crop_scale must be in (0, 1], got {crop_scale}")
        for key, slot in camera_map.items():
            if slot not in cfg.cameras:
                raise KeyError(f"camera_map[{key!r}] = {slot!r} is not a model camera slot; "
                               f"policy.cameras are {cfg.cameras}")
        self.cfg = cfg
        self.camera_map = dict(camera_map)
        self.ignored_cameras = [c for c in ignored_cameras if c not in self.camera_map]
        self.slot_to_key = {slot: key for key, slot in self.camera_map.items()}
        self.state_dim, self.action_dim = int(state_dim), int(action_dim)
        self.state_key, self.action_key = state_key, action_key
        self.crop_scale = float(crop_scale)
        self.tokenize = tokenize
        self.embodiment = embodiment
        # name -> single-embodiment state dict of every embodiment the model was trained on (a mixture);
        # saved in preprocessor.json next to this one's, so `for_embodiment` can switch robots.
        self.embodiments: dict[str, dict] = {}
        norm = cfg.normalization
        # Only the two keys the model sees are kept: this is what goes into checkpoints.
        self.stats = {k: stats[k] for k in (state_key, action_key) if k in stats}
        self.normalizer = Normalizer(self.stats, {state_key: norm.state, action_key: norm.action}, norm.eps)
        for key, dim in ((state_key, self.state_dim), (action_key, self.action_dim)):
            have = self.normalizer.dim(key)
            if have is not None and have != dim:
                raise ValueError(f"stats[{key!r}] have dim {have} but the dataset's {key} has dim {dim}")

    @classmethod
    def from_dataset(cls, policy_cfg: PolicyConfig, dataset_cfg: DatasetConfig, spec: DatasetSpec, stats: Mapping,
                     tokenize: Tokenize | None = None) -> "Preprocessor":
        """Wire a preprocessor from configs: camera map resolved, unused dataset cameras ignored."""
        cmap = resolve_camera_map(dataset_cfg.camera_map, spec.cameras, policy_cfg.cameras)
        return cls(policy_cfg, cmap, spec.state_dim, spec.action_dim, stats, tokenize,
                   crop_scale=dataset_cfg.crop_scale, state_key=dataset_cfg.state_key,
                   action_key=dataset_cfg.action_key, ignored_cameras=[c for c in spec.cameras if c not in cmap])

    # --- observation ----------------------------------------------------------------------------
    def _require(self, raw: Mapping[str, Any], key: str) -> Any:
        if key not in raw:
            required = [self.state_key, "task", *self.camera_map]
            raise MissingKeyError(f"missing required key {key!r}; expected keys {required}, "
                                  f"received keys {sorted(raw)}")
        return raw[key]

    def observation(self, raw: Mapping[str, Any], *, train: bool = False) -> Observation:
        """A LeRobot-keyed batch or single observation -> batched, normalized :class:`Observation`."""
        cfg = self.cfg
        state = _as_tensor(self._require(raw, self.state_key), self.state_key)
        if state.ndim not in (1, 2):
            raise ValueError(f"{self.state_key}: expected shape (B, {self.state_dim}) or ({self.state_dim},), "
                             f"got {tuple(state.shape)}")
        batched = state.ndim == 2
        if state.shape[-1] != self.state_dim:
            want = f"({state.shape[0]}, {self.state_dim})" if batched else f"({self.state_dim},)"
            raise ValueError(f"{self.state_key}: expected shape {want}, got {tuple(state.shape)} "
                             f"(the dataset's state dim is {self.state_dim})")
        state = state if batched else state[None]
        b = state.shape[0]
        _check_finite(state, self.state_key)
        device = state.device
        texts = self._tasks(self._require(raw, "task"), b)

        for key in raw:
            if key.startswith(IMAGE_PREFIX) and key not in self.camera_map and key not in self.ignored_cameras:
                ignored = f" (ignored: {self.ignored_cameras})" if self.ignored_cameras else ""
                raise MissingKeyError(f"camera {key!r} is not in the camera map; expected camera keys "
                                      f"{list(self.camera_map)}{ignored}")
        images, masks = {}, {}
        s = cfg.image_size
        for slot in cfg.cameras:
            key = self.slot_to_key.get(slot)
            if key is None:  # the designed "missing camera": no dataset camera feeds this slot
                images[slot] = torch.zeros(b, 3, s, s, device=device)
                masks[slot] = torch.zeros(b, dtype=torch.bool, device=device)
                continue
            img = self._image(self._require(raw, key), key, batched, b).to(device)
            images[slot] = self._crop_resize(img, train)
            masks[slot] = torch.ones(b, dtype=torch.bool, device=device)

        state = self.normalizer.normalize(self.state_key, state.float())
        state_pad = torch.zeros(b, cfg.max_state_dim, device=device)
        state_pad[:, : self.state_dim] = state
        state_mask = torch.zeros(b, cfg.max_state_dim, dtype=torch.bool, device=device)
        state_mask[:, : self.state_dim] = True

        if self.tokenize is None:
            raise RuntimeError("Preprocessor has no tokenize function: pass the backbone's tokenize")
        ids, pmask = self.tokenize(texts, cfg.max_prompt_len)
        if ids.shape[0] != b or pmask.shape != ids.shape:
            raise ValueError(f"tokenize returned ids {tuple(ids.shape)} and mask {tuple(pmask.shape)}; "
                             f"expected ({b}, L)")
        return Observation(images=images, image_masks=masks, state=state_pad, prompt_ids=ids.to(device),
                           prompt_mask=pmask.to(device=device, dtype=torch.bool), state_mask=state_mask)

    def _tasks(self, task: Any, b: int) -> list[str]:
        if isinstance(task, str):
            return [task] * b  # one instruction for the whole batch (the robot case)
        if isinstance(task, (list, tuple, np.ndarray)) and all(isinstance(t, str) for t in task):
            if len(task) != b:
                raise ValueError(f"task: expected {b} strings (one per sample), got {len(task)}")
            return list(task)
        raise TypeError(f"task: expected a str or a list of {b} str, got {type(task).__name__}")

    def _image(self, x: Any, key: str, batched: bool, b: int) -> Tensor:
        """Any accepted image layout -> (B, 3, H, W) float in [0, 1]."""
        t = _as_tensor(x, key)
        want = f"({b}, 3, H, W) or ({b}, H, W, 3)" if batched else "(3, H, W) or (H, W, 3)"
        if t.ndim != (4 if batched else 3):
            raise ValueError(f"{key}: expected image shape {want}, got {tuple(t.shape)}")
        t = t if batched else t[None]
        if t.shape[0] != b:
            raise ValueError(f"{key}: expected image shape {want} (batch {b} like the state), got {tuple(t.shape)}")
        # uint8 camera frames are usually HWC, float tensors from lerobot CHW; decide by where the 3 is.
        chw = t.shape[1] == 3 and not (t.dtype == torch.uint8 and t.shape[-1] == 3)
        if not chw:
            if t.shape[-1] != 3:
                raise ValueError(f"{key}: expected 3 colour channels, image shape {want}, got "
                                 f"{tuple(t.shape) if batched else tuple(t.shape[1:])}")
            t = t.permute(0, 3, 1, 2)
        if t.dtype == torch.bool:
            raise TypeError(f"{key}: expected uint8 or float image, got {t.dtype}")
        if not t.is_floating_point():
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi > 255:
                raise ValueError(f"{key}: integer images must be in [0, 255], got values in [{lo}, {hi}]")
            return t.float() / 255.0
        _check_finite(t, key)
        t = t.float()
        lo, hi = float(t.min()), float(t.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"{key}: float images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}] "
                             "(pass uint8 for 0..255 images)")
        return t.clamp(0.0, 1.0)

    def _crop_resize(self, img: Tensor, train: bool) -> Tensor:
        """(B, 3, H, W) -> (B, 3, S, S). Random crop at train time, the same-size center crop at eval
        time (so train and eval see objects at the same scale), then a bilinear resize."""
        _, _, h, w = img.shape
        if self.crop_scale < 1.0:
            ch, cw = max(1, round(h * self.crop_scale)), max(1, round(w * self.crop_scale))
            if train:
                tops = torch.randint(0, h - ch + 1, (img.shape[0],)).tolist()
                lefts = torch.randint(0, w - cw + 1, (img.shape[0],)).tolist()
                img = torch.stack([im[:, t : t + ch, l : l + cw] for im, t, l in zip(img, tops, lefts)])
            else:
                t, l = (h - ch) // 2, (w - cw) // 2
                img = img[:, :, t : t + ch, l : l + cw]
        s = self.cfg.image_size
        if img.shape[-2:] != (s, s):
            img = F.interpolate(img, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return img.clamp(0.0, 1.0)

    # --- actions ----------------------------------------------------------------------------------
    def actions(self, raw: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """-> actions (B, H, A_max) normalized and zero-padded, is_pad (B, H) bool, dim_mask (B, A_max) bool.

        ``<action_key>_is_pad`` (lerobot marks steps past the episode end) is optional: absent means
        every step is real.
        """
        cfg, key = self.cfg, self.action_key
        if key not in raw:
            raise MissingKeyError(f"missing required key {key!r}; received keys {sorted(raw)}")
        a = _as_tensor(raw[key], key)
        h, ad = cfg.chunk_size, self.action_dim
        if a.ndim not in (2, 3) or tuple(a.shape[-2:]) != (h, ad):
            raise ValueError(f"{key}: expected shape (B, {h}, {ad}) or ({h}, {ad}) (chunk_size {h}, action dim {ad}), "
                             f"got {tuple(a.shape)}")
        batched = a.ndim == 3
        a = (a if batched else a[None]).float()
        _check_finite(a, key)
        b = a.shape[0]
        pad_key = f"{key}_is_pad"
        if pad_key in raw:
            is_pad = _as_tensor(raw[pad_key], pad_key).to(a.device)
            is_pad = is_pad if batched else is_pad[None]
            if tuple(is_pad.shape) != (b, h):
                raise ValueError(f"{pad_key}: expected shape ({b}, {h}), got {tuple(is_pad.shape)}")
            is_pad = is_pad.bool()
        else:
            is_pad = torch.zeros(b, h, dtype=torch.bool, device=a.device)
        out = torch.zeros(b, h, cfg.max_action_dim, device=a.device)
        out[..., :ad] = self.normalizer.normalize(key, a)
        dim_mask = torch.zeros(b, cfg.max_action_dim, dtype=torch.bool, device=a.device)
        dim_mask[:, :ad] = True
        return out, is_pad, dim_mask

    def unnormalize_actions(self, actions: Tensor) -> Tensor:
        """(..., A_max) normalized model output -> (..., action_dim) in the dataset's units.

        Raises on NaN/inf: a non-finite action must never reach a robot.
        """
        a_max = self.cfg.max_action_dim
        if actions.shape[-1] != a_max:
            raise ValueError(f"actions: expected last dim max_action_dim={a_max}, got shape {tuple(actions.shape)}")
        if not bool(torch.isfinite(actions).all()):
            raise ValueError(f"actions: the policy produced NaN/inf in a chunk of shape {tuple(actions.shape)}")
        out = self.normalizer.unnormalize(self.action_key, actions[..., : self.action_dim])
        if not bool(torch.isfinite(out).all()):
            raise ValueError("actions: unnormalized actions are not finite (check the normalization stats)")
        return out

    # --- embodiments (mixtures) -------------------------------------------------------------------
    @property
    def embodiment_names(self) -> list[str]:
        return sorted(self.embodiments) if self.embodiments else ([self.embodiment] if self.embodiment else [])

    def with_embodiments(self, table: Mapping[str, "Preprocessor"]) -> "Preprocessor":
        """Record every embodiment's preprocessor (by name) inside this one's checkpoint state."""
        if self.embodiment not in table:
            raise KeyError(f"embodiment {self.embodiment!r} (this preprocessor) is not in the table {sorted(table)}")
        self.embodiments = {name: p._single_state_dict() for name, p in table.items()}
        return self

    def for_embodiment(self, name: str) -> "Preprocessor":
        """The preprocessor (stats, dims, cameras) of another embodiment the model was trained on."""
        if name == self.embodiment:
            return self
        return Preprocessor.from_state_dict(self.state_dict(), self.cfg, self.tokenize, embodiment=name)

    # --- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to rebuild this preprocessor at inference (json-able).

        A mixture-trained preprocessor also holds ``embodiments`` (name -> the same fields) and its own
        ``embodiment`` name, the default a loaded checkpoint uses.
        """
        d = self._single_state_dict()
        if self.embodiments:
            d["embodiments"] = {name: dict(sd) for name, sd in self.embodiments.items()}
        return d

    def _single_state_dict(self) -> dict:
        n = self.cfg.normalization
        d = {
            "version": STATE_DICT_VERSION,
            "camera_map": dict(self.camera_map),
            "ignored_cameras": list(self.ignored_cameras),
            "state_dim": self.state_dim,
            "action_dim": self.action_dim,
            "state_key": self.state_key,
            "action_key": self.action_key,
            "crop_scale": self.crop_scale,
            "normalization": {"state": n.state, "action": n.action, "eps": n.eps},
            "stats": stats_to_jsonable(self.stats),
        }
        if self.embodiment is not None:
            d["embodiment"] = self.embodiment
        return d

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any], policy_cfg: PolicyConfig,
                        tokenize: Tokenize | None = None, embodiment: str | None = None) -> "Preprocessor":
        """``embodiment`` picks one of a mixture checkpoint's embodiments (None = the saved default)."""
        table = d.get("embodiments") or {}
        if embodiment is not None and embodiment != d.get("embodiment"):
            if embodiment not in table:
                known = sorted(table) or ([d["embodiment"]] if d.get("embodiment") else [])
                raise MissingKeyError(f"unknown embodiment {embodiment!r}; this checkpoint's embodiments are {known}")
            pre = cls._from_single(table[embodiment], policy_cfg, tokenize)
        else:
            pre = cls._from_single(d, policy_cfg, tokenize)
        pre.embodiments = {name: dict(sd) for name, sd in table.items()}
        return pre

    @classmethod
    def _from_single(cls, d: Mapping[str, Any], policy_cfg: PolicyConfig, tokenize: Tokenize | None) -> "Preprocessor":
        if d.get("version") != STATE_DICT_VERSION:
            raise ValueError(f"preprocessor state: expected version {STATE_DICT_VERSION}, got {d.get('version')!r}")
        saved = NormalizationConfig(**d["normalization"])
        if saved != policy_cfg.normalization:
            raise ValueError(f"preprocessor state was saved with normalization {saved} but the policy config "
                             f"says {policy_cfg.normalization}: the model was trained on the saved one")
        return cls(policy_cfg, d["camera_map"], d["state_dim"], d["action_dim"], stats_from_jsonable(d["stats"]),
                   tokenize, crop_scale=d["crop_scale"], state_key=d["state_key"], action_key=d["action_key"],
                   ignored_cameras=d.get("ignored_cameras", ()), embodiment=d.get("embodiment"))
