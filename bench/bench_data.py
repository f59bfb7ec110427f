"""Data preparation at the sizes users bring: wall time and peak memory against corpus size.

    python bench/bench_data.py                          # 30 MB, 300 MB and 1 GB, folder and .jsonl
    python bench/bench_data.py --sizes 30 --kinds jsonl --work /tmp/corpora

Each corpus is the Python standard library's source (about 31 MB of .py files) written out again
and again under new names until it reaches the size: a folder of files, or a .jsonl file with one
document per line. For each, a fresh process runs what `train.py` runs before its first step:
`data.prepare_data` (BPE of 2,048 ids trained on a 5 MB sample, then every document tokenised
into the token files), the unigram baseline over both splits, and one batch. "Cold" starts from an
empty token cache, "warm" reuses the one cold wrote. Peak RSS is the process's own high-water mark
(ru_maxrss), which covers the interpreter, NumPy and tiktoken (about 70-170 MB before any data).
The corpora (and their caches) are kept under --work between runs; delete it afterwards.
"""

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
import numpy as np
from minparcae import data
t0 = time.perf_counter()
ds = data.prepare_data(sys.argv[1], vocab_size=2048, cache_dir=sys.argv[2])
unigram = data.unigram_entropy(ds.train, ds.tokenizer.vocab_size, ds.val)
data.get_batch(ds.train, 16, 256, np.random.default_rng(0))
print(json.dumps({"seconds": time.perf_counter() - t0, "cached": ds.cached,
                  "tokens": int(len(ds.train) + len(ds.val)), "unigram": unigram,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def stdlib_files():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    return root, files


def build(kind, size_mb, work):
    """The corpus of `kind` ("folder" or "jsonl") of about size_mb MB under `work` (reused)."""
    path = Path(work, f"{kind}-{size_mb}MB" + (".jsonl" if kind == "jsonl" else ""))
    if path.exists():
        return path
    root, files = stdlib_files()
    target, written, copy = size_mb * 10**6, 0, 0
    tmp = path.with_name(path.name + ".tmp")
    out = open(tmp, "w", encoding="utf-8") if kind == "jsonl" else None
    if kind == "folder":
        tmp.mkdir(parents=True)
    try:
        while written < target:
            for p in files:
                text = p.read_bytes().decode("utf-8", errors="replace")
                if kind == "jsonl":
                    out.write(json.dumps({"text": text}) + "\n")
                else:
                    dest = tmp / f"copy{copy:03d}" / p.relative_to(root)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_text(text, encoding="utf-8")
                written += len(text.encode("utf-8"))
                if written >= target:
                    break
            copy += 1
    finally:
        if out:
            out.close()
    tmp.rename(path)
    return path


def measure(corpus, cache):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(cache)], env=env,
                            capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"preparing {corpus} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="30,300,1000", help="corpus sizes in MB")
    ap.add_argument("--kinds", default="folder,jsonl")
    ap.add_argument("--work", default="/tmp/minparcae-bench-data", help="where corpora and caches go")
    args = ap.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    print("| corpus | tokens | cold s | cold peak RSS MB | warm s | warm peak RSS MB |\n"
          "|---|---|---|---|---|---|", flush=True)
    for size in (int(s) for s in args.sizes.split(",")):
        for kind in args.kinds.split(","):
            corpus = build(kind, size, args.work)
            cache = Path(args.work, f"cache-{kind}-{size}")
            subprocess.run(["rm", "-rf", str(cache)], check=True)
            cold = measure(corpus, cache)
            warm = measure(corpus, cache)
            assert not cold["cached"] and warm["cached"]
            print(f"| {kind}, {size} MB | {cold['tokens']:,} | {cold['seconds']:.1f} | "
                  f"{cold['peak_mb']:.0f} | {warm['seconds']:.1f} | {warm['peak_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"\n({(time.perf_counter() - t0) / 60:.1f} min in all)")
