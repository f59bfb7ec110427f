"""Every lesson's exercises grade as a learner meets them (lessons/exercise.py).

Each lesson has two or three exercises and a solutions file that covers them. For every exercise
of the lessons written with an Exercises section (all but lesson 6, whose kernels
tests/test_lesson6.py grades), the unwritten skeleton fails its check with "not written yet", the
solution passes, and a plausible wrong answer fails with a WRONG line. All of it runs in this
process on each lesson's Exercises cells, loaded once, so the whole file takes a few seconds; two
runs of the command line check the plumbing around it, and that grading does not run the lesson
(lesson 10 would train three models).
"""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

LESSONS_DIR = Path(__file__).resolve().parent.parent / "lessons"
sys.path.insert(0, str(LESSONS_DIR))
import exercise  # noqa: E402  (lessons/exercise.py)
import render  # noqa: E402  (lessons/render.py)

LESSONS = sorted(LESSONS_DIR.glob("[0-9][0-9]_*.py"))
WITH_SECTION = [p for p in LESSONS if not p.name.startswith("06_")]
_loaded = {}


def exercises_of(path):
    """The lesson's Exercises cells, run once per test session: {N: (skeleton, check)}."""
    if path not in _loaded:
        _loaded[path] = exercise.load(path)["EXERCISES"]
    return _loaded[path]


def defined_functions(path):
    return {node.name for node in ast.parse(path.read_text(encoding="utf-8")).body
            if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_every_lesson_has_exercises_and_a_solutions_file_that_covers_them(path):
    if path in WITH_SECTION:
        exercises = exercises_of(path)
        names = [exercise.name_of(fn) for fn, _ in exercises.values()]
        # --exercise N is read before the lesson's work: in its first code cell
        first = next(c for c in render.parse_cells(path.read_text("utf-8")) if c.kind == "code")
        assert "\nexercise.grade_if_asked()" in first.source, \
            f"{path.name}: its first code cell must call exercise.grade_if_asked()"
    else:  # lesson 6 grades each kernel where it is taught: run_exercise(N, kernel, check)
        found = re.findall(r"^run_exercise\((\d+), (\w+), \w+\)$", path.read_text("utf-8"), re.M)
        exercises, names = {int(n): None for n, _ in found}, [name for _, name in found]
    assert sorted(exercises) == list(range(1, len(exercises) + 1)) and 2 <= len(exercises) <= 3, \
        f"{path.name}: exercises numbered {sorted(exercises)}, want 1 to 2 or 3"
    solutions = exercise.solutions_path(path)
    assert solutions.is_file(), f"{path.name} has no solutions file lessons/solutions/{path.name}"
    missing = set(names) - defined_functions(solutions)
    assert not missing, f"lessons/solutions/{path.name} lacks {sorted(missing)}"


@pytest.mark.parametrize("path", WITH_SECTION, ids=lambda p: p.stem)
def test_skeleton_fails_and_solution_passes(path, capsys):
    for number, (skeleton, check) in exercises_of(path).items():
        assert not exercise.grade(number, skeleton, check)
        out = capsys.readouterr().out
        assert f"`{exercise.name_of(skeleton)}` is not written yet" in out, out
        assert exercise.grade(number, skeleton, check, exercise.solutions_path(path)), \
            capsys.readouterr().out
        out = capsys.readouterr().out
        assert "WRONG" not in out and re.search(r"\b(exact|approximate|ok)\b", out), out


# Plausible mistakes, at least one per lesson, graded through the same `grade` as a learner's answer.
# Each returns wrong numbers rather than raising, so the check itself must tell them apart.


def to_host(x):
    from minparcae import backend
    return backend.to_host(x)


def onehot_made_on_the_host(ids, V):
    return np.eye(V, dtype=np.float32)[to_host(ids)]


def unit_roundoff_in_python_floats(dtype):
    u = 1.0
    while 1.0 + u != 1.0:  # float64 arithmetic, whatever dtype was asked for
        u /= 2
    return u


def log_sigmoid_naive(x):
    with np.errstate(over="ignore", divide="ignore"):
        return -np.log1p(np.exp(-x))


def linear_backward_mean_over_rows(dout, x, w):
    rows = x.reshape(-1, x.shape[-1])
    return dout @ w.T, rows.T @ dout.reshape(-1, dout.shape[-1]) / len(rows)


def mlp_backward_without_relu(dout, x, w_fc, w_proj):
    u = x @ w_fc
    a = np.maximum(u, 0)
    rows = dout.reshape(-1, dout.shape[-1])
    du = (dout @ w_proj.T) * u  # u where relu(u) = a belongs
    return (du @ w_fc.T, x.reshape(-1, x.shape[-1]).T @ du.reshape(-1, du.shape[-1]),
            (0.5 * a * a).reshape(-1, a.shape[-1]).T @ rows)


def central_differences_one_sided(f, x, eps=1e-6):
    grad, f0 = np.zeros_like(x), f()
    for i in range(x.size):
        x.flat[i] += eps
        grad.flat[i] = (f() - f0) / eps
        x.flat[i] -= eps
    return grad


def cross_entropy_loss_counting_ignored(logits, targets):
    z = logits - logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=-1))
    rows = np.where(targets >= 0, lse - z[np.arange(len(z)), targets], 0.0)
    return float(rows.mean())  # divides by every row, ignored ones included


def cross_entropy_grad_without_max(logits, targets):
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(logits)
        p = e / e.sum(axis=-1, keepdims=True)
    valid = targets >= 0
    p[valid, targets[valid]] -= 1
    return np.where(valid[:, None], p, 0) / max(valid.sum(), 1)


def softcap_backward_raw_logits(dcapped, logits, c):
    return dcapped * (1 - (logits / c) ** 2)  # the raw logits, not the capped ones


def rmsnorm_backward_without_gain(dout, x, w, eps=1e-5):
    r = 1 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    xhat = x * r
    dw = (dout * xhat).reshape(-1, x.shape[-1]).sum(axis=0)
    return r * (dout - xhat * (dout * xhat).mean(axis=-1, keepdims=True)), dw


def layernorm_backward_as_rmsnorm(dout, x, eps=1e-5):
    xc = x - x.mean(axis=-1, keepdims=True)
    r = 1 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
    return r * (dout - xc * r * (dout * xc * r).mean(axis=-1, keepdims=True))  # the mean's term lost


def rotary_backward_forward_rotation(dout, cos, sin):
    from minparcae.ops import rotary
    return rotary.rotate(dout, cos, sin)  # by +pθ: the forward again


def softmax_backward_elementwise(dp, p):
    return p * dp


def attention_backward_without_scale(dy, q, k, v, scale):
    S = q.shape[-2]
    s = np.where(np.tri(S, dtype=bool), q @ k.swapaxes(-1, -2) * scale, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    dp = dy @ v.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # the scale of s left out
    return ds @ k, ds.swapaxes(-1, -2) @ q, p.swapaxes(-1, -2) @ dy


def run_loop_from_h0_every_step(pf, cfg, e, h0, T, rope):
    from minparcae import model
    from minparcae.ops import REFERENCE, injection
    u, _ = injection.input_forward(cfg.injection, pf, e)
    for _ in range(T):
        x, _ = injection.state_forward(cfg.injection, pf, h0, u)  # h0 each time: no recurrence
        for i in range(cfg.n_recurrent):
            x, _ = model.block_forward(pf, f"core.{i}", x, rope, cfg, REFERENCE)
    return x


def train_flops_backward_as_forward(cfg, forward_flops):
    step = forward_flops(2) - forward_flops(1)
    outside = forward_flops(1) - step
    return 3 * outside + step * (cfg.mean_recurrence + cfg.backprop_depth)


def zoh_one_minus_A_bar(A_log, dt_bias, B):
    a, delta = np.exp(A_log), np.logaddexp(0, dt_bias)
    A_bar = np.exp(-delta * a)
    return A_bar, B * (1 - A_bar) / a  # 0 once Ā rounds to 1


def rho_and_frobenius(W):
    W_h = W[: W.shape[1]]
    return float(np.abs(np.linalg.eigvals(W_h)).max()), float(np.linalg.norm(W_h))


def fixed_point_untransposed(kind, p, e):
    W = p.get("inject.W")
    if kind == "diagonal":
        a, delta = np.exp(p["inject.A_log"]), np.logaddexp(0, p["inject.dt_bias"])
        return delta * (e @ p["inject.B"]) / (1 - np.exp(-delta * a))
    d_h = W.shape[1]
    return np.linalg.solve(np.eye(d_h) - W[:d_h], (e @ W[d_h:])[..., None])[..., 0]  # columns


def sample_depths_unclamped(rng, batch, mu_rec):
    return rng.poisson(mu_rec, size=batch)


def loop_schedule_left_aligned(depths, mu_bwd):
    T = int(depths.max())
    t = np.arange(T)[None, :]
    d = depths[:, None]
    return np.where(t >= d, 0, np.where(t < d - np.minimum(d, mu_bwd), 1, 2))


def truncated_grads_full(a, b, e, h0, T, k):
    states = [h0]
    for _ in range(T):
        states.append(a * states[-1] + b * e)
    G, da, db = 1.0, 0.0, 0.0
    for t in range(T, 0, -1):  # every step, whatever k
        da, db, G = da + G * states[t - 1], db + G * e, G * a
    return da, db


def three_point_fit_unit_spacing(T, L):
    q = (L[1] - L[2]) / (L[0] - L[1])
    z = -np.log(q)  # as if the points were 1 apart
    Z = (L[0] - L[1]) / (np.exp(-z * T[0]) * (1 - q))
    return L[0] - Z * np.exp(-z * T[0]), Z, z


def best_loop_count_continuous(L_inf, Z, z, price):
    return max(1, round(np.log(z * Z / price) / z))  # the continuous optimum, rounded


def state_path_untransposed(kind, p, g, h_prev):
    if kind == "add":
        return g, None
    d_h = p["inject.W"].shape[1]
    return g @ p["inject.W"][:d_h], h_prev.reshape(-1, d_h).T @ g.reshape(-1, d_h)


def discretisation_backward_through_A_only(dA_bar, d_delta_B, A_log, dt_bias):
    a, delta = np.exp(A_log), np.logaddexp(0, dt_bias)
    A_bar = np.exp(-delta * a)
    return dA_bar * (-A_bar * delta * a), dA_bar * (-A_bar * a) / (1 + np.exp(-dt_bias))


def step_kl_reversed(logits_prev, logits):
    def log_softmax(z):
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    lp, lq = log_softmax(logits), log_softmax(logits_prev)
    return (np.exp(lq) * (lq - lp)).sum(axis=-1)  # KL(p_prev ‖ p)


def exit_loop_counts_from_step_one(logits, eps):
    T_max, N = logits.shape[:2]
    loops = np.full(N, T_max)
    for n in range(N):
        for t in range(2, T_max + 1):
            if step_kl_reversed(logits[t - 1, n], logits[t - 2, n]) < eps:
                loops[n] = t - 1  # counts the steps before the one that decided
                break
    return loops


def loops_that_fit_without_prelude_and_coda(cfg, budget_bytes, batch, context):
    return max(0, budget_bytes // (batch * context * 4 * 2 * cfg.n_recurrent * cfg.d_h))


WRONG = {
    "01_backend": {1: onehot_made_on_the_host, 2: unit_roundoff_in_python_floats, 3: log_sigmoid_naive},
    "02_linear": {1: linear_backward_mean_over_rows, 2: mlp_backward_without_relu,
                  3: central_differences_one_sided},
    "03_cross_entropy": {1: cross_entropy_loss_counting_ignored, 2: cross_entropy_grad_without_max,
                         3: softcap_backward_raw_logits},
    "04_rmsnorm": {1: rmsnorm_backward_without_gain, 2: layernorm_backward_as_rmsnorm},
    "05_attention": {1: rotary_backward_forward_rotation, 2: softmax_backward_elementwise,
                     3: attention_backward_without_scale},
    "07_looped_block": {1: run_loop_from_h0_every_step, 2: train_flops_backward_as_forward},
    "08_stability": {1: zoh_one_minus_A_bar, 2: rho_and_frobenius, 3: fixed_point_untransposed},
    "09_training": {1: sample_depths_unclamped, 2: loop_schedule_left_aligned, 3: truncated_grads_full},
    "10_test_time_looping": {1: three_point_fit_unit_spacing, 2: best_loop_count_continuous},
    "11_loop_backward": {1: state_path_untransposed, 2: discretisation_backward_through_A_only},
    "12_inference": {1: step_kl_reversed, 2: exit_loop_counts_from_step_one,
                     3: loops_that_fit_without_prelude_and_coda},
}


@pytest.mark.parametrize("path", WITH_SECTION, ids=lambda p: p.stem)
def test_wrong_answers_fail(path, capsys):
    wrong = WRONG[path.stem]
    assert wrong, f"{path.name}: no wrong answer is tried"
    for number, answer in wrong.items():
        _, check = exercises_of(path)[number]
        assert not exercise.grade(number, answer, check), f"{answer.__name__} passed"
        out = capsys.readouterr().out
        assert "WRONG: " in out, out  # a value the check names is wrong: no crash
        assert "failed" not in out, out


def test_cmp_says_exact_approximate_or_wrong(capsys):
    ref = np.array([[1.0, -2.0], [0.5, 4.0]])
    assert exercise.cmp("same", ref.copy(), ref)
    assert exercise.cmp("close", ref * (1 + 1e-14), ref)
    assert not exercise.cmp("far", ref + [[0, 0], [0, 1e-3]], ref, rtol=1e-6)
    assert not exercise.cmp("shape", ref.T[:1], ref)
    assert not exercise.cmp("count", 3, 4, rtol=0)
    assert not exercise.cmp("missing", None, ref)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["same", "exact"]
    assert lines[1].split()[:2] == ["close", "approximate:"]
    assert "WRONG: max |mine − ref| = 0.00025 of max |ref| (allowed 1e-06); the worst at [1, 1]: " \
           "4.001, want 4" in lines[2]
    assert lines[3].endswith("WRONG: shape (1, 2), want (2, 2)")
    assert lines[4].endswith("WRONG: 3, want 4")
    assert lines[5].endswith("WRONG: got None, want an array of shape (2, 2)")


def test_an_error_is_one_line_naming_the_answer_and_the_helper_not_written(capsys):
    exercises = exercises_of(LESSONS_DIR / "05_attention.py")
    _, check = exercises[3]
    skeleton_softmax = exercises[2][0]

    def attention_backward(dy, q, k, v, scale):  # a learner's, calling their unwritten helper
        return skeleton_softmax(dy, q), None, None

    assert not exercise.grade(3, attention_backward, check)
    assert capsys.readouterr().out == ("exercise 3: `softmax_backward` is not written yet "
                                       "(attention_backward calls it): replace its `raise "
                                       "NotImplementedError` with your code.\n")

    def broken(dy, q, k, v, scale):
        return 1 / 0

    assert not exercise.grade(3, broken, check)
    line = broken.__code__.co_firstlineno + 1
    assert capsys.readouterr().out == (f"exercise 3: `broken` failed (line {line} of "
                                       f"{Path(__file__).name}): ZeroDivisionError: division by zero\n")


def test_arguments():
    assert exercise.arguments([1, 2], []) == (None, False)
    assert exercise.arguments([1, 2], ["--exercise", "2", "--solution"]) == (2, True)
    assert exercise.arguments(None, ["--exercise", "7", "-f", "kernel.json"]) == (7, False)
    with pytest.raises(SystemExit):
        exercise.arguments([1, 2], ["--solution"])
    with pytest.raises(SystemExit):
        exercise.arguments([1, 2], ["--exercise", "3"])


def run_lesson(name, *flags, tmp_path):
    env = {**os.environ, "MINPARCAE_DEVICE": "cpu", "OPENBLAS_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, str(LESSONS_DIR / name), *flags], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_command_line(tmp_path):
    skeleton = run_lesson("02_linear.py", "--exercise", "1", tmp_path=tmp_path)
    assert skeleton.returncode == 1, skeleton.stdout + skeleton.stderr
    assert skeleton.stdout.splitlines() == [
        "exercise 1: linear_backward",
        "exercise 1: `linear_backward` is not written yet: replace its `raise NotImplementedError` "
        "with your code.",
        "exercise 1: FAILED"]
    # a lesson that trains three models in its cells grades without them: only its exercises run
    solution = run_lesson("10_test_time_looping.py", "--exercise", "2", "--solution", tmp_path=tmp_path)
    assert solution.returncode == 0, solution.stdout + solution.stderr
    lines = solution.stdout.splitlines()
    assert lines[0] == "exercise 2: best_loop_count, from lessons/solutions/10_test_time_looping.py"
    assert lines[-1] == "exercise 2: passed" and all(" exact" in line for line in lines[1:-1])
    unknown = run_lesson("02_linear.py", "--exercise", "4", tmp_path=tmp_path)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == "02_linear.py has exercises 1, 2, 3: there is no exercise 4"
    assert not any(tmp_path.iterdir())  # grading writes nothing
