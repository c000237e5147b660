"""Sharded training, train.py --fsdp: torch's fully_shard (FSDP2; the design of Zhao et al. 2023, "PyTorch FSDP",
arXiv 2304.11277, on DTensors) over the processes of a torchrun run, and the conversions that keep one checkpoint
format: full tensors gathered for rank 0 to write, each rank's shard cut from full tensors on load. A run started
sharded therefore resumes unsharded and the other way round, and sample.py and eval.py never see a shard.

Each transformer block is a group of its own (its weights gathered just before it runs and freed after); the rest
(the embedding table, which the output head shares, the time MLP, the input and output projections) is the root group
around the whole training forward, so the tied table is gathered once for both of its uses.
"""
import contextlib

import torch

from utils import UsageError


def check_sharding(world_size, device):
    """Raise UsageError unless --fsdp can shard here: several processes (torchrun) on CUDA GPUs or CPUs, and a torch
    with fully_shard."""
    if world_size < 2:
        raise UsageError("--fsdp shards over the processes of a torchrun run: start it with torchrun "
                         "--nproc-per-node N (N of 2 or more), or drop --fsdp")
    if device.type not in ("cuda", "cpu"):
        raise UsageError(f"--fsdp on {device.type}: sharding runs on CUDA GPUs or CPUs; drop --fsdp")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        raise UsageError(f"--fsdp needs torch's fully_shard (torch 2.6 or later), this is torch {torch.__version__}; "
                         "drop --fsdp or upgrade torch") from None


def sharded_training_forward(runner, blocks, device, precision):
    """Shard `runner` (training.TrainingForward, whose forward is the whole loss) in place: each of `blocks` (the
    model's transformer blocks) a group, the rest the root. On CUDA with `precision` "bf16" (resolved, as
    utils.resolve_precision gives it), the blocks' weights are gathered in bf16 and their gradients reduced in fp32
    (MixedPrecisionPolicy); the root keeps fp32, as the tied table, the norms and the logits need (autocast still runs
    the root's matmuls in bf16), and so does the CPU. Returns `runner`. Needs the default process group (torchrun)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    blocks_policy = MixedPrecisionPolicy()
    if device.type == "cuda" and precision == "bf16":
        # the blocks' float inputs keep their dtype: the rotary phases stay in fp32
        blocks_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                             cast_forward_inputs=False)
    for block in blocks:
        fully_shard(block, mp_policy=blocks_policy)
    fully_shard(runner)
    return runner


def is_sharded(module):
    """Whether `module`'s parameters are shards (DTensors), i.e. it was sharded by sharded_training_forward."""
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in module.parameters())


def gathered(state_dict, keep=True):
    """`state_dict` with every shard (DTensor) replaced by its full tensor, on the CPU; plain tensors and other values
    pass unchanged. A collective: every rank calls it, in the same order; where `keep` is False (ranks that will not
    write) the full tensors are dropped as soon as they are gathered and the dict holds only the plain values."""
    from torch.distributed.tensor import DTensor
    full = {}
    for name, value in state_dict.items():
        if isinstance(value, DTensor):
            value = value.full_tensor().cpu()  # one tensor at a time: at most one full tensor is held extra
            if not keep:
                continue
        full[name] = value
    return full


def sharded_like(full, reference):
    """`full` (name -> full tensor) cut into this rank's shards where `reference` (name -> tensor, a sharded module's
    state dict) holds a DTensor of the same shape; everything else (buffers, missing keys, tensors of other shapes,
    which the caller's checks then name) passes unchanged. No communication: every rank holds the full tensors."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    cut = {}
    for name, tensor in full.items():
        ref = reference.get(name)
        if isinstance(ref, DTensor) and torch.is_tensor(tensor) and tensor.shape == ref.shape:
            tensor = distribute_tensor(tensor.to(ref.device, ref.dtype), ref.device_mesh, ref.placements,
                                       src_data_rank=None)
        cut[name] = tensor
    return cut


def gathered_optimizer(optimizer, keep=True):
    """optimizer.state_dict() with every moment a full tensor on the CPU (gathered like gathered()): the format of an
    unsharded run's optimizer, since both are built over the model's parameters in the same order."""
    saved = optimizer.state_dict()
    return {"state": {index: gathered(state, keep) for index, state in saved["state"].items()},
            "param_groups": saved["param_groups"]}


def sharded_optimizer(saved, optimizer):
    """An optimizer state dict of full moments (`saved`, in the unsharded format) with each moment of a sharded
    parameter's shape cut into this rank's shard, ready for optimizer.load_state_dict."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {index: sharded_like(moments, {name: params[index] for name in moments}) if index < len(params) else moments
             for index, moments in saved["state"].items()}
    return {**saved, "state": state}


def sharded_checkpoint(checkpoint, model, optimizer):
    """A checkpoint of full tensors with its model, EMA and optimizer entries cut into this rank's shards of the
    sharded `model` and its `optimizer`; the other entries unchanged."""
    reference = model.state_dict()
    return {**checkpoint, "model": sharded_like(checkpoint["model"], reference),
            "ema": {rate: sharded_like(weights, reference) for rate, weights in checkpoint["ema"].items()},
            "optimizer": sharded_optimizer(checkpoint["optimizer"], optimizer)}


def local_parameter_count(module, trainable=True):
    """How many of `module`'s parameter entries (the `trainable` ones, else all) this process holds: its shards' under
    fully_shard, all of them otherwise (the optimizer's moments and the EMAs follow the same split)."""
    from torch.distributed.tensor import DTensor
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in module.parameters()
               if p.requires_grad or not trainable)


def plain_norm(norm):
    """clip_grad_norm_'s total norm as a plain tensor (over sharded gradients it is a DTensor)."""
    from torch.distributed.tensor import DTensor
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


@contextlib.contextmanager
def gradient_sync(runner, enabled):
    """Context of a micro-step whose gradients are reduced across the ranks (`enabled`, the last of a step) or only
    accumulated here: DistributedDataParallel's no_sync, fully_shard's set_requires_gradient_sync; nothing to do in a
    single process."""
    if enabled:
        yield
    elif hasattr(runner, "set_requires_gradient_sync"):
        runner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            runner.set_requires_gradient_sync(True)
    elif hasattr(runner, "no_sync"):
        with runner.no_sync():
            yield
    else:
        yield
