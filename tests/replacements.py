"""Every op replacement of an op set against the reference op, on the same random inputs.

`exercise(name, op, ...)` runs every function of op `name` that a replacement may replace, through
`op` (the reference module or a replacement), and returns the outputs and gradients by label; a
test runs it through both and compares label by label. `EXERCISED` lists the functions it calls,
so a test can check that every function a replacement replaces is compared. Used by the CPU
kernels' tests and the CUDA ones (on Numba's simulator, at tiny sizes)."""

import numpy as np

from minparcae.ops import REFERENCE, cross_entropy, rotary

EXERCISED = {
    "attention": {"forward", "backward"},
    "cross_entropy": {"forward", "loss", "backward"},
    "embedding": {"forward", "backward"},
    "injection": {"input_forward", "input_backward", "state_forward", "state_backward"},
    "linear": {"forward", "backward"},
    "mlp": {"forward", "backward"},
    "qk_norm": {"forward", "backward"},
    "rmsnorm": {"forward", "add_forward", "backward"},
}


def replaced(ops):
    """(op name, function names) of every function `ops` replaces in the reference."""
    found = []
    for name in ops._fields:
        op, ref = getattr(ops, name), getattr(REFERENCE, name)
        functions = {f for f in EXERCISED[name] if getattr(op, f) is not getattr(ref, f)}
        extra = {f for f, v in vars(op).items() if callable(v) and not f.startswith("_")
                 and getattr(ref, f, None) is not v and f not in EXERCISED[name]
                 and not isinstance(v, type)}
        assert not extra, f"{name} replaces {extra}, which no test exercises"
        if functions:
            found.append((name, functions))
    return found


def exercise(name, op, dtype, seed=0, T=7, hs=4, width=40, heads=(4, 2)):
    """label -> array: op `name`'s outputs and gradients through `op`."""
    rng = np.random.default_rng(seed)

    def r(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(dtype)

    out = {}
    if name == "rmsnorm":
        x, g, res = r(3, 5, width), r(3, 5, width), r(3, 5, width)
        for label, w in (("w", 1 + r(width, scale=0.2)), ("none", None)):
            y, c = op.forward(x, w)
            out[f"y/{label}"] = y
            out.update({f"d{k}/{label}": v for k, v in op.backward(g, c).items()})
            s, y, c = op.add_forward(x, res, w)
            out[f"s+/{label}"], out[f"y+/{label}"] = s, y
            out.update({f"d{k}+/{label}": v for k, v in op.backward(g, c, dres=res).items()})
    elif name == "qk_norm":
        cos, sin = rotary.tables(T, hs, dtype=dtype)
        x = r(2, T, 5, hs)[:, :, 1:4]  # the heads of a q/k/v product: a strided view
        y, c = op.forward(x, cos, sin)
        out["y"], out["dx"] = y, op.backward(r(*y.shape), c)["x"]
    elif name == "mlp":
        y, c = op.forward(r(3, T, 8), r(8, 32), r(32, 8))
        out["y"] = y
        out.update({f"d{k}": v for k, v in op.backward(r(*y.shape), c).items()})
    elif name == "linear":
        y, c = op.forward(r(3, T, 8), r(8, 5))
        out["y"] = y
        out.update({f"d{k}": v for k, v in op.backward(r(*y.shape), c).items()})
    elif name == "attention":
        H, H_kv = heads
        q, k, v = r(2, H, T, hs), r(2, H_kv, T, hs), r(2, H_kv, T, hs)
        y, c = op.forward(q, k, v, 0.4)
        out["y"] = y
        out.update({f"d{k}": v for k, v in op.backward(r(*y.shape), c).items()})
    elif name == "cross_entropy":
        logits, targets = r(2, T, 50, scale=3.0), rng.integers(0, 50, (2, T))
        targets[0, T // 2] = cross_entropy.IGNORE_INDEX
        for label, kw in (("plain", {}), ("capped", dict(scale=0.8, softcap=5.0))):
            loss, c = op.forward(logits, targets, **kw)
            out[f"loss/{label}"] = np.float64(loss)
            out[f"eval/{label}"] = np.float64(op.loss(logits, targets, **kw))
            out[f"dlogits/{label}"] = op.backward(0.7, c)["logits"]
    elif name == "embedding":
        ids, table = rng.integers(0, 6, (3, T)), r(6, 8)
        ids[0, :3] = 2  # a repeated row: the backward must add up its gradients
        y, c = op.forward(ids, table)
        out["y"], out["dtable"] = y, op.backward(r(*y.shape), c)["table"]
    elif name == "injection":
        d, d_h = 8, 8
        p = {"inject.A_log": r(d_h, scale=0.5), "inject.dt_bias": r(d_h, scale=0.5),
             "inject.B": r(d, d_h), "inject.W": r(d_h + d, d_h, scale=0.5)}
        e, h = r(3, T, d), r(3, T, d_h)
        for kind in ("diagonal", "linear", "add"):
            u, cu = op.input_forward(kind, p, e)
            x, cs = op.state_forward(kind, p, h, u)
            out[f"u/{kind}"], out[f"x/{kind}"] = u, x
            g = op.state_backward(r(*x.shape), cs, p)
            g.update(op.input_backward(g["u"], cu, p))
            out.update({f"d{k}/{kind}": v for k, v in g.items()})
    else:
        raise KeyError(name)
    return out
