"""Small-scale checks of the Parcae paper's claims, one script each.

    python -m minparcae.experiments.stability      # which injections survive high learning rates
    python -m minparcae.experiments.fixed_depth    # Parcae against a fixed-depth transformer
    python -m minparcae.experiments.looping        # loss against test-time loop count, L(T) law
    python -m minparcae.experiments.isoflop        # the best μ_rec at two fixed compute budgets

Each trains a handful of small models on the built-in corpus (the Python standard library's
source), sized to finish on a 2-core CPU in under half an hour, and writes a Markdown table, the
same rows as CSV, the raw per-run records as JSON, and a plot when matplotlib is installed
(`pip install -e ".[plot]"`). Flags scale each one up (`--steps`, `--d-model`, `--jobs`,
`--device gpu`). docs/RESULTS.md holds the committed results and the commands that made them.

common.py: the training run, divergence rule, tables and plots the scripts share. law.py: the
least-squares fit of L(T) = L∞ + Z·e^(−zT).
"""
