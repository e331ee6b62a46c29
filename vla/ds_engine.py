"""The pieces of a DeepSpeed engine around a VLAPolicy: config, ZeRO-3 hooks, activation
checkpointing, and the consolidated (single-file) export.

    ds_config = deepspeed_config(cfg, world_size)
    external = register_unhooked_parameters(wrapper, policy, run_forward)   # ZeRO-3 only
    enable_activation_checkpointing(policy)
    export_policy(policy, path, zero_stage=3, is_main=rank == 0)          # every rank calls it
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from vla.config import PretrainConfig


class LossModule(nn.Module):
    """What the engine wraps: ``forward`` is the policy's per-step loss (B, H).

    The engine must call a module's ``forward``: ZeRO-3 gathers a module's parameters in hooks around
    it, and ``VLAPolicy.forward`` takes raw batches, not the mixture's preprocessed tensors.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, obs, actions: Tensor, is_pad: Tensor, dim_mask: Tensor) -> Tensor:
        return self.policy.loss(obs, actions, is_pad, dim_mask)


def _deep_update(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def deepspeed_config(cfg: PretrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for this run (``deepspeed.config_file`` keys override it)."""
    ds = cfg.deepspeed
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage: expected 0, 1, 2 or 3, got {ds.zero_stage}")
    if ds.offload_optimizer and ds.zero_stage == 0:
        raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
    zero: dict[str, Any] = {"stage": ds.zero_stage, "reduce_bucket_size": ds.reduce_bucket_size,
                            "allgather_bucket_size": ds.reduce_bucket_size, "overlap_comm": ds.overlap_comm,
                            "contiguous_gradients": True}
    if ds.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=ds.param_persistence_threshold,
                    stage3_prefetch_bucket_size=ds.reduce_bucket_size)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the client optimizer is torch's AdamW
        "steps_per_print": 2**31 - 1,  # our own rank-0 log replaces DeepSpeed's
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer:
        # ZeRO-Offload runs the step on the CPU with DeepSpeedCPUAdam (prebuilt at install: run.sh).
        out["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                        "weight_decay": cfg.weight_decay}}
    if ds.config_file:
        _deep_update(out, json.loads(Path(ds.config_file).read_text()))
    return out


def skip_cpuinfo_probe() -> None:
    """DeepSpeedCPUAdam calls ``cpuinfo.get_cpu_info()`` only to read the CPU vendor. py-cpuinfo gets
    that from a CPUID probe in a subprocess that measures the clock by busy-waiting; in this VM, under
    load, two such probes spun for 18+ minutes and stalled a 2-rank run. The vendor and flags are in
    /proc/cpuinfo, so answer from there (other platforms keep py-cpuinfo)."""
    import cpuinfo

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return
    fields = {}
    for line in text.splitlines():  # the first processor's block is enough
        if ":" in line:
            k, v = line.split(":", 1)
            fields.setdefault(k.strip(), v.strip())
    info = {"vendor_id_raw": fields.get("vendor_id", ""), "brand_raw": fields.get("model name", ""),
            "flags": fields.get("flags", "").split()}
    cpuinfo.get_cpu_info = lambda: dict(info)


def register_unhooked_parameters(wrapper: nn.Module, run_forward: Callable[[], Any]) -> list[str]:
    """ZeRO-3: parameters used outside their module's ``forward`` must be gathered by a module that runs.

    ZeRO-3 materializes a module's own parameters in hooks around its ``forward``. A parameter read
    directly (``self.camera_embed.weight[:n]``) or owned by a module only ever called through other
    methods (``head.loss``) would be an empty partition there. One dry forward (``run_forward``) records
    which modules run; the direct parameters of those that never do are registered as external
    parameters of ``wrapper`` (gathered for the whole step). Returns their names.
    """
    import deepspeed

    ran: set[int] = set()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, args: ran.add(id(m)))
    try:
        run_forward()
    finally:
        handle.remove()
    names = []
    for mod_name, mod in wrapper.named_modules():
        if id(mod) in ran or mod is wrapper:
            continue
        for p_name, p in mod.named_parameters(recurse=False):
            deepspeed.zero.register_external_parameter(wrapper, p)
            names.append(f"{mod_name}.{p_name}")
    return names


def enable_activation_checkpointing(policy: nn.Module) -> int:
    """Recompute transformer blocks in backward instead of storing their activations.

    Hugging Face models use their own ``gradient_checkpointing_enable``; ``vla.nn.Block`` modules
    called through ``forward`` (the timm_lm language model) get a non-reentrant
    ``torch.utils.checkpoint`` wrapper. Returns the number of checkpointed modules.
    """
    from torch.utils.checkpoint import checkpoint

    from vla.nn import Block

    n, inside_hf = 0, set()
    for m in policy.modules():
        if hasattr(m, "gradient_checkpointing_enable") and getattr(m, "supports_gradient_checkpointing", False):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            inside_hf.update(id(x) for x in m.modules())
            n += 1
    for m in policy.modules():
        if isinstance(m, Block) and id(m) not in inside_hf:
            fwd = m.forward

            def wrapped(*args, _fwd=fwd, **kwargs):
                if not torch.is_grad_enabled():
                    return _fwd(*args, **kwargs)
                return checkpoint(_fwd, *args, use_reentrant=False, **kwargs)

            m.forward = wrapped
            n += 1
    return n


def to_contiguous_parameters(model: nn.Module) -> list[nn.Parameter]:
    """DeepSpeed broadcasts and flattens parameters as raw bytes, which needs the default memory layout:
    channels_last conv weights (timm_lm's encoder) are made contiguous. Returns the frozen ones, which
    :func:`restore_channels_last` may switch back (trainable ones become views of ZeRO's flat buffers)."""
    frozen = []
    for p in model.parameters():
        # Compare strides, not is_contiguous(): a channels_last (N, C, 1, 1) weight counts as contiguous
        # but its last stride is C.
        canonical = torch.empty(p.shape, device="meta").stride()
        if p.numel() > 1 and p.stride() != canonical:
            p.data = p.data.clone(memory_format=torch.contiguous_format)
            if not p.requires_grad and p.ndim == 4:
                frozen.append(p)
    return frozen


def restore_channels_last(params: list[nn.Parameter]) -> None:
    for p in params:
        p.data = p.data.contiguous(memory_format=torch.channels_last)


def export_policy(policy: nn.Module, path: Path, zero_stage: int, is_main: bool) -> None:
    """Write ``policy.save_pretrained(path)`` from rank 0. Under ZeRO-3 every rank must call this:
    the partitioned parameters are gathered (on all ranks) for the duration of the write."""
    from vla.distributed import barrier

    if zero_stage == 3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(list(policy.parameters()), modifier_rank=None)
    else:
        ctx = nullcontext()
    with ctx:
        if is_main:
            # ZeRO keeps trainable parameters as views into flat buffers; safetensors refuses to save views
            # of a larger storage, so the export writes private copies (restored before any re-partition).
            saved = [(p, p.data) for p in policy.parameters()]
            try:
                for p, data in saved:
                    p.data = data.detach().clone()
                policy.save_pretrained(path)
            finally:
                for p, data in saved:
                    p.data = data
    barrier()


def engine_state_mb(engine) -> dict[str, float]:
    """MiB this rank holds for the model (its ZeRO-3 partition, else every parameter) and for the
    optimizer (fp32 master partition + Adam moments): what ZeRO divides among ranks."""
    def mb(tensors) -> float:
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20

    params = []
    for p in engine.module.parameters():
        part = getattr(p, "ds_tensor", None)  # ZeRO-3: this rank's partition
        params += [p] if part is None else [part] + ([p.data] if getattr(p, "ds_persist", False) else [])
    opt = getattr(engine, "basic_optimizer", None)
    zero = engine.optimizer
    # The fp32 master copy: ZeRO-3 and ZeRO-1/2 keep this rank's partition flat (ZeRO-3 empties the
    # inner optimizer's param groups between steps); without ZeRO it is the optimizer's params.
    master = (getattr(zero, "fp32_partitioned_groups_flat", None) or getattr(zero, "single_partition_of_fp32_groups", None)
              or ([p for g in opt.param_groups for p in g["params"]] if opt is not None else []))
    moments = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.ndim > 0] if opt else []
    return {"params_mb": round(mb(params), 2), "optimizer_mb": round(mb(master) + mb(moments), 2)}


def memory_mb() -> dict[str, float]:
    """This process's resident memory now and at its peak (MiB), and the accelerator's peak."""
    import resource

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        with open("/proc/self/statm") as f:
            import os

            out["rss_mb"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        pass
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out
