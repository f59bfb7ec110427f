"""The Parcae model: a prelude, a stable looped recurrent block, a coda. Forward and backward by hand.

    ids ─wte─▶ prelude (n_p blocks) ─RMSNorm─▶ e                      (B, T, d), fixed during the loop
    h_0 ~ truncated normal                                             (B, T, d_h), "like-init"
    h_t = R(Ā ⊙ h_{t−1} + B̄ e),  t = 1..T                              R = n_r blocks, shared weights
    h_T ─C─▶ coda (n_c blocks) ─RMSNorm─▶ logits = x wteᵀ              tied embeddings

Every choice, in one place:
  * blocks: pre-norm, x += attn(norm1 x); x += mlp(norm2 x); RMSNorm with a weight, eps 1e-5
  * attention: causal, rotary on adjacent pairs (base 50,000), QK-norm (weightless RMSNorm after
    rotary, eps the dtype's machine epsilon), scale 1/√hs, no biases anywhere; prelude and coda
    may group their key/value heads (n_kv_head), the recurrent block has n_recurrent_head heads
    (default n_head), each with its own keys and values
  * MLP: proj(½ relu(fc x)²), hidden width d_mlp (default 4d) outside the loop, d_mlp_recurrent
    (default 4 d_h) in the recurrent block
  * prelude norm: the RMSNorm before the loop can be switched off (prelude_norm=False), as the
    official code allows
  * injection (ops/injection.py): diagonal (Parcae, ρ(Ā) < 1 by construction), linear or add;
    "none" is the fixed-depth baseline: the recurrent block runs once on the prelude output, with no
    norm before it and no C after it, which is exactly a plain (n_p + n_r + n_c)-layer transformer
  * value embeddings (optional): one table per chosen layer (every other layer counting prelude,
    core and coda together, the last one included), added to v through 2σ(W_g x[..., :32]), one
    gate per KV head; the core layers' tables are added again on every loop iteration
  * init ("scaled-zero", as the official code): matrices scaled-orthogonal with entry std
    √(2/(5·width)), attention and MLP output projections zero, norms one; A_log = 0, dt_bias =
    softplus⁻¹(−ln √(1/5)) so Ā starts at √(1/5) ≈ 0.447; B identity (orthogonal when not
    square); C scaled-orthogonal; the linear injection's [W_h; W_e] one truncated normal with std
    √(2/(5d)) (ρ(W_h) ≈ 0.64 at d = 768); value-embedding tables N(0, 1) and their gates uniform
    in ±1/√32 (PyTorch's defaults, which the official code keeps)
  * initial state: truncated normal (±3σ) with the embedding's std in training ("like-init"; the
    official code's "normal", "embed", "unit" and "zero" too); evaluation uses `eval_state`:
    "seeded" (a fixed draw per position, so evaluation repeats exactly; the official code draws a
    fresh state per call), or any of the others
  * training depth ("poisson-truncated-full", per sequence): total = max(1, Poisson(μ_rec)),
    k = min(total, μ_bwd) steps with gradient (the last ones), total − k steps without.

Per-sequence depths are right-aligned: a batch runs S = max(total) steps and sequence b joins at
step S − total_b, keeping its initial state until then. Each sequence computes exactly its own
recurrence, and every sequence's steps with gradient fall in the last min(S, μ_bwd) steps of the
batch. Only those steps keep activations, so activation memory grows with μ_bwd, never with T;
gradients do not flow into the states before them (truncated backprop through the loop).

Parameters are one flat dict name -> array; matrices are stored (in, out) so a layer is `x @ W`.
The layers are built from an op set (`ops`, default ops.REFERENCE: the math as written in
minparcae/ops); decoding runs the same `forward` with a KVCache and, for adaptive depth, an exit
rule (minparcae/generate.py). This file holds the model's math only: threads and fast paths are
chosen by its callers (minparcae/runtime.py, minparcae/kernels).
"""

import math
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from . import backend
from .backend import array_module, to_host
from .ops import REFERENCE, attention, injection, rotary
from .ops.linear import rows_matmul, rows_t_matmul  # x @ W and Σ xᵀG as one product each

INJECTIONS = injection.KINDS + ("none",)
STATE_INITS = ("like-init", "seeded", "zero", "normal", "embed", "unit")
EVAL_STATE_SEED = 1234


@dataclass(frozen=True)
class Config:
    vocab_size: int = 2048
    context: int = 128
    d_model: int = 128  # d: embeddings, prelude and coda
    d_state: int | None = None  # d_h: loop state and recurrent block (None: d_model)
    n_head: int = 4
    n_kv_head: int | None = None  # prelude and coda key/value heads (None: n_head, no grouping)
    n_recurrent_head: int | None = None  # the recurrent block's heads, all with their own k, v
    mlp_ratio: int = 4
    d_mlp: int | None = None  # prelude and coda MLP hidden width (None: mlp_ratio · d_model)
    d_mlp_recurrent: int | None = None  # the recurrent block's MLP width (None: mlp_ratio · d_h)
    n_prelude: int = 1
    n_recurrent: int = 2
    n_coda: int = 1
    mean_recurrence: int = 4  # μ_rec: mean training depth and default evaluation depth
    backprop_depth: int = 2  # μ_bwd: loop steps with gradient
    injection: str = "diagonal"  # diagonal | linear | add | none (fixed-depth baseline)
    state_init: str = "like-init"  # initial state in training
    eval_state: str = "seeded"  # initial state in evaluation: seeded | zero | like-init
    prelude_norm: bool = True  # RMSNorm (with a weight) between the prelude and the loop
    tie_embeddings: bool = True
    logit_scale: float = 1.0
    logit_softcap: float | None = None
    value_embeddings: bool = False
    rope_base: float = 50_000.0

    def __post_init__(self):
        d_h, kv = self.d_h, self.kv_heads
        problems = []
        if self.injection not in INJECTIONS:
            problems.append(f"injection must be one of {', '.join(INJECTIONS)}")
        for w, h in {(self.d_model, self.n_head), (d_h, self.recurrent_heads)}:
            if h < 1 or w % h or (w // h) % 2:
                problems.append(f"width {w} must split into {h} heads of even size")
        if kv < 1 or self.n_head % kv:
            problems.append(f"n_kv_head={kv} must divide n_head={self.n_head}")
        if min(self.d_model, d_h, self.mlp_hidden, self.mlp_hidden_recurrent) < 1:
            problems.append("widths must be at least 1")
        if self.injection in ("add", "none") and d_h != self.d_model:
            problems.append(f"injection '{self.injection}' needs d_state == d_model")
        if min(self.mean_recurrence, self.backprop_depth, self.n_recurrent) < 1:
            problems.append("mean_recurrence, backprop_depth and n_recurrent must be at least 1")
        if self.state_init not in STATE_INITS or self.eval_state not in STATE_INITS:
            problems.append(f"state_init and eval_state must be one of {', '.join(STATE_INITS)}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems) + ".")

    @property
    def d_h(self):
        return self.d_state or self.d_model

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def recurrent_heads(self):
        return self.n_recurrent_head or self.n_head

    @property
    def mlp_hidden(self):
        return self.d_mlp or self.mlp_ratio * self.d_model

    @property
    def mlp_hidden_recurrent(self):
        return self.d_mlp_recurrent or self.mlp_ratio * self.d_h

    @property
    def looped(self):
        return self.injection != "none"

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown model config fields: {', '.join(unknown)}.")
        return cls(**d)


PRESETS = {
    # trains on a 2-core CPU in minutes
    "tiny": Config(),
    # a ~6M-parameter model for a patient CPU or a quick GPU run
    "small-cpu": Config(vocab_size=4096, context=256, d_model=256, n_head=4, n_prelude=2,
                        n_recurrent=2, n_coda=2),
    # the paper's sizes; all with μ_rec 8, μ_bwd 4, head size 128 and value embeddings
    "parcae-140m": Config(vocab_size=32768, context=2048, d_model=768, n_head=6, n_prelude=2,
                          n_recurrent=2, n_coda=2, mean_recurrence=8, backprop_depth=4,
                          value_embeddings=True),
    "parcae-370m": Config(vocab_size=32768, context=2048, d_model=1024, n_head=8, n_prelude=4,
                          n_recurrent=4, n_coda=4, mean_recurrence=8, backprop_depth=4,
                          value_embeddings=True),
    "parcae-770m": Config(vocab_size=32768, context=2048, d_model=1280, n_head=10, n_prelude=6,
                          n_recurrent=6, n_coda=6, mean_recurrence=8, backprop_depth=4,
                          value_embeddings=True),
    "parcae-1.3b": Config(vocab_size=32768, context=2048, d_model=1536, n_head=12, n_prelude=8,
                          n_recurrent=8, n_coda=8, mean_recurrence=8, backprop_depth=4,
                          value_embeddings=True),
}


def preset(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}.")
    return replace(PRESETS[name], **overrides)


def fixed_depth_baseline(cfg):
    """The plain transformer with the same blocks: n_p + n_r + n_c layers, each used once.
    It has the same block parameters as `cfg`; the looped model adds only B, C, A_log, dt_bias
    and the prelude norm (compare `count_params` of both)."""
    return replace(cfg, injection="none", mean_recurrence=1, backprop_depth=1)


# ----------------------------------------------------------------------------- parameters

class Layer(NamedTuple):
    """One block's shape. Prelude and coda blocks have the model's width, n_head query heads and
    n_kv_head key/value heads; the recurrent block's have the state's width d_h and
    n_recurrent_head heads, each with its own keys and values (no grouping inside the loop)."""
    name: str  # prelude.i, core.i or coda.i
    width: int
    heads: int
    kv_heads: int
    hidden: int  # the MLP's hidden width

    @property
    def head_size(self):
        return self.width // self.heads


@lru_cache(maxsize=64)
def layers(cfg):
    """Every block in order: prelude.i, core.i, coda.i, as Layer tuples."""
    outside = (cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.mlp_hidden)
    core = (cfg.d_h, cfg.recurrent_heads, cfg.recurrent_heads, cfg.mlp_hidden_recurrent)
    return tuple([Layer(f"prelude.{i}", *outside) for i in range(cfg.n_prelude)]
                 + [Layer(f"core.{i}", *core) for i in range(cfg.n_recurrent)]
                 + [Layer(f"coda.{i}", *outside) for i in range(cfg.n_coda)])


@lru_cache(maxsize=64)
def layer(cfg, name):
    """The Layer called `name`."""
    return {spec.name: spec for spec in layers(cfg)}[name]


def value_embedding_layers(cfg):
    """Names of the blocks with a value-embedding table: every other one, counting back from the last."""
    if not cfg.value_embeddings:
        return []
    names = [spec.name for spec in layers(cfg)]
    return [n for i, n in enumerate(names) if (len(names) - 1 - i) % 2 == 0]


def _gate_inputs(width):
    return min(32, width)


def param_shapes(cfg):
    """Every parameter's name and shape, in a stable order (the checkpoint keys)."""
    V, d, d_h = cfg.vocab_size, cfg.d_model, cfg.d_h
    ve_layers = value_embedding_layers(cfg)
    shapes = {"wte": (V, d)}
    for name, w, H, H_kv, m in layers(cfg):
        hs = w // H
        shapes[f"{name}.norm1"] = (w,)
        shapes[f"{name}.attn.wq"] = (w, H * hs)
        shapes[f"{name}.attn.wk"] = (w, H_kv * hs)
        shapes[f"{name}.attn.wv"] = (w, H_kv * hs)
        shapes[f"{name}.attn.wo"] = (H * hs, w)
        if name in ve_layers:
            shapes[f"{name}.attn.ve_gate"] = (_gate_inputs(w), H_kv)
            shapes[f"ve.{name}"] = (V, H_kv * hs)
        shapes[f"{name}.norm2"] = (w,)
        shapes[f"{name}.mlp.fc"] = (w, m)
        shapes[f"{name}.mlp.proj"] = (m, w)
    if cfg.looped and cfg.prelude_norm:
        shapes["prelude_norm"] = (d,)
    if cfg.looped:
        if cfg.injection == "diagonal":
            shapes.update({"inject.A_log": (d_h,), "inject.dt_bias": (d_h,), "inject.B": (d, d_h)})
        elif cfg.injection == "linear":
            shapes["inject.W"] = (d_h + d, d_h)
        shapes["C"] = (d_h, d)
    shapes["final_norm"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (d, V)
    return shapes


def count_params(cfg):
    """The parameter count from the architecture's formula (tests check it against param_shapes)."""
    V, d, d_h = cfg.vocab_size, cfg.d_model, cfg.d_h

    def block(w, H, H_kv, m):  # two norms, q and o, k and v (grouped), fc and proj
        return 2 * w + 2 * w * w + 2 * w * w * H_kv / H + 2 * w * m

    n = V * d + sum(block(*spec[1:]) for spec in layers(cfg)) + d
    for name in value_embedding_layers(cfg):
        _, w, H, H_kv, _ = layer(cfg, name)
        n += V * w * H_kv / H + _gate_inputs(w) * H_kv
    if cfg.looped:
        n += d * cfg.prelude_norm + d_h * d  # prelude norm, C
        n += {"diagonal": 2 * d_h + d * d_h, "linear": (d_h + d) * d_h, "add": 0}[cfg.injection]
    if not cfg.tie_embeddings:
        n += d * V
    return int(round(n))


def init_std(width):
    return math.sqrt(2.0 / (5.0 * width))


def _scaled_orthogonal(rng, n_in, n_out, std):
    """A matrix with orthonormal rows or columns, scaled so that its entries have std `std`."""
    a = rng.standard_normal((max(n_in, n_out), min(n_in, n_out)))
    q, r = np.linalg.qr(a)
    q = q * np.sign(np.diag(r))  # a uniformly random orthogonal matrix, not QR's biased one
    q = q if n_in >= n_out else q.T
    return q * (std * math.sqrt(max(n_in, n_out)))


def _identity_or_orthogonal(rng, n_in, n_out):
    if n_in == n_out:
        return np.eye(n_in)
    return _scaled_orthogonal(rng, n_in, n_out, 1.0 / math.sqrt(max(n_in, n_out)))


def init_params(cfg, seed=0, dtype=None, xp=None):
    """A freshly initialised parameter dict (see the module docstring for the scheme)."""
    rng = np.random.default_rng(seed)
    dtype = dtype or backend.dtype()
    xp = xp or backend.get_xp()
    d, d_h = cfg.d_model, cfg.d_h
    params = {}
    for name, shape in param_shapes(cfg).items():
        width = d_h if name.startswith("core.") else d
        if len(shape) == 1:
            p = np.ones(shape)
        elif name.endswith((".attn.wo", ".mlp.proj")):
            p = np.zeros(shape)  # residual branches start as the identity
        elif name.endswith(".attn.ve_gate"):  # PyTorch's default for a linear layer
            p = rng.uniform(-1, 1, shape) / math.sqrt(shape[0])
        elif name.startswith("ve."):  # PyTorch's default for an embedding table
            p = rng.standard_normal(shape)
        elif name in ("wte", "lm_head"):
            p = rng.standard_normal(shape) * init_std(d)
        elif name == "inject.B":
            p = _identity_or_orthogonal(rng, d, d_h)
        elif name == "inject.W":  # [W_h; W_e], one truncated normal (ρ(W_h) ≈ 0.64 at d = 768)
            p = _truncated_normal(rng, shape) * init_std(d)
        elif name == "C":
            p = _scaled_orthogonal(rng, d_h, d, init_std(d))
        else:
            p = _scaled_orthogonal(rng, *shape, init_std(width))
        params[name] = p
    if cfg.injection == "diagonal":
        params["inject.A_log"] = np.zeros(d_h)
        # softplus(dt_bias) = Δ0 with Δ0 = −ln √(1/5), so that Ā = exp(−Δ0) = √(1/5) at A_log = 0
        delta0 = -math.log(math.sqrt(1 / 5))
        params["inject.dt_bias"] = np.full(d_h, math.log(math.expm1(delta0)))
    # C order everywhere: results must not depend on how a matrix happened to be laid out (a
    # transposed init would otherwise change BLAS's rounding after a checkpoint round trip)
    return {k: xp.ascontiguousarray(xp.asarray(v, dtype=dtype)) for k, v in params.items()}


def initial_state(cfg, shape, mode, rng=None, dtype=np.float32, xp=np, start=0):
    """h_0 of the loop, of `shape` (..., T, d_h), for positions start..start+T−1:
    'like-init'  truncated normal (±3σ, σ = the embedding's init std), drawn from `rng`;
    'seeded'     the same distribution, but position t's vector comes from a generator seeded with
                 (EVAL_STATE_SEED, t) and is shared by every row, so a position's state depends on
                 nothing else (a decoder that runs one position at a time gets the same states);
    'zero'       zeros;
    'normal'     standard normal; 'embed': normal with std 1/√d; 'unit': a standard normal
                 draw standardised per position (mean 0, unbiased std 1), as the official code's
                 state_init options of these names."""
    if mode == "zero":
        return xp.zeros(shape, dtype=dtype)
    if mode in ("normal", "embed", "unit"):
        if rng is None:
            raise ValueError("a random initial state needs an rng")
        z = rng.standard_normal(shape)
        if mode == "embed":
            z = z / math.sqrt(cfg.d_model)
        elif mode == "unit":
            z = (z - z.mean(axis=-1, keepdims=True)) / (z.std(axis=-1, ddof=1, keepdims=True) + 1e-8)
        return xp.asarray(z, dtype=dtype)
    if mode == "seeded":
        T, d_h = shape[-2], shape[-1]
        rows = [_seeded_row(t, d_h) for t in range(start, start + T)]
        z = np.broadcast_to(np.stack(rows), shape)
    elif rng is None:
        raise ValueError("a random initial state needs an rng")
    else:
        z = _truncated_normal(rng, shape)
    return xp.asarray(z * init_std(cfg.d_model), dtype=dtype)


@lru_cache(maxsize=2048)  # seeding a generator costs ~0.25 ms, far more than the draw: evaluation and
# decoding ask for the same positions again and again (2,048 rows of d_h 768: 12 MB at most)
def _seeded_row(t, d_h):
    """Position t's 'seeded' initial state (before scaling), read-only: shared by every caller."""
    z = _truncated_normal(np.random.default_rng((EVAL_STATE_SEED, t)), (d_h,))
    z.flags.writeable = False
    return z


def _truncated_normal(rng, shape):
    z = rng.standard_normal(shape)
    bad = np.abs(z) > 3
    while bad.any():  # redraw the tails: a truncated normal, not a clipped one
        z[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(z) > 3
    return z


def sample_depths(rng, batch, cfg):
    """'poisson-truncated-full': each sequence runs max(1, Poisson(μ_rec)) loop steps."""
    return np.maximum(1, rng.poisson(cfg.mean_recurrence, size=batch))


# ----------------------------------------------------------------------------- layers
#
# Every layer below takes `ops`, the set of ops it is built from (ops.REFERENCE unless the caller
# chose a faster set with kernels.select), and keeps its cache as a named tuple.

def _acc(grads, name, g):
    grads[name] += g


def take_rows(a, idx):
    """The rows idx of a (all of a for idx None)."""
    return a if idx is None or a is None else a[idx]


def put_rows(a, idx, rows):
    """a with its rows idx replaced by `rows` (just `rows` when idx is None: they are all of a)."""
    if idx is None:
        return rows
    a = a.copy()
    a[idx] = rows
    return a


class GateCache(NamedTuple):
    x: object  # the gate's input x[..., :n_g], (N, T, n_g)
    gate: object  # 2σ(x_g W_g), (N, T, H_kv)
    ve: object  # the value embedding, (N, H_kv, T, hs)
    w: object  # W_g, (n_g, H_kv)


class AttentionCache(NamedTuple):
    qkv: object  # linear.Cache of x [W_q W_k W_v]
    q: object  # qk_norm caches of the query and key heads
    k: object
    core: object  # attention.Cache
    out: object  # linear.Cache of concat(Y) W_o
    gate: GateCache | None
    heads: tuple  # (H, H_kv, hs)


class BlockCache(NamedTuple):
    norm1: object
    attn: AttentionCache
    norm2: object
    mlp: object


class FusedParams(dict):
    """Parameters with the fused "<layer>.attn.wqkv" added (with_fused_qkv): a copy of the
    weights, true only as long as they do not change."""


def with_fused_qkv(p, cfg):
    """p and, for every layer, "<layer>.attn.wqkv" = [W_q W_k W_v] side by side: the q, k, v
    projections as one product, which BLAS runs faster than three narrower ones. Made once per
    forward in training (a loop step runs the same core layers again), and once per Decoder in
    decoding, whose weights do not change: `p` that is already FusedParams is returned as it is
    (copying the weights for every decoded token would cost more than that token's products)."""
    if isinstance(p, FusedParams):
        return p
    xp = array_module(p["wte"])
    return FusedParams({**p, **{f"{name}.attn.wqkv": xp.concatenate(
        [p[f"{name}.attn.wq"], p[f"{name}.attn.wk"], p[f"{name}.attn.wv"]], axis=1)
        for name, *_ in layers(cfg)}})


def attention_forward(p, name, x, rope, heads, ops, ve=None, kv=None):
    """One self-attention layer on x (N, T, w), heads = (H, H_kv) query and key/value heads of
    size hs, rope = the rotary (cos, sin) tables for hs:

        [q k v] = x [W_q W_k W_v]               one product (p from with_fused_qkv), heads side by side
        v ← v + 2σ(x[..., :n_g] W_g) · ve        with a value embedding: one gate per KV head
        q, k ← QK-norm(RoPE(·))                  ops.qk_norm
        Y = causal softmax(q kᵀ / √hs) v          ops.attention (with the KV cache slot `kv`)
        y = concat_heads(Y) W_o
    """
    N, T, _ = x.shape
    H, H_kv = heads
    hs = p[f"{name}.attn.wq"].shape[1] // H
    qkv, c_qkv = ops.linear.forward(x, p[f"{name}.attn.wqkv"])
    qkv = qkv.reshape(N, T, H + 2 * H_kv, hs)
    v = qkv[:, :, H + H_kv:].transpose(0, 2, 1, 3)  # (N, H_kv, T, hs)
    gate = None
    if ve is not None:
        w_g = p[f"{name}.attn.ve_gate"]
        x_g = x[..., :w_g.shape[0]]
        g = 2.0 * injection.sigmoid(rows_matmul(x_g, w_g))  # (N, T, H_kv)
        ve = ve.reshape(N, T, H_kv, hs).transpose(0, 2, 1, 3)
        v = v + g.transpose(0, 2, 1)[..., None] * ve
        gate = GateCache(x_g, g, ve, w_g)
    q, c_q = ops.qk_norm.forward(qkv[:, :, :H], *rope)  # (N, H, T, hs)
    k, c_k = ops.qk_norm.forward(qkv[:, :, H:H + H_kv], *rope)  # (N, H_kv, T, hs)
    y, c_core = ops.attention.forward(q, k, v, 1.0 / math.sqrt(hs), kv)
    y = y.transpose(0, 2, 1, 3).reshape(N, T, H * hs)
    out, c_out = ops.linear.forward(y, p[f"{name}.attn.wo"])
    return out, AttentionCache(c_qkv, c_q, c_k, c_core, c_out, gate, (H, H_kv, hs))


def attention_backward(dout, cache, name, grads, ops):
    """Backward of attention_forward, each line the chain rule through a line above, bottom up;
    through the gate, with dv the gradient of the gated v:
        dve = dv · gate,  dgate = Σ_hs dv ⊙ ve,  dz = dgate · 2σ(z)(1 − σ(z)),  z = x_g W_g
    Accumulates the layer's weight gradients into `grads`; returns (dL/dx, dL/dve or None)."""
    c_qkv, c_q, c_k, c_core, c_out, gate, (H, H_kv, hs) = cache
    xp = array_module(dout)
    N, T, _ = dout.shape
    g = ops.linear.backward(dout, c_out)
    _acc(grads, f"{name}.attn.wo", g["w"])
    g = ops.attention.backward(g["x"].reshape(N, T, H, hs).transpose(0, 2, 1, 3), c_core)
    dq = ops.qk_norm.backward(g["q"], c_q)["x"]  # (N, T, H, hs)
    dk = ops.qk_norm.backward(g["k"], c_k)["x"]  # (N, T, H_kv, hs)
    dv = g["v"]  # (N, H_kv, T, hs)
    dve = None
    if gate is not None:
        dve = (dv * gate.gate.transpose(0, 2, 1)[..., None]).transpose(0, 2, 1, 3).reshape(N, T, -1)
        dgate = (dv * gate.ve).sum(axis=-1).transpose(0, 2, 1)  # (N, T, H_kv)
        sig = 0.5 * gate.gate
        dz = dgate * 2.0 * sig * (1.0 - sig)
        _acc(grads, f"{name}.attn.ve_gate", rows_t_matmul(gate.x, dz))
    dqkv = xp.concatenate([dq, dk, dv.transpose(0, 2, 1, 3)], axis=2).reshape(N, T, -1)
    g = ops.linear.backward(dqkv, c_qkv)
    n_q, n_kv = H * hs, H_kv * hs
    _acc(grads, f"{name}.attn.wq", g["w"][:, :n_q])
    _acc(grads, f"{name}.attn.wk", g["w"][:, n_q:n_q + n_kv])
    _acc(grads, f"{name}.attn.wv", g["w"][:, n_q + n_kv:])
    dx = g["x"]
    if gate is not None:
        dx[..., :gate.w.shape[0]] += rows_matmul(dz, gate.w.T)
    return dx, dve


def block_forward(p, name, x, rope, cfg, ops, ve=None, kv=None):
    """One pre-norm block: x += attn(norm1 x); x += mlp(norm2 x).  x: (N, T, w); rope: head size
    -> rotary tables (`rotary_tables`)."""
    spec = layer(cfg, name)
    a, c_n1 = ops.rmsnorm.forward(x, p[f"{name}.norm1"])
    y, c_att = attention_forward(p, name, a, rope[spec.head_size], (spec.heads, spec.kv_heads),
                                 ops, ve, kv)
    x, a, c_n2 = ops.rmsnorm.add_forward(x, y, p[f"{name}.norm2"])  # x += attn(...); a = norm2(x)
    y, c_mlp = ops.mlp.forward(a, p[f"{name}.mlp.fc"], p[f"{name}.mlp.proj"])
    return x + y, BlockCache(c_n1, c_att, c_n2, c_mlp)


def block_backward(dx, cache, name, grads, ops):
    """Backward of block_forward: accumulates the block's parameter gradients into `grads`,
    returns (dL/dx, dL/dve or None)."""
    g = ops.mlp.backward(dx, cache.mlp)
    _acc(grads, f"{name}.mlp.fc", g["w_fc"])
    _acc(grads, f"{name}.mlp.proj", g["w_proj"])
    g = ops.rmsnorm.backward(g["x"], cache.norm2, dres=dx)  # the residual path's gradient joins
    _acc(grads, f"{name}.norm2", g["weight"])
    dx = g["x"]
    da, dve = attention_backward(dx, cache.attn, name, grads, ops)
    g = ops.rmsnorm.backward(da, cache.norm1)
    _acc(grads, f"{name}.norm1", g["weight"])
    return dx + g["x"], dve


# ----------------------------------------------------------------------------- the model

class KVCache:
    """The keys and values that decoding keeps: for the positions seen so far, one slot per prelude
    and coda layer and `core_slots` per core layer, each (B, H_kv, capacity, hs). A forward given a
    KVCache runs positions length..length+n−1 and appends them.

    The core slots. At loop step t a position holds its own h_t, and a token at step t attends to
    the earlier positions' keys in slot t mod core_slots. With a slot per step (core_slots ≥ the
    loop count, the default) that is exactly step t's keys, as a full forward computes them, and
    the cache grows with the loop count. With fewer slots, step t overwrites slot t mod k: a token
    reads, for each earlier position, the keys of the latest step of that position that mapped to
    the same slot (k = 1: its last step), an approximation that keeps the cache at k slots per layer
    whatever the depth. A position that ran fewer steps than there are slots leaves the rest
    unwritten; the decoder fills them with its last step's keys (generate.Decoder).

    slide=True: past the capacity, position p overwrites index p mod capacity and a query attends
    to the last `capacity` positions (ops/attention.py), one token at a time; `length` counts every
    position seen, and rotary angles and seeded initial states follow the absolute positions."""

    def __init__(self, cfg, batch, capacity, core_slots, xp=np, dtype=np.float32, slide=False):
        if core_slots < 1 or capacity < 1:
            raise ValueError("a KV cache needs at least one position and one core slot per layer.")
        self.length, self.capacity, self.core_slots, self.slide = 0, capacity, core_slots, slide
        self.slots = {}
        for spec in layers(cfg):
            shape = (batch, spec.kv_heads, capacity, spec.head_size)
            for step in range(core_slots) if spec.name.startswith("core.") else (None,):
                self.slots[spec.name, step] = (xp.empty(shape, dtype), xp.empty(shape, dtype))

    def slot(self, name, step=None, rows=None):
        keys, values = self.slots[name, None if step is None else step % self.core_slots]
        return attention.KVSlot(keys, values, self.length, rows)

    def index(self, position):
        """Where `position`'s keys are kept along the capacity axis."""
        return position % self.capacity

    def check(self, n):
        """A ValueError unless n more positions fit (see slide)."""
        end = self.length + n
        if end > self.capacity and not self.slide:
            raise ValueError(f"{self.length} + {n} positions exceed the KV cache's capacity "
                             f"{self.capacity}: clear it or make a larger one.")
        if end > self.capacity and n > 1:
            raise ValueError(f"a sliding KV cache takes one token at a time past its capacity "
                             f"{self.capacity} ({self.length} + {n} positions).")

    @property
    def nbytes(self):
        return sum(k.nbytes + v.nbytes for k, v in self.slots.values())

    def bytes_per_position(self):
        """Cache bytes one position costs: its keys and values in every slot."""
        return self.nbytes // self.capacity


class LoopStep(NamedTuple):
    rows: object  # device index of the rows that ran this step, or None for all of them
    state: object  # injection.StateCache
    blocks: list  # BlockCache of each core layer


class ModelCache(NamedTuple):
    ops: object  # the op set of the forward, which the backward must use too
    shape: tuple  # (B, T)
    wte: object  # embedding.Cache
    ve: dict  # layer name -> embedding.Cache of its value-embedding table
    prelude: list  # BlockCache per prelude block
    prelude_norm: object  # rmsnorm.Cache, None for the fixed-depth baseline
    inject: object  # injection.InputCache of u = B̄e
    steps: list  # LoopStep of the last min(S, μ_bwd) loop steps
    C: object  # linear.Cache of h_T C, None for the fixed-depth baseline
    coda: list  # BlockCache per coda block
    final_norm: object
    x_final: object  # the head's input (B, T, d)
    loss: object  # cross_entropy.Cache


def output_logits(logits, cfg):
    """The logits as the model returns them: scaled, and soft-capped when cfg says so."""
    xp = array_module(logits)
    z = logits * cfg.logit_scale
    return z if cfg.logit_softcap is None else cfg.logit_softcap * xp.tanh(z / cfg.logit_softcap)


def forward(p, cfg, ids, targets=None, n_loops=None, depths=None, h0=None, rng=None, train=False,
            ops=REFERENCE, kv=None, exit_rule=None):
    """Run the model on ids (B, T).

    Depth: `depths` (B,) gives each sequence's loop count; else every sequence runs `n_loops`
    (default μ_rec). With train=True the last min(depth, μ_bwd) steps of each sequence keep
    activations for `backward`, and the initial state is cfg.state_init drawn from `rng`;
    otherwise nothing is kept and the state is cfg.eval_state. Decoding passes `kv`, a KVCache
    (positions continue from kv.length), and may pass `exit_rule` (see loop_forward).
    Returns (loss if targets is given else logits (B, T, V), cache or None, diagnostics dict).
    """
    xp = array_module(p["wte"])
    dtype = p["wte"].dtype
    B, T = ids.shape
    start = 0 if kv is None else kv.length
    if kv is not None:
        kv.check(T)
        if kv.slide and kv.capacity > cfg.context:
            raise ValueError(f"a sliding KV cache of {kv.capacity} positions would show the model "
                             f"more than its context {cfg.context}.")
    if start + T > cfg.context and not (kv is not None and kv.slide):
        raise ValueError(f"positions up to {start + T} exceed the model's context {cfg.context}.")
    if depths is None:
        depths = np.full(B, n_loops or cfg.mean_recurrence)
    depths = np.asarray(to_host(depths), dtype=np.int64)
    if depths.shape != (B,) or depths.min() < 1:
        raise ValueError("depths must hold one loop count of at least 1 per sequence.")
    if not cfg.looped:
        depths = np.ones(B, dtype=np.int64)  # the fixed-depth baseline runs its blocks once

    p = with_fused_qkv(p, cfg)
    x, rope, ve, (c_wte, c_ve, c_prelude) = prelude_forward(p, cfg, ids, ops, start, kv)
    if cfg.looped:
        e, c_pn = ops.rmsnorm.forward(x, p["prelude_norm"]) if cfg.prelude_norm else (x, None)
        if h0 is None:
            h0 = initial_state(cfg, (B, T, cfg.d_h), cfg.state_init if train else cfg.eval_state,
                               rng, dtype, xp, start)
        kind = cfg.injection
    else:  # plain transformer: the "loop" is one pass of the blocks on the prelude output
        e, c_pn, h0, kind = x, None, xp.zeros_like(x), "add"

    def logits_of(h, idx):  # the logits of states h of the rows idx (for an exit rule)
        return output_logits(coda_forward(p, cfg, h, rope, _rows(ve, idx), ops, kv, idx)[0], cfg)

    n_grad = cfg.backprop_depth if train else 0
    h, c_inject, steps, diag = loop_forward(p, cfg, kind, e, h0, depths, n_grad, rope, ve, ops, kv,
                                            exit_rule, logits_of)
    logits, c_C, c_coda, c_fn, x = coda_forward(p, cfg, h, rope, ve, ops, kv)
    diag["rho"] = injection.spectral_radius(kind, p) if cfg.looped else 0.0
    if kv is not None:  # decoding: each position's final loop state (B, T, d_h), for a warm start
        diag["state"] = h
    if kv is not None:
        kv.length += T
    if targets is None:
        return output_logits(logits, cfg), None, diag
    if not train:
        return ops.cross_entropy.loss(logits, targets, scale=cfg.logit_scale,
                                      softcap=cfg.logit_softcap), None, diag
    loss, c_loss = ops.cross_entropy.forward(logits, targets, scale=cfg.logit_scale,
                                             softcap=cfg.logit_softcap)
    return loss, ModelCache(ops, (B, T), c_wte, c_ve, c_prelude, c_pn, c_inject, steps, c_C,
                            c_coda, c_fn, x, c_loss), diag


def _rows(tables, idx):
    return {name: take_rows(t, idx) for name, t in tables.items()}


def prelude_forward(p, cfg, ids, ops, start=0, kv=None):
    """ids (B, T) at positions start.. -> wte -> prelude blocks -> x (B, T, d). Returns x, the
    rotary tables (`rotary_tables`), the value embeddings (layer -> (B, T, H_kv·hs)) and the
    caches (token embedding, value embeddings, prelude blocks)."""
    rope = rotary_tables(cfg, ids.shape[1], start, p["wte"])
    ve, c_ve = {}, {}
    for name in value_embedding_layers(cfg):
        ve[name], c_ve[name] = ops.embedding.forward(ids, p[f"ve.{name}"])
    x, c_wte = ops.embedding.forward(ids, p["wte"])
    c_prelude = []
    for i in range(cfg.n_prelude):
        name = f"prelude.{i}"
        x, c = block_forward(p, name, x, rope, cfg, ops, ve.get(name), kv and kv.slot(name))
        c_prelude.append(c)
    return x, rope, ve, (c_wte, c_ve, c_prelude)


def rotary_tables(cfg, T, start, like):
    """head size -> (cos, sin) for positions start..start+T−1, for every head size of the model,
    on the device and in the dtype of `like`."""
    xp = array_module(like)
    return {hs: rotary.tables(T, hs, cfg.rope_base, offset=start, xp=xp, dtype=like.dtype)
            for hs in {spec.head_size for spec in layers(cfg)}}


def coda_forward(p, cfg, h, rope, ve, ops, kv=None, idx=None):
    """h (N, T, d_h) -> C -> coda blocks -> final norm -> logits (N, T, V), before output_logits,
    for the rows idx of the batch (None: all). Returns (logits, C cache, coda caches, final-norm
    cache, the head's input)."""
    x, c_C = ops.linear.forward(h, p["C"]) if cfg.looped else (h, None)  # (N, T, d)
    c_coda = []
    for i in range(cfg.n_coda):
        name = f"coda.{i}"
        x, c = block_forward(p, name, x, rope, cfg, ops, ve.get(name), kv and kv.slot(name, rows=idx))
        c_coda.append(c)
    x, c_fn = ops.rmsnorm.forward(x, p["final_norm"])
    head = p["wte"].T if cfg.tie_embeddings else p["lm_head"]  # (d, V)
    return rows_matmul(x, head), c_C, c_coda, c_fn, x


def state_after(p, cfg, ids, n_steps, h0):
    """The loop state h_n after n_steps iterations from h0 (no gradient kept): for analysis, and
    for building the truncated loss in the tests."""
    p = with_fused_qkv(p, cfg)
    x, rope, ve, _ = prelude_forward(p, cfg, ids, REFERENCE)
    e = REFERENCE.rmsnorm.forward(x, p["prelude_norm"])[0] if cfg.prelude_norm else x
    depths = np.full(ids.shape[0], n_steps)
    return loop_forward(p, cfg, cfg.injection, e, h0, depths, 0, rope, ve, REFERENCE)[0]


def loop_forward(p, cfg, kind, e, h, depths, n_grad, rope, ve, ops, kv=None, exit_rule=None,
                 logits_of=None):
    """h_t = R(Ā h_{t−1} + B̄ e) for each sequence's own number of steps (right-aligned, see the
    module docstring), keeping the caches of the last min(S, n_grad) steps.

    Decoding may stop a sequence early: after each step t, `exit_rule(t, rows, h_t, h_prev,
    logits_of)` gets the rows that ran (host indices), their new and previous states and
    `logits_of(h, idx)` (the coda's logits of states h for the rows idx), and returns a host
    boolean per row, True for the rows that stop. Returns h_T, the injection's input cache, the
    step caches and diagnostics: the steps run S, the mean ‖h_T‖ over positions, the mean relative
    change ‖h_T − h_{T−1}‖ / ‖h_T‖ over positions (the residual), and each row's loop count."""
    xp = array_module(h)
    u, c_inject = ops.injection.input_forward(kind, p, e)  # B̄e: computed once for the whole loop
    B = h.shape[0]
    S = int(depths.max())
    start = S - depths  # sequence b runs steps start_b .. S−1
    running = np.ones(B, dtype=bool)  # False once an exit rule stopped the row
    loops = np.zeros(B, dtype=np.int64)
    first_cached = S - min(S, n_grad)
    steps, h_prev = [], h
    for t in range(S):
        rows = np.flatnonzero((start <= t) & running)
        idx = None if len(rows) == B else xp.asarray(rows)  # index on the state's device
        x, c_state = ops.injection.state_forward(kind, p, take_rows(h, idx), take_rows(u, idx))
        c_blocks = []
        for i in range(cfg.n_recurrent):
            name = f"core.{i}"
            x, c = block_forward(p, name, x, rope, cfg, ops, take_rows(ve.get(name), idx),
                                 kv and kv.slot(name, t, idx))
            c_blocks.append(c)
        h_prev, h = h, put_rows(h, idx, x)  # sequences that have not started keep their state
        loops[rows] += 1
        if t >= first_cached:
            steps.append(LoopStep(idx, c_state, c_blocks))
        if exit_rule is not None:
            running[rows[exit_rule(t, rows, x, take_rows(h_prev, idx), logits_of)]] = False
            if not running.any():
                break
    # in float64: an exploding state (an unstable injection) can pass float32's range in its
    # squares long before its entries overflow, and the diagnostics should still measure it
    h64, prev64 = h.astype(xp.float64), h_prev.astype(xp.float64)
    norm_T = xp.sqrt((h64 * h64).sum(axis=-1))  # (B, T)
    change = xp.sqrt(((h64 - prev64) ** 2).sum(axis=-1)) / xp.maximum(norm_T, 1e-30)
    diag = {"steps": S, "state_norm": float(norm_T.mean()), "residual": float(change.mean()),
            "loops": loops}
    return h, c_inject, steps, diag


def backward(p, cfg, cache, dloss=1.0):
    """Gradients of dloss × the mean cross-entropy with respect to every parameter (a dict like p),
    through the ops that made `cache`."""
    ops = cache.ops
    xp = array_module(p["wte"])
    grads = {k: xp.zeros_like(v) for k, v in p.items()}
    dlogits = ops.cross_entropy.backward(dloss, cache.loss)["logits"]  # (B, T, V)
    x = cache.x_final
    if cfg.tie_embeddings:
        _acc(grads, "wte", rows_t_matmul(dlogits, x))
        dx = rows_matmul(dlogits, p["wte"])
    else:
        _acc(grads, "lm_head", rows_t_matmul(x, dlogits))
        dx = rows_matmul(dlogits, p["lm_head"].T)
    g = ops.rmsnorm.backward(dx, cache.final_norm)
    _acc(grads, "final_norm", g["weight"])
    dx = g["x"]
    dve = {}  # layer name -> dL/d(value embedding) (B, T, kv·hs), summed over loop steps
    for i in reversed(range(cfg.n_coda)):
        name = f"coda.{i}"
        dx, g_ve = block_backward(dx, cache.coda[i], name, grads, ops)
        _add_ve(dve, name, g_ve)
    if cfg.looped:
        g = ops.linear.backward(dx, cache.C)
        _acc(grads, "C", g["w"])
        dh = g["x"]  # (B, T, d_h)
    else:
        dh = dx

    de = loop_backward(p, cfg, cache, dh, grads, dve)

    if cache.prelude_norm is not None:
        g = ops.rmsnorm.backward(de, cache.prelude_norm)
        _acc(grads, "prelude_norm", g["weight"])
        dx = g["x"]
    else:
        dx = de
    for i in reversed(range(cfg.n_prelude)):
        name = f"prelude.{i}"
        dx, g_ve = block_backward(dx, cache.prelude[i], name, grads, ops)
        _add_ve(dve, name, g_ve)
    _acc(grads, "wte", ops.embedding.backward(dx, cache.wte)["table"])
    for name, g_ve in dve.items():
        _acc(grads, f"ve.{name}", ops.embedding.backward(g_ve, cache.ve[name])["table"])
    return grads


def _add_ve(dve, name, g):
    if g is not None:
        dve[name] = g


def loop_backward(p, cfg, cache, dh, grads, dve):
    """Backprop through the cached loop steps, newest first; returns dL/de. The gradient reaching
    the state before the first cached step is dropped: that is the truncation."""
    ops = cache.ops
    xp = array_module(dh)
    B, T = cache.shape
    du = xp.zeros_like(dh)
    for rows, c_state, c_blocks in reversed(cache.steps):
        g = take_rows(dh, rows)
        for i in reversed(range(cfg.n_recurrent)):
            name = f"core.{i}"
            g, g_ve = block_backward(g, c_blocks[i], name, grads, ops)
            if g_ve is not None:
                if name not in dve:
                    dve[name] = xp.zeros((B,) + g_ve.shape[1:], dtype=g_ve.dtype)
                if rows is None:
                    dve[name] += g_ve
                else:
                    dve[name][rows] += g_ve
        gs = ops.injection.state_backward(g, c_state, p)
        for k, v in gs.items():
            if k.startswith("inject."):
                _acc(grads, k, v)
        if rows is None:
            dh = gs["h"]
            du += gs["u"]
        else:
            dh = dh.copy()
            dh[rows] = gs["h"]  # sequences that had not started pass their gradient through
            du[rows] += gs["u"]
    gi = ops.injection.input_backward(du, cache.inject, p)
    for k, v in gi.items():
        if k.startswith("inject."):
            _acc(grads, k, v)
    return gi["e"]


def cache_nbytes(cache, exclude=()):
    """Bytes held by the arrays in a cache (each array counted once; arrays in `exclude`, e.g. the
    parameters, are not activations and are skipped)."""
    seen = {id(a) for a in exclude}
    total = 0
    stack = [cache]
    while stack:
        obj = stack.pop()
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif hasattr(obj, "nbytes") and hasattr(obj, "shape") and id(obj) not in seen:
            seen.add(id(obj))
            total += obj.nbytes
    return total


def flops_per_token(cfg, train=True, n_loops=None):
    """Matmul FLOPs per token: 2 per multiply-add in the forward, twice that in the backward.
    Prelude, coda, C, B and the head run once; the recurrent block runs T times forward (T = μ_rec
    in training, `n_loops` at inference) and backward only through the μ_bwd steps with gradient:
        train = 6·N_outside + 2·N_core·μ_rec + 4·N_core·μ_bwd  (+ attention, counted the same way)
    Attention scores and values cost 2·2·H·hs per attended position, and a causal token attends to
    (context + 1)/2 positions on average."""
    V, d, d_h = cfg.vocab_size, cfg.d_model, cfg.d_h

    def block(w, H, H_kv, m):
        return 2 * w * w + 2 * w * w * H_kv / H + 2 * w * m

    def attn(w):  # multiply-adds: q·k and p·v, w = H·hs each, per attended position
        return 2 * w * (cfg.context + 1) / 2

    outside = [spec for spec in layers(cfg) if not spec.name.startswith("core.")]
    core = [spec for spec in layers(cfg) if spec.name.startswith("core.")]
    n_outside = sum(block(*spec[1:]) for spec in outside) + V * d
    a_outside = sum(attn(spec.width) for spec in outside)
    n_core = sum(block(*spec[1:]) for spec in core)
    a_core = sum(attn(spec.width) for spec in core)
    for name in value_embedding_layers(cfg):  # the value-embedding gates
        spec = layer(cfg, name)
        if name.startswith("core."):
            n_core += _gate_inputs(spec.width) * spec.kv_heads
        else:
            n_outside += _gate_inputs(spec.width) * spec.kv_heads
    if cfg.looped:
        n_outside += d_h * d + (d * d_h if cfg.injection in ("diagonal", "linear") else 0)
        n_core += d_h * d_h if cfg.injection == "linear" else 0
    if train:
        T, k = (cfg.mean_recurrence, cfg.backprop_depth) if cfg.looped else (1, 1)
        return 6 * (n_outside + a_outside) + 2 * (n_core + a_core) * T + 4 * (n_core + a_core) * k
    T = (n_loops or cfg.mean_recurrence) if cfg.looped else 1
    return 2 * (n_outside + a_outside) + 2 * (n_core + a_core) * T


def evaluate(params, cfg, batches, n_loops=None, ops=REFERENCE):
    """Mean loss over (x, y) batches at n_loops loop steps (default μ_rec), from the evaluation
    state, each batch weighted by its number of sequences."""
    total, count = 0.0, 0
    for x, y in batches:
        total += forward(params, cfg, x, y, n_loops=n_loops, ops=ops)[0] * len(x)
        count += len(x)
    if count == 0:
        raise ValueError("no batches to evaluate.")
    return total / count
