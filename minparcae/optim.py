"""Optimisers (AdamW, Muon, both combined), global-norm gradient clipping and the lr schedule.

Parameters and gradients are flat dicts `name -> array` (NumPy or CuPy, float32 or float64); every
update happens in place, in the parameter's dtype and on its device. An optimiser's state is a flat
dict of arrays and ints (`state_dict()`), so a checkpoint can store it next to the parameters (e.g.
with `np.savez`) and `load_state_dict()` resumes the run bit for bit.
"""

import math

from minparcae.backend import array_module

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Muon's quintic Newton–Schulz coefficients (a, b, c)


def no_weight_decay(name, shape):
    """True for the parameters that weight decay must not touch (DESIGN.md: none on A_log, dt_bias,
    B, C; the paper's AdamW group: none on embeddings and norms):
    - 1-D parameters (RMSNorm weights, inject.A_log, inject.dt_bias): decay would pull norm gains
      and the injection's A and Δ towards values no loss asked for;
    - embeddings ("wte", also the tied head, and the value-embedding tables "ve.*"): a row only gets
      a gradient when its token appears, so decay would wear rare tokens away;
    - "inject.B" and "C", which start at identity/orthogonal and set the scale entering and leaving
      the loop.
    Every other 2-D matrix (block weights, ve_gate, the linear baseline's inject.W, an untied
    lm_head) is decayed."""
    return len(shape) < 2 or name in ("wte", "inject.B", "C") or name.startswith("ve.")


def uses_muon(name, shape):
    """True for the 2-D weights inside attention and MLP blocks (not the value-embedding gate)."""
    in_block = ".attn." in name or ".mlp." in name
    return len(shape) == 2 and in_block and not name.endswith(".ve_gate")


def _buffer(store, name, p):
    """The state array `store[name]`: zeros on first use, else moved to p's device and dtype (a
    no-op except right after `load_state_dict` from host arrays)."""
    xp = array_module(p)
    if name not in store:
        store[name] = xp.zeros_like(p)
    store[name] = xp.asarray(store[name], dtype=p.dtype)
    return store[name]


def _strip(state, prefix):
    """The entries of `state` whose keys start with `prefix`, keyed without it."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _copies(state, prefix):
    """Like `_strip`, with the arrays copied so the optimiser never shares buffers with the caller."""
    return {k: a.copy() for k, a in _strip(state, prefix).items()}


def adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2):
    """One AdamW update of p, m, v in place (see AdamW); weight_decay 0 for undecayed parameters."""
    xp = array_module(p)
    if weight_decay:
        p *= 1 - lr * weight_decay
    m *= beta1
    m += (1 - beta1) * g
    v *= beta2
    v += (1 - beta2) * g * g
    p -= (lr / bias_correction1) * m / (xp.sqrt(v) / math.sqrt(bias_correction2) + eps)


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), as in torch.optim.AdamW.

    For each parameter p with gradient g, at step t = 1, 2, ...:
        p ← p·(1 − lr·wd)                        (only where not no_weight_decay)
        m ← β1·m + (1 − β1)·g,   v ← β2·v + (1 − β2)·g²
        p ← p − lr · (m / (1 − β1^t)) / (√(v / (1 − β2^t)) + eps)
    The bias corrections undo the zero start of m and v. Defaults are the common GPT ones; the
    reference trains its AdamW group with betas (0.8, 0.95), eps 1e-10 and no weight decay.
    `update` does one parameter's update (`adamw_update`, or the GPU's one-pass kernel from
    kernels.adamw_update). State: {"step": t, "m.<name>": m, "v.<name>": v}, the live buffers (save
    them before stepping).
    """

    def __init__(self, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, update=None):
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.update = update or adamw_update
        self.t, self.m, self.v = 0, {}, {}

    def step(self, params, grads, lr):
        """Update every params[name] that has a gradient in `grads`, in place."""
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for name, g in grads.items():
            p = params[name]
            m, v = _buffer(self.m, name, p), _buffer(self.v, name, p)
            wd = 0.0 if no_weight_decay(name, p.shape) else self.weight_decay
            self.update(p, g, m, v, lr, b1, b2, self.eps, wd, bc1, bc2)

    def state_dict(self):
        return {"step": self.t, **{"m." + k: a for k, a in self.m.items()},
                **{"v." + k: a for k, a in self.v.items()}}

    def load_state_dict(self, state):
        self.t = int(state["step"])
        self.m, self.v = _copies(state, "m."), _copies(state, "v.")


def newton_schulz(G, steps=5, eps=1e-7):
    """An approximation of the orthogonal polar factor U·Vᵀ of G = U·S·Vᵀ, in float32.
    X_0 = G / (‖G‖_F + eps) puts every singular value in [0, 1]. Each step applies the odd quintic
        X ← a·X + b·(X·Xᵀ)·X + c·(X·Xᵀ)²·X,     (a, b, c) = (3.4445, −4.7750, 2.0315),
    which maps each singular value σ to φ(σ) = aσ + bσ³ + cσ⁵ and leaves U and V alone. The large
    slope a pushes small σ up fast (a⁵ ≈ 490); the coefficients trade exact convergence to 1 for
    speed, so after 5 steps every σ that started above ≈ 2e-3 lies roughly in [0.68, 1.2], not at 1
    (smaller ones, such as a near-low-rank gradient's tail, stay below). Working on the wide
    orientation (transposing when rows > cols) makes X·Xᵀ the smaller Gram matrix.
    """
    xp = array_module(G)
    X = G.astype(xp.float32)
    X = X / (xp.linalg.norm(X) + eps)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    a, b, c = NS_COEFFS
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.T if tall else X


class Muon:
    """Muon (Keller Jordan et al.): Nesterov momentum whose update is orthogonalised.
    For a weight W (stored (in, out), y = x·W) with gradient G:
        M ← μ·M + G                       (momentum buffer)
        Ĝ = G + μ·M                       (Nesterov look-ahead)
        O = NS5(Ĝ) ≈ polar factor of Ĝ   (`newton_schulz`: all singular values ≈ 1)
        W ← W·(1 − lr·wd) − lr · √max(1, d_out/d_in) · O
    Orthogonalising equalises the update's strength across directions, so rare directions of the
    gradient learn as fast as dominant ones. The scale √max(1, d_out/d_in) is the reference's
    max(1, rows/cols)^0.5 for PyTorch's (out, in) layout; with the (in, out) layout used here it is
    max(1, cols/rows)^0.5 (2 for an MLP's d→4d fc, 1 for its 4d→d proj). State: {"m.<name>": M}.
    """

    def __init__(self, momentum=0.95, ns_steps=5, weight_decay=0.0):
        self.momentum, self.ns_steps, self.weight_decay = momentum, ns_steps, weight_decay
        self.m = {}

    def step(self, params, grads, lr):
        mu = self.momentum
        for name, g in grads.items():
            p = params[name]
            if p.ndim != 2:
                raise ValueError(f"Muon updates 2-D weights only; give {name} {p.shape} to AdamW")
            M = _buffer(self.m, name, p)
            M *= mu
            M += g
            O = newton_schulz(g + mu * M, self.ns_steps).astype(p.dtype)
            rows, cols = p.shape
            p *= 1 - lr * self.weight_decay
            p -= (lr * max(1.0, cols / rows) ** 0.5) * O

    def state_dict(self):
        return {"m." + k: a for k, a in self.m.items()}

    def load_state_dict(self, state):
        self.m = _copies(state, "m.")


class Combined:
    """Muon for the block weights (`uses_muon`), AdamW for everything else, behind one step.

    `step(params, grads, lr)` gives AdamW the rate lr and Muon lr·muon_lr_ratio, so one schedule
    (`lr_at`) drives both. Muon needs the larger rate: an orthogonalised update has elements of size
    ≈ 1/√max(rows, cols), where Adam's are ≈ 1. The default 2.5 is Muon's usual 0.02 over the
    reference's 8e-3. State: AdamW's keys prefixed "adamw.", Muon's "muon.".
    """

    def __init__(self, adamw=None, muon=None, muon_lr_ratio=2.5):
        self.adamw, self.muon = adamw or AdamW(), muon or Muon()
        self.muon_lr_ratio = muon_lr_ratio

    def step(self, params, grads, lr):
        to_muon = {k: g for k, g in grads.items() if uses_muon(k, params[k].shape)}
        self.adamw.step(params, {k: g for k, g in grads.items() if k not in to_muon}, lr)
        self.muon.step(params, to_muon, lr * self.muon_lr_ratio)

    def state_dict(self):
        return {**{"adamw." + k: a for k, a in self.adamw.state_dict().items()},
                **{"muon." + k: a for k, a in self.muon.state_dict().items()}}

    def load_state_dict(self, state):
        self.adamw.load_state_dict(_strip(state, "adamw."))
        self.muon.load_state_dict(_strip(state, "muon."))


def clip_grad_norm(grads, max_norm):
    """Scale all gradients in place by max_norm/‖g‖ when their global L2 norm ‖g‖ > max_norm.

    ‖g‖ = √(Σ over all arrays of Σ g²), accumulated in float64; returned (before clipping) as a
    Python float. A non-finite norm (inf/nan gradients) is returned as is and nothing is scaled, so
    the caller can skip the step instead of writing NaNs into the parameters.
    """
    sq = 0.0
    for g in grads.values():
        xp = array_module(g)
        sq += xp.sum(xp.square(g, dtype=xp.float64))  # stays on the device until float() below
    norm = math.sqrt(float(sq))
    if math.isfinite(norm) and norm > max_norm:
        for g in grads.values():
            g *= max_norm / norm
    return norm


def lr_at(step, total_steps, base_lr, warmup=0, schedule="cosine", cooldown_frac=0.5,
          min_lr_frac=0.0):
    """The learning rate for optimiser step `step` (0-based) of a run of `total_steps` steps.

    Warm-up, for step < warmup: base_lr·(step + 1)/warmup (reaches base_lr at step warmup − 1).
    After it, with min_lr = min_lr_frac·base_lr and N = total_steps:
      "constant":  base_lr.
      "cosine":    min_lr + (base_lr − min_lr)·½(1 + cos(π·s)),  s = (step − warmup)/(N − warmup).
      "trapezoid": min_lr + (base_lr − min_lr)·min(1, (N − step)/(cooldown_frac·N)): flat at base_lr,
                   then a straight line down over the last cooldown_frac of training (the
                   reference: no warm-up, cooldown_frac 0.5, to 0).
    Both decays reach min_lr at step = total_steps, one past the last step, so no step is spent at
    a rate of 0; steps beyond the end stay at min_lr.
    """
    if schedule not in ("cosine", "trapezoid", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}: use cosine, trapezoid or constant")
    if schedule == "trapezoid" and not 0 < cooldown_frac <= 1:
        raise ValueError(f"cooldown_frac must be in (0, 1], not {cooldown_frac}")
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    min_lr = min_lr_frac * base_lr
    if schedule == "cosine":
        s = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * s))
    left = max(0.0, (total_steps - step) / (cooldown_frac * total_steps))
    return min_lr + (base_lr - min_lr) * min(1.0, left)
