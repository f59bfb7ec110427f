"""Checkpoints: one .npz file holding everything needed to resume or to sample.

    param/<name>   every parameter (host copies, their own dtype)
    opt/<key>      the optimiser's state (moments, step count)
    meta           JSON: config, step, RNG state, tokenizer, training arguments, metrics

The file is written to a temporary name private to the writing process, in the same folder, and
then renamed over the old one (`files.atomic_write`), so a kill, a crash or a full disk while saving
leaves the previous checkpoint intact and no temporary file behind. Every way saving or loading can
fail that a user can cause ends in a `CheckpointError` with one sentence. `load_model` reads
either a minparcae checkpoint or an official Parcae model folder, for sampling and fine-tuning.
"""

import json
import os
import zipfile

import numpy as np

from .backend import to_host
from .files import describe_os_error, durable_write

FORMAT = "minparcae-checkpoint-1"


class CheckpointError(RuntimeError):
    pass


def save(path, params, opt_state, meta):
    """Atomically write params (dict of arrays), opt_state (dict of arrays/ints) and meta (JSON-able)."""
    arrays = {f"param/{k}": to_host(v) for k, v in params.items()}
    for k, v in opt_state.items():
        arrays[f"opt/{k}"] = to_host(v) if hasattr(v, "shape") else np.asarray(v)
    arrays["meta"] = np.frombuffer(json.dumps({"format": FORMAT, **meta}).encode(), dtype=np.uint8)
    try:
        durable_write(path, lambda f: np.savez(f, **arrays))
    except OSError as err:
        raise CheckpointError(describe_os_error(err, "cannot write the checkpoint", path) + "; the "
                              "previous checkpoint, if any, is untouched.") from None


def load(path):
    """Returns (params, opt_state, meta) as host arrays; raises CheckpointError on any problem."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.npz")
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}: train one first (python train.py --out DIR) "
                              "or pass the folder of an existing run.")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = {k: z[k] for k in z.files}
        meta = json.loads(files.pop("meta").tobytes().decode())
    except (PermissionError, IsADirectoryError) as err:
        raise CheckpointError(describe_os_error(err, "cannot read the checkpoint", path) + ".") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} is damaged or truncated ({type(err).__name__}); "
                              "use an earlier copy or train again.") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a minparcae checkpoint of format {FORMAT}.")
    params = {k[6:]: v for k, v in files.items() if k.startswith("param/")}
    opt = {k[4:]: (int(v) if v.ndim == 0 and v.dtype.kind == "i" else v)
           for k, v in files.items() if k.startswith("opt/")}
    return params, opt, meta


def check_config(meta, config_dict, path):
    """Stop with one sentence if the checkpoint was made for a different model config."""
    saved = meta["config"]
    diff = [f"{k} {saved.get(k)!r} vs {v!r}" for k, v in config_dict.items() if saved.get(k) != v]
    if diff:
        raise CheckpointError(f"checkpoint {path} was made for a different model ({'; '.join(diff)} "
                              "in the checkpoint vs now): use the same flags as that run, or a new "
                              "--out folder.")


def check_params(params, shapes, path):
    """Stop with one sentence if the saved parameters do not fit the model's shapes."""
    missing = [k for k in shapes if k not in params]
    wrong = [k for k in shapes if k in params and tuple(params[k].shape) != tuple(shapes[k])]
    if missing or wrong or len(params) != len(shapes):
        raise CheckpointError(f"checkpoint {path} does not match the model "
                              f"({len(missing)} parameters missing, {len(wrong)} of another shape).")


class Model:
    """A trained model read by `load_model`: config, parameters (host arrays), tokenizer, and the
    minparcae checkpoint's meta (None for an official folder)."""

    def __init__(self, cfg, params, tokenizer, meta=None, description=""):
        self.cfg, self.params, self.tokenizer, self.meta = cfg, params, tokenizer, meta
        self.description = description


def load_model(path, dtype=np.float32):
    """A model to sample from or to fine-tune: a minparcae run folder or .npz checkpoint, or an
    official Parcae folder (config.json, weights and tokenizer.json; see minparcae/official.py).
    Parameters come back as host arrays of `dtype`."""
    from . import model, official
    from .tokenizer import Tokenizer
    if official.is_official(path):
        loaded = official.load(path, dtype)
        if loaded.tokenizer is None:
            raise CheckpointError(f"{path} has no {official.TOKENIZER_FILE}: copy the model's "
                                  "tokenizer.json into the folder.")
        return Model(loaded.cfg, loaded.params, loaded.tokenizer, None,
                     "official Parcae model, " + official.describe(loaded))
    params, _, meta = load(path)
    try:
        cfg = model.Config.from_dict(meta["config"])
        tok = Tokenizer.from_dict(meta["tokenizer"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} holds no usable model config or tokenizer "
                              f"({type(err).__name__}: {err}).") from None
    check_params(params, model.param_shapes(cfg), path)
    params = {k: np.asarray(v, dtype=dtype) for k, v in params.items()}
    return Model(cfg, params, tok, meta, f"minparcae run at step {meta.get('step', '?')}")
