# %% [markdown]
# # Lesson 9: training a looped model
#
# ```bash
# python lessons/09_training.py
# ```
#
# Training a looped model asks two questions a plain transformer never faces: how many loop steps
# to run, and how far back through them to propagate the gradient. Parcae's answers: draw the depth
# at random for every sequence (so the model learns to work at many depths), and backpropagate only
# through the last μ_bwd steps (so memory stays bounded). This lesson checks what the truncated
# gradient is the exact gradient of, measures what it saves, and then trains a small model on real
# text and watches the loss fall.

# %%
import tempfile
from dataclasses import replace

from common import small_corpus, train  # first: it sets NumPy's BLAS to one thread
import numpy as np

from minparcae import data, model
from minparcae.gradcheck import check_grads, rel_error

import exercise  # lessons/exercise.py
exercise.grade_if_asked()  # with --exercise N: grade exercise N (the end of the lesson) and stop

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Depth sampling
#
# Each training sequence runs its own number of loop steps,
#
# $$ \text{total} = \max(1, \mathrm{Poisson}(\mu_{rec})), $$
#
# of which the last k = min(total, μ_bwd) keep activations for the backward and the first
# total − k run forward only. `model.sample_depths` draws the totals. The Poisson distribution
# puts most sequences near μ_rec and some far from it on both sides, which is what later lets the
# same weights be run at other depths (lesson 10). Its mean is μ_rec, and clamping the zeros to 1
# adds P(0) = e^(−μ_rec):

# %%
cfg = model.Config(vocab_size=64, context=16, d_model=16, n_head=2, n_prelude=1, n_recurrent=1,
                   n_coda=1, mean_recurrence=4, backprop_depth=2)
depths = model.sample_depths(np.random.default_rng(0), 100_000, cfg)
mu = cfg.mean_recurrence
print(f"depths drawn for 100,000 sequences, μ_rec = {mu}:")
for n in range(1, 13):
    share = np.mean(depths == n)
    print(f"  {n:2d} {share:6.1%} " + "#" * int(200 * share))
k = np.minimum(depths, cfg.backprop_depth)
print(f"mean depth {depths.mean():.3f} (μ_rec + e^−μ_rec = {mu + np.exp(-mu):.3f}); "
      f"mean steps with gradient {k.mean():.3f} (μ_bwd = {cfg.backprop_depth})")
assert abs(depths.mean() - (mu + np.exp(-mu))) < 0.02
assert k.max() == cfg.backprop_depth and np.all(depths - k >= 0)

# %% [markdown]
# A batch mixes depths. `model.forward(..., depths=...)` runs T = max(total) loop steps and
# right-aligns the sequences: sequence b joins at step T − total_b and keeps its initial state
# until then, so every sequence computes exactly its own recurrence, and the steps with gradient
# of all sequences fall in the batch's last μ_bwd steps. Check: a batch with depths (2, 5) gives
# the same loss as the two sequences run alone, each at its own depth.

# %%
p = {key: v + 0.3 * rng.standard_normal(v.shape)          # noise, so that no block is the identity
     for key, v in model.init_params(cfg, seed=0, dtype=np.float64, xp=np).items()}
ids = rng.integers(0, cfg.vocab_size, (2, 10))
targets = rng.integers(0, cfg.vocab_size, (2, 10))
h0 = model.initial_state(cfg, (2, 10, cfg.d_h), "like-init", rng, np.float64)
both, _, diag = model.forward(p, cfg, ids, targets, depths=np.array([2, 5]), h0=h0)
alone = [model.forward(p, cfg, ids[b:b + 1], targets[b:b + 1], n_loops=n, h0=h0[b:b + 1])[0]
         for b, n in enumerate((2, 5))]
print(f"batch with depths (2, 5): loss {both:.12f}, mean of the two alone {np.mean(alone):.12f}")
assert diag["steps"] == 5 and abs(both - np.mean(alone)) < 1e-12

# %% [markdown]
# ## 2. Truncated backprop through the loop: what gradient is it?
#
# Run T steps, the last k of them with gradient. `model.backward` walks back through those k
# steps and stops: the gradient that would flow into h_{T−k}, and from there into the parameters
# through the first T − k steps, is dropped. That is not an approximation of an unknown quantity;
# it is the exact gradient of a slightly different function. Freeze the state after T − k steps as
# a constant,
#
# $$ h_{frozen} = h_{T-k}(\theta_0) \qquad \text{(computed once, at the current parameters } \theta_0 \text{)}, $$
#
# and run the remaining k steps and the coda from it:
#
# $$ L_{trunc}(\theta) = \text{loss of the model started at } h_{frozen} \text{ and looped } k \text{ times.} $$
#
# L_trunc(θ₀) equals the real loss, and its gradient is what the truncated backward computes. The
# check below perturbs every parameter (prelude, injection, loop, coda, embedding) and compares.

# %%
T, k = 5, cfg.backprop_depth
loss, cache, _ = model.forward(p, cfg, ids, targets, n_loops=T, h0=h0, train=True)
grads = model.backward(p, cfg, cache)
h_frozen = model.state_after(p, cfg, ids, T - k, h0)             # h_{T−k}, no gradient kept


def truncated_loss():
    return model.forward(p, cfg, ids, targets, n_loops=k, h0=h_frozen)[0]


assert abs(truncated_loss() - loss) < 1e-12                      # same value at θ₀
errors = check_grads(truncated_loss, p, grads, n_samples=10)
print(f"\ntruncated gradient vs finite differences of L_trunc, over {len(errors)} tensors: "
      f"worst relative error {max(errors.values()):.1e}")
# (Rounding alone reaches ~1e-6 on a tensor whose gradient is tiny; a wrong gradient gives O(1).)
assert max(errors.values()) < 1e-5

# %% [markdown]
# The real loss depends on the parameters through the first T − k steps too, so its gradient is
# different. Backpropagating through all T steps (μ_bwd = T) gives that full gradient; the two
# agree where the loop plays no part (the coda runs after it) and differ inside the loop.

# %%
_, cache_full, _ = model.forward(p, replace(cfg, backprop_depth=T), ids, targets, n_loops=T, h0=h0,
                                 train=True)
full = model.backward(p, cfg, cache_full)
for name in ("coda.0.mlp.fc", "core.0.attn.wq", "inject.A_log"):
    print(f"  {name:16s} truncated vs full gradient: relative difference "
          f"{rel_error(grads[name], full[name]):.1e}")
assert rel_error(grads["coda.0.mlp.fc"], full["coda.0.mlp.fc"]) < 1e-12
assert rel_error(grads["core.0.attn.wq"], full["core.0.attn.wq"]) > 1e-3

# %% [markdown]
# ## 3. What truncation saves
#
# Full backprop keeps activations for every step, so its memory grows with the deepest sequence of
# the batch; truncated backprop keeps μ_bwd steps, whatever the depths (lesson 7 measured this per
# step). With sampled depths a batch of 16 routinely reaches twice μ_rec:

# %%
ids16 = rng.integers(0, cfg.vocab_size, (16, 16))
targets16 = rng.integers(0, cfg.vocab_size, (16, 16))
p32 = model.init_params(cfg, seed=0, dtype=np.float32, xp=np)
depths16 = model.sample_depths(rng, 16, cfg)
deepest = int(depths16.max())
print(f"\nbatch of 16, deepest sequence {deepest} loop steps:")
nbytes = {}
for name, c in (("truncated", cfg), ("full", replace(cfg, backprop_depth=deepest))):
    _, cache16, _ = model.forward(p32, c, ids16, targets16, depths=depths16, rng=rng, train=True)
    nbytes[name] = model.cache_nbytes(cache16, exclude=p32.values())
    print(f"  {name:9s} backprop (μ_bwd = {c.backprop_depth:2d}): {len(cache16.steps):2d} loop "
          f"steps kept, {nbytes[name]:,} bytes of activations in all")
assert deepest > cfg.backprop_depth and nbytes["full"] > nbytes["truncated"]

# %% [markdown]
# ## 4. A real training run
#
# Data: a few modules of Python's standard library, tokenised by a byte-level BPE of 384 ids
# trained on them (`data.prepare_data`, cached in a temporary folder). Model: width 32, context
# 32, one block each for prelude, loop and coda, μ_rec = 4, μ_bwd = 2. Each step of `train` in
# `lessons/common.py`:
#
#     x, y = data.get_batch(dataset.train, batch_size, cfg.context, rng)      # (B, S) each
#     depths = model.sample_depths(rng, batch_size, cfg)                       # section 1
#     loss, cache, diag = model.forward(params, cfg, x, y, depths=depths, rng=rng, train=True)
#     grads = model.backward(params, cfg, cache)                               # section 2
#     optim.clip_grad_norm(grads, 1.0)
#     opt.step(params, grads, optim.lr_at(step, steps, lr, schedule="trapezoid"))
#
# Two references for the numbers: a model that knows nothing pays ln V nats per token, and the best
# model that ignores context, the unigram distribution (`data.unigram_entropy`), pays less. A model
# that reads its context must beat both.

# %%
with tempfile.TemporaryDirectory() as tmp:
    dataset = small_corpus(tmp, vocab_size=384)
    V = dataset.tokenizer.vocab_size
    cfg = model.Config(vocab_size=V, context=32, d_model=32, n_head=2, n_prelude=1, n_recurrent=1,
                       n_coda=1, mean_recurrence=4, backprop_depth=2)
    unigram = data.unigram_entropy(dataset.train, V, dataset.val)
    print(f"\n{len(dataset.train):,} training tokens, {len(dataset.val):,} validation tokens; "
          f"{model.count_params(cfg):,} parameters")
    print(f"ln V = {np.log(V):.3f}, unigram entropy of the validation text = {unigram:.3f}")

    def validation_loss(params):
        return model.evaluate(params, cfg, data.iter_eval_batches(dataset.val, 16, cfg.context, 8))

    before = validation_loss(model.init_params(cfg, seed=0))     # where `train` starts from
    params, losses = train(cfg, dataset, steps=80, lr=1e-2, log_every=10)
    after = validation_loss(params)

print(f"validation loss at T = μ_rec: {before:.3f} before training, {after:.3f} after 80 steps")
assert abs(before - np.log(V)) < 0.5                  # an untrained model is close to uniform
assert np.mean(losses[-10:]) < losses[0] - 1.5        # the training loss fell by over 1.5 nats
assert after < unigram                                # and the model uses its context

# %% [markdown]
# ## Exercises
#
# Write each function, then grade it (lesson 1 says how exercises work); grading trains nothing:
#
#     python lessons/09_training.py --exercise 1              # or 2, 3
#     python lessons/09_training.py --exercise 1 --solution   # lessons/solutions/ instead
#
# 1. `sample_depths`: section 1's depth per sequence, from the generator it is given. Graded on
#    200,000 draws at two μ_rec: every depth at least 1, the mean μ_rec + e^(−μ_rec) and the share
#    of each depth that of the clamped Poisson distribution, within stated tolerances (several
#    standard errors of the sample), and the same draws again from an equal generator.
# 2. `loop_schedule`: what each sequence of a batch does at each of the T = max(depths) steps of
#    section 1's right-aligned loop: wait, run without gradient, or run with it. Graded exactly;
#    the steps with gradient are read from the caches of `model.forward` itself.
# 3. `truncated_grads`: section 2's point on a scalar loop, h_t = a·h_{t−1} + b·e, L = h_T: the
#    gradient with respect to a and b of the loss whose first T − k steps are frozen. Graded
#    against central differences of that frozen-state loss, to 1e-7.

# %%
import numpy as np

from exercise import cmp, expect
from minparcae import model


def sample_depths(rng, batch, mu_rec):
    """(batch,) int loop counts, max(1, Poisson(mu_rec)) each, drawn from the Generator rng."""
    raise NotImplementedError  # exercise 1: rng.poisson, then clamp the zeros


def check_sample_depths(fn):
    ok = []
    for mu in (4.0, 1.5):
        n = 200_000
        depths = np.asarray(fn(np.random.default_rng(1), n, mu))
        again = np.asarray(fn(np.random.default_rng(1), n, mu))
        share = np.bincount(np.clip(depths, 0, 30), minlength=31)[:31] / n
        pmf = np.exp(-mu) * np.cumprod(np.r_[1.0, np.full(30, mu) / np.arange(1, 31)])  # Poisson
        want = np.r_[0.0, pmf[0] + pmf[1], pmf[2:]]                  # P(0) moves to depth 1
        mean, mean_want = depths.mean(), mu + np.exp(-mu)
        gap = np.abs(share - want).max()
        ok += [expect(f"μ {mu:g}: shape, ints", depths.shape == (n,) and depths.dtype.kind in "iu",
                      f"{depths.shape} {depths.dtype}, want ({n},) integers"),
               expect(f"μ {mu:g}: depth ≥ 1", depths.min() >= 1, f"the smallest is {depths.min()}"),
               expect(f"μ {mu:g}: mean", abs(mean - mean_want) < 0.03, f"{mean:.4f}, want "
                      f"{mean_want:.4f} ± 0.03", f"{mean:.4f}, μ + e^(−μ) = {mean_want:.4f}"),
               expect(f"μ {mu:g}: shares", gap < 0.005, f"off by up to {gap:.4f}, the worst at depth "
                      f"{np.abs(share - want).argmax()}", f"within {gap:.4f} of the distribution's"),
               expect(f"μ {mu:g}: from rng", np.array_equal(depths, again),
                      "two equal generators gave different depths: draw from rng, not np.random")]
    return all(ok)


# %%
WAIT, FORWARD, GRAD = 0, 1, 2


def loop_schedule(depths, mu_bwd):
    """depths: (B,) loop counts. Returns (B, T) ints, T = max(depths): at step t sequence b
    WAITs (keeps h_0), runs FORWARD only, or runs with GRAD (its activations kept)."""
    raise NotImplementedError  # exercise 2: b runs the last depths[b] steps, with GRAD the last k


def check_loop_schedule(fn):
    cfg = model.Config(vocab_size=32, context=8, d_model=8, n_head=1, n_prelude=0, n_recurrent=1,
                       n_coda=0, backprop_depth=3)
    p = model.init_params(cfg, seed=0, dtype=np.float64, xp=np)
    rng = np.random.default_rng(2)
    ok = []
    for depths in (np.array([2, 5, 1, 7, 3]), np.array([4, 4]), np.array([1, 9, 2])):
        ids = rng.integers(0, 32, (len(depths), 8))
        _, cache, diag = model.forward(p, cfg, ids, ids, depths=depths, rng=rng, train=True)
        T = diag["steps"]
        want = np.where(np.arange(T)[None, :] >= T - depths[:, None], FORWARD, WAIT)  # right-aligned
        for t, step in zip(range(T - len(cache.steps), T), cache.steps):      # the model's own
            rows = np.arange(len(depths)) if step.rows is None else step.rows
            want[rows, t] = GRAD
        ok.append(cmp(f"depths {depths.tolist()}", fn(depths, cfg.backprop_depth), want, rtol=0))
    return all(ok)


# %%
def truncated_grads(a, b, e, h0, T, k):
    """h_t = a·h_{t−1} + b·e for t = 1..T from h0, L = h_T, the state after T − k steps frozen.
    Returns (dL/da, dL/db) through the last k steps."""
    raise NotImplementedError  # exercise 3: walk back k steps: G = ∂L/∂h_t, starting at 1


def check_truncated_grads(fn):
    a, b, e, h0, T, eps = 0.9, 0.5, 1.3, 0.7, 6, 1e-6

    def run(a_, b_, h, steps):
        for _ in range(steps):
            h = a_ * h + b_ * e
        return h

    ok = []
    for k in (1, 3, T):          # k = T: nothing frozen, the full gradient
        frozen = run(a, b, h0, T - k)            # h_{T−k} at the current a, b: a constant from now

        def L(a_, b_):
            return run(a_, b_, frozen, k)

        want = [(L(a + eps, b) - L(a - eps, b)) / (2 * eps), (L(a, b + eps) - L(a, b - eps)) / (2 * eps)]
        got = fn(a, b, e, h0, T, k)
        ok += [cmp(f"dL/da, k = {k}", got[0], want[0], rtol=1e-7),
               cmp(f"dL/db, k = {k}", got[1], want[1], rtol=1e-7)]
    return all(ok)


# %%
EXERCISES = {1: (sample_depths, check_sample_depths), 2: (loop_schedule, check_loop_schedule),
             3: (truncated_grads, check_truncated_grads)}

# %%
print("lesson 9 passed")
