"""``vla train``: fit a VLA policy on a LeRobot dataset. Read it top to bottom.

    vla train --preset=debug
    vla train --preset=metaworld --dataset.root=data/mt10 --steps=20000 --bf16=true
    vla train --preset=metaworld --head.type=flow_matching --output_dir=outputs/run1 --resume=true
"""
from __future__ import annotations

import json
import logging
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from vla.checkpoint import (
    LAST,
    MODEL_DIR,
    latest_step_dir,
    load_training_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vla.config import EXECUTION_FIELDS, PolicyConfig, TrainConfig, to_dict
from vla.ema import EMA, load_trainable_state, trainable_state
from vla.policy import VLAPolicy, load_policy_config
from vla.sampler import ResumableBatchSampler
from vla.schedule import make_optimizer

log = logging.getLogger("vla.train")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_data(cfg: TrainConfig):
    """Dataset + the preprocessor whose normalization stats come from that dataset."""
    from vla.data.dataset import dataset_spec, make_dataset
    from vla.data.stats import compute_stats

    prepare_synthetic(cfg.dataset, cfg.output_dir, cfg.policy.image_size)
    dataset = make_dataset(cfg.dataset, cfg.policy.chunk_size)
    spec = dataset_spec(dataset)
    stats = compute_stats(dataset, keys=(cfg.dataset.state_key, cfg.dataset.action_key))
    return dataset, spec, stats


def normalized_action_chunks(dataset, preprocessor, horizon: int, max_chunks: int = 20000) -> np.ndarray:
    """(N, horizon, A) normalized action windows inside episodes (no padded steps), for fitting tokenizers."""
    from vla.data.chunks import chunks_from_dataset

    raw = chunks_from_dataset(dataset.root, horizon, key=preprocessor.action_key, max_chunks=max_chunks)
    with torch.no_grad():
        norm = preprocessor.normalizer.normalize(preprocessor.action_key, torch.from_numpy(raw).float())
    return norm.numpy()


def prepare_synthetic(dataset_cfg, output_dir: str, image_size: int) -> None:
    """``dataset.synthetic``: generate the debug dataset at ``root`` (default output_dir/synthetic_data)
    if it does not exist yet, and point ``dataset_cfg.root`` at it."""
    if dataset_cfg.synthetic and (dataset_cfg.root is None or not Path(dataset_cfg.root).exists()):
        from vla.data.synthetic import make_synthetic_dataset

        root = Path(dataset_cfg.root or Path(output_dir) / "synthetic_data")
        if not root.exists():
            make_synthetic_dataset(root, num_episodes=8, image_size=image_size)
        dataset_cfg.root = str(root)


def seed_everything(seed: int, torch_threads: int = 0) -> None:
    """Seed python, numpy and torch; ``torch_threads > 0`` also fixes torch's thread count."""
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig) -> Path:
    """Run training; returns the path of the final policy checkpoint."""
    # 1. Determinism and threads.
    seed_everything(cfg.seed, cfg.torch_threads)
    device = resolve_device(cfg.device)
    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"

    if cfg.cache_features < 0 or (cfg.cache_features and not (getattr(cfg.policy.backbone, "freeze_vision", False)
                                                               or cfg.lora.enabled)):
        raise ValueError(f"--cache_features={cfg.cache_features}: expected 0 (off) or a number of views >= 1 with a "
                         "frozen vision encoder (--policy.backbone.freeze_vision=true)")
    if cfg.cache_dir is not None and not cfg.cache_features:
        raise ValueError(f"--cache_dir={cfg.cache_dir}: stores the feature cache, which is off; add --cache_features=K")

    # 2. Data and normalization statistics.
    dataset, spec, stats = build_data(cfg)

    # 3. The policy (backbone + head + preprocessor), optionally from a checkpoint, optionally LoRA.
    #    LoRA adapters are saved alone and point at a frozen base checkpoint written once (lora_base).
    from vla.data.processor import Preprocessor

    existing = latest_step_dir(ckpt_root)
    if existing is not None and not cfg.resume:
        raise FileExistsError(f"output_dir {out} already has checkpoints (latest: {existing.name}); pass "
                              "--resume=true to continue that run, or choose another --output_dir")
    lora_base = (Path(cfg.init_from) if cfg.init_from else out / "lora_base") if cfg.lora.enabled else None
    if cfg.init_from:
        policy = init_policy(cfg.init_from, cfg.policy)
    elif lora_base is not None and (lora_base / "config.json").exists():
        policy = VLAPolicy.from_pretrained(lora_base)  # resuming: the frozen base exactly as saved
    else:
        policy = VLAPolicy(cfg.policy)
    policy.preprocessor = Preprocessor.from_dataset(cfg.policy, cfg.dataset, spec, stats, policy.backbone.tokenize)
    log.info("dataset: %d frames, %d episodes, cameras %s, state %d, action %d", spec.num_frames,
             spec.num_episodes, policy.preprocessor.camera_map, spec.state_dim, spec.action_dim)
    # 3b. Token heads predict the codes of an action tokenizer fitted on this dataset's normalized
    #     chunks; a resumed run reloads the tokenizer its weights were trained with.
    if cfg.refit_tokenizer:
        if not (cfg.init_from and hasattr(policy.head, "refit_tokenizer")):
            raise ValueError("--refit_tokenizer=true needs --init_from and a token head (head.type discrete)")
        if not cfg.resume:  # a resumed run already holds the re-fitted tokenizer in its checkpoint
            policy.head.refit_tokenizer(normalized_action_chunks(dataset, policy.preprocessor, cfg.policy.chunk_size))
    if hasattr(policy.head, "fit_tokenizer") and not policy.head.tokenizer.is_fitted:
        if cfg.resume:
            from vla.policy import HEAD_ASSETS_DIR

            policy.head.load_assets(ckpt_root / LAST / MODEL_DIR / HEAD_ASSETS_DIR)
        else:
            policy.head.fit_tokenizer(normalized_action_chunks(dataset, policy.preprocessor, cfg.policy.chunk_size))
            log.info("action tokenizer %r fitted: vocabulary %d", policy.head.tokenizer.config.type,
                     policy.head.tokenizer.vocab_size)
    if lora_base is not None:
        from vla.lora import apply_lora

        if not (lora_base / "config.json").exists():
            policy.save_pretrained(lora_base)
        apply_lora(policy, cfg.lora)
    policy.to(device).train()
    n_train = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in policy.parameters())
    log.info("parameters: %.2fM trainable of %.2fM", n_train / 1e6, n_all / 1e6)

    # 4. Optimizer, schedule, and (on resume) the exact state of the interrupted run.
    opt, sched = make_optimizer(policy, cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.steps,
                                cfg.min_lr_ratio, cfg.backbone_lr_scale)
    step, batches_done = 0, 0
    ema = EMA(policy, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if cfg.resume:
        ckpt = ckpt_root / LAST
        state = load_training_state(ckpt)
        _load_weights(policy, ckpt / MODEL_DIR)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step, batches_done = state["step"], state["batches_done"]
        if ema is not None:  # the checkpoint's policy is the average; the run continues from the raw weights
            ema.load_state_dict(state["ema"])
            load_trainable_state(policy, state["raw_weights"])
        log.info("resumed from %s at step %d", ckpt.resolve(), step)

    pre = policy.preprocessor
    sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, seed=cfg.seed, start_batch=batches_done)
    if cfg.cache_features:
        # Frozen encoder: encode every frame once (K augmented views) and train from memory.
        from vla.data.feature_cache import build_feature_cache

        cache = build_feature_cache(dataset, pre, policy.backbone, views=cfg.cache_features, seed=cfg.seed,
                                    batch_size=cfg.batch_size, num_workers=cfg.num_workers, bf16=cfg.bf16,
                                    device=device, cache_dir=cfg.cache_dir)
        batches = (cache.batch(indices) for indices in sampler)  # (Observation, raw action fields)
    else:
        # A private generator: creating the loader iterator must not consume the global RNG, or a
        # resumed run would draw different noise than an uninterrupted one.
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                                             persistent_workers=cfg.num_workers > 0,
                                             generator=torch.Generator().manual_seed(cfg.seed))
        batches = ((pre.observation(raw, train=True), raw) for raw in loader)
    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()

    def save(at_step: int) -> Path:
        def write_model(path: Path) -> None:
            if lora_base is not None:
                from vla.lora import save_adapter_checkpoint

                save_adapter_checkpoint(policy, path, str(lora_base), cfg.lora)
            else:
                policy.save_pretrained(path)

        state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(),
                 "step": at_step, "batches_done": batches_done}
        if ema is None:
            return save_checkpoint(ckpt_root, at_step, write_model, state, to_dict(cfg), cfg.keep_last)
        state["ema"], state["raw_weights"] = ema.state_dict(), trainable_state(policy)
        with ema.swapped(policy):  # the saved policy is the average (what evaluation and robots use)
            return save_checkpoint(ckpt_root, at_step, write_model, state, to_dict(cfg), cfg.keep_last)

    # 5. The loop: grad_accum micro-batches per optimizer step; loss = mean over valid action steps.
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "train_log.jsonl").open("a" if cfg.resume else "w")
    last_step = cfg.steps if cfg.stop_after is None else min(cfg.steps, step + cfg.stop_after)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True, mininterval=1.0)
    losses: list[float] = []
    t0, seen = time.perf_counter(), 0
    while step < last_step:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(cfg.grad_accum):
            obs, raw = next(batches)
            batches_done += 1
            obs = obs.to(device)
            actions, is_pad, dim_mask = (t.to(device) for t in pre.actions(raw))
            with autocast():
                per_step = policy.loss(obs, actions, is_pad, dim_mask)  # (B, H)
            loss = per_step.sum() / (~is_pad).sum().clamp(min=1)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
            seen += actions.shape[0]
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(policy)
        step += 1
        losses.append(total)
        bar.update(1)
        if step % cfg.log_every == 0 or step == last_step:
            dt = time.perf_counter() - t0
            rec = {"step": step, "loss": sum(losses) / len(losses), "grad_norm": float(grad_norm),
                   "lr": max(sched.get_last_lr()), "samples_per_s": seen / max(dt, 1e-9)}
            bar.set_postfix(loss=f"{rec['loss']:.4f}", sps=f"{rec['samples_per_s']:.1f}")
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            losses, t0, seen = [], time.perf_counter(), 0
        if cfg.save_every and step % cfg.save_every == 0 and step != last_step:
            save(step)
    bar.close()
    log_file.close()
    final = save(step)
    log.info("checkpoint: %s", (final / MODEL_DIR).resolve())
    return final / MODEL_DIR


def _load_weights(policy: VLAPolicy, path: Path) -> None:
    """Load the model weights of a training checkpoint into a freshly built policy."""
    from vla.lora import ADAPTER_WEIGHTS_NAME, load_adapter_weights
    from vla.policy import WEIGHTS_NAME, load_weights

    if (path / ADAPTER_WEIGHTS_NAME).exists():
        load_adapter_weights(policy, path / ADAPTER_WEIGHTS_NAME)
    else:
        load_weights(policy, path / WEIGHTS_NAME)


# Head/backbone fields that change behaviour at run time but not the weights' shapes or meaning: the same
# list that load-time overrides accept without a warning (vla.config.EXECUTION_FIELDS).
_EXECUTION_FIELDS = {f.split(".", 1)[1] for f in EXECUTION_FIELDS if f.startswith(("head.", "backbone."))}


def init_policy(path: str | Path, run: PolicyConfig) -> VLAPolicy:
    """``--init_from``: the checkpoint's weights in a policy built with this run's execution settings.

    Not the checkpoint's: ``freeze_vision`` decides which parameters get gradients when the modules are
    built, so setting the config after loading would be too late. The architecture must match."""
    saved = saved_policy_config(path)
    check_same_architecture(saved, run, str(path))
    policy = VLAPolicy.from_pretrained(path, overrides=run_overrides(saved, run))
    policy.config = run  # execution settings (n_action_steps, num_steps, ...) follow this run
    return policy


def saved_policy_config(path: str | Path) -> PolicyConfig:
    """The PolicyConfig of a checkpoint folder (a LoRA adapter's: its base's)."""
    from vla.lora import ADAPTER_CONFIG_NAME, read_adapter_config

    path = Path(path)
    if (path / ADAPTER_CONFIG_NAME).exists():
        path = Path(read_adapter_config(path)[1])
    return load_policy_config(path)


def run_overrides(have: PolicyConfig, want: PolicyConfig) -> list[str]:
    """``--part.field=value`` for each execution field in which this run differs from the checkpoint."""
    out = []
    for part in ("backbone", "head"):
        a, b = to_dict(getattr(have, part)), to_dict(getattr(want, part))
        out += [f"--{part}.{k}={json.dumps(b[k])}" for k in sorted(_EXECUTION_FIELDS) if k in b and a.get(k) != b.get(k)]
    return out


def check_same_architecture(have: PolicyConfig, want: PolicyConfig, source: str) -> None:
    """``--init_from`` must match the run's architecture; otherwise config.json and weights disagree."""
    diffs = []
    for part in ("backbone", "head"):
        a, b = to_dict(getattr(have, part)), to_dict(getattr(want, part))
        diffs += [f"{part}.{k}: checkpoint {a.get(k)!r}, run {b.get(k)!r}"
                  for k in sorted(set(a) | set(b)) if k not in _EXECUTION_FIELDS and a.get(k) != b.get(k)]
    for k in ("chunk_size", "max_state_dim", "max_action_dim", "cameras"):
        if getattr(have, k) != getattr(want, k):
            diffs.append(f"{k}: checkpoint {getattr(have, k)!r}, run {getattr(want, k)!r}")
    if diffs:
        raise ValueError(f"--init_from={source} has a different architecture than this run's config: "
                         + "; ".join(diffs) + ". Use the checkpoint's preset/fields.")
