"""A PyTorch reference of the Parcae model, written separately from minparcae and differentiated by
autograd. The tests compare minparcae's hand-written gradients with it; the benchmarks time it.

It reads minparcae's parameter dict as is: the same names, matrices stored (in, out), so every
layer is `x @ W`. `cfg` is any object with minparcae's Config fields. The model, in autograd terms:

    x = wte[ids] → prelude blocks                                      (B, T, d)
    e = RMSNorm(x) · prelude_norm  (or e = x without a prelude norm)   fixed for the loop
    h_t = R(inject(h_{t−1}, e)),  t = 1..S,  S = max(depths)           (B, T, d_h)
        diagonal  Ā ⊙ h + Δ ⊙ (e B),  Δ = softplus(dt_bias), Ā = exp(−Δ · exp(A_log))
        linear    h W[:d_h] + e W[d_h:]
        add       h + e
    logits = RMSNorm(coda(h_S C)) · final_norm @ (wteᵀ | lm_head)      (B, T, V)
    loss = mean cross-entropy of s·logits (or c·tanh(s·logits / c) with a soft-cap c)

Each block: x += attn(RMSNorm(x) · norm1); x += ½ relu(RMSNorm(x) · norm2 @ fc)² @ proj, RMSNorm
with eps 1e-5. Attention: q, k, v projections (k, v with H_kv ≤ H heads in the prelude and coda;
the recurrent block has n_recurrent_head heads, each with its own k and v); v += 2σ(x[..., :32] W_g)
· ve where the block has a value embedding; rotary on adjacent pairs, then a weightless RMSNorm of
q and k with the dtype's machine epsilon (PyTorch's default, as in the official Parcae code);
causal softmax(q kᵀ / √hs) v; the output projection.

"none" is the plain transformer: the core blocks run once on the prelude output. Sequence b with
depth D_b joins the loop at step S − D_b and keeps its state until then (right-aligned), so its
last min(D_b, μ_bwd) steps all lie in the batch's last k = min(S, μ_bwd) steps. Truncated backprop
is therefore: the first S − k steps run under no_grad, and the state they produce is detached.
"""

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-5  # the blocks' RMSNorms; QK-norm uses PyTorch's default (the dtype's machine epsilon)
IGNORE_INDEX = -1


def d_state(cfg):
    return cfg.d_state or cfg.d_model


def heads(cfg, name):
    """(query heads, key/value heads) of block `name`."""
    if name.startswith("core."):
        h = cfg.n_recurrent_head or cfg.n_head
        return h, h
    return cfg.n_head, cfg.n_kv_head or cfg.n_head


def block_names(cfg):
    return ([f"prelude.{i}" for i in range(cfg.n_prelude)] + [f"core.{i}" for i in range(cfg.n_recurrent)]
            + [f"coda.{i}" for i in range(cfg.n_coda)])


def value_embedding_names(cfg):
    """The last block and every second one before it carry a value-embedding table."""
    if not cfg.value_embeddings:
        return []
    names = block_names(cfg)
    return names[(len(names) - 1) % 2::2]  # the indices with the last one's parity


def rope_tables(T, hs, base, like):
    """cos, sin of position·base^(−2i/hs): (T, hs/2) each, in float64 then cast like `like`."""
    inv_freq = base ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq
    return angles.cos().to(like), angles.sin().to(like)


def rotate_pairs(x, cos, sin):
    """Rotate each adjacent pair (x_2i, x_2i+1) of x (B, H, T, hs) by its angle."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def rms_norm(x, weight=None):
    return F.rms_norm(x, (x.shape[-1],), weight, eps=EPS)


def attention(p, name, x, rope, cfg, ve):
    B, T, w = x.shape
    H, H_kv = heads(cfg, name)
    hs = w // H
    rope = rope[hs]
    q = (x @ p[f"{name}.attn.wq"]).view(B, T, H, hs).transpose(1, 2)  # (B, H, T, hs)
    k = (x @ p[f"{name}.attn.wk"]).view(B, T, H_kv, hs).transpose(1, 2)  # (B, H_kv, T, hs)
    v = (x @ p[f"{name}.attn.wv"]).view(B, T, H_kv, hs).transpose(1, 2)
    if ve is not None:
        w_gate = p[f"{name}.attn.ve_gate"]  # (n_g, H_kv)
        gate = 2 * torch.sigmoid(x[..., : w_gate.shape[0]] @ w_gate)  # (B, T, H_kv)
        v = v + gate.transpose(1, 2)[..., None] * ve.view(B, T, H_kv, hs).transpose(1, 2)
    q = F.rms_norm(rotate_pairs(q, *rope), (hs,))  # eps None: the machine epsilon
    k = F.rms_norm(rotate_pairs(k, *rope), (hs,))
    # query head h reads key/value head h // (H / H_kv)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=hs ** -0.5,
                                       enable_gqa=H != H_kv)  # (B, H, T, hs)
    return y.transpose(1, 2).reshape(B, T, H * hs) @ p[f"{name}.attn.wo"]


def block(p, name, x, rope, cfg, ve=None):
    x = x + attention(p, name, rms_norm(x, p[f"{name}.norm1"]), rope, cfg, ve)
    u = rms_norm(x, p[f"{name}.norm2"]) @ p[f"{name}.mlp.fc"]
    return x + (0.5 * torch.relu(u) ** 2) @ p[f"{name}.mlp.proj"]


def injected_input(p, kind, e):
    """The part of the injection that depends on e only: (B, T, d) -> (B, T, d_h)."""
    if kind == "diagonal":
        return F.softplus(p["inject.dt_bias"]) * (e @ p["inject.B"])
    if kind == "linear":
        W = p["inject.W"]
        return e @ W[W.shape[1]:]
    return e


def inject(p, kind, h, u):
    if kind == "diagonal":
        A_bar = torch.exp(-F.softplus(p["inject.dt_bias"]) * torch.exp(p["inject.A_log"]))
        return A_bar * h + u
    if kind == "linear":
        W = p["inject.W"]
        return h @ W[: W.shape[1]] + u
    return h + u


def loop(p, cfg, e, h, depths, rope, ve):
    """Run each sequence for its own depth, right-aligned; truncated backprop as in the docstring."""
    u = injected_input(p, cfg.injection, e)  # (B, T, d_h)
    ve = {n: t for n, t in ve.items() if n.startswith("core.")}

    def step(h, u, ve):  # one pass of the recurrent block
        x = inject(p, cfg.injection, h, u)
        for i in range(cfg.n_recurrent):
            x = block(p, f"core.{i}", x, rope, cfg, ve.get(f"core.{i}"))
        return x

    B, S = len(depths), max(depths)
    first_grad = S - min(S, cfg.backprop_depth)
    for t in range(S):
        with torch.set_grad_enabled(torch.is_grad_enabled() and t >= first_grad):
            if t == first_grad:
                h = h.detach()  # the truncation: no gradient into the states before this step
            rows = [b for b in range(B) if t >= S - depths[b]]  # the sequences that have joined
            if len(rows) == B:
                h = step(h, u, ve)
            else:  # the others keep their state
                rows = torch.tensor(rows, device=h.device)
                h = h.index_copy(0, rows, step(h[rows], u[rows], {n: v[rows] for n, v in ve.items()}))
    return h


def loss_fn(p, cfg, ids, targets, depths, h0):
    """Mean cross-entropy over targets ≠ −1. ids, targets: (B, T) long; depths: a list of B ints;
    h0: (B, T, d_h)."""
    T = ids.shape[1]
    wte = p["wte"]
    sizes = {cfg.d_model // cfg.n_head, d_state(cfg) // heads(cfg, "core.0")[0]}
    rope = {hs: rope_tables(T, hs, cfg.rope_base, wte) for hs in sizes}  # by head size
    ve = {n: p[f"ve.{n}"][ids] for n in value_embedding_names(cfg)}  # (B, T, H_kv·hs)
    x = wte[ids]  # (B, T, d)
    for i in range(cfg.n_prelude):
        x = block(p, f"prelude.{i}", x, rope, cfg, ve.get(f"prelude.{i}"))
    if cfg.injection == "none":
        for i in range(cfg.n_recurrent):
            x = block(p, f"core.{i}", x, rope, cfg, ve.get(f"core.{i}"))
    else:
        e = rms_norm(x, p["prelude_norm"]) if "prelude_norm" in p else x
        x = loop(p, cfg, e, h0, depths, rope, ve) @ p["C"]
    for i in range(cfg.n_coda):
        x = block(p, f"coda.{i}", x, rope, cfg, ve.get(f"coda.{i}"))
    x = rms_norm(x, p["final_norm"])
    logits = x @ (wte.T if cfg.tie_embeddings else p["lm_head"])  # (B, T, V)
    z = logits * cfg.logit_scale
    if cfg.logit_softcap is not None:
        z = cfg.logit_softcap * torch.tanh(z / cfg.logit_softcap)
    return F.cross_entropy(z.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def to_torch(params_np, device="cpu"):
    """minparcae's parameter dict (NumPy arrays) as leaf tensors that require grad."""
    return {k: torch.tensor(np.asarray(v), device=device).requires_grad_()
            for k, v in params_np.items()}


def loss_and_grads(params_np, cfg, ids, targets, depths, h0):
    """The loss and the gradient of every parameter (NumPy, the parameters' dtype; zeros for a
    parameter the loss does not reach), from NumPy inputs."""
    p = to_torch(params_np)
    loss = loss_fn(p, cfg, torch.as_tensor(ids, dtype=torch.long),
                   torch.as_tensor(targets, dtype=torch.long), [int(n) for n in depths],
                   torch.as_tensor(np.asarray(h0), dtype=p["wte"].dtype))
    loss.backward()
    grads = {k: (t.grad if t.grad is not None else torch.zeros_like(t)).numpy() for k, t in p.items()}
    return loss.item(), grads


class TrainStep:
    """One training step: forward, backward, torch.optim.AdamW, on a fixed batch and initial state.

    AdamW's decoupled weight decay is applied to the parameters for which `decay(name, shape)` is
    true (pass minparcae's rule so both sides update the same way). With compile=True the loss
    function goes through torch.compile first.
    """

    def __init__(self, params_np, cfg, decay, device="cpu", lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                 weight_decay=0.1, compile=False):
        self.p, self.cfg = to_torch(params_np, device), cfg
        decayed = {k for k, t in self.p.items() if decay(k, t.shape)}
        groups = [{"params": [t for k, t in self.p.items() if k in decayed], "weight_decay": weight_decay},
                  {"params": [t for k, t in self.p.items() if k not in decayed], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
        self.loss_fn = torch.compile(loss_fn) if compile else loss_fn
        self.device = device

    def __call__(self, ids, targets, depths, h0):
        # depths as plain ints: torch.compile specialises on them instead of tracing an array
        loss = self.loss_fn(self.p, self.cfg, ids, targets, [int(n) for n in depths], h0)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def batch(self, ids, targets, h0):
        """NumPy batch -> tensors on this step's device."""
        dt = self.p["wte"].dtype
        return (torch.as_tensor(ids, dtype=torch.long, device=self.device),
                torch.as_tensor(targets, dtype=torch.long, device=self.device),
                torch.as_tensor(np.asarray(h0), dtype=dt, device=self.device))

