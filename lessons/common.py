"""What lessons 8, 9, 10 and 12 share: a small real corpus, the training loop and one BLAS thread.

They run on the CPU at toy sizes, so that each trains a model in seconds. Import this module before
NumPy (the lessons do): it sets the thread count that NumPy's BLAS reads when it loads.
"""

import os

# The lessons' matrices are tiny (32 × 32 weights, a few hundred rows), so a product is over long
# before a second BLAS thread could help, and every product wakes and waits for the others. On a
# 2-core machine that made lesson 9 take 14 s instead of 5 and lesson 10 80 s instead of 14. BLAS
# reads these variables once, when NumPy first loads it, hence before `import numpy`; a value the
# user has set is kept.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import shutil  # noqa: E402
import sysconfig  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from minparcae import data, model, optim  # noqa: E402

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


def train(cfg, dataset, steps, lr, batch_size=16, seed=0, log_every=None, desc="training",
          trace=None):
    """Train a fresh model of config `cfg` on dataset.train; return (params, training losses).

    Each step is the recipe of lesson 9: draw a batch of windows and one loop depth per sequence
    (Poisson around μ_rec), run the model forward keeping the last μ_bwd loop steps, backpropagate
    by hand, clip the gradient's global norm to 1, and take an AdamW step at the learning rate of a
    trapezoid schedule (flat, then a linear decay to 0 over the second half). On a terminal a
    progress bar shows the step and the loss; `log_every` also prints a line every so many steps.
    `trace`, a dict, gets each step's ρ(Ā) and mean ‖h_T‖ appended under "rho" and "state_norm"
    (lesson 8 draws them)."""
    params = model.init_params(cfg, seed=seed)
    opt = optim.AdamW(weight_decay=0.0)
    rng = np.random.default_rng(seed)
    losses = []
    bar = tqdm(range(steps), desc=desc, unit="step", leave=False, disable=None)
    for step in bar:
        x, y = data.get_batch(dataset.train, batch_size, cfg.context, rng)      # (B, S) each
        depths = model.sample_depths(rng, batch_size, cfg)                       # (B,)
        loss, cache, diag = model.forward(params, cfg, x, y, depths=depths, rng=rng, train=True)
        grads = model.backward(params, cfg, cache)
        optim.clip_grad_norm(grads, 1.0)
        opt.step(params, grads, optim.lr_at(step, steps, lr, schedule="trapezoid"))
        losses.append(loss)
        if trace is not None:
            trace.setdefault("rho", []).append(diag["rho"])
            trace.setdefault("state_norm", []).append(diag["state_norm"])
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if log_every and (step % log_every == 0 or step == steps - 1):
            bar.write(f"  step {step:3d}  loss {loss:.3f}  loop steps {diag['steps']:2d}  "
                      f"ρ(Ā) {diag['rho']:.3f}  ‖h_T‖ {diag['state_norm']:.2f}")
    return params, losses
