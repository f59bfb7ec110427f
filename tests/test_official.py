"""Official Parcae models in minparcae (minparcae/official.py): configs, names, files, refusals.

PyTorch, where installed, only writes the files here (as the official code saves its models); the
reading is minparcae's own, without torch. The architecture itself is compared with the official
code by scripts/parity_official.py (it needs a checkout of that code, which CI does not have)."""

import json
import os
from dataclasses import replace

import numpy as np
import pytest

from minparcae import checkpoint, model, official, torchfile

# The fields of the published configs (parcae_lm/configs/parcae/*.py) that set the architecture,
# as ParcaeConfig's asdict writes them into config.json, plus the fields every one of them shares.
SHARED = dict(_class_name="ParcaeConfig", block_size=2048, vocab_size=32768, padding_multiple=64,
              padded_vocab_size=32768, bias=False, tie_embeddings=True, prelude_norm=True,
              block_class_name="TransformerPreNormBlock", norm_class_name="RMSNorm", norm_eps=1e-5,
              mlp_class_name="BaseMLP", nonlin_name="ReLU2", qk_norm=True, logit_softcap=None,
              init_strategy="scaled-zero", init_orthogonal=True, injection_type="diagonal",
              state_init="like-init", mean_recurrence=8, mean_backprop_depth=4,
              sampling_scheme="poisson-truncated-full", recurrent_iteration_method="per-sequence",
              rope_settings={"use_rope": True, "rope_condense_ratio": 1, "rope_base": 50000},
              attn_impl="flash", use_fused_head="pytorch", hf_config={"org": "SandyResearch"},
              recurrent_num_attention_heads=None, _is_recurrent_block_config=False,
              model_class_name="Parcae", clip_qkv=None, mup_model_scaling_factor=1)
PUBLISHED = {  # name: (n_embd, heads, layers per part, minparcae preset)
    "parcae-small-140m": (768, 6, 2, "parcae-140m"),
    "parcae-medium-370m": (1024, 8, 4, "parcae-370m"),
    "parcae-large-770m": (1280, 10, 6, "parcae-770m"),
    "parcae-xlarge-1_3b": (1536, 12, 8, "parcae-1.3b"),
}


def published(name):
    d, heads, n, _ = PUBLISHED[name]
    return {**SHARED, "name": name, "n_embd": d, "num_attention_heads": heads,
            "num_key_value_heads": heads, "intermediate_size": 4 * d,
            "recurrent_embedding_dimension": d, "recurrent_intermediation_embedding_dimension": 4 * d,
            "n_layers_in_prelude": n, "n_layers_in_recurrent_block": n, "n_layers_in_coda": n}


def small(**kw):
    """A published-style config small enough to run here."""
    d = {**published("parcae-small-140m"), "block_size": 16, "vocab_size": 40, "padding_multiple": 8,
         "padded_vocab_size": None, "n_embd": 16, "num_attention_heads": 2, "num_key_value_heads": 2,
         "intermediate_size": 24, "recurrent_embedding_dimension": 16,
         "recurrent_intermediation_embedding_dimension": 40, "mean_recurrence": 3,
         "mean_backprop_depth": 2}
    d.update(kw)
    return d


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_are_the_presets(name):
    cfg = official.config_from_official(published(name))
    preset = model.PRESETS[PUBLISHED[name][3]]
    assert model.param_shapes(cfg) == model.param_shapes(preset)
    assert model.layers(cfg) == model.layers(preset)
    for field in ("vocab_size", "context", "mean_recurrence", "backprop_depth", "injection",
                  "tie_embeddings", "rope_base", "prelude_norm", "state_init", "logit_scale"):
        assert getattr(cfg, field) == getattr(preset, field), field
    assert model.value_embedding_layers(cfg) == model.value_embedding_layers(preset)
    # and back: the exported config reads as the same model, from the preset too
    assert official.config_from_official(official.config_to_official(cfg)) == cfg
    back = official.config_from_official(official.config_to_official(preset))
    assert official.canonical(back) == official.canonical(preset)


def test_official_only_features_map_onto_the_config():
    cfg = official.config_from_official(small(
        num_key_value_heads=1, recurrent_num_attention_heads=4, recurrent_embedding_dimension=32,
        recurrent_intermediation_embedding_dimension=20, prelude_norm=False, state_init="unit",
        n_layers_in_prelude=1, n_layers_in_recurrent_block=1, n_layers_in_coda=1,
        mean_recurrence=3, mean_backprop_depth=1, injection_type="linear", logit_softcap=15.0))
    assert model.layer(cfg, "core.0")[1:] == (32, 4, 4, 20)  # ungrouped heads in the loop
    assert model.layer(cfg, "prelude.0")[1:] == (16, 2, 1, 24)
    assert (cfg.vocab_size, cfg.prelude_norm, cfg.state_init, cfg.logit_softcap) == (40, False, "unit", 15.0)
    assert cfg.eval_state == "seeded"  # minparcae's reproducible evaluation state stays the default


@pytest.mark.parametrize("change, words", [
    ({"nonlin_name": "GELU"}, "nonlin_name"),
    ({"norm_eps": 1e-6}, "norm_eps"),
    ({"qk_norm": False}, "qk_norm"),
    ({"bias": True}, "bias"),
    ({"recurrent_iteration_method": "per-token"}, "recurrent_iteration_method"),
    ({"sampling_scheme": "poisson-unbounded"}, "sampling_scheme"),
    ({"state_init": "orthogonal"}, "state_init"),
    ({"init_strategy": "takase"}, "init_strategy"),
    ({"rope_settings": {"use_rope": True, "rope_condense_ratio": 4, "rope_base": 50000}}, "rotary"),
    ({"some_new_field": 1}, "'some_new_field'"),
    ({"_class_name": "GPTConfig"}, "GPTConfig"),
    # gates where layer id ≡ n_r·μ_bwd − 1 (mod 2) with coda ids after n_r·μ_rec: here prelude.0,
    # core.0, coda.0; tables on every other of the 5 blocks from the last: prelude.0, core.0, coda.1
    ({"n_layers_in_recurrent_block": 1, "mean_recurrence": 2, "mean_backprop_depth": 1},
     "value-embedding gates and tables"),
    ({"n_embd": 15}, "cannot build"),
    ({"n_layers_in_prelude": "2"}, "not an integer of at least 0"),
    ({"mean_recurrence": 0}, "not an integer of at least 1"),
    ({"logit_softcap": -1.0}, "not a positive number"),
])
def test_unsupported_fields_are_refused_by_name(change, words):
    with pytest.raises(official.OfficialError, match=words.replace("(", r"\(")):
        official.config_from_official(small(**change))


def test_names_cover_every_parameter_once():
    cfg = official.config_from_official(small(tie_embeddings=False, injection_type="linear"))
    names = official.official_names(cfg)
    assert set(names) == set(model.param_shapes(cfg))
    assert len({o for o, _ in names.values()}) == len(names)
    assert names["ve.core.1"] == ("value_embeds.3.weight", False)  # counted over prelude, core, coda
    assert names["core.0.attn.wq"] == ("transformer.core_block.0.attn.c_q.weight", True)
    assert names["inject.W"] == ("transformer.adapter.adapter.weight", True)
    assert names["lm_head"] == ("lm_head.weight", True)


def random_params(cfg, seed=0):
    p = model.init_params(cfg, seed=seed, dtype=np.float32, xp=np)
    rng = np.random.default_rng(seed)
    return {k: (v + 0.2 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in p.items()}


def write_official(folder, d, state, torch, dtype, prefix=""):
    """A folder as the official code's save_pretrained writes it: config.json and model.pt, with
    the tied head sharing the embedding's storage and the rotary buffer saved alongside."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(d, f)
    sd = {prefix + k: torch.tensor(v).to(dtype) for k, v in state.items()}
    if d["tie_embeddings"]:
        sd[prefix + "lm_head.weight"] = sd[prefix + "transformer.wte.weight"]
    sd[prefix + "freqs_cis"] = torch.zeros(1, d["block_size"], 1, 4, 2)
    torch.save(sd, os.path.join(folder, "model.pt"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("prefix", ["", "_orig_mod."])
def test_torch_save_round_trip_without_torch(tmp_path, dtype, prefix):
    torch = pytest.importorskip("torch")
    d = small()
    cfg = official.config_from_official(d)
    p = random_params(cfg)
    write_official(tmp_path, d, official.params_to_official(p, cfg), torch, getattr(torch, dtype), prefix)
    loaded = official.load(str(tmp_path))
    want = p if dtype == "float32" else {  # what bfloat16 keeps of each number, read exactly
        k: torchfile.bfloat16_to_float32(torchfile.float32_to_bfloat16(v)) for k, v in p.items()}
    assert loaded.params.keys() == p.keys()
    for k in p:
        np.testing.assert_array_equal(loaded.params[k], want[k], err_msg=k)
    assert set(loaded.stored_dtypes.values()) == {dtype}
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9))
    np.testing.assert_array_equal(model.forward(loaded.params, loaded.cfg, ids)[0],
                                  model.forward(want, cfg, ids)[0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_round_trip(tmp_path, dtype):
    cfg = official.config_from_official(small(tie_embeddings=False, logit_softcap=5.0))
    p = random_params(cfg, seed=3)
    d = official.export(str(tmp_path), cfg, p, dtype=dtype)
    assert d["_class_name"] == "ParcaeConfig"
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded = official.load(str(tmp_path))
    assert loaded.cfg == cfg
    for k, v in p.items():
        want = v if dtype == "float32" else torchfile.bfloat16_to_float32(torchfile.float32_to_bfloat16(v))
        np.testing.assert_array_equal(loaded.params[k], want, err_msg=k)
    stored = torchfile.load_safetensors(str(tmp_path / "model.safetensors"))
    assert "transformer.core_block.1.mlp.fc.weight" in stored  # official names, (out, in) layout
    assert stored["transformer.core_block.1.mlp.fc.weight"].shape == (40, 16)


def test_export_refuses_what_the_official_code_cannot_express(tmp_path):
    cfg = official.config_from_official(small())
    for change, words in [({"injection": "none", "mean_recurrence": 1, "backprop_depth": 1}, "GPT"),
                          ({"logit_scale": 0.5}, "logit scale")]:
        with pytest.raises(official.OfficialError, match=words):
            official.config_to_official(replace(cfg, **change))


def test_mismatched_weights_are_refused(tmp_path):
    d = small()
    cfg = official.config_from_official(d)
    state = official.params_to_official(random_params(cfg), cfg)
    official.params_from_official(state, cfg)  # as written: fine
    cases = [
        ({k: v for k, v in state.items() if k != "transformer.C.weight"}, "lack 1 tensor"),
        ({**state, "transformer.extra.weight": state["transformer.C.weight"]}, "does not describe"),
        ({**state, "transformer.C.weight": state["transformer.C.weight"][:, :8]}, "has shape"),
        ({**state, "lm_head.weight": state["transformer.wte.weight"] + 1}, "different lm_head"),
    ]
    for bad, words in cases:
        with pytest.raises(official.OfficialError, match=words):
            official.params_from_official(bad, cfg)


def test_folder_errors_are_one_sentence(tmp_path):
    with pytest.raises(official.OfficialError, match="not a folder"):
        official.load(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text(json.dumps(small()))
    with pytest.raises(official.OfficialError, match="no weights"):
        official.load(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(official.OfficialError, match="not valid JSON"):
        official.load(str(tmp_path))
    assert official.is_official(str(tmp_path))
    (tmp_path / "ckpt.npz").write_bytes(b"")  # a minparcae run folder is not an official one
    assert not official.is_official(str(tmp_path))


def test_load_model_reads_both_kinds(tmp_path):
    cfg = official.config_from_official(small())
    p = random_params(cfg)
    official.export(str(tmp_path / "off"), cfg, p)
    with pytest.raises(checkpoint.CheckpointError, match="tokenizer.json"):
        checkpoint.load_model(str(tmp_path / "off"))


def test_tokenizer_json_written_here_encodes_like_the_tokenizers_library(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from minparcae.tokenizer import Tokenizer, train_bpe
    text = open(model.__file__, encoding="utf-8").read()
    tok = train_bpe(text[:30000], 400)
    tok.to_hf_json(tmp_path / "tokenizer.json")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    sample = text[30000:45000] + " naïve 中文 🙂\n\n\t x"
    ids = tok.encode(sample)
    assert hf.encode(sample, add_special_tokens=False).ids == ids
    assert hf.decode(ids) == sample
    back = Tokenizer.from_hf_json(tmp_path / "tokenizer.json")
    assert back.encode(sample) == ids and back.eot_id == tok.eot_id


@pytest.fixture(scope="module")
def official_folder(tmp_path_factory):
    """An official-layout folder made here: a small model, its weights, a tokenizer.json, and a
    text to evaluate and fine-tune on."""
    from minparcae.tokenizer import train_bpe
    root = tmp_path_factory.mktemp("official")
    text = open(model.__file__, encoding="utf-8").read()
    tok = train_bpe(text[:20000], 300)
    cfg = official.config_from_official(small(vocab_size=tok.vocab_size, block_size=32,
                                              padding_multiple=1))
    official.export(str(root / "model"), cfg, random_params(cfg), tokenizer=tok)
    (root / "text.txt").write_text(text[20000:60000])
    return root


def test_sample_runs_an_official_folder_on_given_text(official_folder, capsys):
    import sample
    sample.main(["--ckpt", str(official_folder / "model"), "--loops", "1,3", "--tokens", "6",
                 "--data", str(official_folder / "text.txt"), "--eval-batches", "1",
                 "--device", "cpu", "--prompt", "def "])
    out = capsys.readouterr().out
    assert "official Parcae model" in out
    heads = [line for line in out.splitlines() if line.startswith("--- loops")]
    assert [h.split(":")[0] for h in heads] == ["--- loops 1", "--- loops 3"]
    assert all("val_loss" in h for h in heads)


def test_train_fine_tunes_an_official_folder(official_folder, tmp_path):
    import train
    from runhelp import read_log
    folder = official_folder / "model"
    argv = ["--init-from", str(folder), "--data", str(official_folder / "text.txt"), "--out",
            str(tmp_path / "ft"), "--cache-dir", str(tmp_path / "cache"), "--steps", "4",
            "--batch-size", "4", "--context", "16", "--eval-every", "2", "--eval-batches", "1",
            "--sample-tokens", "0", "--device", "cpu", "--lr", "1e-3"]
    train.main(argv)
    start = official.load(str(folder))
    params, _, meta = checkpoint.load(str(tmp_path / "ft"))
    cfg = model.Config.from_dict(meta["config"])
    assert cfg == replace(start.cfg, context=16)
    assert params.keys() == start.params.keys()
    assert any(not np.array_equal(params[k], start.params[k]) for k in params)  # it trained
    assert read_log(tmp_path / "ft")[0]["step"] == 1
    # resume takes the model, its tokenizer and the settings from the run's own checkpoint
    train.main(["--out", str(tmp_path / "ft"), "--resume", "--steps", "6", "--device", "cpu"])
    assert checkpoint.load(str(tmp_path / "ft"))[2]["step"] == 6
    with pytest.raises(SystemExit):
        train.main(argv[:6] + ["--preset", "tiny"])  # the model's own architecture stays


def test_a_model_without_value_embeddings_exports_with_zero_tables(tmp_path):
    """The official model always has value embeddings: zero tables and gates add nothing, so the
    exported model computes the same logits."""
    cfg = model.Config(vocab_size=48, context=16, d_model=16, n_head=2, n_prelude=1, n_recurrent=2,
                       n_coda=1, mean_recurrence=3, backprop_depth=2)
    p = random_params(cfg, seed=4)
    official.export(str(tmp_path), cfg, p)
    loaded = official.load(str(tmp_path))
    assert loaded.cfg.value_embeddings and not any(loaded.params[k].any() for k in loaded.params
                                                   if k.startswith("ve.") or k.endswith("ve_gate"))
    ids = np.random.default_rng(1).integers(0, 48, (2, 11))
    np.testing.assert_allclose(model.forward(loaded.params, loaded.cfg, ids)[0],
                               model.forward(p, cfg, ids)[0], rtol=0, atol=1e-6)


def test_export_command_writes_a_folder_the_loader_reads(tmp_path, capsys):
    from minparcae.tokenizer import train_bpe
    cfg = official.config_from_official(small(vocab_size=300, padding_multiple=1))
    tok = train_bpe(open(model.__file__, encoding="utf-8").read()[:20000], 300)
    p = random_params(cfg)
    checkpoint.save(str(tmp_path / "run" / "ckpt.npz"), p, {},
                    {"config": cfg.to_dict(), "tokenizer": tok.to_dict(), "step": 7})
    official.main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--dtype", "bfloat16"])
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors", "tokenizer.json"]
    official.main(["info", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "stored as bfloat16" in out and "300 ids" in out
    loaded = official.load(str(tmp_path / "out"))
    assert loaded.tokenizer.encode("def f(x):") == tok.encode("def f(x):")
