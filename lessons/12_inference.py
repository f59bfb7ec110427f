# %% [markdown]
# # Lesson 12: inference with a looped model. A KV cache per loop step, and stopping early
#
# ```bash
# python lessons/12_inference.py
# ```
#
# A transformer that generates text keeps the keys and values of the tokens it has read (a KV
# cache), so that a new token costs one pass over one position instead of a pass over the whole
# sequence. A looped model runs its recurrent block T times per token, and at each loop step every
# position holds a different state h_t, hence different keys and values. Its cache therefore holds
# one slot per (loop step, recurrent layer), and inference memory grows with T, where training
# memory does not (lesson 7). This lesson lays that cache out, checks that decoding through it gives
# the logits of a full forward pass, measures what it saves, and then lets each token choose its own
# loop count: a token stops looping once its prediction stops moving, which lesson 10's law
# L(T) = L∞ + Z·e^(−zT) says happens after a few steps.
#
# Notation: T is the loop count, S the sequence length, μ_rec the mean training depth, ε the exit
# threshold; n_p, n_r, n_c count the prelude, recurrent and coda blocks.

# %%
import tempfile
import time

from common import small_corpus, train  # first: it sets NumPy's BLAS to one thread
import numpy as np

from minparcae import data, generate, model

import exercise  # lessons/exercise.py
exercise.grade_if_asked()  # with --exercise N: grade exercise N (the end of the lesson) and stop

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The cache: one slot per (loop step, recurrent layer)
#
# Decoding position i, the recurrent block's attention at loop step t compares the query made from
# position i's state entering step t with the keys of every earlier position j at the same step,
# made from position j's state entering step t. That is what
# a full forward pass computes, since all positions go through the loop together. For a token
# decoded later to see the same numbers, the cache must keep position j's keys and values at every
# step t, not only at its last. The prelude and coda run once per token, so one slot each is enough
# (H_kv key/value heads of size hs outside the loop; H_r heads of size hs_r inside it):
#
# | layers | slots | keys, and values alike |
# |---|---|---|
# | prelude.i, coda.i | one slot per layer | (B, H_kv, S, hs) |
# | core.i at loop step t | one slot per (layer, step): T·n_r | (B, H_r, S, hs_r) |
#
# `model.KVCache(cfg, batch, capacity, core_slots)` allocates them; here for T = 4:

# %%
cfg = model.Config(vocab_size=64, context=32, d_model=16, n_head=2, n_prelude=1, n_recurrent=2,
                   n_coda=1, mean_recurrence=4, backprop_depth=2)
kv = model.KVCache(cfg, 1, 1, 4)
print("slots of the cache at T = 4:", ", ".join(f"{name}@{step}" if step is not None else name
                                                  for name, step in kv.slots))
assert len(kv.slots) == cfg.n_prelude + 4 * cfg.n_recurrent + cfg.n_coda

# %% [markdown]
# One position costs its keys and values in every slot. Outside the loop a layer's keys have
# H_kv heads of size hs = d / H; inside, every head has its own keys (no grouping in the loop), so
# a core slot is H_r·hs_r = d_h wide. In float32 (4 bytes):
#
# $$ \text{bytes/position} = 4 \cdot 2 \cdot \left[ (n_p + n_c) H_{kv} hs + T n_r d_h \right] $$
#
# linear in T, with slope 4·2·n_r·d_h. Training keeps activations for the μ_bwd steps it
# backpropagates, whatever T is (lessons 7 and 9); the table sets the two side by side, the
# training column as activation bytes per token of one training forward (`model.cache_nbytes`).


# %%
def kv_bytes_per_position(c, T, itemsize=4):
    outside = (c.n_prelude + c.n_coda) * c.kv_heads * (c.d_model // c.n_head)
    return itemsize * 2 * (outside + T * c.n_recurrent * c.d_h)


p32 = model.init_params(cfg, seed=0, dtype=np.float32, xp=np)
ids = rng.integers(0, cfg.vocab_size, (2, cfg.context))
targets = rng.integers(0, cfg.vocab_size, (2, cfg.context))
Ts = np.array([1, 2, 4, 8, 16])
kv_bytes, train_bytes = [], []
print(f"\n   T   KV cache bytes/position   training activations bytes/token (μ_bwd = "
      f"{cfg.backprop_depth})")
for T in Ts:
    kv_bytes.append(model.KVCache(cfg, 1, 1, T).bytes_per_position())
    _, cache, _ = model.forward(p32, cfg, ids, targets, n_loops=T, rng=rng, train=True)
    train_bytes.append(model.cache_nbytes(cache, exclude=p32.values()) // ids.size)
    print(f"  {T:2d}   {kv_bytes[-1]:23,}   {train_bytes[-1]:38,}")
assert kv_bytes == [kv_bytes_per_position(cfg, T) for T in Ts]
assert np.all(np.diff(kv_bytes) / np.diff(Ts) == 4 * 2 * cfg.n_recurrent * cfg.d_h)  # linear in T
assert len(set(b for T, b in zip(Ts, train_bytes) if T >= cfg.backprop_depth)) == 1  # flat in T

# %% [markdown]
# At the paper's 140M size and T = μ_rec = 8, a position's keys and values fill 2 + 8·2 + 2 = 20
# layers' worth: the cache of a looped model is that of the transformer as deep as its unrolled
# loop, not that of the transformer with as many parameters (`model.fixed_depth_baseline`, the
# same six blocks each run once).

# %%
big = model.preset("parcae-140m")
mib = {name: model.KVCache(c, 1, 1, c.mean_recurrence).bytes_per_position() * c.context / 2**20
       for name, c in (("looped", big), ("fixed depth", model.fixed_depth_baseline(big)))}
print(f"\nparcae-140m, float32, one sequence of {big.context} tokens: KV cache {mib['looped']:.0f} "
      f"MiB at T = {big.mean_recurrence}, {mib['fixed depth']:.0f} MiB for the same blocks at "
      f"fixed depth")
assert mib["looped"] / mib["fixed depth"] == 20 / 6

# %% [markdown]
# ## 2. Decoding through the cache gives the full forward's logits
#
# `generate.Decoder` holds a KVCache and feeds tokens to `model.forward(..., kv=cache)`: the same
# function that trains the model, told that positions 0..length−1 are already in the cache. Prefill
# the prompt in one pass, then feed the rest one token at a time, and compare each token's logits
# with one full forward pass over the whole sequence. Two things make them equal: the per-step
# slots of section 1, and the initial state. Evaluation starts the loop from cfg.eval_state =
# "seeded", where position i's h_0 is drawn from a generator seeded with i, so a position gets the
# same h_0 whether it runs alone or with the others ("like-init" would draw a fresh one each call).
# As in lesson 7, noise on every parameter keeps the blocks from being the identity; float64, so
# that the two computations can differ only by rounding, ~1e-15 of the logits' size.

# %%
p = {k: v + 0.3 * rng.standard_normal(v.shape)
     for k, v in model.init_params(cfg, seed=0, dtype=np.float64, xp=np).items()}
B, S, P, T = 2, 24, 8, 4                          # batch, sequence length, prompt length, loop steps
ids = rng.integers(0, cfg.vocab_size, (B, S))
full = model.forward(p, cfg, ids, n_loops=T)[0]                       # (B, S, V)


def decode(kv_slots=None):
    dec = generate.Decoder(p, cfg, B, n_loops=T, kv_slots=kv_slots)
    logits = [dec.feed(ids[:, :P])[0]]                                  # prefill: (B, P, V)
    logits += [dec.feed(ids[:, i:i + 1])[0] for i in range(P, S)]       # then (B, 1, V) each
    return np.concatenate(logits, axis=1), dec


cached, dec = decode()
print(f"\ncached decoding vs one full forward, T = {T}: max |difference| "
      f"{np.abs(cached - full).max():.1e} (logits up to {np.abs(full).max():.1f})")
assert np.abs(cached - full).max() < 1e-12

# %% [markdown]
# Why a slot per step: the keys that core.0 wrote at successive steps differ by a large fraction
# of their size. Keep a single slot per core layer (kv_slots=1: every step overwrites it, and a
# token reads each earlier position's keys from its last step) and the logits are no longer the
# full forward's.

# %%
keys = [dec.kv.slots["core.0", t][0][:, :, :S] for t in range(T)]       # (B, H, S, hs) each
moved = [np.linalg.norm(keys[t] - keys[t - 1]) / np.linalg.norm(keys[t]) for t in range(1, T)]
shared, _ = decode(kv_slots=1)
print("core.0 keys, relative change from one step to the next:",
      " ".join(f"{m:.2f}" for m in moved))
print(f"one shared slot per core layer: max |difference| from the full forward "
      f"{np.abs(shared - full).max():.2f}")
assert min(moved) > 0.05 and np.abs(shared - full).max() > 1e-2

# %% [markdown]
# ## 3. What the cache saves
#
# Without a cache (`generate.generate(..., cache=False)`), each new token reruns the whole window:
# token k of n, after a prompt of P, runs P + k positions through the prelude, T loop steps and the
# coda. With it, each token runs one position. Counting position-steps (one position through one
# loop step; `stats["position_steps"]`):
#
# $$ \text{uncached: } T \sum_{k = 0}^{n - 1} (P + k) = T \left(nP + \frac{n(n-1)}{2}\right) \qquad \text{cached: } T (P + n - 1) $$
#
# (the cached decoder runs the prompt once and then every generated token but the last). The
# position-steps per token grow with the length without the cache, and stay flat with it. The
# wall time of a cached token does not stay quite flat: it still attends over all S positions
# (at S ≈ 128 here, about a quarter of a block's work) and pays a fixed cost per call, so the
# speed-up comes out well below the ratio of position-steps. A model with
# context 128 and random weights (speed does not depend on them), greedy decoding, one sequence:

# %%
fast = model.Config(vocab_size=256, context=128, d_model=64, n_head=2, n_prelude=1, n_recurrent=2,
                    n_coda=1)
pf = model.init_params(fast, seed=0)                                    # float32
prompt, T = rng.integers(0, fast.vocab_size, (1, 8)), 4
P = prompt.shape[1]
for cache in (False, True):                                             # warm-up
    generate.generate(pf, fast, prompt, 2, n_loops=T, temperature=0, cache=cache)
print(f"\ngreedy generation after a prompt of {P} tokens, T = {T}:")
print("    n   uncached tokens/s   cached tokens/s   speed-up   work per token: uncached / cached")
speedups = []
for n in (16, 48, 120):
    rate, steps = {}, {}
    for cache in (False, True):
        stats = {}
        t0 = time.perf_counter()
        generate.generate(pf, fast, prompt, n, n_loops=T, temperature=0, cache=cache, stats=stats)
        rate[cache], steps[cache] = n / (time.perf_counter() - t0), stats["position_steps"]
    assert steps[False] == T * (n * P + n * (n - 1) // 2) and steps[True] == T * (P + n - 1)
    speedups.append(rate[True] / rate[False])
    print(f"  {n:3d}   {rate[False]:17.0f}   {rate[True]:15.0f}   {speedups[-1]:7.1f}×   "
          f"{steps[False] / steps[True]:33.1f}")
# Timings on a shared machine vary; the last row's work ratio is large enough that the cached
# decoder wins whatever the load.
assert speedups[-1] > 1

# %% [markdown]
# ## 4. Adaptive exit: each token loops until its prediction stops moving
#
# Fixed depth runs every token T steps. Some tokens are easy and settle in two; some need more. A
# decoder with an exit rule runs at most T_max steps and stops a token after step t when
#
# $$ \text{kl:} \quad \mathrm{KL}(p_t \parallel p_{t-1}) = \sum_v p_t(v) \left(\log p_t(v) - \log p_{t-1}(v)\right) < \varepsilon, \quad t \ge 2 $$
#
# $$ \text{state:} \quad \frac{\lVert h_t - h_{t-1} \rVert}{\lVert h_t \rVert} < \varepsilon $$
#
# with p_t = softmax(coda(h_t)), the prediction the token would make if it stopped after step t;
# it then predicts from its last state. The KL rule measures what matters (the distribution we
# sample from) but pays for it: after every step it runs C, the coda blocks and the V×d head. The
# state rule costs a norm. ε = 0 never stops early, so it is fixed depth T_max. This lesson
# measures the KL rule; bench/bench_decoding.py measures both on a larger model.
#
# Why stopping early costs little: lesson 10 found L(T) = L∞ + Z·e^(−zT). The loss a model still
# gains after step t is Z·e^(−zt), which shrinks by the same factor at every step. The same shows in
# the predictions: the step-to-step KL (its mean over the validation tokens) falls by a factor per
# step that settles from about 6 to about 3; call r its geometric mean over t = 3..T_max. So once a token's prediction moves by less than ε, each later step
# would move it r times less than the one before, and stopping there gives up little. And the
# ε → steps trade is predictable: dividing ε by 10 makes a token run about ln 10 / ln r more steps.
#
# Train lesson 10's model (no prelude or coda blocks, so that the loop does the work after a short
# run), at μ_rec = 4, and look at it up to T_max = 2μ_rec.

# %%
with tempfile.TemporaryDirectory() as tmp:
    dataset = small_corpus(tmp, vocab_size=384)
    cfg = model.Config(vocab_size=dataset.tokenizer.vocab_size, context=32, d_model=32, n_head=2,
                       n_prelude=0, n_recurrent=1, n_coda=0, mean_recurrence=4, backprop_depth=2)
    params, _ = train(cfg, dataset, steps=300, lr=1e-2)
    batches = list(data.iter_eval_batches(dataset.val, 32, cfg.context, 4))  # 4 × 32 windows
mu = cfg.mean_recurrence
T_max = 2 * mu
y = np.concatenate([y for _, y in batches])                             # (N, S)


def log_probs(T):
    """log p_T of every validation token, (N, S, V) in float64: the full forward at T steps."""
    z = np.concatenate([model.forward(params, cfg, x, n_loops=T)[0] for x, _ in batches])
    z = z.astype(np.float64) - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


steps = np.arange(1, T_max + 1)
loss, kl = np.zeros(T_max), np.full(T_max, np.nan)
for t in steps:
    lp = log_probs(t)
    loss[t - 1] = -np.take_along_axis(lp, y[..., None], axis=-1).mean()
    if t > 1:
        kl[t - 1] = (np.exp(lp) * (lp - lp_prev)).sum(axis=-1).mean()
    lp_prev = lp
ratio = kl[1:-1] / kl[2:]                                               # KL_{t−1} / KL_t, t ≥ 3
print(f"\nvalidation loss and mean step-to-step KL at each loop step (trained at μ_rec = {mu}):")
print("   t   L(t)     L(t) − L(T_max)   mean KL(p_t ‖ p_t−1)   KL_t−1 / KL_t")
for t in steps:
    r = f"{ratio[t - 3]:13.2f}" if t >= 3 else ""
    k = f"{kl[t - 1]:20.2e}" if t >= 2 else " " * 20
    print(f"  {t:2d}   {loss[t - 1]:.4f}   {loss[t - 1] - loss[-1]:+15.4f}   {k}   {r}")
r = (kl[2] / kl[-1]) ** (1 / (T_max - 3))                               # mean factor, t = 3..T_max
print(f"the KL falls by r = {r:.2f} per step; the loss at μ_rec is "
      f"{loss[mu - 1] - loss[-1]:+.4f} from the loss at T_max")
# Geometric: every step at least halves the KL. And converged: by μ_rec the loss has nothing left to
# gain (lesson 10's ceiling), to within 0.005 nats.
assert np.all(ratio > 2)
assert abs(loss[mu - 1] - loss[-1]) < 0.005

# %% [markdown]
# Now the exit rule. Its quality: `generate.evaluate(..., adaptive="kl", epsilon=ε)` runs the
# validation windows through the cached decoder one token at a time (teacher forcing, as generation
# reads them) and returns the loss and the mean loop count per token. Its speed: greedy generation
# of 24 tokens after each of 8 validation prompts, one sequence at a time. (In a batch the step
# runs for the rows still looping, and at this size a step costs about as much for 3 rows as for
# 32, so a batch pays for its slowest token; one sequence shows what the saved steps buy.) Every
# row, ε = 0 included, pays for the rule; at this size its extra pass costs about one more step of
# the block, so tokens/s grow less than the steps fall:

# %%
rule = 2 * (cfg.d_h * cfg.d_model + cfg.n_coda * 12 * cfg.d_model**2 + cfg.vocab_size * cfg.d_model)
block = 2 * cfg.n_recurrent * 12 * cfg.d_h**2
print(f"\nKL rule: {rule:,} FLOPs per token per step against {block:,} for a step of the block "
      f"({rule / block:.2f}×)")
prompts = [batches[0][0][i:i + 1, :8] for i in range(0, 32, 4)]          # 8 × (1, 8)
generate.generate(params, cfg, prompts[0], 2, n_loops=T_max, temperature=0, adaptive="kl")  # warm-up


def generation_speed(eps):
    """(loop steps per generated token, tokens/s) of greedy generation, one sequence at a time."""
    loops, t0 = [], time.perf_counter()
    for prompt in prompts:
        _, used = generate.generate(params, cfg, prompt, 24, n_loops=T_max, temperature=0,
                                    adaptive="kl", epsilon=eps, return_loops=True)
        loops += used[0]
    return np.mean(loops), len(loops) / (time.perf_counter() - t0)


epsilons = (0, 1e-4, 1e-3, 1e-2, 1e-1)
table = []
print(f"KL exit, at most T_max = {T_max} steps:")
print("           validation, teacher forced                 generation, one sequence")
print("       ε   loop steps   loss     − fixed T_max          loop steps   tokens/s")
for eps in epsilons:
    l, s = generate.evaluate(params, cfg, batches, n_loops=T_max, adaptive="kl", epsilon=eps)
    table.append((l, s, *generation_speed(eps)))
    print(f"  {eps:6g}   {s:10.2f}   {l:.4f}   {l - loss[-1]:+13.4f}   {table[-1][2]:16.2f}   "
          f"{table[-1][3]:8.0f}")
l_exit, s_exit, _, rate = (np.array(column) for column in zip(*table))

# %% [markdown]
# ε = 0 is fixed depth (the decoder's loss equals the full forward's up to float32 rounding); a
# larger ε stops tokens sooner; the smallest ε > 0 already saves steps at no cost in loss (within
# 1e-3 nats of fixed depth); and a tenfold smaller ε buys about ln 10 / ln r more steps, within half
# a step, between ε = 1e-3 and 1e-4. (L(t) above is lowest at t = 5 and rises by 0.0003 nats to
# t = 8: within the noise of 4 × 32 windows, and a monotone law like lesson 10's cannot follow it.)

# %%
per_decade = s_exit[1] - s_exit[2]
print(f"ε from 1e-3 to 1e-4: {per_decade:.2f} more steps per token; ln 10 / ln r = "
      f"{np.log(10) / np.log(r):.2f}")
assert s_exit[0] == T_max and abs(l_exit[0] - loss[-1]) < 1e-4
assert np.all(np.diff(s_exit) < 0)
assert s_exit[1] < T_max - 1 and abs(l_exit[1] - loss[-1]) < 1e-3
assert abs(per_decade - np.log(10) / np.log(r)) < 0.5
# Two steps instead of eight make generation faster whatever the machine's load is doing.
assert rate[-1] > rate[0]

# %% [markdown]
# ## 5. Sharing slots to bound the memory
#
# Section 2 showed that one slot per core layer changes the logits. How much does it change the
# loss of a trained model? With kv_slots = k, step t writes and reads slot t mod k, so the cache
# holds k core slots per layer whatever T is (`generate.Decoder(..., kv_slots=k)`; the module
# docstring of minparcae/generate.py says what a token then reads). The approximation is measured,
# not assumed: at T_max, one slot against one per step.

# %%
exact = generate.Decoder(params, cfg, 1, n_loops=T_max).kv.bytes_per_position()
one = generate.Decoder(params, cfg, 1, n_loops=T_max, kv_slots=1).kv.bytes_per_position()
l_one, _ = generate.evaluate(params, cfg, batches, n_loops=T_max, kv_slots=1)
print(f"\nT = {T_max}: a slot per step {exact:,} bytes/position, one shared slot {one:,}; "
      f"validation loss {loss[-1]:.4f} and {l_one:.4f} ({l_one - loss[-1]:+.4f})")
assert exact == kv_bytes_per_position(cfg, T_max) and one == kv_bytes_per_position(cfg, 1)
# Here the loop converges in a few steps (section 4), so an earlier position's last keys are close
# to its keys at most steps, and sharing costs under 0.005 nats; a model whose loop keeps moving
# would pay more.
assert abs(l_one - loss[-1]) < 0.005

# %% [markdown]
# ## Exercises
#
# Write each function, then grade it (lesson 1 says how exercises work); grading trains nothing:
#
#     python lessons/12_inference.py --exercise 1              # or 2, 3
#     python lessons/12_inference.py --exercise 1 --solution   # lessons/solutions/ instead
#
# 1. `step_kl`: the KL rule's measure of section 4, KL(p_t ‖ p_{t−1}) for every token, from two
#    steps' logits, finite whatever their size. Graded to 1e-10 against log-softmax by NumPy's
#    `logaddexp`, and on logits that differ by a constant per row, where it must be 0.
# 2. `exit_loop_counts`: the loop count of each token under the KL rule, given the logits every
#    step t = 1..T_max would predict: stop after the first step t ≥ 2 whose KL is below ε, else run
#    all T_max. Graded exactly, at ε = 0 (fixed depth) and at larger ε.
# 3. `loops_that_fit`: section 1's formula turned round: the most loop steps a memory budget lets
#    the KV cache of a batch hold, with a slot per (loop step, recurrent layer) in float32. Graded
#    exactly against the sizes of `model.KVCache`s, for the tiny preset and for parcae-140m.

# %%
import numpy as np

from exercise import cmp
from minparcae import model


def step_kl(logits_prev, logits):
    """Two steps' logits (..., V). Returns KL(p ‖ p_prev) = Σ_v p_v (log p_v − log p_prev,v) per
    token (...), with p = softmax(logits) and p_prev = softmax(logits_prev)."""
    raise NotImplementedError  # exercise 1: log-softmax each, the row maximum out first


def log_softmax(z):
    return z - np.logaddexp.reduce(z, axis=-1, keepdims=True)


def kl_reference(z_prev, z):
    lp = log_softmax(z)
    return (np.exp(lp) * (lp - log_softmax(z_prev))).sum(axis=-1)


def check_step_kl(fn):
    rng = np.random.default_rng(1)
    z_prev = 2 * rng.standard_normal((3, 4, 20))
    z = z_prev + 0.5 * rng.standard_normal(z_prev.shape)
    return all([cmp("KL", fn(z_prev, z), kl_reference(z_prev, z), rtol=1e-10),
                cmp("KL, logits × 300", fn(300 * z_prev, 300 * z), kl_reference(300 * z_prev, 300 * z),
                    rtol=1e-10),
                cmp("KL, z + c per row", fn(z_prev, z_prev + 1e3 * rng.standard_normal((3, 4, 1))),
                    np.zeros((3, 4)), rtol=1e-12)])


# %%
def exit_loop_counts(logits, eps):
    """logits: (T_max, N, V), the prediction of each of N tokens after each step t = 1..T_max.
    Returns (N,) ints: the loop count of each token under the KL rule with threshold eps."""
    raise NotImplementedError  # exercise 2: step_kl of successive steps; the first t ≥ 2 below eps


def check_exit_loop_counts(fn):
    rng = np.random.default_rng(2)
    T_max, N, V = 8, 12, 16
    rates = rng.uniform(0.2, 0.9, N)                 # each token settles at its own pace
    settled = 3 * rng.standard_normal((N, V))
    noise = rng.standard_normal((T_max, N, V))
    logits = settled + rates[None, :, None] ** np.arange(1, T_max + 1)[:, None, None] * 4 * noise
    kl = np.r_[np.full((1, N), np.inf), kl_reference(logits[:-1], logits[1:])]   # (T_max, N)
    ok = []
    for eps in (0.0, 1e-3, 1e-2, 0.3):
        below = (kl < eps) & (np.arange(1, T_max + 1)[:, None] >= 2)
        want = np.where(below.any(axis=0), below.argmax(axis=0) + 1, T_max)
        ok.append(cmp(f"ε = {eps:g}", fn(logits, eps), want, rtol=0))
    return all(ok)


# %%
def loops_that_fit(cfg, budget_bytes, batch, context):
    """The largest T whose float32 KV cache (a slot per prelude and coda layer, one per loop step
    and recurrent layer) for `batch` sequences of `context` positions takes at most budget_bytes;
    0 if not even T = 1 fits."""
    raise NotImplementedError  # exercise 3: bytes/position = 4·2·[(n_p + n_c) H_kv hs + T n_r d_h]


def check_loops_that_fit(fn):
    def fits(cfg, T, budget, batch, context):
        return model.KVCache(cfg, 1, 1, T).bytes_per_position() * batch * context <= budget

    ok = []
    for name, budget, batch in (("tiny", 2**20, 1), ("tiny", 2**24, 4), ("parcae-140m", 16 * 2**30, 8),
                                ("parcae-140m", 2**20, 1)):
        cfg = model.preset(name)
        lo, hi = 0, 1                              # the largest T that fits, by bisection
        while fits(cfg, hi, budget, batch, cfg.context):
            lo, hi = hi, 2 * hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(cfg, mid, budget, batch, cfg.context) else (lo, mid)
        ok.append(cmp(f"{name}, {budget / 2**20:g} MiB, B {batch}", fn(cfg, budget, batch, cfg.context),
                      lo, rtol=0))
    return all(ok)


# %%
EXERCISES = {1: (step_kl, check_step_kl), 2: (exit_loop_counts, check_exit_loop_counts),
             3: (loops_that_fit, check_loops_that_fit)}

# %%
print("lesson 12 passed")
