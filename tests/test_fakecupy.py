"""Device code on the CPU: the model, optimisers, data, generation and checkpoints run on the CuPy
stand-in of tests/fakecupy.py, which refuses every implicit host/device mix-up that CuPy refuses.

The CUDA kernels are off here (`use_kernels(False)`, the ops' own `xp` code runs on the device
arrays): the kernels are checked on the simulator (test_kernels_cuda.py, test_cudasim.py) and on a
GPU (test_gpu.py). What this file checks is the code around them. Each run on the stand-in is also
compared with the same run on NumPy: the stand-in computes with NumPy inside, so the numbers agree
to float32 rounding (1e-5 relative), and a mix-up shows as an exception, not as a wrong number.
Last, tests/test_gpu.py's own injection and AdamW checks run here with stand-in kernels, to show
that they fail when a kernel is wrong.
"""

import numpy as np
import pytest

import fakecupy
from minparcae import backend, checkpoint, data, generate, kernels, model, optim

TOL = 1e-5


@pytest.fixture
def cp(monkeypatch):
    """The stand-in as `cupy`, the device set to "gpu", the kernels off; all undone afterwards."""
    module = fakecupy.install(monkeypatch)
    monkeypatch.setitem(backend._state, "device", None)
    assert backend.gpu_available() and backend.use_device("gpu") == "gpu"
    monkeypatch.setitem(kernels._state, "enabled", False)
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
    loss, grads, diag = model.loss_and_grads(params, CFG, x, y, depths=depths, rng=batch_rng)
    norm = optim.clip_grad_norm(grads, 1.0)
    opt.step(params, grads, 1e-2)
    backend.synchronize()
    return loss, norm, diag


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_training_step_and_evaluation(cp, optimizer):
    """Two training steps and an evaluation on device arrays give NumPy's numbers; the loss, the
    gradient norm and the diagnostics train.py logs are host floats."""
    def run(on_device):
        backend.use_device("gpu" if on_device else "cpu")  # where the batches are made
        params = model.init_params(CFG, seed=0, dtype=np.float32)
        opt = optim.AdamW() if optimizer == "adamw" else optim.Combined()
        rng = np.random.default_rng(1)
        steps = [training_step(params, opt, rng) for _ in range(2)]
        val = model.evaluate(params, CFG, data.iter_eval_batches(tokens(200, 2), 4, CFG.context, 3))
        return steps, val, {k: backend.to_host(v) for k, v in params.items()}

    steps, val, params = run(True)
    steps_np, val_np, params_np = run(False)
    for (loss, norm, diag), (loss_np, norm_np, diag_np) in zip(steps, steps_np):
        assert type(loss) is float and type(norm) is float
        assert all(type(v) in (float, int) for v in diag.values()), diag
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
                                epsilon=1e-2, rng=np.random.default_rng(3), return_loops=True)
        batches = data.iter_eval_batches(tokens(200, 2), 2, CFG.context, 2)
        return out, generate.evaluate(params, CFG, batches, adaptive=adaptive, epsilon=1e-2)

    (out, (val, loops)), (out_np, (val_np, loops_np)) = run("gpu"), run("cpu")
    assert out == out_np and loops == loops_np
    assert type(val) is float and abs(val - val_np) <= TOL * val_np


# ----------------------------------------------------------------------------- tests/test_gpu.py on it

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
    """tests/test_gpu.py's injection and AdamW tests, run on the stand-in with these kernels in place
    of the CUDA ones both in the registry and in the kernel module: they pass with right kernels and
    fail with wrong ones, so they compare the kernels with the reference, not with themselves."""
    import importlib.util
    import os

    from minparcae.kernels import cuda as K

    replacements = right_or_wrong_kernels(wrong)
    for name, func in replacements.items():
        monkeypatch.setattr(K, name, func)
    f32 = {np.dtype(np.float32)}
    monkeypatch.setattr(kernels, "_load", lambda device: {n: (f, f32) for n, f in replacements.items()})
    monkeypatch.setitem(kernels._state, "enabled", True)
    path = os.path.join(os.path.dirname(__file__), "test_gpu.py")
    spec = importlib.util.spec_from_file_location("test_gpu_on_the_stand_in", path)
    gpu_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_tests)
    for test in (gpu_tests.test_diagonal_injection, gpu_tests.test_adamw_step_matches_optim_adamw):
        if wrong:
            with pytest.raises(AssertionError):
                test()
        else:
            test()
