"""The CPU runtime: a training batch split over threads gives the whole batch's loss, gradients
and diagnostics."""

import numpy as np
import pytest

from minparcae import model as M
from minparcae import runtime
from test_model import batch, perturbed_params, tiny_cfg


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("kind", ["diagonal", "none"])
def test_batch_split_over_threads_matches_the_whole_batch(threads, kind, monkeypatch):
    """runtime.loss_and_grads with the batch cut into 2 or 3 parts of unequal sizes, per-sequence depths
    and ignored targets (so the parts weigh differently) against forward + backward on it whole,
    with the initial state drawn from the same rng; and the loop diagnostics."""
    blas_threads = [threads]  # stands in for OpenBLAS's setting, which the split lowers to 1
    monkeypatch.setattr(runtime, "_blas_thread_control",
                        lambda: (lambda: blas_threads[0], lambda n: blas_threads.__setitem__(0, n)))
    cfg = tiny_cfg(injection=kind, value_embeddings=True)
    p = perturbed_params(cfg)
    ids, targets, _ = batch(cfg, B=5)
    targets[1, :3] = -1
    targets[4, :] = -1
    depths = np.array([2, 5, 1, 3, 4])
    loss, cache, diag = M.forward(p, cfg, ids, targets, depths=depths,
                                  rng=np.random.default_rng(7), train=True)
    grads = M.backward(p, cfg, cache)
    loss_t, grads_t, diag_t = runtime.loss_and_grads(p, cfg, ids, targets, depths=depths,
                                                     rng=np.random.default_rng(7))
    assert len(runtime.split(5, threads)) == threads and blas_threads == [threads]  # restored
    assert abs(loss_t - loss) < 1e-12 * abs(loss)
    for name in grads:
        np.testing.assert_allclose(grads_t[name], grads[name], rtol=1e-9, atol=1e-13, err_msg=name)
    for key in ("steps", "rho", "state_norm", "residual"):
        assert diag_t[key] == pytest.approx(diag[key], rel=1e-12), key
    np.testing.assert_array_equal(diag_t["loops"], diag["loops"])


def test_one_thread_runs_the_batch_whole(monkeypatch):
    monkeypatch.setattr(runtime, "_blas_thread_control", lambda: (lambda: 1, lambda n: None))
    calls = []
    real = M.forward
    monkeypatch.setattr(M, "forward", lambda *a, **kw: calls.append(a[2].shape) or real(*a, **kw))
    cfg = tiny_cfg()
    ids, targets, _ = batch(cfg, B=4)
    runtime.loss_and_grads(perturbed_params(cfg), cfg, ids, targets, rng=np.random.default_rng(0))
    assert calls == [(4, 5)]


def test_a_failing_part_waits_for_the_others_and_restores_blas(monkeypatch):
    blas_threads = [2]
    monkeypatch.setattr(runtime, "_blas_thread_control",
                        lambda: (lambda: blas_threads[0], lambda n: blas_threads.__setitem__(0, n)))
    done = []

    def job(lo, hi):
        if lo == 0:
            raise RuntimeError("part 0 failed")
        done.append((lo, hi))
        return hi

    with pytest.raises(RuntimeError, match="part 0 failed"):
        runtime.map_parts(job, 4)
    assert done == [(2, 4)] and blas_threads == [2]
