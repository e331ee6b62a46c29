"""``vla pretrain``: data-parallel training with DeepSpeed (ZeRO 1/2/3) on a mixture of datasets.

    vla pretrain --preset=debug                                        # one process
    torchrun --standalone --nproc_per_node 2 -m vla.train_deepspeed --preset=debug --deepspeed.zero_stage=3
    deepspeed --hostfile hosts --module vla.train_deepspeed --preset=metaworld --mixture='[{root: a}, {root: b}]'

Every rank runs this file. Rank 0 alone logs, shows the progress bar and writes the policy export;
all ranks write their part of the DeepSpeed checkpoint. A checkpoint folder holds

    step_000100/deepspeed/state/...      DeepSpeed (ZeRO partitions, optimizer, scheduler): exact resume
               /rng/rank_000.pt          each rank's RNG state
               /pretrained_model/        consolidated policy: VLAPolicy.from_pretrained in one process
               /training_state.pt        step, data position, world size
               /train_config.json

and is renamed into place only when every rank has finished writing (``last`` points at it).
Read it top to bottom; the single-process trainer (vla/train.py) is the reference for each step.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from vla.checkpoint import (
    LAST,
    MODEL_DIR,
    TRAINING_STATE,
    latest_step_dir,
    publish_checkpoint,
    rng_state,
    set_rng_state,
)
from vla.config import PretrainConfig, from_dict, parse_config, to_dict
from vla.distributed import DistInfo, all_reduce_mean, barrier, init_distributed
from vla.ds_engine import (
    LossModule,
    deepspeed_config,
    enable_activation_checkpointing,
    engine_state_mb,
    export_policy,
    memory_mb,
    register_unhooked_parameters,
    restore_channels_last,
    skip_cpuinfo_probe,
    to_contiguous_parameters,
)
from vla.policy import VLAPolicy
from vla.train import (
    init_policy,
    prepare_synthetic,
    resolve_device,
    seed_everything,
)

log = logging.getLogger("vla.pretrain")
DS_DIR, DS_TAG, RNG_DIR = "deepspeed", "state", "rng"


def _quiet_other_ranks(info: DistInfo) -> None:
    if not info.is_main:
        for name in ("vla", "DeepSpeed", "deepspeed", "torch.distributed"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _validate_mixture(cfg: PretrainConfig) -> None:
    from vla.data.mixture import SAMPLE_BY, check_mixture, read_specs

    if cfg.sample_by not in SAMPLE_BY:
        raise ValueError(f"sample_by: unknown {cfg.sample_by!r}; known: {', '.join(SAMPLE_BY)}")
    ready = [m for m in (cfg.mixture or [cfg.dataset]) if not m.synthetic or (m.root and Path(m.root).exists())]
    if ready:
        check_mixture(ready, read_specs(ready), cfg.policy)


def _build_mixture(cfg: PretrainConfig, info: DistInfo, tokenize):
    from vla.data.mixture import load_mixture

    members = cfg.mixture or [cfg.dataset]
    for i, m in enumerate(members):
        if m.synthetic and m.root is None:
            m.root = str(Path(cfg.output_dir) / f"synthetic_data{i or ''}")
    if info.is_main:  # one writer for generated debug data; the others wait for it
        for m in members:
            prepare_synthetic(m, cfg.output_dir, cfg.policy.image_size)
    barrier()
    return load_mixture(members, cfg.policy, tokenize, cfg.sample_by)


def _fit_head_tokenizer(policy: VLAPolicy, mix, cfg: PretrainConfig, info: DistInfo, ckpt_root: Path) -> None:
    """Token heads: the action tokenizer is fitted once (rank 0) and shared, as in vla/train.py step 3b."""
    if not hasattr(policy.head, "fit_tokenizer") or policy.head.tokenizer.is_fitted:
        return
    from vla.policy import HEAD_ASSETS_DIR

    if cfg.resume:
        policy.head.load_assets(ckpt_root / LAST / MODEL_DIR / HEAD_ASSETS_DIR)
        return
    if len(mix.preprocessors) > 1:
        raise ValueError("vla pretrain: fitting a token head's action tokenizer on a mixture of several "
                         f"embodiments ({sorted(mix.preprocessors)}) is not supported; fit one with `vla tokenizer "
                         "fit` and start from it, or use the flow_matching head")
    from vla.train import normalized_action_chunks

    shared = Path(cfg.output_dir) / ".head_tokenizer"
    if info.is_main:
        policy.head.fit_tokenizer(normalized_action_chunks(mix.dataset.datasets[0], policy.preprocessor,
                                                           cfg.policy.chunk_size))
        shared.mkdir(parents=True, exist_ok=True)
        policy.head.save_assets(shared)
    barrier()
    if not info.is_main:
        policy.head.load_assets(shared)


def pretrain(cfg: PretrainConfig, local_rank: int | None = None) -> Path:
    """Run (this rank's part of) pretraining; returns the consolidated policy checkpoint's path."""
    import deepspeed

    # 0. Datasets that cannot be padded into one model fail here, before any process group exists.
    _validate_mixture(cfg)
    # 1. Processes, threads, determinism. The model is built from the same seed on every rank;
    #    after that each rank draws its own noise and crops (seed + rank).
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")  # DeepSpeed's calls
    info = init_distributed(cfg.deepspeed.backend, local_rank)
    _quiet_other_ranks(info)
    seed_everything(cfg.seed, cfg.torch_threads)
    device = resolve_device(cfg.device)
    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    existing = latest_step_dir(ckpt_root)
    if existing is not None and not cfg.resume:
        raise FileExistsError(f"output_dir {out} already has checkpoints (latest: {existing.name}); pass "
                              "--resume=true to continue that run, or choose another --output_dir")
    if cfg.lora.enabled or getattr(cfg, "refit_tokenizer", False):
        raise ValueError("vla pretrain: --lora.enabled and --refit_tokenizer are for fine-tuning (vla train), "
                         "not pretraining")
    if cfg.ema_decay > 0:
        raise ValueError(f"vla pretrain: --ema_decay={cfg.ema_decay} is not supported under DeepSpeed (ZeRO shards "
                         "the weights); use --ema_decay=0, or vla train for an EMA run")
    if cfg.cache_features:
        raise ValueError(f"vla pretrain: --cache_features={cfg.cache_features} is supported by vla train only "
                         "(one dataset in memory); use --cache_features=0")

    # 2. The policy, then the mixture (its preprocessors need the backbone's tokenizer).
    if cfg.init_from:
        policy = init_policy(cfg.init_from, cfg.policy)
    else:
        policy = VLAPolicy(cfg.policy)
    mix = _build_mixture(cfg, info, policy.backbone.tokenize)
    policy.preprocessor = mix.checkpoint_preprocessor(cfg.default_embodiment)
    # 3. (room for per-head data preparation, as in vla/train.py step 3b)
    _fit_head_tokenizer(policy, mix, cfg, info, ckpt_root)
    for c, s, n, p in zip(mix.cfgs, mix.specs, mix.names, mix.probabilities()):
        log.info("dataset %s: %s, %d frames, state %d, action %d, cameras %s, p=%.3f", n, c.root, s.num_frames,
                 s.state_dim, s.action_dim, mix.preprocessors[n].camera_map, p)
    policy.to(device).train()
    n_train = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    log.info("parameters: %.2fM trainable of %.2fM; %d processes", n_train / 1e6,
             sum(p.numel() for p in policy.parameters()) / 1e6, info.world_size)
    if cfg.deepspeed.activation_checkpointing:
        log.info("activation checkpointing: %d modules", enable_activation_checkpointing(policy))

    # 4. The engine: ZeRO stage, optimizer (torch AdamW, or DeepSpeedCPUAdam when offloading), schedule.
    from vla.schedule import make_optimizer, param_groups, warmup_cosine

    wrapper = LossModule(policy)
    if cfg.deepspeed.zero_stage == 3:
        ext = register_unhooked_parameters(wrapper, lambda: _dry_forward(wrapper, mix, device))
        log.info("ZeRO-3: %d parameters used outside their module's forward, gathered per step", len(ext))
    ds_config = deepspeed_config(cfg, info.world_size)
    if cfg.deepspeed.offload_optimizer:
        optimizer, params = None, param_groups(policy, cfg.lr, cfg.weight_decay, cfg.backbone_lr_scale)
    else:
        optimizer, _ = make_optimizer(policy, cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.steps,
                                      cfg.min_lr_ratio, cfg.backbone_lr_scale)
        params = None
    schedule = warmup_cosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    nhwc = to_contiguous_parameters(policy)
    if cfg.deepspeed.offload_optimizer:
        skip_cpuinfo_probe()  # DeepSpeedCPUAdam's vendor probe can spin for minutes in a VM
    engine, _, _, _ = deepspeed.initialize(
        model=wrapper, optimizer=optimizer, model_parameters=params, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    if cfg.deepspeed.zero_stage < 3:
        restore_channels_last(nhwc)

    # 5. Resume (model, optimizer, scheduler, data position, every rank's RNG) or a fresh start.
    step, batches_done = 0, 0
    if cfg.resume:
        step, batches_done = _resume(engine, ckpt_root / LAST, info)
        log.info("resumed from %s at step %d", (ckpt_root / LAST).resolve(), step)
    else:
        torch.manual_seed(cfg.seed + info.rank)
        np.random.seed(cfg.seed + info.rank)
        random.seed(cfg.seed + info.rank)

    from vla.data.mixture import MixtureBatchSampler, collate_by_dataset

    sampler = MixtureBatchSampler(mix.sizes, mix.probabilities(), cfg.batch_size, seed=cfg.seed,
                                  start_batch=batches_done, rank=info.rank, world_size=info.world_size,
                                  names=mix.names)
    if info.is_main and len(mix.names) > 1:
        log.info("per global batch of %d: %s", sampler.global_batch,
                 ", ".join(f"{n} {q}" for n, q in zip(mix.names, sampler.quota)))
    loader = torch.utils.data.DataLoader(mix.dataset, batch_sampler=sampler, collate_fn=collate_by_dataset,
                                         num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    batches = iter(loader)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()

    def save(at_step: int) -> Path:
        return _save(engine, policy, cfg, info, ckpt_root, at_step, batches_done)

    # 6. The loop: DeepSpeed accumulates grad_accum micro-batches per optimizer step; the logged loss is
    #    the mean over ranks of each rank's mean over valid action steps.
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "train_log.jsonl").open("a" if cfg.resume else "w") if info.is_main else None
    last_step = cfg.steps if cfg.stop_after is None else min(cfg.steps, step + cfg.stop_after)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=step, desc="pretrain", dynamic_ncols=True, mininterval=1.0,
               disable=not info.is_main)
    losses: list[float] = []
    t0, seen = time.perf_counter(), 0
    while step < last_step:
        total = 0.0
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            batches_done += 1
            obs, actions, is_pad, dim_mask = (x.to(device) for x in mix.preprocess(batch, train=True))
            with autocast():
                per_step = engine(obs, actions, is_pad, dim_mask)  # (B, H)
            loss = per_step.float().sum() / (~is_pad).sum().clamp(min=1)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"rank {info.rank}: non-finite loss {loss.item()} at step {step}")
            engine.backward(loss)  # scaled by 1/grad_accum inside
            engine.step()  # an optimizer step only at the accumulation boundary
            total += loss.item() / cfg.grad_accum
            seen += actions.shape[0] * info.world_size
        step += 1
        losses.append(all_reduce_mean(total))
        bar.update(1)
        if step % cfg.log_every == 0 or step == last_step:
            dt = time.perf_counter() - t0
            gn = engine.get_global_grad_norm()
            mem = _gather_memory(engine)
            rec = {"step": step, "loss": sum(losses) / len(losses), "grad_norm": None if gn is None else float(gn),
                   "lr": max(engine.lr_scheduler.get_last_lr()), "samples_per_s": seen / max(dt, 1e-9),
                   "world_size": info.world_size, "peak_rss_mb": [m["peak_rss_mb"] for m in mem],
                   "params_mb": [m["params_mb"] for m in mem], "optimizer_mb": [m["optimizer_mb"] for m in mem]}
            if log_file is not None:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", sps=f"{rec['samples_per_s']:.1f}")
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
            losses, t0, seen = [], time.perf_counter(), 0
        if cfg.save_every and step % cfg.save_every == 0 and step != last_step:
            save(step)
    bar.close()
    if log_file is not None:
        log_file.close()
    final = save(step)
    log.info("checkpoint: %s", (final / MODEL_DIR).resolve())
    return final / MODEL_DIR


def _dry_forward(wrapper, mix, device) -> None:
    """One no-grad loss on a couple of frames of every dataset (RNG state left untouched)."""
    from vla.data.mixture import collate_by_dataset

    state = rng_state()
    try:
        items = [mix.dataset[off + j] for off, n in zip(mix.dataset.offsets, mix.sizes) for j in range(min(2, n))]
        obs, actions, is_pad, dim_mask = (x.to(device) for x in mix.preprocess(collate_by_dataset(items), train=False))
        with torch.no_grad():
            wrapper(obs, actions, is_pad, dim_mask)
    finally:
        set_rng_state(state)


def _gather_memory(engine) -> list[dict]:
    """Every rank's memory (peak RSS, and what its ZeRO partition holds), gathered to all ranks."""
    mem = {**memory_mb(), **engine_state_mb(engine)}
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        box: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(box, mem)
        return box
    return [mem]


def _save(engine, policy: VLAPolicy, cfg: PretrainConfig, info: DistInfo, ckpt_root: Path, step: int,
          batches_done: int) -> Path:
    """Every rank writes its part into a temporary folder; rank 0 renames it into place at the end."""
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f".tmp_step_{step:06d}"
    if info.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / RNG_DIR).mkdir(parents=True)
    barrier()
    client = {"step": step, "batches_done": batches_done, "world_size": info.world_size}
    engine.save_checkpoint(str(tmp / DS_DIR), tag=DS_TAG, client_state=client, save_latest=False)
    torch.save(rng_state(), tmp / RNG_DIR / f"rank_{info.rank:03d}.pt")
    export_policy(policy, tmp / MODEL_DIR, cfg.deepspeed.zero_stage, info.is_main)
    if info.is_main:
        torch.save(client, tmp / TRAINING_STATE)
        (tmp / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    barrier()
    if info.is_main:
        publish_checkpoint(tmp, final, ckpt_root, cfg.keep_last)
    barrier()
    return final


def _resume(engine, ckpt: Path, info: DistInfo) -> tuple[int, int]:
    state_file = ckpt / TRAINING_STATE
    if not state_file.exists():
        raise FileNotFoundError(f"cannot resume: {state_file} does not exist")
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    if state["world_size"] != info.world_size:
        raise ValueError(f"cannot resume {ckpt.resolve()}: it was written by {state['world_size']} processes, this "
                         f"run has {info.world_size}; resume with the same number of processes (the data order "
                         "and every rank's RNG state depend on it)")
    path, client = engine.load_checkpoint(str(ckpt / DS_DIR), tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"cannot resume: no DeepSpeed checkpoint under {ckpt / DS_DIR}")
    set_rng_state(torch.load(ckpt / RNG_DIR / f"rank_{info.rank:03d}.pt", weights_only=False))
    return int(client["step"]), int(client["batches_done"])


def parse_args(argv: list[str]) -> tuple[PretrainConfig, int | None]:
    """Preset + flags -> PretrainConfig; also takes the deepspeed launcher's ``--local_rank``."""
    from vla.cli import _split_preset
    from vla.plugins import load_plugins
    from vla.presets import get_preset

    load_plugins()
    local_rank, rest = None, []
    it = iter(argv)
    for a in it:
        if a.startswith("--local_rank="):
            local_rank = int(a.split("=", 1)[1])
        elif a == "--local_rank":
            local_rank = int(next(it))
        else:
            rest.append(a)
    preset, rest = _split_preset(rest)
    base = from_dict(PretrainConfig, to_dict(get_preset(preset))) if preset else PretrainConfig()
    # A `vla train` preset's single-process options (weight average, in-memory feature cache) are not
    # DeepSpeed's: a preset turns them off here; asked for explicitly on the command line they are refused.
    base.ema_decay, base.cache_features = 0.0, 0
    return parse_config(PretrainConfig, base, rest), local_rank


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg, local_rank = parse_args(argv)
    path = pretrain(cfg, local_rank)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
