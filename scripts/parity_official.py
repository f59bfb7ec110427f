"""minparcae against the official Parcae code, run side by side: logits, loss, gradients, export.

    python scripts/parity_official.py --official PATH [--sizes small,140m]

PATH is a checkout of github.com/sandyresearch/parcae (its `parcae_lm` package is imported from
there; it needs PyTorch and einops). For each config the script builds the official model with
random weights (plus noise, so that zero-initialised projections hide nothing), converts its
state dict with minparcae.official, and compares, in float64:

  logits     eval forward at several loop counts, from the same initial state
  train      loss and every parameter gradient with per-sequence depths (poisson-truncated-full),
             truncated backprop through the last μ_bwd steps
  export     minparcae's parameters written by official.export, loaded by the official code

The official code computes some steps in float32 even in a float64 model: its rotary table, the
rotation, its RMSNorm and the logits call `.float()`. For the float64 comparison the rotary table
is rebuilt in float64 and `Tensor.float` returns its tensor unchanged, so that the comparison sees
the architecture, not float32 rounding. A last row compares the unmodified official code with
minparcae in float32.
"""

import argparse
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from minparcae import kernels, model, official  # noqa: E402

SMALL = dict(block_size=32, vocab_size=96, padding_multiple=32, n_embd=64, num_attention_heads=4,
             num_key_value_heads=4, intermediate_size=160, recurrent_embedding_dimension=64,
             recurrent_intermediation_embedding_dimension=192, n_layers_in_prelude=2,
             n_layers_in_recurrent_block=2, n_layers_in_coda=2, mean_recurrence=4,
             mean_backprop_depth=2)


def configs(sizes):
    base = dict(_class_name="ParcaeConfig", name="parcae-small-140m", bias=False,
                tie_embeddings=True, norm_class_name="RMSNorm", norm_eps=1e-5,
                mlp_class_name="BaseMLP", nonlin_name="ReLU2", qk_norm=True, prelude_norm=True,
                init_strategy="scaled-zero", init_orthogonal=True, injection_type="diagonal",
                state_init="like-init", sampling_scheme="poisson-truncated-full",
                recurrent_iteration_method="per-sequence", attn_impl="sdpa")
    out = []
    if "small" in sizes:
        s = {**base, **SMALL}
        # one block each, μ_rec 3, μ_bwd 1: value embeddings on the prelude and coda only (the
        # official code sizes every table like the prelude's, so a wider core cannot have one)
        one = {**s, "n_layers_in_prelude": 1, "n_layers_in_recurrent_block": 1,
               "n_layers_in_coda": 1, "mean_recurrence": 3, "mean_backprop_depth": 1}
        out += [("diagonal", s), ("linear", {**s, "injection_type": "linear"}),
                ("add", {**s, "injection_type": "add"}),
                ("soft-cap, untied head", {**s, "logit_softcap": 5.0, "tie_embeddings": False}),
                ("GQA outside; core: 8 heads of its own, width 128, MLP 96; no prelude norm",
                 {**one, "num_key_value_heads": 2, "recurrent_num_attention_heads": 8,
                  "recurrent_embedding_dimension": 128,
                  "recurrent_intermediation_embedding_dimension": 96, "prelude_norm": False}),
                ("linear, state width 96 (6 core heads)",
                 {**one, "injection_type": "linear", "recurrent_embedding_dimension": 96,
                  "recurrent_num_attention_heads": 6})]
    if "140m" in sizes:
        out.append(("parcae-small-140m", {**base, "block_size": 2048, "vocab_size": 32768,
                                          "padding_multiple": 64, "n_embd": 768,
                                          "num_attention_heads": 6, "num_key_value_heads": 6,
                                          "intermediate_size": 3072,
                                          "recurrent_embedding_dimension": 768,
                                          "recurrent_intermediation_embedding_dimension": 3072,
                                          "n_layers_in_recurrent_block": 2, "n_layers_in_prelude": 2,
                                          "n_layers_in_coda": 2, "mean_recurrence": 8,
                                          "mean_backprop_depth": 4}))
    return out


def build_official(torch, d, seed):
    from parcae_lm.models.parcae.config import ParcaeConfig
    cfg = ParcaeConfig(**{k: v for k, v in d.items() if k != "_class_name"})
    torch.manual_seed(seed)
    m = cfg.construct_model()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * p.std().clamp(min=0.05) * torch.randn_like(p))
    return m


def float64_rotary(torch, mixer, m, cfg):
    """Replace the official float32 rotary table and rotation by float64 versions."""
    hs = {cfg.d_model // cfg.n_head, cfg.d_h // cfg.recurrent_heads}
    assert len(hs) == 1, "the official model uses one rotary table for all blocks"
    hs = hs.pop()
    inv = 1.0 / (cfg.rope_base ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs))
    ang = torch.outer(torch.arange(cfg.context, dtype=torch.float64), inv)
    m.freqs_cis = torch.stack([ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]], dim=4)

    def rotate(q, k, freqs_cis):
        qk = torch.cat([q, k], dim=2).unflatten(-1, (-1, 2))
        c, s = freqs_cis[..., 0], freqs_cis[..., 1]
        out = torch.stack([qk[..., 0] * c - qk[..., 1] * s, qk[..., 1] * c + qk[..., 0] * s], -1)
        return torch.split(out.flatten(3), q.shape[2], dim=2)
    mixer.apply_rotary_emb_complex_like = rotate


class Float64Everywhere:
    """Inside: `Tensor.float()` returns its tensor, so the official code's float32 casts keep
    float64."""

    def __init__(self, torch):
        self.torch = torch

    def __enter__(self):
        self.saved = self.torch.Tensor.float
        saved = self.saved
        self.torch.Tensor.float = lambda t, *a, **k: t if t.is_floating_point() else saved(t, *a, **k)

    def __exit__(self, *exc):
        self.torch.Tensor.float = self.saved


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def compare(torch, mixer, label, d, args):
    cfg = official.config_from_official(d)
    m = build_official(torch, d, seed=0).double()
    float64_rotary(torch, mixer, m, cfg)
    state = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    p = official.params_from_official(state, cfg, np.float64)
    rng = np.random.default_rng(1)
    B, T = args.batch, min(args.seq, cfg.context)
    ids = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    targets[0, :3] = -1
    h0 = model.initial_state(cfg, (B, T, cfg.d_h), "like-init", rng, np.float64)
    m.initialize_state = lambda e: torch.tensor(h0)
    row = {"config": label}

    m.eval()
    worst = 0.0
    with torch.no_grad():
        for n in args.loops:
            ref = m(torch.tensor(ids), return_logits=True, num_steps_pair=torch.tensor([n]))["logits"]
            mine = model.forward(p, cfg, ids, n_loops=n, h0=h0)[0]
            worst = max(worst, rel(mine, ref.numpy()))
    row["logits (float64)"] = worst

    m.train()
    total = np.maximum(1, rng.poisson(cfg.mean_recurrence, size=B))
    k = np.minimum(total, cfg.backprop_depth)
    m._sample_batch_depths = lambda *a, **kw: (torch.tensor(total - k), torch.tensor(k))
    labels = torch.tensor(np.where(targets < 0, -100, targets))
    m.zero_grad()
    out = m(torch.tensor(ids), labels=labels)
    out["loss"].backward()
    loss, cache, _ = model.forward(p, cfg, ids, targets, depths=total, h0=h0, train=True)
    grads = model.backward(p, cfg, cache)
    row["loss"] = abs(loss - out["loss"].item()) / abs(out["loss"].item())
    named = dict(m.named_parameters())
    gerr = 0.0
    for name, (off, transposed) in official.official_names(cfg).items():
        off = "transformer.wte.weight" if off == "lm_head.weight" and cfg.tie_embeddings else off
        g = named[off].grad.numpy()
        gerr = max(gerr, rel(grads[name], g.T if transposed else g))
    row["gradients (worst)"] = gerr

    with tempfile.TemporaryDirectory() as folder:  # export: minparcae -> official layout -> official code
        q = {n: a * (1 + 0.1 * rng.standard_normal(a.shape)) for n, a in p.items()}
        official.export(folder, cfg, q, dtype="float64")
        from safetensors.torch import load_file
        m2 = build_official(torch, d, seed=5).double()
        float64_rotary(torch, mixer, m2, cfg)
        missing, unexpected = m2.load_state_dict(load_file(os.path.join(folder, "model.safetensors")),
                                                 strict=False)
        assert not unexpected and set(missing) <= {"freqs_cis", "lm_head.weight"}, (missing, unexpected)
        m2.initialize_state = lambda e: torch.tensor(h0)
        m2.eval()
        with torch.no_grad():
            ref = m2(torch.tensor(ids), return_logits=True,
                     num_steps_pair=torch.tensor([cfg.mean_recurrence]))["logits"].numpy()
        row["export (float64)"] = rel(model.forward(q, cfg, ids, h0=h0)[0], ref)
    return row


def compare_float32(torch, d, args, label):
    """The unmodified official code in float32 against minparcae in float32 (reference ops and the
    CPU's fast set)."""
    import importlib
    from parcae_lm.modules import mixer
    importlib.reload(mixer)
    from parcae_lm.modules import blocks
    importlib.reload(blocks)
    cfg = official.config_from_official(d)
    m = build_official(torch, d, seed=0).float().eval()
    state = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    p = official.params_from_official(state, cfg, np.float32)
    rng = np.random.default_rng(1)
    B, T = args.batch, min(args.seq, cfg.context)
    ids = rng.integers(0, cfg.vocab_size, (B, T))
    h0 = model.initial_state(cfg, (B, T, cfg.d_h), "like-init", rng, np.float32)
    m.initialize_state = lambda e: torch.tensor(h0)
    with torch.no_grad():
        ref = m(torch.tensor(ids), return_logits=True,
                num_steps_pair=torch.tensor([cfg.mean_recurrence]))["logits"].numpy()
    row = {"config": label + ", float32, official code unmodified"}
    row["logits, reference ops"] = rel(model.forward(p, cfg, ids, h0=h0)[0], ref)
    row["logits, CPU fast set"] = rel(model.forward(p, cfg, ids, h0=h0,
                                                    ops=kernels.select("cpu", np.float32))[0], ref)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, help="a checkout of github.com/sandyresearch/parcae")
    ap.add_argument("--sizes", default="small", help="comma-separated: small, 140m")
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--seq", type=int, default=24)
    ap.add_argument("--loops", default="1,2,4,7")
    args = ap.parse_args()
    args.loops = [int(n) for n in args.loops.split(",")]
    sys.path.insert(0, os.path.abspath(args.official))
    import torch
    from parcae_lm.modules import mixer
    torch.set_num_threads(2)
    rows = []
    for label, d in configs(args.sizes.split(",")):
        with Float64Everywhere(torch):
            rows.append(compare(torch, mixer, label, d, args))
        print(rows[-1], flush=True)
    f32 = compare_float32(torch, configs(args.sizes.split(","))[-1][1], args,
                          configs(args.sizes.split(","))[-1][0])
    print("\n| config | logits (float64) | loss | gradients (worst) | export (float64) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['logits (float64)']:.1e} | {r['loss']:.1e} | "
              f"{r['gradients (worst)']:.1e} | {r['export (float64)']:.1e} |")
    print(f"\n{f32['config']}: logits differ by {f32['logits, reference ops']:.1e} (reference ops), "
          f"{f32['logits, CPU fast set']:.1e} (CPU fast set), normwise relative")
    print("(normwise relative differences; logits at loop counts", args.loops, ")")


if __name__ == "__main__":
    main()
