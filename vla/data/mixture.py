"""A mixture of LeRobot datasets from different robots, trained as one model.

    mix = load_mixture([DatasetConfig(root="data/a"), DatasetConfig(root="data/b", weight=2.0)],
                       policy_cfg, chunk_size=8)
    sampler = MixtureBatchSampler(mix.sizes, mix.probabilities(), batch_size=16, rank=r, world_size=w)
    loader = DataLoader(mix.dataset, batch_sampler=sampler, collate_fn=collate_by_dataset)
    obs, actions, is_pad, dim_mask = mix.preprocess(next(iter(loader)), train=True)

Datasets may differ in cameras (mapped onto the model's camera slots; a slot a robot lacks is the
"missing camera", mask False), in state/action dims (zero-padded to the model's max dims with masks)
and in their statistics: each dataset is normalized with the statistics of its *embodiment* (its
name; datasets of one robot may share a name and are then pooled), and every embodiment's
statistics are saved by name in the checkpoint, so one pretrained model serves several robots.
What cannot be padded (a dim above the model's max, a non-1-D feature, more cameras than slots, one
name for two different robots) fails before training, naming the datasets and the features.

Batches mix datasets: the collate function groups a batch's items by dataset (their image sizes
and dims differ) and :meth:`Mixture.preprocess` runs each group through its own preprocessor, then
concatenates the groups in model space.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from vla.config import DatasetConfig, PolicyConfig
from vla.data.dataset import DatasetSpec, dataset_spec, make_dataset, resolve_camera_map
from vla.data.processor import Preprocessor, Tokenize
from vla.types import Observation

SAMPLE_BY = ("dataset", "frame")


def embodiment_name(cfg: DatasetConfig) -> str:
    """The name a dataset's statistics are kept under: ``embodiment``, else its folder or repo name."""
    if cfg.embodiment:
        return cfg.embodiment
    if cfg.root:
        return Path(cfg.root).name
    return cfg.repo_id.rsplit("/", 1)[-1]


def _label(cfg: DatasetConfig) -> str:
    return f"{embodiment_name(cfg)!r} ({cfg.root or cfg.repo_id})"


def read_specs(cfgs: Sequence[DatasetConfig]) -> list[DatasetSpec]:
    """Metadata of every dataset; a missing or non-1-D state/action feature names the dataset."""
    specs, problems = [], []
    for cfg in cfgs:
        try:
            specs.append(dataset_spec(cfg))
        except (KeyError, ValueError, FileNotFoundError) as e:
            problems.append(f"dataset {_label(cfg)}: {str(e).strip(chr(34) + chr(39))}")
    if problems:
        raise ValueError("mixture: cannot read these datasets:\n  - " + "\n  - ".join(problems))
    return specs


def check_mixture(cfgs: Sequence[DatasetConfig], specs: Sequence[DatasetSpec], policy: PolicyConfig) -> None:
    """Raise one error listing every way the datasets cannot be padded into ``policy``'s inputs."""
    problems: list[str] = []
    dims = ", ".join(f"{embodiment_name(c)}: state {s.state_dim}, action {s.action_dim}, cameras {len(s.cameras)}"
                     for c, s in zip(cfgs, specs))
    for cfg, spec in zip(cfgs, specs):
        if spec.state_dim > policy.max_state_dim:
            problems.append(f"dataset {_label(cfg)}: feature {cfg.state_key!r} has dim {spec.state_dim} > "
                            f"policy.max_state_dim {policy.max_state_dim}")
        if spec.action_dim > policy.max_action_dim:
            problems.append(f"dataset {_label(cfg)}: feature {cfg.action_key!r} has dim {spec.action_dim} > "
                            f"policy.max_action_dim {policy.max_action_dim}")
        try:
            resolve_camera_map(cfg.camera_map, spec.cameras, policy.cameras)
        except (KeyError, ValueError) as e:
            problems.append(f"dataset {_label(cfg)}: cameras {spec.cameras}: {str(e).strip(chr(34) + chr(39))}")
        if not (np.isfinite(cfg.weight) and cfg.weight > 0):
            problems.append(f"dataset {_label(cfg)}: weight must be a positive number, got {cfg.weight}")
    by_name: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        by_name.setdefault(embodiment_name(cfg), []).append(i)
    for name, idx in by_name.items():
        shapes = {(specs[i].state_dim, specs[i].action_dim, cfgs[i].state_key, cfgs[i].action_key) for i in idx}
        if len(shapes) > 1:
            problems.append(f"embodiment {name!r} names datasets of different shapes "
                            f"({', '.join(str(cfgs[i].root or cfgs[i].repo_id) for i in idx)}: (state dim, action "
                            f"dim, state key, action key) = {sorted(shapes)}); give them different "
                            "dataset.embodiment names")
    if problems:
        raise ValueError(f"mixture: these datasets cannot be padded to the model (max_state_dim "
                         f"{policy.max_state_dim}, max_action_dim {policy.max_action_dim}, cameras {policy.cameras}):"
                         "\n  - " + "\n  - ".join(problems) + f"\n(datasets: {dims})")


def embodiment_stats(cfgs: Sequence[DatasetConfig]) -> dict[str, dict[str, np.ndarray]]:
    """Statistics over every frame of the given datasets of ONE embodiment (pooled, exact quantiles)."""
    from vla.data.stats import read_columns, stats_from_array

    keys = (cfgs[0].state_key, cfgs[0].action_key)
    parts = [read_columns(c.root, keys, c.episodes) for c in cfgs]
    return {k: stats_from_array(np.concatenate([p[k] for p in parts]), k) for k in keys}


class MixtureDataset(Dataset):
    """Concatenation of several datasets; each item carries ``dataset_index``."""

    def __init__(self, datasets: Sequence[Any]):
        self.datasets = list(datasets)
        self.sizes = [len(d) for d in self.datasets]
        self.offsets = np.cumsum([0, *self.sizes]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"mixture index {i} out of range [0, {len(self)})")
        d = bisect.bisect_right(self.offsets, i) - 1
        return d, i - self.offsets[d]

    def __getitem__(self, i: int) -> dict:
        d, j = self.locate(int(i))
        item = dict(self.datasets[d][j])
        item["dataset_index"] = d
        return item


def collate_by_dataset(items: list[dict]) -> dict:
    """-> {"groups": [(dataset_index, collated sub-batch), ...]} in dataset order (shapes differ across)."""
    from torch.utils.data import default_collate

    by: dict[int, list[dict]] = {}
    for it in items:
        by.setdefault(int(it["dataset_index"]), []).append(it)
    return {"groups": [(d, default_collate(by[d])) for d in sorted(by)]}


def apportion(total: int, probs: Sequence[float]) -> list[int]:
    """Largest-remainder split of ``total`` slots by ``probs`` (sums to ``total``)."""
    raw = np.asarray(probs, np.float64) * total
    out = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - out), kind="stable")[: total - int(out.sum())]:
        out[i] += 1
    return out.tolist()


class MixtureBatchSampler(Sampler[list[int]]):
    """Infinite, resumable, rank-sharded batches over a mixture.

    Every global batch (``batch_size x world_size`` items) holds a fixed number of items of each
    dataset (its probability times the global batch, largest remainder), so the k-th item ever drawn
    from dataset d is known without history: item k is position k of d's shuffled epoch
    ``k // len(d)``. The only state is the number of batches handed out (``start_batch``): a resumed
    run sees exactly the batches an uninterrupted one would, whatever the number of loader workers.
    The global batch is shuffled and rank r takes slice r, so ranks never share an item.
    """

    def __init__(self, sizes: Sequence[int], probs: Sequence[float], batch_size: int, seed: int = 0,
                 start_batch: int = 0, rank: int = 0, world_size: int = 1, names: Sequence[str] | None = None):
        names = list(names) if names is not None else [str(i) for i in range(len(sizes))]
        if len(sizes) != len(probs) or not sizes:
            raise ValueError(f"MixtureBatchSampler: {len(sizes)} datasets but {len(probs)} probabilities")
        empty = [n for n, s in zip(names, sizes) if s < 1]
        if empty:
            raise ValueError(f"mixture: datasets {empty} have no frames")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.sizes, self.bs, self.seed = [int(s) for s in sizes], int(batch_size), int(seed)
        self.rank, self.world, self.start_batch = rank, world_size, int(start_batch)
        self.global_batch = self.bs * self.world
        self.quota = apportion(self.global_batch, probs)
        starved = [f"{n} (p={p:.3g})" for n, p, q in zip(names, probs, self.quota) if q == 0]
        if starved:
            raise ValueError(f"mixture: a global batch of {self.global_batch} (batch_size {self.bs} x {self.world} "
                             f"ranks) gives no slot to datasets {starved}; raise batch_size or their weight")
        self.offsets = np.cumsum([0, *self.sizes]).tolist()
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def fractions(self) -> list[float]:
        """The share of each dataset in every global batch (what the weights became)."""
        return [q / self.global_batch for q in self.quota]

    def _perm(self, d: int, epoch: int) -> np.ndarray:
        key = (d, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.sizes):  # keep only recent epochs
                self._perms.clear()
            self._perms[key] = np.random.default_rng([self.seed, d, epoch]).permutation(self.sizes[d])
        return self._perms[key]

    def global_indices(self, b: int) -> list[int]:
        """All ``batch_size x world_size`` indices of global batch ``b`` (the same on every rank)."""
        out = []
        for d, q in enumerate(self.quota):
            pos = b * q + np.arange(q)
            epochs, within = np.divmod(pos, self.sizes[d])
            for e in np.unique(epochs):
                sel = epochs == e
                out.append(self._perm(d, int(e))[within[sel]] + self.offsets[d])
        idx = np.concatenate(out)
        np.random.default_rng([self.seed, 1 << 20, b]).shuffle(idx)
        return idx.tolist()

    def __iter__(self) -> Iterator[list[int]]:
        b = self.start_batch
        while True:
            yield self.global_indices(b)[self.rank * self.bs : (self.rank + 1) * self.bs]
            b += 1

    def __len__(self) -> int:  # infinite; DataLoader only needs this for progress estimates
        return 2**62


def cat_observations(parts: Sequence[Observation]) -> Observation:
    """Concatenate observations along the batch dim; prompts are right-padded to the longest."""
    if len(parts) == 1:
        return parts[0]
    length = max(o.prompt_ids.shape[1] for o in parts)

    def pad(t: Tensor, fill) -> Tensor:
        return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=fill)

    return Observation(
        images={c: torch.cat([o.images[c] for o in parts]) for c in parts[0].images},
        image_masks={c: torch.cat([o.image_masks[c] for o in parts]) for c in parts[0].image_masks},
        state=torch.cat([o.state for o in parts]),
        prompt_ids=torch.cat([pad(o.prompt_ids, 0) for o in parts]),
        prompt_mask=torch.cat([pad(o.prompt_mask, False) for o in parts]),
        state_mask=torch.cat([o.state_mask for o in parts]),
        image_features=None if parts[0].image_features is None
        else {c: torch.cat([o.image_features[c] for o in parts]) for c in parts[0].image_features},
    )


@dataclass
class Mixture:
    cfgs: list[DatasetConfig]
    specs: list[DatasetSpec]
    names: list[str]  # embodiment name per dataset
    dataset: MixtureDataset
    preprocessors: dict[str, Preprocessor]  # by embodiment name
    sample_by: str = "dataset"

    @property
    def sizes(self) -> list[int]:
        return self.dataset.sizes

    def probabilities(self) -> list[float]:
        """P(dataset): weight, or weight x frames with ``sample_by="frame"``; sums to 1."""
        w = np.asarray([c.weight for c in self.cfgs], np.float64)
        if self.sample_by == "frame":
            w = w * np.asarray(self.sizes, np.float64)
        return (w / w.sum()).tolist()

    def preprocess(self, batch: Mapping[str, Any], *, train: bool = True) -> tuple[Observation, Tensor, Tensor, Tensor]:
        """A :func:`collate_by_dataset` batch -> (Observation, actions (B, H, A_max), is_pad (B, H),
        dim_mask (B, A_max)), each group normalized with its embodiment's statistics."""
        obs, acts, pads, masks = [], [], [], []
        for d, sub in batch["groups"]:
            pre = self.preprocessors[self.names[d]]
            obs.append(pre.observation(sub, train=train))
            a, p, m = pre.actions(sub)
            acts.append(a), pads.append(p), masks.append(m)
        return cat_observations(obs), torch.cat(acts), torch.cat(pads), torch.cat(masks)

    def checkpoint_preprocessor(self, default: str | None = None) -> Preprocessor:
        """The preprocessor saved with the model: ``default``'s (else the first dataset's), holding all."""
        default = default or self.names[0]
        if default not in self.preprocessors:
            raise KeyError(f"default_embodiment {default!r} is not in the mixture; embodiments: "
                           f"{sorted(self.preprocessors)}")
        return self.preprocessors[default].with_embodiments(self.preprocessors)


def load_mixture(cfgs: Sequence[DatasetConfig], policy: PolicyConfig, tokenize: Tokenize | None = None,
                 sample_by: str = "dataset") -> Mixture:
    """Check, open and compute per-embodiment statistics for every dataset of the mixture."""
    if sample_by not in SAMPLE_BY:
        raise ValueError(f"sample_by: unknown {sample_by!r}; known: {', '.join(SAMPLE_BY)}")
    if not cfgs:
        raise ValueError("mixture: no datasets given")
    cfgs = list(cfgs)
    specs = read_specs(cfgs)
    check_mixture(cfgs, specs, policy)
    names = [embodiment_name(c) for c in cfgs]
    datasets = [make_dataset(c, policy.chunk_size) for c in cfgs]
    pres: dict[str, Preprocessor] = {}
    for name in dict.fromkeys(names):
        idx = [i for i, n in enumerate(names) if n == name]
        cfg, spec = cfgs[idx[0]], specs[idx[0]]
        stats = embodiment_stats([cfgs[i] for i in idx])
        pre = Preprocessor.from_dataset(policy, cfg, spec, stats, tokenize)
        pre.embodiment = name
        pres[name] = pre
    return Mixture(cfgs, specs, names, MixtureDataset(datasets), pres, sample_by)
