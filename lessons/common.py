"""What lessons 9 and 10 share: a small real corpus, and the training loop.

Both run on the CPU at toy sizes, so that each trains a model in seconds.
"""

import shutil
import sysconfig
from pathlib import Path

import numpy as np

from minparcae import data, model, optim

# A few modules of Python's standard library: real text (code) that every Python install has.
CORPUS_FILES = ("textwrap.py", "string.py", "functools.py", "heapq.py", "queue.py", "random.py",
                "dataclasses.py")


def small_corpus(folder, vocab_size):
    """Copy the corpus files into `folder`/corpus, train a byte-level BPE of `vocab_size` ids on
    them and tokenise them once, caching under `folder`/cache (lessons never write into the
    repository). Returns a `data.Dataset`: .train and .val token arrays, .tokenizer."""
    folder = Path(folder)
    (folder / "corpus").mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in CORPUS_FILES:
        shutil.copy(stdlib / name, folder / "corpus" / name)
    # val_fraction: each file goes to validation with this probability (by a hash of its name)
    return data.prepare_data(folder / "corpus", vocab_size=vocab_size, cache_dir=folder / "cache",
                             val_fraction=0.1)


def train(cfg, dataset, steps, lr, batch_size=16, seed=0, log_every=None):
    """Train a fresh model of config `cfg` on dataset.train; return (params, training losses).

    Each step is the recipe of lesson 9: draw a batch of windows and one loop depth per sequence
    (Poisson around μ_rec), run the model forward keeping the last μ_bwd loop steps, backpropagate
    by hand, clip the gradient's global norm to 1, and take an AdamW step at the learning rate of a
    trapezoid schedule (flat, then a linear decay to 0 over the second half)."""
    params = model.init_params(cfg, seed=seed)
    opt = optim.AdamW(weight_decay=0.0)
    rng = np.random.default_rng(seed)
    losses = []
    for step in range(steps):
        x, y = data.get_batch(dataset.train, batch_size, cfg.context, rng)      # (B, T) each
        depths = model.sample_depths(rng, batch_size, cfg)                       # (B,)
        loss, cache, diag = model.forward(params, cfg, x, y, depths=depths, rng=rng, train=True)
        grads = model.backward(params, cfg, cache)
        optim.clip_grad_norm(grads, 1.0)
        opt.step(params, grads, optim.lr_at(step, steps, lr, schedule="trapezoid"))
        losses.append(loss)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"  step {step:3d}  loss {loss:.3f}  loop steps {diag['steps']:2d}  "
                  f"ρ(Ā) {diag['rho']:.3f}  ‖h_T‖ {diag['state_norm']:.2f}")
    return params, losses
