"""Many processes with PyTorch's own engine: process-group setup under torchrun, FSDP full sharding (ZeRO-3, as
Dolly's DeepSpeed config), and the few collectives the training loop needs. One process needs none of it.

FSDP here is FSDP2 (torch.distributed.fsdp.fully_shard): each Block is one shard unit, the root holds the
embeddings and head. Parameters stay fp32 (the master weights); bf16 comes from autocast in the loop.
"""

import os

import torch
import torch.distributed as dist


def setup(device: torch.device) -> tuple[int, int]:
    """(rank, world_size); under torchrun (WORLD_SIZE > 1) joins the group: nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size()


def local_device(device: torch.device) -> torch.device:
    """The device of this process: `device` (checked by cli.pick_device), with an unnumbered cuda read as
    cuda:LOCAL_RANK, one GPU per process under torchrun."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Fully shard model across the group (parameters, gradients and optimizer state: ZeRO-3), in place.

    Process 0 holds the weights (the others a meta-device model of the same shapes): every process shards the
    empty model, then process 0 broadcasts each whole tensor and every process keeps its own shard of it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    full = model.state_dict() if dist.get_rank() == 0 else {}  # references: process 0's weights stay alive here
    model.to("meta")
    for block in model.gpt_neox.layers:
        fully_shard(block)
    fully_shard(model)
    model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over all processes (a no-op for one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
