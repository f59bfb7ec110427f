"""The model sizes the benchmark scripts run: name -> (config, default batch size). Each sequence is
the config's full context long; the loop settings are set per run."""

from minparcae import model

SIZES = {
    "tiny": (model.preset("tiny"), 8),  # 1.1M parameters, 8 × 128 tokens
    "medium": (model.Config(vocab_size=4096, context=256, d_model=384, n_head=6, n_prelude=2,
                            n_recurrent=2, n_coda=2), 4),  # 12.5M parameters, 4 × 256 tokens
}
