"""Run by test_distributed.py under torchrun with 2 processes: the DDP gradient of one global batch must equal
the single-process gradient of the same rows. Writes "max abs difference, largest gradient entry" to the file
named last."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import diffusion  # noqa: E402
import flags  # noqa: E402
import training  # noqa: E402
from corpus import Tokenizer  # noqa: E402


class GradientCapture(torch.optim.SGD):
    """An optimizer whose step keeps the gradients instead of applying them."""

    def step(self, closure=None):
        self.grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()  # frozen: rotary
                      for group in self.param_groups for p in group["params"]]


def gradient(args, tokenizer, rank, world_size):
    torch.manual_seed(0)
    state = training.build_state(args, tokenizer, torch.device("cpu"), rank, world_size)
    state.optimizer = GradientCapture(state.model.parameters(), lr=0.0)
    state.runner = training.training_runner(state.model, state.objective, args, world_size)
    real_randn = torch.randn  # no noise in the step (after the model's init, whose Fourier features draw from it)
    torch.randn = lambda *shape, **kwargs: torch.zeros(*shape)
    try:
        training.optimizer_step(state, args, torch.device("cpu"), 0)
    finally:
        torch.randn = real_randn
    state.loader.close()
    return state.optimizer.grads


def main(corpus, spm, cache_dir, out):
    torch.distributed.init_process_group("gloo")
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    # one noise level, no noise: the loss depends on the rows alone, whichever process computes it
    diffusion.draw_training_sigma = lambda segment_ids, *args, **kwargs: torch.full(segment_ids.shape, 3.0)
    command = ["-d", corpus, "-spm", spm, "-mdir", "unused", "--cache_dir", cache_dir, "-dim", "32", "-nl", "2",
             "-nh", "2", "-emb", "16", "-slen", "32", "-acc", "2", "--num_workers", "0", "-gc", "0", "-ema", "",
               "--precision", "fp32"]  # fp32: equal to rounding error
    tokenizer = Tokenizer(spm)
    distributed = gradient(flags.parse_args(command + ["-bsz", "4"]), tokenizer, rank, world_size)
    if rank == 0:  # the same global batch (2 micro-batches of 8 rows) in one process
        torch.distributed.destroy_process_group()
        single = gradient(flags.parse_args(command + ["-bsz", "8"]), tokenizer, 0, 1)
        difference = max(float((a - b).abs().max()) for a, b in zip(distributed, single))
        scale = max(float(b.abs().max()) for b in single)
        with open(out, "w") as f:
            f.write(f"{difference} {scale}\n")
    else:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
