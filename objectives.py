"""The three objectives behind one small interface, so that training, evaluation and sampling call them without
knowing which one a run trains: continuous diffusion (diffusion.py, this project's model), the autoregressive
baseline (autoregressive.py) and masked diffusion (masked.py, MDLM). Each objective is an object with

    name                                      "diffusion", "ar" or "mdlm" (train.py's --objective)
    targets(segment_ids, cond_mask)           (B, L) bool: the positions whose loss a step averages over
    scored(noise, targets)                    (B, L) bool: the positions whose predictions the accuracy counts
    draw(model, ids, segment_ids, cond_mask, step, warp, coins)
                                              the training noise of one micro-batch, a dict of tensors (and flags);
                                              its coin flips (per-token levels or not, self-conditioned or not)
                                              from the generator `coins` where given, else the global one
    loss(model, ids, segment_ids, cond_mask, weight, noise)
                                              (loss, ce (B, L), hit (B, L)): the training loss of that noise
    observed(noise, ce, targets)              (level, ce, counted), each (B, L): each position's noise level,
                                              its cross-entropy in nats and whether it counts, for the loss by level
                                              (diagnostics.py) and the time warp's fit; None without levels
    level_range                               (name, low, high, "log" or "linear"): the noise level's name
                                              ("sigma", "t") and span, or None
    nll(model, ids, cond_mask, segment_ids, draws, seeds)
                                              the NLL of the free positions of each row, or its upper bound (each
                                              row's draws from a generator of its seed): a dict of (B,) float64 CPU
                                              tensors, its terms in nats, "variance" of their sum's estimate (0 where
                                              exact) and "tokens", and for a bound "per_draw" (B, draws)
    sample(model, ids, cond_mask, seeds, settings, segment_ids, context, callback)
                                              (tokens, evaluations, steps) of one batch of layouts

The noise is drawn outside the module that DistributedDataParallel and torch.compile wrap (training.TrainingForward
calls `loss`), so that the random draws are the same in every setting. Several processes flip the coins of a
micro-batch from one generator that they all seed alike (training.coins), so that they run the same forward passes
(a sharded model gathers its weights in each) and a global batch is self-conditioned or not as a whole, as in one
process. Shapes: B batch, L length.
"""
import torch

import autoregressive
import diffusion
import masked

OBJECTIVES = ("diffusion", "ar", "mdlm")


def objective_name(cfg):
    """The objective a model of ModelConfig `cfg` was built for."""
    return "ar" if getattr(cfg, "causal", False) else "mdlm" if getattr(cfg, "masked", False) else "diffusion"


def text_positions(segment_ids, cond_mask):
    """Positions of a packed sequence that are not held: (B, L) bool."""
    return (segment_ids > 0) & ~cond_mask


class Continuous:
    """Continuous diffusion in embedding space (diffusion.py): a noise level sigma per sequence, or per token in a
    --multilevel_prob share of the batches, Gaussian noise, clean anchors in an `anchor_prob` share of the sequences
    (diffusion.draw_anchors), the score-interpolation cross-entropy (plus `elbo_weight` times the bound's diffusion
    term, diffusion.mixed_elbo_loss), self-conditioning in a share of the batches and the output prior's ramp.
    `sigma_min`, `sigma_max`, `rho`: the training levels; their sampling counterparts come from the checkpoint."""
    name = "diffusion"

    def __init__(self, sigma_min=1.0, sigma_max=50.0, rho=1.0, multilevel_prob=0.0, self_cond=0.0, stratified=False,
                 prior_ramp=0, anchor_prob=0.0, elbo_weight=0.0):
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.multilevel_prob, self.self_cond, self.stratified, self.prior_ramp = (multilevel_prob, self_cond,
                                                                                  stratified, prior_ramp)
        self.anchor_prob, self.elbo_weight = anchor_prob, elbo_weight
        self.level_range = ("sigma", sigma_min, sigma_max, "log")

    def targets(self, segment_ids, cond_mask):
        return text_positions(segment_ids, cond_mask)

    def draw(self, model, ids, segment_ids, cond_mask, step, warp=None, coins=None):
        per_token = bool(torch.rand((), generator=coins) < self.multilevel_prob)
        self_cond = model.cfg.self_cond and bool(torch.rand((), generator=coins) < self.self_cond)  # no draw without
        sigma = diffusion.draw_training_sigma(segment_ids, self.sigma_min, self.sigma_max, self.rho, per_token,
                                              warp=warp, stratified=self.stratified)
        noise = torch.randn(*ids.shape, model.cfg.embedding_dim, device=ids.device)
        ramp = min(1.0, (step + 1) / self.prior_ramp) if self.prior_ramp else 1.0
        drawn = {"sigma": sigma, "noise": noise, "self_cond": self_cond,
                 "prior_scale": torch.full((), ramp, device=ids.device)}
        if self.anchor_prob:  # drawn only then, so that a run without anchors draws what it always did
            drawn["anchors"] = diffusion.draw_anchors(sigma, text_positions(segment_ids, cond_mask), segment_ids,
                                                      self.anchor_prob, self.sigma_min, self.sigma_max)
        if self.elbo_weight:  # the density the levels came from, for the ELBO term's importance weights
            drawn["density"] = diffusion.training_density(sigma, self.sigma_min, self.sigma_max, self.rho, warp)
        return drawn

    def loss(self, model, ids, segment_ids, cond_mask, weight, noise):
        anchors = noise.get("anchors")
        if anchors is not None:
            # held clean like a prompt and left out of the loss (and of the ce it reports); the step's mean still
            # divides by every free position, so an anchored token lowers its batch's weight a little
            cond_mask, weight = cond_mask | anchors, weight * ~anchors
        common = dict(segment_ids=segment_ids, cond_mask=cond_mask, weight=weight, self_cond=noise["self_cond"],
                      prior_scale=noise["prior_scale"])
        if self.elbo_weight:
            loss, ce, hit = diffusion.mixed_elbo_loss(model, ids, noise["sigma"], noise["noise"], noise["density"],
                                                      self.elbo_weight, **common)
        else:
            loss, ce, hit = diffusion.score_interpolation_loss(model, ids, noise["sigma"], noise["noise"], **common)
        return loss, ce if anchors is None else ce * ~anchors, hit

    def observed(self, noise, ce, targets):
        return noise["sigma"], ce, self.scored(noise, targets)

    def scored(self, noise, targets):
        return targets if noise.get("anchors") is None else targets & ~noise["anchors"]

    def nll(self, model, ids, cond_mask, segment_ids, draws, seeds):
        return diffusion.nll_bound(model, ids, cond_mask, self.sigma_min, self.sigma_max, draws, segment_ids, seeds)

    def sample(self, model, ids, cond_mask, seeds, settings, segment_ids, context, callback=None):
        dtype = torch.float64 if settings.fp64 else torch.float32
        return diffusion.generate(model, settings.step(), settings.schedule_function(), context["grid"], ids,
                                  cond_mask, seeds, settings.steps, segment_ids, settings.exit(), settings.precision,
                                  dtype, callback=callback, denoising=settings.denoising())


class Autoregressive:
    """The autoregressive baseline (autoregressive.py): clean embeddings, causal attention, the next-token loss; its
    NLL is exact; it samples left to right."""
    name = "ar"
    level_range = None

    def targets(self, segment_ids, cond_mask):
        return autoregressive.autoregressive_targets(segment_ids)

    def draw(self, model, ids, segment_ids, cond_mask, step, warp=None, coins=None):
        return {}

    def loss(self, model, ids, segment_ids, cond_mask, weight, noise):
        return autoregressive.autoregressive_loss(model, ids, segment_ids, weight)

    def observed(self, noise, ce, targets):
        return None

    def scored(self, noise, targets):
        return targets

    @torch.no_grad()
    def nll(self, model, ids, cond_mask, segment_ids, draws=None, seeds=None):
        segment_ids = torch.ones_like(ids) if segment_ids is None else segment_ids
        targets = autoregressive.autoregressive_targets(segment_ids) & ~cond_mask
        _, ce, _ = autoregressive.autoregressive_loss(model, ids, segment_ids, targets.float())
        nats = (ce.double() * targets).sum(-1).cpu()
        return {"nll": nats, "variance": torch.zeros_like(nats), "tokens": targets.sum(-1).double().cpu()}

    def sample(self, model, ids, cond_mask, seeds, settings, segment_ids, context, callback=None):
        return autoregressive.generate_autoregressive(model, ids, cond_mask, seeds, context["eos_id"],
                                                      context["pad_id"], segment_ids, settings.temperature,
                                                      settings.top_p, settings.precision, callback=callback)


class Masked:
    """Masked diffusion, MDLM (masked.py): a time t per sequence (per token in a --multilevel_prob share of the
    batches), stratified over the batch; the free positions masked with probability t; the ELBO's 1/t-weighted
    cross-entropy on the masked positions, or with `uniform` the plain masked cross-entropy."""
    name = "mdlm"

    level_range = ("t", 0.0, 1.0, "linear")  # the mask probability

    def __init__(self, multilevel_prob=0.0, uniform=False):
        self.multilevel_prob, self.uniform = multilevel_prob, uniform

    def targets(self, segment_ids, cond_mask):
        return text_positions(segment_ids, cond_mask)

    def draw(self, model, ids, segment_ids, cond_mask, step, warp=None, coins=None):
        per_token = bool(torch.rand((), generator=coins) < self.multilevel_prob)
        t = masked.draw_mask_times(segment_ids, per_token)
        return {"t": t, "masked": masked.draw_masks(t, text_positions(segment_ids, cond_mask))}

    def loss(self, model, ids, segment_ids, cond_mask, weight, noise):
        return masked.masked_loss(model, ids, noise["t"], noise["masked"], segment_ids, weight, self.uniform)

    def observed(self, noise, ce, targets):
        plain = ce if self.uniform else ce * noise["t"]  # the cross-entropy itself, not the ELBO's 1/t multiple
        return noise["t"], plain, targets & noise["masked"]

    def scored(self, noise, targets):
        return targets & noise["masked"]  # the unmasked ones are carried over: right by construction

    def nll(self, model, ids, cond_mask, segment_ids, draws, seeds):
        return masked.nll_bound(model, ids, cond_mask, draws, segment_ids, seeds)

    def sample(self, model, ids, cond_mask, seeds, settings, segment_ids, context, callback=None):
        return masked.generate_masked(model, ids, cond_mask, seeds, settings.steps, segment_ids, settings.temperature,
                                      settings.top_p, settings.precision, callback=callback)


def training_objective(args):
    """The objective of train.py's flags (args.objective and its own flags)."""
    if args.objective == "ar":
        return Autoregressive()
    if args.objective == "mdlm":
        return Masked(args.multilevel_prob, args.mask_weight == "uniform")
    return Continuous(args.sigma_min, args.sigma_max, args.rho, args.multilevel_prob, args.self_cond,
                      args.stratified_sigma, args.prior_ramp, args.anchor_prob, args.elbo_weight)


def run_objective(model, sampling=None):
    """The objective of a trained model (its ModelConfig) for evaluation and sampling; a continuous run's bound spans
    the checkpoint's `sampling` levels (sigma_min, sigma_max; needed for its `nll` only)."""
    name = objective_name(model.cfg)
    if name == "ar":
        return Autoregressive()
    if name == "mdlm":
        return Masked()
    return Continuous() if sampling is None else Continuous(sampling["sigma_min"], sampling["sigma_max"])
