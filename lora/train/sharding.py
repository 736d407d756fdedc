"""How the model is spread over the processes `torchrun` starts: DDP (default) or FSDP.

    --shard ddp  (DistributedDataParallel)      --shard fsdp  (FSDP2, `fully_shard`)

    process 0          process 1                process 0            process 1
    ┌──────────────┐   ┌──────────────┐         ┌──────────────┐     ┌──────────────┐
    │ whole base W │   │ whole base W │         │ W[0 : n/2]   │     │ W[n/2 : n]   │
    │ whole A, B   │   │ whole A, B   │         │ A, B [1st ½] │     │ A, B [2nd ½] │
    │ whole AdamW  │   │ whole AdamW  │         │ AdamW [1st ½]│     │ AdamW [2nd ½]│
    └──────────────┘   └──────────────┘         └──────────────┘     └──────────────┘
    after backward: all-reduce of the           before each layer's forward/backward: all-gather
    adapter gradients (each gets the mean)      of that layer's weights, freed right after;
                                                after its backward: reduce-scatter of its gradients

DDP is the fastest when the model fits on one GPU: only the small adapter gradients travel. FSDP
stores 1/N of every weight on each of N processes (for our LoRA runs that means 1/N of the frozen
base, which is nearly all the memory), and all-gathers one decoder layer at a time while it
computes: a model N times larger than one GPU trains, at the price of moving the weights over the
network every step. Each decoder layer is its own FSDP unit, and so is the root (embeddings,
final norm, `lm_head`), which stays gathered for the whole step.

The arithmetic is the same in both: FSDP's reduce-scatter, like DDP's all-reduce, averages the
gradients, so the loop's `× world_size` (loop.backward_window) holds for both, and the
adapter after N steps equals the single-process one. Mixed precision is FSDP2's policy: weights
gathered in bf16/fp16, gradients reduced in fp32 onto the fp32 adapter master weights.

Under FSDP each adapter weight is a `DTensor` (a shard plus where it sits in the whole). Saving
gathers it (`adapter.full_tensor`, a collective: every process calls it), loading scatters it
back (`adapter.copy_full_`), and AdamW's state is saved shard by shard with `torch.distributed.checkpoint`.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import UserError
from .distributed import DistInfo, wrap_for_data_parallel
from .precision import grad_scaler_for


def check_sharding(cfg, info: DistInfo) -> None:
    """Refuse an FSDP run that cannot work, before any weight is loaded."""
    if cfg.shard != "fsdp":
        return
    if not info.enabled:
        raise UserError(
            "--shard fsdp splits the model across processes: start 2 or more with torchrun, "
            "e.g. torchrun --nproc_per_node 2 train.py --shard fsdp ..."
        )
    from ..model import load_model_config  # reads config.json only

    layers = getattr(load_model_config(cfg.model, cfg.trust_remote_code), "num_hidden_layers", None)
    if layers is not None and info.world_size > layers:
        raise UserError(
            f"--shard fsdp: {info.world_size} processes but {cfg.model} has only {layers} decoder "
            f"layers; use at most {layers} processes (or --shard ddp)"
        )


def model_load_device(cfg, device: torch.device) -> torch.device:
    """Where to load the base: on the CPU for FSDP (fully_shard moves each shard to `device`)."""
    return torch.device("cpu") if cfg.shard == "fsdp" else device


def wrap_for_training(loss_module: torch.nn.Module, cfg, info: DistInfo, device, precision: str):
    """The module the loop calls: the loss itself, DDP around it, or it sharded in place (FSDP).

    Call before building the optimizer: FSDP replaces every parameter by its shard.
    """
    if not info.enabled:
        return loss_module
    if cfg.shard != "fsdp":
        return wrap_for_data_parallel(loss_module, device, info)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    from ..inject import lora_parameters
    from .precision import DTYPES

    model = loss_module.model
    # Every process drew its own random A (seed + rank); process 0's is the single-process one.
    broadcast_from_main(lora_parameters(model), device)
    options = {"mesh": init_device_mesh(device.type, (info.world_size,))}
    if precision != "fp32":  # gather weights in 16 bits; reduce gradients in fp32
        options["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=DTYPES[precision], reduce_dtype=torch.float32
        )
    if cfg.fsdp_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    for layer in model.get_decoder().layers:
        fully_shard(layer, **options)
    fully_shard(loss_module, **options)  # the root: embeddings, final norm, lm_head
    return loss_module


def broadcast_from_main(tensors: list[torch.Tensor], device) -> None:
    """Copy process 0's values into every process's tensors (on `device`: NCCL needs a GPU)."""
    with torch.no_grad():
        for t in tensors:
            on_device = t.detach().to(device)
            dist.broadcast(on_device, src=0)
            t.copy_(on_device)


def deferred_gradient_sync(forward, info: DistInfo, last: bool):
    """The context for one micro-batch's backward: DDP exchanges gradients only after the last.

    FSDP reduce-scatters after every micro-batch instead: each process then accumulates only its
    shard of the gradient, in fp32, and never holds a whole one.
    """
    if info.enabled and not last and hasattr(forward, "no_sync"):
        return forward.no_sync()
    return nullcontext()


def grad_scaler(precision: str, device, sharded: bool):
    """fp16's GradScaler; under FSDP the sharded one, which agrees on overflow across processes."""
    if precision == "fp16" and sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return grad_scaler_for(precision, device)


def save_sharded_optimizer(run, directory: Path) -> None:
    """AdamW's state, each process writing its own shards (torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(run.forward, run.optimizer)
    dcp.save({"optimizer": state}, checkpoint_id=str(directory))


def load_sharded_optimizer(run, directory: Path) -> None:
    """Read this process's shards of AdamW's state back (same number of processes)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    state = {"optimizer": get_optimizer_state_dict(run.forward, run.optimizer)}
    dcp.load(state, checkpoint_id=str(directory))
    set_optimizer_state_dict(run.forward, run.optimizer, optim_state_dict=state["optimizer"])
