"""The tied output head computed a chunk of rows at a time: logits = features @ table.T + bias over the vocabulary,
reduced on the spot, so that no (N, V) tensor outlives its chunk. Two reductions: the cross-entropy with its gradient
(training) and the softmax's expected embedding (score interpolation: the self-conditioning pass and the samplers).

A (B L) x V tensor of logits is 131 MB at batch 64 x 64 and 8,000 tokens: materialised for the loss, again for
log-softmax's backward and again for the accuracy, it is read and written from memory several times a step, where a
chunk of it stays in cache. No project imports: diffusion.py passes the model's features, table and bias.
Shapes: N rows (any leading dims flattened), E embedding dim, V vocabulary.
"""
import torch

CHUNK_ROWS = 256  # rows of logits at a time on the CPU: 256 x 8,000 fp32 is 8 MB (RESULTS.md, "Training throughput")
# logits at a time elsewhere (a GPU): 256 MB of fp32, so that a batch is a few large products, not hundreds of
# small ones (128 rows of 256 tokens are 4 chunks of 8,388 rows at a vocabulary of 8,000); not yet measured on a GPU
DEVICE_CHUNK_LOGITS = 2**26


def chunk_rows(device, vocab_size):
    """Rows of logits a chunk holds on `device` for a vocabulary of `vocab_size`: CHUNK_ROWS on the CPU (a chunk
    that stays in cache), else DEVICE_CHUNK_LOGITS / vocab_size, at least CHUNK_ROWS."""
    if device.type == "cpu":
        return CHUNK_ROWS
    return max(CHUNK_ROWS, DEVICE_CHUNK_LOGITS // vocab_size)


def chunk_logits(features, table, bias):
    """Logits of one chunk, float32: features (n, E) in the compute dtype, table (V, E) in the same dtype, bias (V,)
    float32 -> (n, V) float32, the product in the features' dtype and the bias added in float32."""
    return torch.addmm(bias, features, table.t()) if features.dtype == torch.float32 \
        else (features @ table.t()).float() + bias


class TiedCrossEntropy(torch.autograd.Function):
    """The summed, weighted cross-entropy of the tied head and its gradient, computed together a chunk of rows at a
    time: the gradient of cross-entropy with respect to the logits is softmax minus one-hot, so that log-softmax's
    backward pass and the (N, V) tensors it keeps are not needed. forward(features (N, E), table (V, E), bias (V,)
    float32, targets (N,) int64, weight (N,) float32, grads bool, chunk int) -> loss (0-dim float32) = sum_i weight_i
    ce_i, with ce (N,) float32 nats and hit (N,) bool (the target's logit is the row's largest; a tie counts as a hit),
    neither differentiable. The hit is read from the target's logit and the row's max, not from an argmax: a max with
    its index is an order of magnitude slower over the vocabulary (RESULTS.md, "Training throughput"). The logits'
    product runs in the features' dtype (the table is cast to it) and the softmax in float32; the gradients' products
    run in bf16 for bf16 features and in float32 otherwise (fp16 would underflow them before backward applies the loss
    scale), and they are kept in float32. With `grads` the gradients of the loss with respect to features, table and
    bias are computed in forward and scaled by the loss's incoming gradient in backward (Liger Kernel's fused linear
    cross-entropy works the same way, Hsu et al. 2024); without, backward is not available."""

    @staticmethod
    def forward(ctx, features, table, bias, targets, weight, grads, chunk):
        with torch.autocast(features.device.type, enabled=False):  # the dtypes are the features'
            return TiedCrossEntropy.chunks(ctx, features, table, bias, targets, weight, grads, chunk)

    @staticmethod
    def chunks(ctx, features, table, bias, targets, weight, grads, chunk):
        """forward's work, under no autocast."""
        table_c = table.to(features.dtype)
        # the gradients' products: in bf16 for bf16 features (fp32's range), else in fp32, since fp16 would underflow
        # the unscaled gradients (the loss scale is applied in backward)
        grad_dtype = torch.bfloat16 if features.dtype == torch.bfloat16 else torch.float32
        table_g = table.to(grad_dtype)
        ce = torch.empty(len(features), dtype=torch.float32, device=features.device)
        hit = torch.empty(len(features), dtype=torch.bool, device=features.device)
        if grads:
            grad_features = torch.empty(features.shape, dtype=torch.float32, device=features.device)
            grad_table = torch.zeros(table.shape, dtype=torch.float32, device=table.device)
            grad_bias = torch.zeros_like(bias, dtype=torch.float32)
        for start in range(0, len(features), chunk):
            rows = slice(start, start + chunk)
            logits = chunk_logits(features[rows], table_c, bias)  # (n, V) float32
            target = targets[rows, None]
            target_logit = logits.gather(1, target).squeeze(1)
            top = logits.amax(dim=-1)
            hit[rows] = target_logit >= top
            probs = logits.sub_(top[:, None]).exp_()  # unnormalised, in place of the logits
            total = probs.sum(dim=-1)
            ce[rows] = total.log() + top - target_logit  # logsumexp - the target's logit
            if grads:  # d loss / d logits = weight (softmax - one-hot)
                w = weight[rows]
                dlogits = probs.mul_((w / total)[:, None]).scatter_add_(1, target, -w[:, None])
                grad_bias += dlogits.sum(dim=0)
                if grad_dtype == torch.float32:  # straight into the gradients, no temporaries
                    torch.mm(dlogits, table_g, out=grad_features[rows])
                    grad_table.addmm_(dlogits.t(), features[rows].float())
                else:
                    dlogits = dlogits.to(grad_dtype)
                    grad_features[rows] = (dlogits @ table_g).float()
                    grad_table += (dlogits.t() @ features[rows]).float()
        loss = (ce * weight).sum()
        ctx.mark_non_differentiable(ce, hit)
        if grads:
            ctx.save_for_backward(grad_features, grad_table, grad_bias)
        ctx.grads, ctx.dtypes = grads, (features.dtype, table.dtype, bias.dtype)
        return loss, ce, hit

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_hit):
        if not ctx.grads:
            raise RuntimeError("TiedCrossEntropy ran without grads=True; its gradients were not computed")
        # scaled in float32, then cast to each input's dtype
        grads = [(g * grad_loss).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None, None, None)


@torch.compiler.disable  # run eagerly under torch.compile, which would unroll the chunk loop (one copy per chunk)
def tied_cross_entropy(features, table, bias, targets, weight=None, chunk=None):
    """The tied head's cross-entropy, chunked (TiedCrossEntropy): features (..., E) in the compute dtype, table (V, E),
    bias (V,), targets (...) int64 and weight (...) float or None (every position 1) -> (loss, ce, hit): the 0-dim
    float32 sum of weight * ce, differentiable with respect to features, table and bias when grad mode is on (not
    the weights); ce (...) float32 per-position cross-entropy in nats, not differentiable (a loss built from it gets
    no gradient: weigh the positions through `weight`); hit (...) bool, whether the target is the most likely token
    at each position (ties count), for the accuracy.
    The gradient equals F.cross_entropy's on the full logits (features @ table.T + bias). chunk: rows at a time
    (default chunk_rows of the device). Under torch.compile it runs eagerly, a graph break: compiled, the loop is
    unrolled, and its compile time grows with the batch (minutes at 128 rows of 256 tokens)."""
    shape = targets.shape
    weight = torch.ones(shape, device=targets.device) if weight is None else weight
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (features, table, bias))
    loss, ce, hit = TiedCrossEntropy.apply(features.reshape(-1, features.shape[-1]), table, bias.float(),
                                           targets.reshape(-1), weight.detach().reshape(-1).float(), grads,
                                           chunk or chunk_rows(features.device, len(table)))
    return loss, ce.view(shape), hit.view(shape)


@torch.compiler.disable  # as tied_cross_entropy
@torch.no_grad()
def tied_expectation(features, table, bias, dtype=torch.float32, chunk=None, with_top=True):
    """The softmax of the tied head's logits, reduced a chunk of rows at a time: features (..., E), table (V, E),
    bias (V,) -> (expected, top, argmax): expected (..., E) `dtype`, softmax(logits) @ table (score interpolation's
    estimate, Dieleman et al. 2022, section 3); top (...) `dtype`, the largest probability; argmax (...) int64, its
    token; without `with_top` (training's self-conditioning pass, which reads the estimate alone) top and argmax
    are None and their max over the vocabulary is skipped. The logits are formed as in chunk_logits, then cast to
    `dtype` (float32 or float64) for the softmax. chunk: rows at a time (default chunk_rows of the device). Eager
    under torch.compile, as tied_cross_entropy."""
    flat, chunk = features.reshape(-1, features.shape[-1]), chunk or chunk_rows(features.device, len(table))
    table_c, table_out = table.to(flat.dtype), table.to(dtype)
    expected = torch.empty(len(flat), table.shape[1], dtype=dtype, device=flat.device)
    top = torch.empty(len(flat), dtype=dtype, device=flat.device) if with_top else None
    argmax = torch.empty(len(flat), dtype=torch.long, device=flat.device) if with_top else None
    for start in range(0, len(flat), chunk):
        rows = slice(start, start + chunk)
        with torch.autocast(flat.device.type, enabled=False):
            probs = chunk_logits(flat[rows], table_c, bias.float()).to(dtype).softmax(dim=-1)  # (n, V)
            if with_top:
                top[rows], argmax[rows] = probs.max(dim=-1)
            expected[rows] = probs @ table_out
    lead = features.shape[:-1]
    return expected.view(*lead, -1), *(None if t is None else t.view(lead) for t in (top, argmax))
