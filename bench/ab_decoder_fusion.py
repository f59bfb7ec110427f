"""A/B: fusing the q, k, v weights once per Decoder (now) against once per fed token (before).

    python bench/ab_decoder_fusion.py --ckpt runs/small-cpu

Greedy decoding of 100 tokens at T = 8, batch 1, the two variants alternated 6 times in one
process; "before" is recreated by making model.with_fused_qkv return a fresh fused copy on every
call. Prints the median tokens/s and the range of each.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minparcae import checkpoint, cli, generate, kernels, model

fuse_once = model.with_fused_qkv


def fuse_every_call(p, cfg):  # the code before: a fresh fused copy on every forward
    return fuse_once(dict(p), cfg)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default="runs/small-cpu")
    m = checkpoint.load_model(ap.parse_args().ckpt)
    ops = kernels.for_array(m.params["wte"])
    prompt = [m.tokenizer.encode("def ")]
    rates = {"per call (before)": [], "once per Decoder (now)": []}
    for _ in range(6):
        for name, fn in (("per call (before)", fuse_every_call), ("once per Decoder (now)", fuse_once)):
            model.with_fused_qkv = fn
            generate.generate(m.params, m.cfg, prompt, 2, n_loops=8, temperature=0, ops=ops)
            t0 = time.perf_counter()
            out = generate.generate(m.params, m.cfg, prompt, 100, n_loops=8, temperature=0, ops=ops)[0]
            rates[name].append(len(out) / (time.perf_counter() - t0))
    model.with_fused_qkv = fuse_once
    print("| fused | tokens/s (median) | range |\n|---|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {statistics.median(r):.1f} | {min(r):.1f}-{max(r):.1f} |")


if __name__ == "__main__":
    cli.run(main)
