"""The score network: noisy token embeddings and each token's noise level in, logits over the vocabulary out.

No loss, schedule, sampling or I/O here; diffusion.py wraps this network with the preconditioning.
Shapes: B batch, L length, E embedding dim, D model dim, H heads, V vocabulary.
"""
import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from rotary_embedding_torch import RotaryEmbedding
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


CONDITIONINGS = ("film", "shared")  # how the noise level reaches the blocks (ModelConfig.conditioning)


@dataclass
class ModelConfig:
    """Architecture of ScoreLM; stored as a plain dict in every checkpoint. Raises ValueError if model_dim does
    not split into num_heads heads of even size (rotary embeddings rotate pairs)."""
    vocab_size: int = 8000
    embedding_dim: int = 64   # E: the space the diffusion runs in
    model_dim: int = 256      # D
    num_layers: int = 4
    num_heads: int = 4        # H; D / H is the head dim, rotated in full by the rotary embedding
    fourier_dim: int = 64     # features of the noise level
    time_dim: int = 128       # width of the noise-level MLP that feeds every block's FiLM
    dropout: float = 0.0
    causal: bool = False      # the autoregressive baseline: a token attends to itself and earlier tokens only
    self_cond: bool = False   # also read a previous estimate of the clean embeddings (self-conditioning)
    output_prior: bool = False  # logits add each token's own posterior (diffusion.py); the head starts at zero
    output_prior_scale: float = 1.0  # the posterior's weight in the logits (1: exact at the start)
    masked: bool = False      # masked diffusion (masked.py): one embedding more, [MASK] at id vocab_size, never predicted
    conditioning: str = "film"  # "film": a FiLM layer per block; "shared": one for all blocks, an offset per block

    def __post_init__(self):
        if self.model_dim % self.num_heads or (self.model_dim // self.num_heads) % 2:
            raise ValueError(f"model_dim {self.model_dim} must split into {self.num_heads} heads of even size")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning {self.conditioning!r} is none of {CONDITIONINGS}")


def segment_positions(segment_ids):
    """Position of each token inside its own packed sequence, restarting at 0 where the segment id changes.
    segment_ids (B, L) int -> (B, L) int64."""
    B, L = segment_ids.shape
    index = torch.arange(L, device=segment_ids.device).expand(B, L)
    is_start = torch.ones_like(segment_ids, dtype=torch.bool)
    is_start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = torch.where(is_start, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - starts


def segment_mask(segment_ids, causal=False):
    """Boolean attention mask (B, 1, L, L): query i may attend to key j only if both carry the same segment id,
    so sequences packed side by side never see each other (identity, not length, decides); with `causal`, also
    only if j <= i."""
    mask = segment_ids[:, :, None] == segment_ids[:, None, :]
    if causal:
        mask = mask & torch.ones_like(mask[0]).tril()
    return mask[:, None]


def segment_block_mask(segment_ids, causal=False):
    """The same rule as segment_mask as a FlexAttention BlockMask, so that blocks of keys no query of a block may
    see are skipped rather than computed and masked. segment_ids (B, L) int -> BlockMask for (B, H, L, L)."""
    B, L = segment_ids.shape

    def same_segment(b, h, q, k):
        return (segment_ids[b, q] == segment_ids[b, k]) & ((k <= q) | (not causal))
    return create_block_mask(same_segment, B, None, L, L, device=segment_ids.device)


_compiled_flex_attention = None  # torch.compile(flex_attention), made once (compiled_flex_attention)
_flex_checked = {}  # (device, head dim, backward) -> whether FlexAttention ran there and agreed with SDPA


def compiled_flex_attention():
    """FlexAttention compiled (it is slow uncompiled), made on first call and kept for the process. Made before a
    compiled forward first reads it (ScoreLM.settle_attention), so that the forward's graph is not traced again once
    it exists. Shapes are left to torch.compile's automatic dynamic dims: a second batch shape (eval.py's batches,
    rows leaving an early-exit sampler) compiles one kernel for any size instead of one per shape."""
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention)
    return _compiled_flex_attention


@torch.compiler.disable
def flex_attention_works(device, head_dim=16, backward=True):
    """Whether FlexAttention runs on `device` at head dim `head_dim` and agrees with SDPA (flex_agrees_with_sdpa,
    with `backward` the backward pass too, never on the CPU, where torch 2.13's FlexAttention has none); checked once
    per device, head dim and pass. A failure warns and the caller uses SDPA."""
    device = torch.device(device)
    backward = backward and device.type != "cpu"
    key = (str(device), head_dim, backward)
    if key not in _flex_checked:
        _flex_checked[key] = flex_agrees_with_sdpa(device, head_dim, backward)
        if not _flex_checked[key]:
            warnings.warn(f"FlexAttention is unavailable or disagrees with SDPA on {device} at head dim {head_dim}; "
                          "using SDPA")
    return _flex_checked[key]


def flex_agrees_with_sdpa(device, head_dim, backward=True):
    """Whether packed_attention with a BlockMask gives SDPA's output (and, with `backward`, its gradients) on a packed
    example of two sequences and fill, (1, 2, 128, head_dim), within 1e-3. Computed in fp32 whatever autocast is
    active: a bf16 result differs from SDPA's by rounding alone (one step near 1 is 2e-3), which says nothing of the
    kernel, and the answer must not depend on which precision asked first. Draws from a generator of its own: the
    device's default one draws the run's noise, and one draw more would change a resumed run. An exception (no kernel
    for this device or torch build) is a False."""
    generator = torch.Generator(device).manual_seed(0)
    segment_ids = torch.tensor([[1] * 40 + [2] * 60 + [0] * 28], device=device)
    try:  # in fp32 and with gradients, whatever the caller's autocast, no_grad or inference mode
        with torch.autocast(device.type, enabled=False), torch.inference_mode(False), torch.enable_grad():
            q, k, v, grad = (torch.randn(1, 2, 128, head_dim, device=device, generator=generator) for _ in range(4))
            results = []
            for mask in (segment_mask(segment_ids), segment_block_mask(segment_ids)):
                inputs = [t.clone().requires_grad_(backward) for t in (q, k, v)]
                out = packed_attention(*inputs, mask)
                grads = torch.autograd.grad(out, inputs, grad) if backward else ()
                results.append([out.detach(), *grads])
        return all(torch.allclose(got, expected, atol=1e-3, rtol=1e-3) for expected, got in zip(*results))
    except Exception:  # no kernel for this device or torch build
        return False


def packed_attention(q, k, v, mask):
    """Attention of (B, H, L, D/H) queries, keys and values under a segment mask: FlexAttention (compiled, on
    CUDA) for a BlockMask, scaled_dot_product_attention for a boolean (B, 1, L, L) mask or None."""
    if not isinstance(mask, BlockMask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    v = v.contiguous()  # a strided view of the fused projection gives wrong output in compiled FlexAttention (CPU)
    if q.is_cuda:
        return compiled_flex_attention()(q, k, v, block_mask=mask)
    return flex_attention(q, k, v, block_mask=mask)  # CPU: forward only in torch 2.13, for tests


class Packing(NamedTuple):
    """A batch's packing as every layer reads it (ScoreLM.packing): rotary, the phases (cos, sin) of each token's
    position, each (B or 1, 1, L, D/H) float32; mask, a (B, 1, L, L) bool, a BlockMask, or None."""
    rotary: tuple
    mask: object


def rotate(x, cos, sin):
    """Rotary position embedding (Su et al. 2021, RoFormer, eq. 34): each adjacent pair (x_2i, x_2i+1) of x (..., L, d)
    turned by its angle, x cos + (-x_2i+1, x_2i) sin, with cos and sin (..., L, d) float32 of rotary_embedding_torch's
    interleaved phases, taken once per forward. Equals that library's apply_rotary_emb(phases, x), without its
    per-call cos and sin, unit scale multiplications and concatenation (RESULTS.md, "Training throughput"). -> x's
    shape and dtype."""
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x * cos + turned * sin).to(x.dtype)


class FourierFeatures(nn.Module):
    """Fourier features of a scalar per token with learned frequencies, initialised N(0, 1) (Tancik et al.
    2020; learned as in the original project's noise embedding): (B, L) float -> (B, L, fourier_dim)."""

    def __init__(self, dim):
        super().__init__()
        self.freqs = nn.Parameter(torch.randn(dim // 2))

    def forward(self, x):
        angles = 2 * math.pi * x.float()[..., None] * self.freqs
        return torch.cat([angles.cos(), angles.sin()], dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention, rotary on queries and keys.
    x (B, L, D), rotary (cos, sin) of the rotary phases, each (B or 1, 1, L, D/H) float32, mask (B, 1, L, L) bool, a
    BlockMask or None -> (B, L, D)."""

    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.model_dim, 3 * cfg.model_dim, bias=False)
        self.out = nn.Linear(cfg.model_dim, cfg.model_dim, bias=False)

    def forward(self, x, rotary, mask):
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # (3, B, H, L, D/H)
        q, k = rotate(qkv[:2], *rotary)  # queries and keys turned together
        y = packed_attention(q, k, qkv[2], mask)
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class SwiGLU(nn.Module):
    """Gated feed-forward of Shazeer (2020), hidden width 8/3 D rounded up to a multiple of 32."""

    def __init__(self, dim):
        super().__init__()
        hidden = 32 * math.ceil(8 * dim / 3 / 32)
        self.up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, value = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * value)


class Block(nn.Module):
    """Pre-norm transformer block whose two norms are modulated per token by FiLM (Perez et al. 2018) from
    that token's noise-level embedding: h = (1 + scale) * RMSNorm(x) + shift. With cfg.conditioning "film" the block
    maps the embedding (B, L, time_dim) to its (scale, shift) pairs by a layer of its own; with "shared" it reads the
    pairs ScoreLM's one shared layer made (B, L, 4 D) and adds a learned offset of its own (adaLN-single of
    PixArt-alpha, Chen et al. 2023, sec. 2.3), a 4 D-vector in place of a time_dim x 4 D layer a block."""

    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.model_dim, elementwise_affine=False)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.model_dim, elementwise_affine=False)
        self.ffn = SwiGLU(cfg.model_dim)
        if cfg.conditioning == "film":
            self.film = nn.Linear(cfg.time_dim, 4 * cfg.model_dim)
        else:
            self.film_offset = nn.Parameter(torch.zeros(4 * cfg.model_dim))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, time, rotary, mask):
        modulation = self.film(time) if hasattr(self, "film") else time + self.film_offset
        scale1, shift1, scale2, shift2 = modulation.chunk(4, dim=-1)  # each (B, L, D)
        x = x + self.dropout(self.attn((1 + scale1) * self.attn_norm(x) + shift1, rotary, mask))
        return x + self.dropout(self.ffn((1 + scale2) * self.ffn_norm(x) + shift2))


class ScoreLM(nn.Module):
    """Transformer that reads noisy token embeddings and a noise level per token and predicts logits
    for the clean token at every position (CDCD, Dieleman et al. 2022).

    forward(x, c_noise, segment_ids, self_cond, output_offset): x (B, L, E) float, the noisy embeddings already
    scaled by c_in; c_noise (B, L) float, each token's noise level as the network sees it (EDM's c_noise(sigma);
    zeros for a causal or masked model, which reads none: reads_noise_level);
    segment_ids (B, L) int or None, packed sequence ids (attention stays within equal ids, rotary positions
    restart in each); self_cond (B, L, E) float or None, a previous estimate of the clean embeddings, read by a
    model built with cfg.self_cond (None reads as zeros: no estimate yet; Chen et al. 2022, Analog Bits, sec. 3.2,
    as CDCD uses it); output_offset (B, L, E) float32 or None, a vector added to the head's output before the tied
    projection onto the embeddings, so that logits = (head(h) + offset) . e_v + bias (diffusion.py's output prior:
    z / sigma^2 gives each token's own posterior; the projection then runs in fp32). Returns logits (B, L, V) in the
    compute dtype (float32 with an offset): project(features(...)), where features are the vectors the tied head
    projects onto the embeddings, which chunked.py reduces over the vocabulary without forming the logits.
    `attention` picks the kernel for packed rows: "auto" (FlexAttention on CUDA, else SDPA), "flex" or "sdpa"; it is
    not part of the architecture.
    """

    attention = "auto"

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size + cfg.masked, cfg.embedding_dim)
        self.fourier = FourierFeatures(cfg.fourier_dim)
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.fourier_dim, cfg.time_dim), nn.SiLU(),
            nn.Linear(cfg.time_dim, cfg.time_dim), nn.SiLU())
        # with "shared" conditioning, the (scale, shift) pairs of every block from one layer (Block)
        self.film = nn.Linear(cfg.time_dim, 4 * cfg.model_dim) if cfg.conditioning == "shared" else None
        self.input_proj = nn.Linear(cfg.embedding_dim, cfg.model_dim)
        # the estimate is concatenated to the input, i.e. its own projection added (no bias: zeros add nothing)
        self.self_cond_proj = nn.Linear(cfg.embedding_dim, cfg.model_dim, bias=False) if cfg.self_cond else None
        self.rotary = RotaryEmbedding(cfg.model_dim // cfg.num_heads)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.model_dim)
        self.head = nn.Linear(cfg.model_dim, cfg.embedding_dim, bias=False)
        self.logit_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.apply(self._init_weights)
        if cfg.output_prior:  # the network starts as the single-token posterior and learns what context adds (Plaid)
            nn.init.zeros_(self.head.weight)
        for film in [self.film] + [getattr(block, "film", None) for block in self.blocks]:
            if film is not None:  # every block starts unmodulated
                nn.init.zeros_(film.weight)
                nn.init.zeros_(film.bias)
        for block in self.blocks:
            for proj in (block.attn.out, block.ffn.down):  # GPT-2's scaled residual init
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.num_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0)

    def reads_noise_level(self):
        """Whether the network reads a noise level per token: a continuous diffusion model does; the autoregressive
        baseline and masked diffusion read clean or masked embeddings with c_noise = 0 everywhere (their objectives
        pass zeros), so their noise-level MLP and FiLM layers run once per batch and broadcast."""
        return not (self.cfg.causal or self.cfg.masked)

    def embedding_table(self):
        """All token embeddings, L2-normalised and scaled to norm sqrt(E) (CDCD): (V, E) float32 ((V + 1, E) for a
        masked model: its [MASK] row last)."""
        return F.normalize(self.embedding.weight.float(), dim=-1) * math.sqrt(self.cfg.embedding_dim)

    def embed(self, ids):
        """Normalised embeddings of token ids: (B, L) int64 -> (B, L, E) float32, each of norm sqrt(E)."""
        return F.normalize(self.embedding(ids).float(), dim=-1) * math.sqrt(self.cfg.embedding_dim)

    def forward(self, x, c_noise, segment_ids=None, self_cond=None, output_offset=None):
        return self.project(self.features(x, c_noise, segment_ids, self_cond, output_offset))

    def head_weights(self):
        """The tied projection's weights: the embedding table (V, E) float32 and the logit bias (V,) float32; a masked
        model's [MASK] row is left out, so that it is never predicted."""
        return self.embedding_table()[:self.cfg.vocab_size], self.logit_bias

    def project(self, features):
        """Logits (..., V) of features (..., E): features . e_v + bias, in the features' dtype (float32 for the
        float32 features of an output offset), the bias added in the matmul."""
        table, bias = self.head_weights()
        with torch.autocast(features.device.type, enabled=False):
            return F.linear(features, table.to(features.dtype), bias.to(features.dtype))

    def settle_attention(self, training=True):
        """Resolve `attention` "auto" once for the device the model is on, before it is compiled or run: "flex" on
        CUDA where flex_attention_works at this model's head dim (its backward pass checked too when `training`),
        else "sdpa"; and make the compiled FlexAttention kernel where it will be used. Afterwards the forward checks
        nothing (under torch.compile, no graph break and no retrace). Returns the model."""
        device = self.logit_bias.device
        if self.attention == "auto":
            head_dim = self.cfg.model_dim // self.cfg.num_heads
            works = device.type == "cuda" and flex_attention_works(device, head_dim, backward=training)
            self.attention = "flex" if works else "sdpa"
        if self.attention == "flex" and device.type == "cuda":
            compiled_flex_attention()
        return self

    def packing(self, segment_ids, shape=None, device=None):
        """What every layer's attention needs of a batch's packing, built once per batch (a self-conditioned step
        and every sampler step evaluate the network more than once on the same rows): Packing(rotary, mask), the
        rotary phases (cos, sin), each (B or 1, 1, L, D/H) float32, of each token's position in its own sequence,
        and the attention mask (a BlockMask for "flex", a (B, 1, L, L) bool for "sdpa", None for rows of one
        sequence each in a bidirectional model). segment_ids (B, L) int, or None for one sequence a row (then
        `shape`, (B, L), and `device` give the rows)."""
        if segment_ids is None and self.cfg.causal:  # one sequence a row, causal mask still needed
            segment_ids = torch.ones(shape, dtype=torch.long, device=device)
        if segment_ids is None:
            positions, mask = torch.arange(shape[1], device=device)[None], None
        else:
            flex = self.attention == "flex" or (self.attention == "auto" and segment_ids.is_cuda
                                                and flex_attention_works(segment_ids.device,
                                                                         self.cfg.model_dim // self.cfg.num_heads))
            positions = segment_positions(segment_ids)
            causal = self.cfg.causal
            mask = segment_block_mask(segment_ids, causal) if flex else segment_mask(segment_ids, causal)
        with torch.autocast(positions.device.type, enabled=False):  # rotary phases stay in fp32
            phases = self.rotary(positions.float())[:, None]  # (B or 1, 1, L, D/H)
        return Packing((phases.cos(), phases.sin()), mask)

    def features(self, x, c_noise, segment_ids=None, self_cond=None, output_offset=None):
        """What the tied head projects onto the embeddings: head(h) + output_offset, (B, L, E), in the compute dtype,
        or float32 with an offset (logits of up to E / sigma_min^2 must keep their small differences). The arguments
        are forward's (segment_ids may also be the batch's Packing, built once by packing()); chunked.py reduces
        these features over the vocabulary without forming the logits."""
        B, L, _ = x.shape
        packing = segment_ids if isinstance(segment_ids, Packing) else self.packing(segment_ids, (B, L), x.device)
        if not self.reads_noise_level():  # c_noise is 0 at every token: one embedding, broadcast, not B x L equal ones
            c_noise = c_noise[:1, :1]
        time = self.time_mlp(self.fourier(c_noise))  # (B, L, time_dim), or (1, 1, time_dim)
        if self.film is not None:
            time = self.film(time)  # (B, L, 4 D): every block's modulation but its offset
        h = self.input_proj(x)  # (B, L, D)
        if self.self_cond_proj is not None:  # zeros when there is no estimate: every parameter takes part in
            # every forward, as DistributedDataParallel requires
            h = h + self.self_cond_proj(torch.zeros_like(x) if self_cond is None else self_cond.to(x.dtype))
        for block in self.blocks:
            h = block(h, time, packing.rotary, packing.mask)
        h = self.head(self.norm(h.float()))  # the last norm in fp32, as its weight is; (B, L, E)
        return h if output_offset is None else h.float() + output_offset.float()
