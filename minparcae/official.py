"""The official Parcae models in minparcae: read a published model folder, write one.

The official implementation (GitHub sandyresearch/parcae, package `parcae_lm`) publishes each
trained model as a folder:

    config.json                   the ParcaeConfig fields (dataclasses.asdict) and "_class_name"
    model.pt | pytorch_model.bin  the state dict, saved with torch.save
    tokenizer.json                (if present) the byte-level BPE, in Hugging Face's format

`load(folder)` turns such a folder into a minparcae Config, the flat parameter dict and the
tokenizer, without PyTorch (minparcae/torchfile.py reads the state dict; a `model.safetensors`
is read too); `export(folder, cfg, params)` writes a minparcae model in the same layout, its
weights as `model.safetensors`, which the official code loads with `load_state_dict`.

The names, official → minparcae (matrices are stored (out, in) there and (in, out) here, so every
one is transposed; `_orig_mod.` and `module.` prefixes, left by torch.compile and DDP, are dropped):

    transformer.wte.weight                          wte
    transformer.{prelude,core_block,coda}.i.        {prelude,core,coda}.i.
        norm_1.weight, norm_2.weight                    norm1, norm2
        attn.c_q/c_k/c_v/c_proj.weight                  attn.wq/wk/wv/wo            transposed
        attn.ve_gate.weight                             attn.ve_gate                transposed
        mlp.fc.weight, mlp.proj.weight                  mlp.fc, mlp.proj            transposed
    transformer.ln_prelude.weight                   prelude_norm
    transformer.adapter.A_log, .dt_bias, .B         inject.A_log, inject.dt_bias, inject.B (B transposed)
    transformer.adapter.adapter.weight              inject.W                    transposed
    transformer.C.weight                            C                           transposed
    transformer.ln_f.weight                         final_norm
    value_embeds.n.weight                           ve.<the n-th block, counting prelude, core, coda>
    lm_head.weight                                  lm_head (transposed), or dropped when tied
    freqs_cis                                       dropped (minparcae computes its rotary tables)

Every config field a published model can hold maps onto a Config field or is an implementation
choice that does not change the function the model computes (the attention kernel, activation
checkpointing, ...); any other value is refused with a sentence naming the field. One difference
remains by design: the official evaluation draws a fresh random initial state on every call (its
`state_init`), minparcae evaluates from a fixed draw per position (`eval_state="seeded"`), so its
losses and samples are reproducible. `Config(eval_state=...)` chooses.
"""

import json
import math
import os
from dataclasses import replace

import numpy as np

from . import model, torchfile
from .files import atomic_write, describe_os_error

WEIGHT_FILES = ("model.safetensors", "model.pt", "pytorch_model.bin")
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


class OfficialError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- the config

# Fields that choose how the official code computes, not what: any value is accepted.
_IMPLEMENTATION = {"name", "hf_config", "attn_impl", "use_fused_head", "activation_checkpoint_impl",
                   "simple_ops", "strategy", "skip_initialization", "init_orthogonal",
                   "padding_multiple", "vocab_size", "lockstep_n", "lockstep_k",
                   "curriculum_target", "_class_name", "architecture_class_name"}
# Fields that must hold one value (the one every published model has; minparcae has no other).
_FIXED = {"norm_class_name": "RMSNorm", "norm_eps": 1e-5, "mlp_class_name": "BaseMLP",
          "nonlin_name": "ReLU2", "block_class_name": "TransformerPreNormBlock", "bias": False,
          "qk_bias": False, "qk_norm": True, "clip_qkv": None, "use_abacus": False,
          "randomize_positions_from": None, "debias_attention": False, "center_attention": False,
          "mup_model_scaling_factor": 1, "model_class_name": "Parcae",
          "_is_recurrent_block_config": False, "sampling_scheme": "poisson-truncated-full",
          "recurrent_iteration_method": "per-sequence"}
# Init strategies of the official code whose tables set neither an embedding nor a logit scale
# (the others change the forward pass, which minparcae does not model).
_INIT_STRATEGIES = {"scaled-zero", "scaled", "scaled-geiping", "scaled-stuck", "small", "mitchell",
                    "normal", "llama", "llama-by-dim", "kaiming", "bert", "megatron", "megatron2",
                    "wang"}
# Fields mapped onto Config, with the official default where the file may leave them out.
_MAPPED = {"block_size": None, "n_embd": None, "intermediate_size": None,
           "num_attention_heads": None, "num_key_value_heads": None, "padded_vocab_size": None,
           "rope_settings": None, "logit_softcap": None, "init_strategy": "scaled",
           "injection_type": "diagonal", "n_layers_in_recurrent_block": 4,
           "n_layers_in_prelude": 1, "n_layers_in_coda": 1, "state_init": "like-init",
           "recurrent_embedding_dimension": 1024,
           "recurrent_intermediation_embedding_dimension": 3520,
           "recurrent_num_attention_heads": None, "prelude_norm": False, "mean_recurrence": 32,
           "mean_backprop_depth": 8, "tie_embeddings": False}
_STATE_INITS = ("like-init", "normal", "embed", "zero", "unit")
_INTEGERS = ("block_size", "n_embd", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "vocab_size", "padding_multiple", "padded_vocab_size", "n_layers_in_recurrent_block",
             "n_layers_in_prelude", "n_layers_in_coda", "recurrent_embedding_dimension",
             "recurrent_intermediation_embedding_dimension", "recurrent_num_attention_heads",
             "mean_recurrence", "mean_backprop_depth")


def _has_value_embedding(index, n):
    """The official rule: every other layer, with the parity of the last one (n − 1)."""
    return index % 2 == (n - 1) % 2


def config_from_official(d):
    """A Config from the dict in an official config.json; OfficialError names any field value
    that minparcae cannot run."""
    if not isinstance(d, dict):
        raise OfficialError("config.json must hold a JSON object of config fields.")
    class_name = d.get("_class_name", "ParcaeConfig")
    if class_name != "ParcaeConfig":
        raise OfficialError(f"config.json describes a {class_name}: only Parcae models "
                            "(_class_name ParcaeConfig) can be loaded.")
    unknown = sorted(set(d) - _IMPLEMENTATION - set(_FIXED) - set(_MAPPED))
    if unknown:
        raise OfficialError(f"config.json has the field {unknown[0]!r}, which minparcae does not "
                            "know; it may come from a newer version of the official code.")
    for key, want in _FIXED.items():
        if key in d and d[key] != want:
            raise OfficialError(f"config.json sets {key} = {d[key]!r}; minparcae supports only "
                                f"{want!r}.")
    if "Gemma" in str(d.get("name", "")):
        raise OfficialError("config.json names a Gemma-style model, whose norms minparcae does "
                            "not implement.")
    g = {**_MAPPED, **{k: v for k, v in d.items() if k in _MAPPED}}
    if g["init_strategy"] not in _INIT_STRATEGIES:
        raise OfficialError(f"config.json sets init_strategy = {g['init_strategy']!r}, which scales "
                            "the embeddings or logits; minparcae supports "
                            f"{', '.join(sorted(_INIT_STRATEGIES))}.")
    if g["state_init"] not in _STATE_INITS:
        raise OfficialError(f"config.json sets state_init = {g['state_init']!r}; minparcae supports "
                            f"{', '.join(_STATE_INITS)}.")
    rope = g["rope_settings"] or {}
    if rope.get("use_rope", True) is not True or rope.get("rope_condense_ratio", 1) != 1:
        raise OfficialError("config.json turns the rotary embedding off or condenses it "
                            f"({rope}); minparcae supports only plain rotary embeddings.")
    for key in ("block_size", "n_embd", "num_attention_heads"):
        if key not in d:
            raise OfficialError(f"config.json lacks the field {key!r}.")
    for key in _INTEGERS:
        value = g.get(key, d.get(key))
        least = 0 if key in ("n_layers_in_prelude", "n_layers_in_coda") else 1
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < least):
            raise OfficialError(f"config.json sets {key} = {value!r}, which is not an integer of "
                                f"at least {least}.")
    if g["logit_softcap"] is not None and not (isinstance(g["logit_softcap"], (int, float))
                                               and g["logit_softcap"] > 0):
        raise OfficialError(f"config.json sets logit_softcap = {g['logit_softcap']!r}, which is "
                            "not a positive number.")
    d_model, heads = d["n_embd"], d["num_attention_heads"]
    kv = d.get("num_key_value_heads") or heads
    vocab = d.get("padded_vocab_size") or _round_up(d.get("vocab_size", 50254),
                                                   d.get("padding_multiple", 512))
    n_p, n_r, n_c = g["n_layers_in_prelude"], g["n_layers_in_recurrent_block"], g["n_layers_in_coda"]
    n_total = n_p + n_r + n_c
    # The official attention layers make a value-embedding gate where has_ve(layer_id, n_layer)
    # holds (layer ids prelude 0.., core n_p.., coda n_p + n_r·μ_rec..; n_layer = n_r·μ_bwd), and
    # the model a table where has_ve(i, n_p + n_r + n_c) holds. minparcae has both or neither.
    mu_rec, mu_bwd = g["mean_recurrence"], g["mean_backprop_depth"]
    ids = list(range(n_p + n_r)) + [n_p + n_r * mu_rec + i for i in range(n_c)]
    gates = [_has_value_embedding(i, n_r * mu_bwd) for i in ids]
    tables = [_has_value_embedding(i, n_total) for i in range(n_total)]
    if gates != tables:
        raise OfficialError("in this config the official code puts value-embedding gates and "
                            "tables on different layers, which minparcae does not model.")
    d_state = g["recurrent_embedding_dimension"]
    try:
        return model.Config(
            vocab_size=vocab, context=d["block_size"], d_model=d_model,
            d_state=None if d_state == d_model else d_state, n_head=heads,
            n_kv_head=None if kv == heads else kv,
            n_recurrent_head=g["recurrent_num_attention_heads"],
            d_mlp=g["intermediate_size"] or 4 * d_model,
            d_mlp_recurrent=g["recurrent_intermediation_embedding_dimension"],
            n_prelude=n_p, n_recurrent=n_r, n_coda=n_c, mean_recurrence=mu_rec,
            backprop_depth=mu_bwd, injection=g["injection_type"], state_init=g["state_init"],
            tie_embeddings=bool(g["tie_embeddings"]), logit_softcap=g["logit_softcap"],
            value_embeddings=True, prelude_norm=bool(g["prelude_norm"]),
            rope_base=float(rope.get("rope_base", 50_000)))
    except ValueError as err:
        raise OfficialError(f"config.json describes a model minparcae cannot build: {err}") from None


def canonical(cfg):
    """cfg with every default spelled out and the evaluation state set aside: two configs with equal
    canonical forms build the same model."""
    return replace(cfg, d_state=cfg.d_h, n_kv_head=cfg.kv_heads, n_recurrent_head=cfg.recurrent_heads,
                   d_mlp=cfg.mlp_hidden, d_mlp_recurrent=cfg.mlp_hidden_recurrent, mlp_ratio=4,
                   eval_state="seeded")


def _round_up(n, k):
    return n if n % k == 0 else n + k - n % k


def config_to_official(cfg, name="minparcae"):
    """The official config.json dict of `cfg`; OfficialError if the official code cannot express it."""
    problems = []
    if not cfg.looped:
        problems.append("the fixed-depth baseline (injection 'none') is the official GPT model")
    if cfg.logit_scale != 1.0:
        problems.append("a logit scale other than 1 needs another init strategy")
    with_ve = replace(cfg, value_embeddings=True)  # the official model always has the tables
    core_ve = [n for n in model.value_embedding_layers(with_ve) if n.startswith("core.")]
    if core_ve and cfg.d_h != cfg.kv_heads * (cfg.d_model // cfg.n_head):
        problems.append("the official code sizes the recurrent block's value-embedding tables like "
                        "the prelude's, so with one in the loop d_state must be n_kv_head · head size")
    if cfg.d_h // cfg.recurrent_heads != cfg.d_model // cfg.n_head:
        problems.append("the official code has one rotary table, so the recurrent block's head "
                        "size must equal the prelude's")
    if problems:
        raise OfficialError("cannot export to the official layout: " + "; ".join(problems) + ".")
    d = {
        "_class_name": "ParcaeConfig", "name": name, "block_size": cfg.context,
        "n_embd": cfg.d_model, "intermediate_size": cfg.mlp_hidden,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
        "vocab_size": cfg.vocab_size, "padding_multiple": 64 if cfg.vocab_size % 64 == 0 else 1,
        "padded_vocab_size": cfg.vocab_size,
        "rope_settings": {"use_rope": True, "rope_condense_ratio": 1, "rope_base": cfg.rope_base},
        "logit_softcap": cfg.logit_softcap, "init_strategy": "scaled-zero", "init_orthogonal": True,
        "injection_type": cfg.injection, "n_layers_in_recurrent_block": cfg.n_recurrent,
        "n_layers_in_prelude": cfg.n_prelude, "n_layers_in_coda": cfg.n_coda,
        "state_init": cfg.state_init if cfg.state_init in _STATE_INITS else "like-init",
        "recurrent_embedding_dimension": cfg.d_h,
        "recurrent_intermediation_embedding_dimension": cfg.mlp_hidden_recurrent,
        "recurrent_num_attention_heads": cfg.n_recurrent_head, "prelude_norm": cfg.prelude_norm,
        "mean_recurrence": cfg.mean_recurrence, "mean_backprop_depth": cfg.backprop_depth,
        "tie_embeddings": cfg.tie_embeddings, **_FIXED}
    if canonical(config_from_official(d)) != canonical(replace(with_ve, state_init=d["state_init"])):
        raise OfficialError("cannot export to the official layout: this config does not survive "
                            "the round trip (its value-embedding layers differ from the official "
                            "rule for these layer counts).")
    return d


# ----------------------------------------------------------------------------- the parameters

_BLOCK_PARTS = {"norm_1.weight": ("norm1", False), "norm_2.weight": ("norm2", False),
                "attn.c_q.weight": ("attn.wq", True), "attn.c_k.weight": ("attn.wk", True),
                "attn.c_v.weight": ("attn.wv", True), "attn.c_proj.weight": ("attn.wo", True),
                "attn.ve_gate.weight": ("attn.ve_gate", True), "mlp.fc.weight": ("mlp.fc", True),
                "mlp.proj.weight": ("mlp.proj", True)}
_GROUPS = {"prelude": "prelude", "core_block": "core", "coda": "coda"}
_TOP = {"transformer.wte.weight": ("wte", False), "transformer.ln_prelude.weight": ("prelude_norm", False),
        "transformer.adapter.A_log": ("inject.A_log", False),
        "transformer.adapter.dt_bias": ("inject.dt_bias", False),
        "transformer.adapter.B": ("inject.B", True), "transformer.adapter.adapter.weight": ("inject.W", True),
        "transformer.C.weight": ("C", True), "transformer.ln_f.weight": ("final_norm", False),
        "lm_head.weight": ("lm_head", True)}


def official_names(cfg):
    """minparcae parameter name -> (official name, transposed?) for every parameter of cfg."""
    blocks = [spec.name for spec in model.layers(cfg)]
    inverse = {v: k for k, v in _GROUPS.items()}
    out = {}
    for name in model.param_shapes(cfg):
        if name.startswith("ve."):
            out[name] = (f"value_embeds.{blocks.index(name[3:])}.weight", False)
            continue
        group, _, rest = name.partition(".")
        if group in inverse:
            i, _, part = rest.partition(".")
            official_part = next(k for k, (v, _) in _BLOCK_PARTS.items() if v == part)
            out[name] = (f"transformer.{inverse[group]}.{i}.{official_part}", _BLOCK_PARTS[official_part][1])
        else:
            out[name] = next((k, t) for k, (v, t) in _TOP.items() if v == name)
    return out


def _strip(name):
    for prefix in ("_orig_mod.", "module."):
        name = name.replace(prefix, "")
    return name


def params_from_official(state, cfg, dtype=np.float32):
    """minparcae's parameter dict (host arrays of `dtype`) from an official state dict of arrays."""
    state = {_strip(k): v for k, v in state.items()}
    state.pop("freqs_cis", None)
    names = official_names(cfg)
    if cfg.tie_embeddings and "lm_head.weight" in state:
        head = state.pop("lm_head.weight")
        if head.shape != state.get("transformer.wte.weight", head).shape or not np.array_equal(
                head, state["transformer.wte.weight"]):
            raise OfficialError("the config ties the head to the embedding, but the weights hold a "
                                "different lm_head.weight.")
    wanted = {official: name for name, (official, _) in names.items()}
    missing = sorted(set(wanted) - set(state))
    extra = sorted(set(state) - set(wanted))
    if missing:
        raise OfficialError(f"the weights lack {len(missing)} tensor(s) the config needs, e.g. "
                            f"{missing[0]!r}: the weight file and config.json do not belong together.")
    if extra:
        raise OfficialError(f"the weights hold {len(extra)} tensor(s) the config does not describe, "
                            f"e.g. {extra[0]!r}: the weight file and config.json do not belong together.")
    shapes = model.param_shapes(cfg)
    params = {}
    for name, (official, transposed) in names.items():
        a = np.asarray(state[official])
        a = a.T if transposed else a
        if a.shape != shapes[name]:
            raise OfficialError(f"{official} has shape {tuple(state[official].shape)}, but the config "
                                f"needs {shapes[name][::-1] if transposed else shapes[name]}.")
        params[name] = np.ascontiguousarray(a, dtype=dtype)
    return params


def params_to_official(params, cfg):
    """The official state dict (host arrays, official names and layout) of minparcae's params.
    The official model always has value embeddings; a model without them is written with zero
    tables and zero gate weights, which add exactly nothing (v + 2σ(0)·0 = v)."""
    from .backend import to_host
    if not cfg.value_embeddings:
        cfg, zeros = replace(cfg, value_embeddings=True), model.param_shapes(cfg)
        params = {**{k: np.zeros(shape, dtype=to_host(params["wte"]).dtype)
                     for k, shape in model.param_shapes(cfg).items() if k not in zeros}, **params}
    out = {}
    for name, (official, transposed) in official_names(cfg).items():
        a = to_host(params[name])
        out[official] = np.ascontiguousarray(a.T if transposed else a)
    return out


# ----------------------------------------------------------------------------- folders

def is_official(path):
    """True if `path` is a folder in the official layout (a config.json, no minparcae checkpoint)."""
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))
            and not os.path.exists(os.path.join(path, "ckpt.npz")))


class Loaded:
    """What `load` returns: cfg, params, the tokenizer (None without a tokenizer.json), the
    weight file read and the dtypes its tensors were stored in."""

    def __init__(self, cfg, params, tokenizer, weights_path, stored_dtypes):
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
        self.weights_path, self.stored_dtypes = weights_path, stored_dtypes


def read_config(folder):
    path = os.path.join(folder, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except OSError as err:
        raise OfficialError(describe_os_error(err, "cannot read the config", path) + ".") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise OfficialError(f"{path} is not valid JSON ({err}).") from None
    return config_from_official(d)


def load(folder, dtype=np.float32, tokenizer=True):
    """Read an official model folder: Config, parameters (host arrays of `dtype`; bfloat16 and
    float16 weights are widened exactly), tokenizer. Raises OfficialError (or the readers'
    WeightsError) with one sentence on any problem."""
    if not os.path.isdir(folder):
        raise OfficialError(f"{folder} is not a folder: pass the folder that holds config.json "
                            "and the weights of an official Parcae model.")
    cfg = read_config(folder)
    path = next((os.path.join(folder, f) for f in WEIGHT_FILES
                 if os.path.isfile(os.path.join(folder, f))), None)
    if path is None:
        raise OfficialError(f"{folder} has a config.json but no weights: expected one of "
                            f"{', '.join(WEIGHT_FILES)}.")
    weights = torchfile.load_weights(path)
    params = params_from_official(weights, cfg, dtype)
    tok = None
    tok_path = os.path.join(folder, TOKENIZER_FILE)
    if tokenizer and os.path.isfile(tok_path):
        from .tokenizer import load_tokenizer
        tok = load_tokenizer(tok_path)
        if tok.vocab_size > cfg.vocab_size:
            raise OfficialError(f"the tokenizer has {tok.vocab_size} tokens, more than the model's "
                                f"{cfg.vocab_size}.")
    stored = {k: v for k, v in weights.stored_dtypes.items() if _strip(k) != "freqs_cis"}
    return Loaded(cfg, params, tok, path, stored)


def export(folder, cfg, params, tokenizer=None, dtype="float32", name="minparcae"):
    """Write cfg and params in the official layout: config.json and model.safetensors (official
    names, `dtype` float32 or bfloat16), plus tokenizer.json when the tokenizer can write one.
    The official code loads it with

        config = ParcaeConfig(**{k: v for k, v in json.load(open("config.json")).items()
                                 if k not in ("_class_name", "rope_settings")})
        model = config.construct_model()
        model.load_state_dict(safetensors.torch.load_file("model.safetensors"), strict=False)
    """
    d = config_to_official(cfg, name)
    state = params_to_official(params, cfg)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise OfficialError(describe_os_error(err, "cannot create the folder", folder) + ".") from None
    torchfile.save_safetensors(os.path.join(folder, "model.safetensors"), state,
                               metadata={"format": "pt", "written_by": "minparcae"}, dtype=dtype)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2)
    atomic_write(os.path.join(folder, CONFIG_FILE), write)
    if tokenizer is not None and hasattr(tokenizer, "to_hf_json"):
        tokenizer.to_hf_json(os.path.join(folder, TOKENIZER_FILE))
    return d


def describe(loaded):
    """One line about a loaded official model."""
    n = sum(math.prod(a.shape) for a in loaded.params.values())
    stored = sorted(set(loaded.stored_dtypes.values()))
    return (f"{os.path.basename(loaded.weights_path)}: {n:,} parameters stored as "
            f"{'/'.join(stored)}, d={loaded.cfg.d_model}, {loaded.cfg.n_prelude}/"
            f"{loaded.cfg.n_recurrent}/{loaded.cfg.n_coda} blocks, μ_rec {loaded.cfg.mean_recurrence}")


def main(argv=None):
    """python -m minparcae.official export RUN OUT [--dtype bfloat16] | info FOLDER"""
    import argparse

    from . import checkpoint, cli
    ap = argparse.ArgumentParser(prog="python -m minparcae.official",
                                 description="Official Parcae model folders: describe one, or "
                                             "export a minparcae run to the official layout.")
    sub = ap.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write a minparcae run as config.json + model.safetensors "
                                      "(+ tokenizer.json)")
    e.add_argument("run", help="a minparcae run folder or .npz checkpoint")
    e.add_argument("out", help="the folder to write")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    i = sub.add_parser("info", help="check an official folder and describe it")
    i.add_argument("folder")
    args = ap.parse_args(argv)

    def run():
        if args.command == "info":
            loaded = load(args.folder)
            tok = loaded.tokenizer
            print(f"{args.folder}: {describe(loaded)}; tokenizer: "
                  f"{'none' if tok is None else f'{tok.vocab_size} ids'}")
            print(json.dumps(loaded.cfg.to_dict()))
        else:
            m = checkpoint.load_model(args.run)
            export(args.out, m.cfg, m.params, m.tokenizer, dtype=args.dtype)
            print(f"wrote {args.out}: config.json, model.safetensors ({args.dtype})"
                  + (", tokenizer.json" if m.tokenizer.ranks is not None else ""))
    cli.run(run)


if __name__ == "__main__":
    from minparcae.official import main as _main  # the module's own classes, not __main__'s copies
    _main()
