"""The code paths that differ on a CUDA GPU, exercised on the CPU: the FlexAttention self-check and kernel choice,
compiled attention, the chunked head under torch.compile, collectives on the run's device, the GPU's generator in
checkpoints, its bf16 answer, its device per rank, out-of-memory errors, the MFU table and gpu_check.py's parsing.
Where a test needs torch.cuda it stands in for the few functions the code calls, and says what that checks; none of
this measures a GPU (gpu_check.py does)."""
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from rotary_embedding_torch import RotaryEmbedding

import bench
import checkpoint
import chunked
import gpu_check
import model as model_module
import train
import training
import utils
from conftest import NATIVE_BF16, small_model
from objectives import Continuous
from diffusion import (EarlyExit, Grid, draw_training_sigma, euler_step, generate, score_interpolation_loss,
                       stratified_uniform, uniform_schedule)
from model import Packing, flex_agrees_with_sdpa, flex_attention_works, segment_block_mask, segment_positions

CPU = torch.device("cpu")


@pytest.fixture
def fresh_checks(monkeypatch):
    """An empty cache of FlexAttention self-checks, as in a new process."""
    monkeypatch.setattr(model_module, "_flex_checked", {})


# FlexAttention's self-check and the kernel choice

def test_the_flex_self_check_answers_alike_under_bf16_autocast(fresh_checks):
    # under bf16 autocast, FlexAttention's output differs from SDPA's by bf16 rounding (2e-3 near 1), which the
    # check used to read as a broken kernel, so that CUDA training never used FlexAttention
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert flex_attention_works(CPU)


def test_the_flex_self_check_draws_nothing_from_the_default_generator(fresh_checks):
    # the default generator draws the run's noise levels and noise: a draw at the first forward of every process
    # would make a resumed run differ from a straight one
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    assert flex_attention_works(CPU)
    assert torch.equal(torch.rand(4), expected)


def test_the_flex_self_check_runs_at_the_models_head_dim_and_checks_gradients(fresh_checks, monkeypatch):
    real = model_module.packed_attention

    def fails_at_head_dim_64(q, k, v, mask):
        if not isinstance(mask, torch.Tensor) and q.shape[-1] == 64:
            raise RuntimeError("no kernel for head dim 64")
        return real(q, k, v, mask)
    monkeypatch.setattr(model_module, "packed_attention", fails_at_head_dim_64)
    assert flex_attention_works(CPU, 16)
    with pytest.warns(UserWarning, match="head dim 64; using SDPA"):
        assert not flex_attention_works(CPU, 64)

    class WrongGradient(torch.autograd.Function):  # SDPA's output with a gradient twice too large
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return 2 * grad

    def right_output_wrong_gradient(q, k, v, mask):
        if isinstance(mask, torch.Tensor):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        dense = model_module.segment_mask(torch.tensor([[1] * 40 + [2] * 60 + [0] * 28]))
        return WrongGradient.apply(F.scaled_dot_product_attention(q, k, v, attn_mask=dense))
    monkeypatch.setattr(model_module, "packed_attention", right_output_wrong_gradient)
    assert flex_agrees_with_sdpa(CPU, 16, backward=False)  # the forward alone cannot see it
    assert not flex_agrees_with_sdpa(CPU, 16, backward=True)

    def agreeing(q, k, v, mask):  # both "kernels" SDPA under the same dense mask
        dense = model_module.segment_mask(torch.tensor([[1] * 40 + [2] * 60 + [0] * 28]))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    monkeypatch.setattr(model_module, "packed_attention", agreeing)
    with torch.inference_mode():  # a sampler's first forward: the gradients are still checked
        assert flex_agrees_with_sdpa(CPU, 16, backward=True)


def test_a_settled_model_checks_nothing_in_its_forward(monkeypatch):
    model = small_model(vocab_size=50).eval()
    assert model.settle_attention().attention == "sdpa"  # "auto" on the CPU

    def must_not_run(*args):
        raise AssertionError("the self-check ran inside the forward")
    monkeypatch.setattr(model_module, "flex_attention_works", must_not_run)
    model(torch.randn(1, 8, 16), torch.rand(1, 8), torch.tensor([[1] * 5 + [2] * 3]))


def test_compiled_flex_attention_reads_the_strided_values_of_the_fused_projection(monkeypatch):
    # v is a strided view of the qkv projection; compiled FlexAttention (CPU inductor) read it wrongly, by up to 4.5.
    # Inductor's caches are off: their key leaves out ATEN_CPU_CAPABILITY, and a kernel compiled unpinned, read back
    # under the AVX2 pin, gave NaN
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config, "force_disable_caches", True)
    torch.manual_seed(0)
    attention = small_model(vocab_size=50).blocks[0].attn
    segment_ids = torch.tensor([[1] * 20 + [2] * 30 + [0] * 14] * 2)
    mask = segment_block_mask(segment_ids)
    x = torch.randn(2, 64, 32)
    phases = RotaryEmbedding(16)(segment_positions(segment_ids).float())[:, None]
    rotary = phases.cos(), phases.sin()
    with torch.no_grad():
        eager = attention(x, rotary, mask)
        compiled = torch.compile(attention, dynamic=False)(x, rotary, mask)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)


def test_the_mask_of_a_self_conditioned_step_is_built_once(monkeypatch):
    model = small_model(vocab_size=50, self_cond=True)
    ids = torch.randint(4, 50, (2, 12))
    segment_ids = torch.tensor([[1] * 7 + [2] * 5, [1] * 12])
    built = []
    real = model_module.segment_mask
    monkeypatch.setattr(model_module, "segment_mask", lambda *a, **k: built.append(1) or real(*a, **k))
    sigma, noise = torch.full((2, 12), 2.0), torch.randn(2, 12, 16)
    loss, _, _ = score_interpolation_loss(model, ids, sigma, noise, segment_ids, self_cond=True)
    assert len(built) == 1  # two passes, one mask
    # and a Packing gives the features the segment ids give
    x, c_noise = torch.randn(2, 12, 16), torch.rand(2, 12)
    packing = model.packing(segment_ids)
    assert isinstance(packing, Packing)
    torch.testing.assert_close(model.features(x, c_noise, packing), model.features(x, c_noise, segment_ids))


def test_stratified_levels_are_drawn_without_reading_a_value_on_the_host():
    # the meta device has shapes and no values: any host sync (int(drawn.sum()) was one) fails there
    segment_ids = torch.tensor([[1, 1, 2, 2, 0], [1, 1, 1, 2, 3]], device="meta")
    sigma = draw_training_sigma(segment_ids, 1.0, 10.0, 7.0, False, stratified=True)
    assert sigma.shape == (2, 5) and sigma.device.type == "meta" and sigma.dtype == torch.float32
    n = 40_000  # a large batch's per-token draws: one in each slice, none rounded onto the next slice's edge
    drawn = stratified_uniform(torch.rand(n), torch.ones(n, dtype=torch.bool), torch.Generator().manual_seed(0))
    assert torch.equal((drawn * n).floor().long().sort().values, torch.arange(n))


@pytest.mark.parametrize("early_exit", [None, EarlyExit(patience=2, confidence=0.0)])
def test_flex_attention_samples_rows_of_different_lengths_as_sdpa_does(early_exit):
    # the kernel CUDA picks: the last rows to finish left a sampler with no rows, whose block mask could not be built
    ids, cond = torch.zeros(3, 12, dtype=torch.long), torch.zeros(3, 12, dtype=torch.bool)
    cond[0, 7:] = cond[1, 10:] = True  # rows of 7, 10 and 12 tokens; the rest is held padding
    segment_ids = (~cond).long()
    segment_ids[2] = 1
    out = {}
    for attention in ("flex", "sdpa"):
        model = small_model(vocab_size=50).eval()
        model.attention = attention
        out[attention] = generate(model, euler_step, uniform_schedule, Grid(0.5, 10.0, 7.0), ids, cond, [0, 1, 2], 8,
                                  segment_ids=segment_ids, early_exit=early_exit)
    for flex, sdpa in zip(out["flex"], out["sdpa"]):
        assert torch.equal(flex, sdpa)


def test_a_causal_model_without_segment_ids_attends_alike_with_either_kernel():
    x, c_noise = torch.randn(3, 10, 16), torch.rand(3, 10)
    logits = {}
    for attention in ("flex", "sdpa"):
        model = small_model(vocab_size=50, causal=True).eval()
        model.attention = attention
        with torch.no_grad():
            logits[attention] = model(x, c_noise)  # a mask of ones(1, L) was read at rows 1 and 2
    torch.testing.assert_close(logits["flex"], logits["sdpa"], atol=1e-5, rtol=1e-5)


# The chunked head under torch.compile

def traced_ops(chunk, rows):
    """Operations torch.compile traces from the chunked cross-entropy of `rows` rows, `chunk` rows at a time."""
    counted = []

    def count(graph_module, example_inputs):
        counted.append(len(graph_module.graph.nodes))
        return graph_module.forward
    torch._dynamo.reset()
    table, bias = torch.randn(50, 16), torch.zeros(50)
    targets = torch.randint(0, 50, (rows,))

    def loss(features):
        return chunked.tied_cross_entropy(features * 2, table, bias, targets, chunk=chunk)[0] + 1
    torch.compile(loss, backend=count)(torch.randn(rows, 16))
    return sum(counted)


def test_compile_does_not_unroll_the_chunk_loop():
    # unrolled, compile time grows with the batch: 128 chunks at batch 128 x 256 took minutes
    assert traced_ops(chunk=64, rows=64) == traced_ops(chunk=8, rows=64)


def test_chunks_hold_more_rows_on_a_gpu_than_in_a_cpu_cache():
    assert chunked.chunk_rows(CPU, 8000) == chunked.CHUNK_ROWS == 256
    assert chunked.chunk_rows(torch.device("cuda"), 8000) == 8388
    assert chunked.chunk_rows(torch.device("cuda"), 10**6) == 256  # never fewer than on the CPU


# Collectives, generators and devices

def test_the_time_budget_agrees_across_ranks_on_the_runs_device(monkeypatch):
    # NCCL reduces CUDA tensors only: an all-reduce of a CPU tensor failed at the budget's first fit, step 21. The
    # meta device stands in for the GPU here: the test checks which device the collective is handed
    handed = []

    class Handed(Exception):
        pass

    def all_reduce(tensor, op=None):
        handed.append(tensor.device)
        raise Handed
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    budget = training.TimeBudget(600.0, device=torch.device("meta"))
    with pytest.raises(Handed):
        for step in range(1, 30):
            budget.record(step, 1.0)
    assert handed == [torch.device("meta")] and step == 21


def test_a_checkpoint_keeps_the_generator_of_the_runs_gpu_alone(monkeypatch):
    # every visible GPU's state was saved, and restoring it with fewer GPUs visible failed; torch.cuda stands in here
    states = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("read every GPU's generator"))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: states[device.index])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.update({device.index: state}))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("wrote every GPU's generator"))
    saved = checkpoint.rng_state(torch.device("cuda", 1))
    assert torch.equal(saved["cuda"], states[1])
    assert "cuda" not in checkpoint.rng_state(CPU)
    checkpoint.set_rng_state(saved, torch.device("cuda", 0))  # resumed where the process sees one GPU
    assert torch.equal(restored[0], states[1])
    old = {**saved, "cuda": [states[0], states[1]]}  # a checkpoint of before: every visible GPU's state
    checkpoint.set_rng_state(old, torch.device("cuda", 1))
    assert torch.equal(restored[1], states[1])
    restored.clear()
    checkpoint.set_rng_state(old, torch.device("cuda", 3))  # more GPUs now than then: nothing to restore
    checkpoint.set_rng_state(saved, CPU)  # a GPU's checkpoint resumed on the CPU
    assert restored == {}


def test_bf16_is_native_on_the_runs_gpu_from_ampere_on(monkeypatch):
    # torch.cuda.is_bf16_supported() counts emulation (T4, V100) and asks the current device, not the run's
    capability = {0: 7, 1: 8}
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(major=capability[torch.device(device).index or 0]))
    assert NATIVE_BF16(torch.device("cuda", 1))
    assert not NATIVE_BF16(torch.device("cuda", 0))


def test_each_rank_takes_its_local_gpu_or_the_only_one_it_sees():
    assert utils.rank_gpu(1, 1) == torch.device("cuda", 0)  # a scheduler gave each process its own GPU
    assert utils.rank_gpu(3, 4, shared=True) == torch.device("cuda", 3)
    with pytest.raises(utils.UsageError, match="LOCAL_RANK 2: this process sees 2 GPUs; .*--nproc-per-node 2"):
        utils.rank_gpu(2, 2, shared=True)
    with pytest.raises(utils.UsageError, match="LOCAL_RANK 1: this process sees 1 GPU; "):
        utils.rank_gpu(1, 1, shared=True)  # torchrun started two processes on a machine whose one GPU they share


def test_running_out_of_memory_is_one_line_naming_the_batch_flags(monkeypatch, capsys, tmp_path, corpus_file,
                                                                  spm_path):
    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train, "run", out_of_memory)
    command = ["-d", corpus_file, "-spm", spm_path, "-mdir", str(tmp_path), "--accumulation_steps", "2"]
    for bsz, saved, expected in [("64", False, "(-bsz 32 --accumulation_steps 4) for about as many rows a step; no "
                                               "checkpoint had been written yet"),
                                 ("1", True, "take a smaller --preset or a shorter -slen; ")]:
        if saved:
            (tmp_path / "ckpt.pt").write_bytes(b"")
        with pytest.raises(SystemExit) as stopped:
            utils.run_command(lambda: train.main(command + ["-bsz", bsz]))
        assert stopped.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: out of memory on cpu at -bsz {bsz}, rows of 64 tokens")
        assert expected in err[0]
    assert err[0].endswith("ckpt.pt is intact and resumes")


def test_ddp_does_not_broadcast_the_unchanging_buffers(monkeypatch):
    wrapped = {}

    class FakeDDP(torch.nn.Module):
        def __init__(self, module, **kwargs):
            super().__init__()
            wrapped.update(kwargs)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", FakeDDP)
    args = types.SimpleNamespace(compile=False)
    training.training_runner(small_model(vocab_size=50), Continuous(), args, world_size=2)
    assert wrapped == {"broadcast_buffers": False}


# bench.py's MFU and gpu_check.py

def test_mfu_uses_the_exact_gpus_peak_and_counts_the_self_conditioning_pass():
    assert bench.PEAK_FLOPS["NVIDIA H100 80GB HBM3"] == 989e12
    assert bench.PEAK_FLOPS["NVIDIA H100 PCIe"] == 756e12  # a substring match gave every H100 the SXM's peak
    assert bench.PEAK_FLOPS["NVIDIA H100 NVL"] == bench.PEAK_FLOPS["NVIDIA H200 NVL"] == 835e12
    assert "NVIDIA H100" not in bench.PEAK_FLOPS  # a name not listed gets no MFU
    plain = bench.training_flops(1000, 2, 8, 10)
    assert plain == 6 * 1000 + 12 * 2 * 8 * 10
    assert bench.training_flops(1000, 2, 8, 10, self_cond=0.5, head=300) == \
        plain + 0.5 * (2 * 1000 + 4 * 2 * 8 * 10 + 2 * 300)


def test_gpu_check_keeps_a_steps_figures_when_it_warns_on_stderr():
    script = ("import json, sys; print('compiling', flush=True); print(json.dumps({'mfu': 0.42}), flush=True); "
              "print('{ a sample that starts with a brace'); "
              "print('UserWarning: TensorFloat32 tensor cores are available', file=sys.stderr)")
    result = gpu_check.run_step("a step", 60, [sys.executable, "-c", script])
    assert result["status"] == 0 and result["figures"] == {"mfu": 0.42}
    assert result["stderr"] == ["UserWarning: TensorFloat32 tensor cores are available"]


def test_gpu_check_compares_the_kernels_losses_and_a_resumed_runs(tmp_path):
    steps = [{"step": name, "status": 0, "figures": {"losses": losses}} for name, losses in [
        ("FlexAttention, small preset", [7.0, 6.0]), ("SDPA, small preset", [7.0, 6.03]),
        ("FlexAttention, tiny preset, compiled", [7.0, 6.0]), ("SDPA, tiny preset, compiled", [7.0, 6.0])]]
    for run, first in (("straight", 1), ("resumed", 51)):
        (tmp_path / run).mkdir()
        lines = [{"step": s, "loss": 5.0 + (s == 52 and run == "resumed") * 0.1} for s in range(first, 101)]
        (tmp_path / run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    eager, compiled, resumed = gpu_check.comparisons(steps, str(tmp_path))
    assert eager["difference"] == pytest.approx(0.03 / 6.03) and eager["agree"]  # 0.5% < 1%
    assert compiled["difference"] == 0.0 and compiled["agree"]
    assert resumed["difference"] == pytest.approx(0.1 / 5.0) and not resumed["agree"]  # step 52 drew other noise
    steps[1]["figures"]["losses"] = [7.0, 5.0]
    assert not gpu_check.comparisons(steps, str(tmp_path))[0]["agree"]
    del steps[3]["figures"]  # a failed step: nothing to compare, not agreeing
    assert gpu_check.comparisons(steps, str(tmp_path))[1] == {
        "compare": "FlexAttention against SDPA, losses of 15 steps, compiled", "difference": None,
        "tolerance": gpu_check.LOSS_TOLERANCE, "agree": False}
    with open(tmp_path / "resumed" / "metrics.jsonl", "w") as f:  # a resumed run stopped before step 100
        f.write(json.dumps({"step": 51, "loss": 5.0}) + "\n" + json.dumps({"step": 52, "loss": 5.0}) + "\n")
    assert gpu_check.comparisons(steps, str(tmp_path))[2]["difference"] is None
