"""Run by test_distributed.py under torchrun (any number of processes and machines, DDP or --fsdp given last): three
optimiser steps of a global batch of 8 rows (2 micro-batches), with the noise taken out so that the loss depends on
the rows alone, must equal the same steps in one process. Arguments: corpus, tokenizer, cache folder, output file,
then train.py flags. Rank 0 writes a JSON object to the output file: the largest differences of the first step's
gradient, the three losses and the final weights, and the largest gradient entry (the scale they compare against)."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import diffusion  # noqa: E402
import flags  # noqa: E402
import masked  # noqa: E402
import training  # noqa: E402
from corpus import Tokenizer  # noqa: E402
from sharding import gathered  # noqa: E402
from utils import distributed_teardown  # noqa: E402

ROWS = 8  # the global batch: -bsz ROWS / processes in each


def steps(args, tokenizer, rank, world_size, count=3):
    """The losses of `count` optimiser steps, the first step's gradients and the final weights (full tensors)."""
    torch.manual_seed(0)
    state = training.build_state(args, tokenizer, torch.device("cpu"), rank, world_size)
    state.runner = training.training_runner(state.model, state.objective, args, world_size, state.runner)
    first = {}
    step = state.optimizer.step

    def keep_first_gradient(*a, **k):
        if not first:
            first.update(gathered({n: p.grad.detach().clone() for n, p in state.model.named_parameters()
                                   if p.grad is not None}))
        return step(*a, **k)

    state.optimizer.step = keep_first_gradient
    real_randn = torch.randn  # no noise in the steps (after the model's init, whose Fourier features draw from it)
    torch.randn = lambda *shape, **kwargs: torch.zeros(*shape)
    try:
        losses = [float(training.optimizer_step(state, args, torch.device("cpu"), i)[1]["loss"]) for i in range(count)]
    finally:
        torch.randn = real_randn
    state.loader.close()
    return losses, first, gathered(state.model.state_dict())


def largest_difference(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in b)


def main(corpus, spm, cache_dir, out, *extra):
    torch.distributed.init_process_group("gloo")
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    # one noise level, no noise; masked diffusion: every other position masked at t = 1/2: the loss depends on the
    # rows alone, whichever process computes it
    diffusion.draw_training_sigma = lambda segment_ids, *args, **kwargs: torch.full(segment_ids.shape, 3.0)
    masked.draw_mask_times = lambda segment_ids, *args, **kwargs: torch.full(segment_ids.shape, 0.5)
    masked.draw_masks = lambda t, free, *args: free & (torch.arange(t.shape[-1]) % 2 == 0)
    command = ["-d", corpus, "-spm", spm, "-mdir", "unused", "--cache_dir", cache_dir, "-dim", "32", "-nl", "2",
               "-nh", "2", "-emb", "16", "-slen", "32", "-acc", "2", "--num_workers", "0", "-gc", "0", "-ema", "",
               "--precision", "fp32", "-lr", "1e-2", "-wus", "0",  # fp32: equal to rounding error
               "--adam_eps", "1e-4"]  # Adam's step moves by at most lr / eps times a gradient's rounding
    if "--objective" not in extra:  # every micro-batch self-conditioned: no coin to tell one process from several
        command += ["--self_cond", "1"]
    tokenizer = Tokenizer(spm)
    per_process = ROWS // 2 // world_size
    losses, gradient, weights = steps(flags.parse_args(command + ["-bsz", str(per_process), *extra]), tokenizer, rank,
                                      world_size)
    distributed_teardown(world_size)
    if rank == 0:  # the same global batches in one process
        single_losses, single_gradient, single_weights = steps(
            flags.parse_args(command + ["-bsz", str(ROWS // 2), *(f for f in extra if f != "--fsdp")]), tokenizer, 0, 1)
        with open(out, "w") as f:
            json.dump({"gradient": largest_difference(gradient, single_gradient),
                       "scale": max(float(g.abs().max()) for g in single_gradient.values()),
                       "losses": max(abs(a - b) for a, b in zip(losses, single_losses)),
                       "weights": largest_difference(weights, single_weights), "steps": len(losses)}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
