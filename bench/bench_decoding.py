"""Decoding options on a trained checkpoint: speed, loop steps, quality and cache memory, one table.

    python bench/bench_decoding.py --ckpt runs/small-cpu
    python bench/bench_decoding.py --ckpt runs/small-cpu --epsilon 1e-2 --tokens 300 --out bench/decoding.md

Rows (T = μ_rec unless named): no cache; the exact per-step cache at T and 2T; adaptive KL exit
(at most 2T steps, threshold --epsilon) with the per-step cache, 2 slots and 1 slot per recurrent
layer; the state exit at each threshold of --state-epsilon (a token stops once a loop step changes
its state by less than that fraction), which needs no logits inside the loop, with the per-step
cache and 1 slot; warm start with and without the KL exit; self-speculative decoding at 2T with two draft
depths and two γ. Columns:

  tokens/s            greedy generation of --tokens tokens from --prompt, batch 1, the median of
                      --repeats runs taken in turns
  loop steps / token  loop steps run per generated token, draft and verify passes included
                      (the no-cache row counts the recomputed window)
  val loss            teacher-forced validation loss through the same decoder (--eval-batches
                      batches of 8 windows); speculative decoding's output is, by construction and
                      test, that of the full-depth decoder, whose loss it shows
  KV bytes / token    cache memory one position costs (every slot of every layer, at the
                      checkpoint's dtype)
  kept drafts         speculative rows: the share of drafted tokens the verify pass kept

The goal this table is read against: a row at least 2× faster than the per-step cache at 2T with a
validation loss within 0.01 nats of it.

A second table, past the context: --long sequences of validation text, each three contexts long,
teacher forced through the cached decoder at T (generate.long_text_losses) with the sliding cache
and with the window recomputed for every token: tokens/s over the whole sequence and the mean loss
of the predictions made past the context (and of all of them). `--only-long` prints this table
alone; --long 0 leaves it out.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minparcae import backend, checkpoint, cli, data, generate, kernels


def rows_for(T, epsilon, state_epsilons):
    """(label, generate options, evaluate options) of every row, T = μ_rec."""
    big = 2 * T
    rows = [(f"no cache, T={T}", dict(n_loops=T, cache=False), dict(n_loops=T)),
            (f"per-step cache, T={T}", dict(n_loops=T), dict(n_loops=T)),
            (f"per-step cache, T={big}", dict(n_loops=big), dict(n_loops=big))]
    exit_ = dict(adaptive="kl", epsilon=epsilon)
    for slots, name in ((None, "per-step cache"), (2, "2 slots"), (1, "1 slot")):
        kw = dict(n_loops=big, kv_slots=slots, **exit_)
        rows.append((f"KL exit ε={epsilon:g}, ≤{big}, {name}", kw, kw))
    for state_epsilon in state_epsilons:
        for slots, name in ((None, "per-step cache"), (1, "1 slot")):
            kw = dict(n_loops=big, kv_slots=slots, adaptive="state", epsilon=state_epsilon)
            rows.append((f"state exit ε={state_epsilon:g}, ≤{big}, {name}", kw, kw))
    for exit_kw, name in (({}, ""), (exit_, f" + KL exit ε={epsilon:g}")):
        kw = dict(n_loops=big, warm_start=True, **exit_kw)
        rows.append((f"warm start, T={big}{name}", kw, kw))
    for draft in sorted({max(1, T // 2), T}):
        for gamma in (2, 4):
            rows.append((f"speculative T={big}, draft T={draft}, γ={gamma}",
                         dict(n_loops=big, speculative=(gamma, draft)), dict(n_loops=big)))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default="runs/small-cpu", help="run folder, .npz or official model folder")
    ap.add_argument("--data", default=None, help="validation text (default: the run's own split)")
    ap.add_argument("--prompt", default="def ")
    ap.add_argument("--tokens", type=cli.positive_int, default=200)
    ap.add_argument("--repeats", type=cli.positive_int, default=3)
    ap.add_argument("--epsilon", type=cli.nonneg_float, default=1e-2, help="KL exit threshold")
    ap.add_argument("--state-epsilon", default="0.1,0.3",
                    help="state exit thresholds, comma-separated (relative change of the state in "
                         "one loop step)")
    ap.add_argument("--eval-batches", type=cli.positive_int, default=4)
    ap.add_argument("--device", default=None, choices=["cpu", "gpu", "auto"])
    ap.add_argument("--long", type=cli.nonneg_int, default=4,
                    help="sequences of three contexts for the past-the-context table (0: no table)")
    ap.add_argument("--only-long", action="store_true", help="only the past-the-context table")
    ap.add_argument("--out", default=None, help="also write the tables to this Markdown file")
    args = ap.parse_args(argv)
    try:
        args.state_epsilon = [float(e) for e in args.state_epsilon.split(",")]
    except ValueError:
        ap.error(f"argument --state-epsilon: takes comma-separated numbers, not {args.state_epsilon!r}")
    if min(args.state_epsilon) < 0:
        ap.error("argument --state-epsilon: thresholds must not be negative")
    backend.use_device(args.device)
    loaded = checkpoint.load_model(args.ckpt)
    cfg, tok = loaded.cfg, loaded.tokenizer
    if not cfg.looped:
        raise ValueError("decoding options need a looped model; this checkpoint is the fixed-depth baseline.")
    params = {k: backend.to_device(v) for k, v in loaded.params.items()}
    ops = kernels.for_array(params["wte"])
    if args.data is not None:
        val = data.encode_source(args.data, tok)
    else:
        folder = (loaded.meta or {}).get("data", {}).get("folder")
        if not folder:
            raise ValueError("pass --data: this checkpoint names no validation split on this machine.")
        _, val, _ = data.open_tokens(folder)
    if len(val) < cfg.context + 1:
        raise ValueError(f"the validation text holds {len(val)} tokens, less than one window of {cfg.context + 1}.")
    batches = list(data.iter_eval_batches(val, 8, cfg.context, args.eval_batches))
    prompt = [tok.encode(args.prompt) or [tok.eot_id]]
    T = cfg.mean_recurrence
    rows = rows_for(T, args.epsilon, args.state_epsilon)

    long_lines = past_context_table(params, cfg, val, args.long, ops) if args.long else []
    if args.only_long:
        _write("\n".join(long_lines) + "\n", args.out)
        return
    results = {}
    for label, gen_kw, _ in rows:  # warm-up, then timed in turns
        generate.generate(params, cfg, prompt, 4, temperature=0, ops=ops, **gen_kw)
    times = {label: [] for label, _, _ in rows}
    for _ in range(args.repeats):
        for label, gen_kw, _ in rows:
            stats = {}
            t0 = time.perf_counter()
            out = generate.generate(params, cfg, prompt, args.tokens, temperature=0, ops=ops,
                                    stats=stats, **gen_kw)[0]
            backend.synchronize()
            times[label].append(len(out) / (time.perf_counter() - t0))
            results[label] = (stats, len(out))
    lines = [(f"{args.ckpt}: {loaded.description}; {args.tokens} greedy tokens from {args.prompt!r}, "
              f"batch 1, {backend.device()}, medians of {args.repeats}; validation: "
              f"{len(batches)} batches of 8 × {cfg.context} tokens"), "",
             "| decoder | tokens/s | loop steps / token | val loss | KV bytes / token | kept drafts |",
             "|---|---|---|---|---|---|"]
    for label, gen_kw, eval_kw in rows:
        stats, n = results[label]
        loss, _ = generate.evaluate(params, cfg, batches, ops=ops, **eval_kw)
        if gen_kw.get("cache") is False:
            kv_bytes = "—"
        else:
            dec = generate.Decoder(params, cfg, 1, gen_kw["n_loops"], capacity=cfg.context,
                                   kv_slots=gen_kw.get("kv_slots"))
            kv_bytes = f"{dec.kv.bytes_per_position():,}"
        kept = (f"{stats['accepted'] / stats['drafted']:.0%}" if stats.get("drafted") else "")
        lines.append(f"| {label} | {statistics.median(times[label]):.1f} | "
                     f"{stats['position_steps'] / max(n, 1):.2f} | {loss:.4f} | {kv_bytes} | {kept} |")
        print(lines[-1], flush=True)
    _write("\n".join(lines + [""] + long_lines) + "\n", args.out)


def _write(text, out):
    print("\n" + text)
    if out:
        with open(out, "w") as f:
            f.write(text)


def past_context_table(params, cfg, val, n_seq, ops):
    """The second table (module docstring): sliding cache against recomputing the window."""
    length = 3 * cfg.context
    if len(val) < length * n_seq:
        return [f"(past the context: the validation text holds {len(val)} tokens, fewer than "
                f"{n_seq} sequences of {length})"]
    starts = np.linspace(0, len(val) - length, n_seq).astype(np.int64)
    ids = np.stack([np.asarray(val[s:s + length], dtype=np.int64) for s in starts])
    lines = [f"Past the context: {n_seq} validation sequences of {length} tokens (context "
             f"{cfg.context}), T = {cfg.mean_recurrence}, teacher forced", "",
             "| past the context | tokens/s | loss past the context | loss, all positions |",
             "|---|---|---|---|"]
    for policy in generate.PAST_CONTEXT:
        t0 = time.perf_counter()
        losses = generate.long_text_losses(params, cfg, ids, ops=ops, past_context=policy)
        backend.synchronize()
        rate = ids.size / (time.perf_counter() - t0)
        lines.append(f"| {policy} | {rate:.1f} | {losses[:, cfg.context - 1:].mean():.4f} | "
                     f"{losses.mean():.4f} |")
        print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    cli.run(main)
