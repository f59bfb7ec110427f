"""Device code on the CPU: the model, optimisers, data, generation and checkpoints run on the CuPy
stand-in of tests/fakecupy.py, which refuses every implicit host/device mix-up that CuPy refuses.

The library runs here with the reference ops and AdamW update (`ops=REFERENCE`, the ops' own `xp`
code on the device arrays), passed explicitly where train.py would pass the GPU's fast set: the
kernels' numbers are checked on the simulator (test_kernels_cuda.py, test_cudasim.py) and on a GPU
(test_gpu.py). What this file checks is the code around them. Each run on the stand-in is also
compared with the same run on NumPy: the stand-in computes with NumPy inside, so the numbers agree
to float32 rounding (1e-5 relative), and a mix-up shows as an exception, not as a wrong number.

Then tests/test_gpu.py runs here: its replacement test at tiny sizes with the CUDA kernels launched
on the stand-in's arrays through Numba's simulator (so the GPU's op set keeps host and device apart
too, and qk_norm's kernel reads its strided head view in place), and its injection and AdamW checks
with stand-in kernels, right and wrong, to show that they fail when a kernel is wrong. Last,
scripts/gpu_kernels_once.py's checks run the same way at tiny sizes.
"""

import importlib.util
import os
import sys

import numpy as np
import pytest

import cudasim
import fakecupy
from minparcae import backend, checkpoint, data, generate, kernels, model, optim, runtime
from minparcae.kernels import cuda as K
from minparcae.ops import REFERENCE

TOL = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
simulated = pytest.mark.skipif(not cudasim.simulated(), reason="launches kernels on Numba's CUDA simulator")


@pytest.fixture
def cp(monkeypatch):
    """The stand-in as `cupy` and the device set to "gpu"; both undone afterwards."""
    module = fakecupy.install(monkeypatch)
    monkeypatch.setitem(backend._state, "device", None)
    assert backend.gpu_available() and backend.use_device("gpu") == "gpu"
    return module


@pytest.fixture
def launched(cp, monkeypatch):
    """The CUDA kernels launch on the stand-in's arrays through the simulator (fakecupy.launch_kernels),
    with few threads and blocks, as in test_kernels_cuda.py; returns the set of the names of the
    kernels launched."""
    fakecupy.launch_kernels(monkeypatch)
    monkeypatch.setattr(K, "MAX_THREADS", 32)
    monkeypatch.setattr(K, "ROW_BLOCKS", 2)
    monkeypatch.setattr(K, "THREADS", 32)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # frequent thread switches: the simulator's barriers are faster
    names, launch = set(), K._launch

    def recorded(kernel, grid, block, *args):
        names.add(kernel.__name__)
        return launch(kernel, grid, block, *args)

    monkeypatch.setattr(K, "_launch", recorded)
    yield names
    sys.setswitchinterval(interval)


def load(path, name):
    """The module at `path` (relative to the repository), freshly imported: under the stand-in when
    the test has installed it."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- the stand-in's rules

def test_the_stand_in_refuses_what_cupy_refuses(cp):
    x, host = cp.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, np.float32)
    assert backend.array_module(x) is cp and backend.array_module(x.sum()) is cp
    for implicit in (lambda: np.asarray(x), lambda: np.array(x), lambda: np.float32(x.sum()),
                     lambda: x + host, lambda: host * x, lambda: np.concatenate([x[0], host]),
                     lambda: cp.ascontiguousarray(host), lambda: np.ones(6)[x[0, 0]], lambda: range(x[0, 1])):
        with pytest.raises(TypeError):
            implicit()
    with pytest.raises(ValueError):
        x[0] = host
    x[np.array([1])] = host  # an index array: the values are copied to the device
    assert float(x.sum()) == 3 + 3.0 and int(x[0, 2]) == 2 and bool(x[1, 0] == 1.0)
    assert f"{x[0, 1]:.1f}" == "1.0" and x[np.array([0, 1]), 0].tolist() == [0.0, 1.0]
    assert type(x.get()) is np.ndarray and type(backend.to_host(x)) is np.ndarray
    assert backend.array_module(np.exp(x)) is cp and backend.array_module(x.sum()) is cp


# ----------------------------------------------------------------------------- the library on it

CFG = model.Config(vocab_size=64, context=16, d_model=32, n_head=2, n_kv_head=1, n_prelude=1,
                   n_recurrent=1, n_coda=1, mean_recurrence=3, backprop_depth=2, value_embeddings=True)


def tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, n).astype(np.uint16)


def training_step(params, opt, batch_rng):
    """One step as train.py takes it: a host batch and depths, loss and gradients, clip, update."""
    x, y = data.get_batch(tokens(400), 4, CFG.context, batch_rng)
    depths = model.sample_depths(batch_rng, 4, CFG)
    loss, grads, diag = runtime.loss_and_grads(params, CFG, x, y, depths=depths, rng=batch_rng, ops=REFERENCE)
    norm = optim.clip_grad_norm(grads, 1.0)
    opt.step(params, grads, 1e-2)
    backend.synchronize()
    return loss, norm, diag


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_training_step_and_evaluation(cp, monkeypatch, optimizer):
    """Two training steps and an evaluation on device arrays give NumPy's numbers; the loss, the
    gradient norm and the diagnostics train.py logs are host floats, each sequence's loop count a
    host array. The NumPy run keeps the batch whole, as the device does: split over threads, its
    sums would be added in another order, and Adam's second step turns that rounding into weight
    differences of up to 2e-5 (relative) in the output projections, which start at zero."""
    monkeypatch.setattr(runtime, "threads", lambda: 1)
    def run(on_device):
        backend.use_device("gpu" if on_device else "cpu")  # where the batches are made
        params = model.init_params(CFG, seed=0, dtype=np.float32)
        opt = optim.AdamW() if optimizer == "adamw" else optim.Combined()
        rng = np.random.default_rng(1)
        steps = [training_step(params, opt, rng) for _ in range(2)]
        val = model.evaluate(params, CFG, data.iter_eval_batches(tokens(200, 2), 4, CFG.context, 3),
                             ops=REFERENCE)
        return steps, val, {k: backend.to_host(v) for k, v in params.items()}

    steps, val, params = run(True)
    steps_np, val_np, params_np = run(False)
    for (loss, norm, diag), (loss_np, norm_np, diag_np) in zip(steps, steps_np):
        assert type(loss) is float and type(norm) is float
        assert all(type(v) in (float, int) for k, v in diag.items() if k != "loops"), diag
        assert type(diag["loops"]) is np.ndarray and np.array_equal(diag["loops"], diag_np["loops"])
        assert abs(loss - loss_np) <= TOL * loss_np and abs(norm - norm_np) <= TOL * norm_np
    assert type(val) is float and abs(val - val_np) <= TOL * val_np
    for k, p in params.items():
        assert np.abs(p - params_np[k]).max() <= TOL * np.abs(params_np[k]).max(), k


def test_checkpoint_round_trip(cp, tmp_path):
    """Device parameters and optimiser state go to disk as host arrays and come back to the device
    (as train.py --resume does), and the resumed step gives the same loss as an uninterrupted one."""
    params = model.init_params(CFG, seed=0, dtype=np.float32)
    opt = optim.AdamW()
    rng = np.random.default_rng(1)
    training_step(params, opt, rng)
    checkpoint.save(tmp_path / "ckpt.npz", params, opt.state_dict(), {"config": CFG.to_dict(), "step": 1})
    saved, opt_state, meta = checkpoint.load(tmp_path)
    assert meta["step"] == 1 and all(type(v) is np.ndarray for v in saved.values())
    checkpoint.check_params(saved, model.param_shapes(CFG), tmp_path)
    resumed = {k: backend.to_device(saved[k], dtype=np.float32) for k in params}
    opt_resumed = optim.AdamW()
    opt_resumed.load_state_dict(opt_state)  # host arrays, moved to the device at the next step
    state = rng.bit_generator.state
    loss = training_step(params, opt, rng)[0]
    rng.bit_generator.state = state
    assert training_step(resumed, opt_resumed, rng)[0] == loss
    assert backend.array_module(opt_resumed.m["wte"]) is cp


@pytest.mark.parametrize("adaptive", [None, "kl"])
def test_cached_generation(cp, adaptive):
    """KV-cached sampling on device arrays gives the tokens and loop counts it gives on NumPy, and the
    cached evaluation its loss."""
    def run(device):
        backend.use_device(device)
        params = model.init_params(CFG, seed=0, dtype=np.float32)
        prompts = [[1, 2, 3], [4, 5, 6]]
        out = generate.generate(params, CFG, prompts, 6, temperature=0.8, top_k=10, adaptive=adaptive,
                                epsilon=1e-2, rng=np.random.default_rng(3), return_loops=True, ops=REFERENCE)
        batches = data.iter_eval_batches(tokens(200, 2), 2, CFG.context, 2)
        return out, generate.evaluate(params, CFG, batches, adaptive=adaptive, epsilon=1e-2, ops=REFERENCE)

    (out, (val, loops)), (out_np, (val_np, loops_np)) = run("gpu"), run("cpu")
    assert out == out_np and loops == loops_np
    assert type(val) is float and abs(val - val_np) <= TOL * val_np


# ----------------------------------------------------------------------------- tests/test_gpu.py on it

TINY = dict(T=9, hs=4, width=40, heads=(4, 2))  # tests/replacements.py's sizes on the simulator

# the kernels each CUDA replacement launches (forward, backward_dq and backward_dkv: flash attention)
LAUNCHES = {
    "attention": {"forward", "backward_dq", "backward_dkv"},
    "cross_entropy": {"_softmax_xent"},
    "embedding": {"_scatter_add"},
    "injection": {"_injection_forward", "_injection_backward"},
    "mlp": {"_relu2", "_relu2_backward"},
    "qk_norm": {"_rotary", "_rmsnorm_forward", "_rmsnorm_backward"},
    "rmsnorm": {"_rmsnorm_forward", "_rmsnorm_backward"},
}


@simulated
@pytest.mark.parametrize("name", sorted(K.REPLACEMENTS))
def test_gpu_replacement_test_with_the_kernels_on_the_stand_in(launched, name):
    """tests/test_gpu.py's test of every CUDA replacement against the reference, at tiny sizes, the
    kernels launched on device arrays: it passes, and it launched the kernels of that op."""
    assert sorted(LAUNCHES) == sorted(K.REPLACEMENTS)
    gpu_tests = load("tests/test_gpu.py", "test_gpu_on_the_stand_in")
    gpu_tests.test_every_replacement_matches_the_reference(name, sizes=TINY)
    assert launched == LAUNCHES[name]


@simulated
def test_adamw_kernel_on_the_stand_in(cp, launched):
    """optim.AdamW with the update kernels.adamw_update gives for float32 device arrays: two steps
    update p, m and v in place on the device, as optim.adamw_update does (within 1e-6)."""
    rng = np.random.default_rng(4)
    host = {"core.0.mlp.fc": rng.standard_normal((5, 8)).astype(np.float32),
            "core.0.norm1": rng.standard_normal(8).astype(np.float32)}
    params = {k: cp.asarray(v) for k, v in host.items()}
    opt = optim.AdamW(update=kernels.adamw_update(params["core.0.norm1"]))
    opt_ref = optim.AdamW()
    assert opt.update is K.adamw_step and kernels.adamw_update(cp.zeros(1, dtype=np.float64)) is None
    for _ in range(2):
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in host.items()}
        opt.step(params, {k: cp.asarray(g) for k, g in grads.items()}, 1e-2)
        opt_ref.step(host, grads, 1e-2)
    assert launched == {"_adamw"}
    for name, p in host.items():
        for got, want in ((params[name], p), (opt.m[name], opt_ref.m[name]), (opt.v[name], opt_ref.v[name])):
            assert backend.array_module(got) is cp
            assert np.abs(got.get() - want).max() <= 1e-6 * np.abs(want).max(), name


def right_or_wrong_kernels(wrong):
    """Device-array versions of the injection and AdamW kernels, right or off by a little (NumPy code
    on the stand-in, no launch), as the CUDA module's functions."""
    off = 1.001 if wrong else 1.0

    def injection_forward(h, u, A_bar):
        return A_bar * h + u * off

    def injection_backward(dx, h, A_bar):
        return dx * A_bar, (dx * h).reshape(-1, dx.shape[-1]).sum(axis=0) * off

    def adamw_step(p, g, m, v, lr, beta1, beta2, eps, weight_decay, bc1, bc2):
        p *= 1 - lr * weight_decay
        m *= beta1
        m += (1 - beta1) * g
        v *= beta2
        v += (1 - beta2) * g * g
        p -= (lr / bc1) * off * m / ((v / bc2) ** 0.5 + eps)

    return {"injection_forward": injection_forward, "injection_backward": injection_backward,
            "adamw_step": adamw_step}


@pytest.mark.parametrize("wrong", [False, True], ids=["right kernels", "wrong kernels"])
def test_gpu_tests_catch_a_wrong_kernel(cp, monkeypatch, wrong):
    """tests/test_gpu.py's injection, AdamW and replacement tests (the last for the injection), run on
    the stand-in with these kernels in place of the CUDA module's, which the GPU's op set and
    kernels.adamw_update call: they pass with right kernels and fail with wrong ones, so they
    compare the kernels with the reference, not with themselves."""
    for name, func in right_or_wrong_kernels(wrong).items():
        monkeypatch.setattr(K, name, func)
    gpu_tests = load("tests/test_gpu.py", "test_gpu_on_the_stand_in")
    for test in (gpu_tests.test_diagonal_injection, gpu_tests.test_adamw_step_matches_optim_adamw,
                 lambda: gpu_tests.test_every_replacement_matches_the_reference("injection", sizes=TINY)):
        if wrong:
            with pytest.raises(AssertionError):
                test()
        else:
            test()


# ----------------------------------------------------------------------------- scripts/gpu_kernels_once.py on it

@simulated
@pytest.mark.parametrize("wrong", [False, True], ids=["right kernels", "wrong kernel"])
def test_gpu_kernels_once_on_the_stand_in(launched, monkeypatch, capsys, wrong):
    """The sanitizer phase's script, its checks at tiny sizes, the kernels launched through the
    simulator: every kernel of the CUDA module is launched, and the script reports KERNELS OK; with
    the scatter-add kernel adding each row twice, it names the embedding's gradient as failed."""
    if wrong:
        scatter_add = K.scatter_add

        def twice(table, rows, values):
            scatter_add(table, rows, values)
            scatter_add(table, rows, values)

        monkeypatch.setattr(K, "scatter_add", twice)
    script = load("scripts/gpu_kernels_once.py", "gpu_kernels_once_on_the_stand_in")
    failed = script.check(script.cases(9, d=16, H=4, H_kv=2, V=50))
    out = capsys.readouterr().out.strip().splitlines()
    if wrong:
        assert failed == ["embedding backward (scatter-add) dtable"], out
        assert out[-1] == "KERNELS FAIL: embedding backward (scatter-add) dtable"
    else:
        assert failed == [] and out[-1] == "KERNELS OK", out
        from numba.cuda.simulator.kernel import FakeCUDAKernel

        in_module = {v.__name__ for v in vars(K).values() if isinstance(v, FakeCUDAKernel) and not v._device}
        assert launched == in_module | {"forward", "backward_dq", "backward_dkv"}  # and the flash kernels


def test_official_folder_on_the_device(cp, tmp_path):
    """An official-layout folder read (host arrays), moved to the device as sample.py and
    train.py --init-from do, evaluated with the same numbers as on NumPy, and exported back from
    the device arrays (official.export copies them to the host)."""
    from minparcae import official
    from minparcae.tokenizer import train_bpe
    tok = train_bpe(open(model.__file__, encoding="utf-8").read()[:20000], 300)
    cfg = model.Config(vocab_size=tok.vocab_size, context=16, d_model=16, n_head=2, n_prelude=1,
                       n_recurrent=2, n_coda=1, mean_recurrence=3, backprop_depth=2,
                       value_embeddings=True)
    host = model.init_params(cfg, seed=2, dtype=np.float32, xp=np)
    official.export(str(tmp_path / "m"), cfg, host, tokenizer=tok)
    loaded = checkpoint.load_model(str(tmp_path / "m"))
    params = {k: backend.to_device(v) for k, v in loaded.params.items()}
    assert backend.array_module(params["wte"]) is cp
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 12))
    x, y = ids[:, :-1], ids[:, 1:]  # on the device, as data.iter_eval_batches yields them
    on_device = model.evaluate(params, loaded.cfg, [(backend.to_device(x), backend.to_device(y))],
                               ops=REFERENCE)
    assert abs(on_device - model.evaluate(loaded.params, loaded.cfg, [(x, y)])) < TOL * on_device
    official.export(str(tmp_path / "again"), loaded.cfg, params, tokenizer=loaded.tokenizer)
    again = official.load(str(tmp_path / "again"))
    assert all(np.array_equal(again.params[k], loaded.params[k]) for k in loaded.params)
