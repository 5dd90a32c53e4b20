"""Basis rotation against Adam, the refresh's invariants, state_dict round trips and bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch

from basisrot_pipeline.model import GPT
from basisrot_pipeline.optim import (
    BasisRotation,
    OptimConfig,
    build_optimizer,
    eigenbasis,
    pipedream_lr_factor,
    power_iteration_refresh,
    split_rotated_parameters,
    stage_aware_frequencies,
)
from basisrot_pipeline.staleness import staleness_schedule

HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def _params(seed=0, shapes=((5, 3), (3,), (4, 4))):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]


def _run(params, optimizer, grads_per_step):
    for grads in grads_per_step:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        optimizer.step()


def _random_grads(shapes, steps, seed=1, diagonal=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        step = []
        for shape in shapes:
            g = torch.randn(*shape, generator=gen)
            if diagonal and len(shape) == 2:
                mask = torch.zeros(shape)
                mask[range(min(shape)), range(min(shape))] = 1
                g = g * mask
            step.append(g)
        out.append(step)
    return out


SHAPES = ((5, 3), (3,), (4, 4))


def test_identity_basis_equals_adamw():
    reference, rotated = _params(), _params()
    adamw = torch.optim.AdamW(reference, **HP)
    opt = BasisRotation(rotated, precondition_frequency=10**9, **HP)
    for p in rotated:  # force identity bases; no refresh happens within the run
        state = opt._init_state(p, opt.param_groups[0])
        if p.ndim == 2:
            state["basis_left"], state["basis_right"] = torch.eye(p.shape[0]), torch.eye(p.shape[1])
    grads = _random_grads(SHAPES, 8)
    _run(reference, adamw, grads)
    _run(rotated, opt, grads)
    for a, b in zip(reference, rotated, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_size_guard_falls_back_to_adam():
    reference, guarded = _params(), _params()
    grads = _random_grads(SHAPES, 6)
    _run(reference, torch.optim.AdamW(reference, **HP), grads)
    opt = BasisRotation(guarded, max_precond_dim=2, **HP)
    _run(guarded, opt, grads)
    for a, b in zip(reference, guarded, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert all(s["basis_left"] is None and s["basis_right"] is None for s in opt.state.values())


class _RecordShapes(torch.overrides.TorchFunctionMode):
    """Records the shape of every tensor produced by a torch function (matmuls included)."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if isinstance(result, torch.Tensor):
            self.shapes.add(tuple(result.shape))
        return result


@pytest.mark.parametrize("source", ["second", "first"])
def test_unrotated_sides_never_form_their_statistic(source):
    # "uni" keeps only the smaller side of the 7 x 3 weight; the size guard drops the 9-row side of the
    # 9 x 3 weight. Neither a 7 x 7 nor a 9 x 9 product may be built (it would be thrown away).
    uni, guarded = _params(shapes=((7, 3),)), _params(shapes=((9, 3),))
    optimizer = BasisRotation(
        [{"params": uni, "geometry": "uni"}, {"params": guarded, "max_precond_dim": 4}],
        precondition_frequency=2,
        source=source,
        **HP,
    )
    grads = _random_grads(((7, 3), (9, 3)), 5, seed=4)
    with _RecordShapes() as recorder:
        _run(uni + guarded, optimizer, grads)
    assert (3, 3) in recorder.shapes  # the kept sides' statistics were formed
    assert (7, 7) not in recorder.shapes and (9, 9) not in recorder.shapes
    assert optimizer.state[uni[0]]["stat_left"] is None and optimizer.state[guarded[0]]["stat_left"] is None


@pytest.mark.parametrize("source", ["second", "first"])
def test_diagonal_gradients_give_signed_permutation_bases_and_adam_updates(source):
    # Diagonal gradients have diagonal statistics: the eigenbases are signed permutations, under which
    # Adam is equivariant; matching Adam needs V permuted whenever the eigenvalue order changes.
    shapes = ((4, 4), (3, 5))
    reference, rotated = _params(shapes=shapes), _params(shapes=shapes)
    grads = _random_grads(shapes, 30, seed=5, diagonal=True)
    _run(reference, torch.optim.AdamW(reference, **HP), grads)
    opt = BasisRotation(rotated, precondition_frequency=2, source=source, **HP)
    _run(rotated, opt, grads)
    for a, b in zip(reference, rotated, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_rotation_changes_the_update_for_dense_gradients():
    reference, rotated = _params(shapes=((4, 4),)), _params(shapes=((4, 4),))
    grads = _random_grads(((4, 4),), 5)
    _run(reference, torch.optim.AdamW(reference, **HP), grads)
    _run(rotated, BasisRotation(rotated, **HP), grads)
    assert (reference[0] - rotated[0]).abs().max() > 1e-3


@pytest.mark.parametrize(("geometry", "source"), [("bi", "second"), ("uni", "second"), ("bi", "first")])
def test_refresh_keeps_bases_orthonormal(geometry, source):
    shapes = ((6, 4), (4, 7))
    params = _params(shapes=shapes)
    opt = BasisRotation(params, precondition_frequency=3, geometry=geometry, source=source, **HP)
    for step_grads in _random_grads(shapes, 13, seed=2):
        _run(params, opt, [step_grads])
        for p in params:
            state = opt.state[p]
            for side in ("left", "right"):
                basis = state[f"basis_{side}"]
                if basis is not None:
                    torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[0]), rtol=0, atol=1e-5)
    if geometry == "uni":  # only the smaller side is rotated
        assert opt.state[params[0]]["basis_left"] is None and opt.state[params[0]]["basis_right"] is not None
        assert opt.state[params[1]]["basis_left"] is not None and opt.state[params[1]]["basis_right"] is None
    else:
        assert all(opt.state[p]["basis_left"] is not None for p in params)


def test_eigenbasis_descending_and_float64_fallback(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=gen)
    sym = a @ a.T
    q = eigenbasis(sym)
    diag = torch.diagonal(q.T @ sym @ q)
    assert torch.all(diag[:-1] >= diag[1:])
    torch.testing.assert_close(q.T @ sym @ q, torch.diag(diag), rtol=0, atol=1e-4)

    real_eigh = torch.linalg.eigh

    def failing_in_float32(matrix):
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return real_eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", failing_in_float32)
    q64 = eigenbasis(sym)
    assert q64.dtype == torch.float32
    torch.testing.assert_close(q64.T @ sym @ q64, torch.diag(diag), rtol=0, atol=1e-4)


def test_power_iteration_sorts_and_permutes_second_moment():
    sym = torch.diag(torch.tensor([1.0, 3.0, 2.0]))
    basis = torch.eye(3)
    second_moment = torch.tensor([[10.0, 11.0], [30.0, 31.0], [20.0, 21.0]])
    new_basis, permuted = power_iteration_refresh(sym, basis, second_moment, dim=0)
    torch.testing.assert_close(permuted, torch.tensor([[30.0, 31.0], [20.0, 21.0], [10.0, 11.0]]))
    torch.testing.assert_close(new_basis.abs(), torch.eye(3)[:, [1, 2, 0]])


def test_state_dict_round_trip_continues_exactly():
    shapes = ((6, 4), (4,))
    params = _params(shapes=shapes)
    opt = BasisRotation(params, precondition_frequency=3, **HP)
    grads = _random_grads(shapes, 12, seed=7)
    _run(params, opt, grads[:7])
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())
    assert saved_state["state"][0]["basis_left"].shape == (6, 6)
    _run(params, opt, grads[7:])

    restored = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = BasisRotation(restored, precondition_frequency=3, **HP)
    opt2.load_state_dict(saved_state)
    _run(restored, opt2, grads[7:])
    for a, b in zip(params, restored, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_per_group_frequency_and_stage_aware_budget():
    delays = staleness_schedule("async-1f1b", 8)
    freqs = stage_aware_frequencies(delays, 10)
    assert freqs == sorted(freqs) and freqs[0] < 10 < freqs[-1]
    assert sum(1 / f for f in freqs) == pytest.approx(8 / 10, rel=0.25)
    a, b = _params(shapes=((4, 4),)), _params(shapes=((4, 4),))
    opt = BasisRotation([{"params": a, "precondition_frequency": 2}, {"params": b, "precondition_frequency": 50}])
    assert [g["precondition_frequency"] for g in opt.param_groups] == [2, 50]


def test_param_split_rotates_only_block_linears(tiny_config):
    model = GPT(tiny_config)
    rotated, rest = split_rotated_parameters(model)
    rotated_ids = {id(p) for p in rotated}
    assert id(model.head.lm_head.weight) not in rotated_ids
    assert id(model.embedding.tok.weight) not in rotated_ids
    assert all(p.ndim == 2 for p in rotated) and len(rotated) == 4 * tiny_config.n_layer
    assert len(rotated) + len(rest) == len(list(model.parameters()))


def test_baselines():
    model = torch.nn.Linear(3, 3)
    nadam = build_optimizer(model, OptimConfig(name="nesterov"), delays=(0,), stage=0)
    assert isinstance(nadam, torch.optim.NAdam)
    assert nadam.param_groups[0]["betas"][0] == 0.99 and nadam.param_groups[0]["decoupled_weight_decay"]
    assert isinstance(build_optimizer(model, OptimConfig(name="pipedream-lr"), delays=(0,), stage=0), torch.optim.AdamW)
    assert pipedream_lr_factor(4, 0, 100) == pytest.approx(0.25)
    assert pipedream_lr_factor(4, 50, 100) == pytest.approx(0.5)
    assert pipedream_lr_factor(4, 200, 100) == 1.0
    assert pipedream_lr_factor(0, 0, 100) == 1.0


def test_bad_inputs():
    p = _params(shapes=((2, 2),))
    with pytest.raises(ValueError, match="precondition_frequency must be a positive int, got 0"):
        BasisRotation(p, precondition_frequency=0)
    with pytest.raises(ValueError, match="precondition_frequency must be a positive int, got -3"):
        BasisRotation([{"params": p, "precondition_frequency": -3}])
    with pytest.raises(ValueError, match="precondition_frequency must be a positive int"):
        OptimConfig(precondition_frequency=0)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        OptimConfig(name="sgd")
    with pytest.raises(ValueError, match="geometry must be one of"):
        BasisRotation(p, geometry="tri")
    with pytest.raises(ValueError, match="source must be one of"):
        OptimConfig(source="third")
    with pytest.raises(ValueError, match=r"max_precond_dim must be a non-negative int .*got -1"):
        OptimConfig(max_precond_dim=-1)
    with pytest.raises(ValueError, match=r"max_precond_dim must be a non-negative int .*got 2.5"):
        OptimConfig(max_precond_dim=2.5)
    with pytest.raises(ValueError, match=r"nesterov_momentum must be in \[0, 1\), got 1.0"):
        OptimConfig(nesterov_momentum=1.0)
    with pytest.raises(ValueError, match=r"nesterov_momentum must be in \[0, 1\), got -0.5"):
        OptimConfig(nesterov_momentum=-0.5)


def test_stage_aware_variant_sets_each_stage_frequency(tiny_config):
    from basisrot_pipeline.model import partition_model

    stages = partition_model(GPT(tiny_config), 4)
    delays = staleness_schedule("async-1f1b", 4)
    config = OptimConfig(name="basis-rotation-stage-aware", precondition_frequency=10)
    got = [
        build_optimizer(st, config, delays=delays, stage=s).param_groups[0]["precondition_frequency"]
        for s, st in enumerate(stages)
    ]
    assert got == stage_aware_frequencies(delays, 10)
    assert got[0] < got[-1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_optimizer_tracks_its_float32_run(dtype):
    # Half-precision CPU has no QR kernel: the refresh must run in float32 whatever the parameter dtype,
    # and the update is rounded to the parameter dtype only when it is applied.
    shapes = ((6, 4), (4,), (5, 5))
    half = [torch.nn.Parameter(p.detach().to(dtype)) for p in _params(shapes=shapes)]
    full = [torch.nn.Parameter(p.detach().float()) for p in half]  # the same starting point
    grads = [[g.to(dtype) for g in step] for step in _random_grads(shapes, 12, seed=3)]
    half_opt, full_opt = (BasisRotation(ps, precondition_frequency=3, **HP) for ps in (half, full))
    _run(half, half_opt, grads)
    _run(full, full_opt, [[g.float() for g in s] for s in grads])
    for p in half:
        assert p.dtype == dtype
    # the state depends on the gradients only, which both runs share: it is the float32 run's, bit for bit
    for p, q in zip(half, full, strict=True):
        for key in ("exp_avg", "exp_avg_sq", "stat_left", "stat_right", "basis_left", "basis_right"):
            if half_opt.state[p].get(key) is not None:
                assert half_opt.state[p][key].dtype == torch.float32, key
                torch.testing.assert_close(half_opt.state[p][key], full_opt.state[q][key], rtol=0, atol=0)
    for a, b in zip(half, full, strict=True):
        # each of the 12 steps rounds the weight once to the half-precision grid (spacing <= 2^-7 near 1)
        torch.testing.assert_close(a.float(), b, rtol=0, atol=12 * 2**-8 * float(b.detach().abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_trains_through_refreshes(tiny_config, tiny_batches, fast_optim, dtype):
    from basisrot_pipeline.emulator import StalenessEmulator
    from basisrot_pipeline.model import partition_model

    torch.manual_seed(0)
    stages = partition_model(GPT(tiny_config).to(dtype), 2)
    config = fast_optim()  # refresh every 3 steps: 7 steps pass the cold start and two warm refreshes
    delays = staleness_schedule("async-1f1b", 2)
    optimizers = [build_optimizer(st, config, delays=delays, stage=s) for s, st in enumerate(stages)]
    emulator = StalenessEmulator(stages, optimizers, delays, optim_config=config, total_steps=7)
    losses = [emulator.step(*tiny_batches.batch(m)) for m in range(7)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == dtype for st in stages for p in st.parameters())
    assert any(s["basis_left"] is not None for opt in optimizers for s in opt.state.values())


@pytest.mark.parametrize("source", ["second", "first"])
@pytest.mark.parametrize(("shape", "rotated"), [((6, 4), "right"), ((4, 7), "left"), ((5, 5), "right")])
def test_uni_rotates_the_right_side_unless_the_matrix_is_wide(shape, rotated, source):
    # The authors rotate the right side when rows >= cols: tall and square matrices on the right.
    params = _params(shapes=(shape,))
    opt = BasisRotation(params, geometry="uni", precondition_frequency=2, source=source, **HP)
    assert BasisRotation.rotated_sides(torch.Size(shape), opt.param_groups[0]) == (
        rotated == "left",
        rotated == "right",
    )
    _run(params, opt, _random_grads((shape,), 3, seed=6))
    state = opt.state[params[0]]
    assert (state["basis_left"] is not None, state["basis_right"] is not None) == (
        rotated == "left",
        rotated == "right",
    )


def _first_order_reference(weight, grads, *, lr, betas, eps, weight_decay, frequency, left, right):
    """The authors' first-order source written out step by step in float64 (arXiv 2602.03515,
    Algorithm 2 with S = 1st): SVD of the look-ahead momentum on cold start; warm refreshes
    Q_L = qr(M Q_R[:, order_R]), Q_R = qr(M^T Q_L[:, order_L]) from the old bases, the columns ordered by
    the estimated singular values ||M q||, and V permuted along the *other* axis. An identity stands in
    for a side that is not rotated (along which V is not permuted)."""
    b1, b2 = betas
    w = weight.clone()
    m, n = w.shape
    exp_avg, exp_avg_sq = torch.zeros_like(w), torch.zeros_like(w)
    q_left, q_right = torch.eye(m, dtype=w.dtype), torch.eye(n, dtype=w.dtype)
    for t, g in enumerate(grads, start=1):
        exp_avg = b1 * exp_avg + (1 - b1) * g
        if t == 1:
            u, _, vh = torch.linalg.svd(exp_avg, full_matrices=True)
            q_left = u if left else q_left
            q_right = vh.T if right else q_right
        elif t % frequency == 0:
            new_left, new_right = q_left, q_right
            if left:
                columns = exp_avg @ q_right
                order = torch.argsort((columns**2).sum(0), descending=True)
                if right:
                    exp_avg_sq = exp_avg_sq[:, order]
                new_left = torch.linalg.qr(columns[:, order], mode="complete").Q
            if right:
                columns = exp_avg.T @ q_left
                order = torch.argsort((columns**2).sum(0), descending=True)
                if left:
                    exp_avg_sq = exp_avg_sq[order, :]
                new_right = torch.linalg.qr(columns[:, order], mode="complete").Q
            q_left, q_right = new_left, new_right
        rotated_grad, rotated_avg = q_left.T @ g @ q_right, q_left.T @ exp_avg @ q_right
        exp_avg_sq = b2 * exp_avg_sq + (1 - b2) * rotated_grad**2
        step_size = lr * (1 - b2**t) ** 0.5 / (1 - b1**t)
        w = w * (1 - lr * weight_decay) - step_size * (q_left @ (rotated_avg / (exp_avg_sq.sqrt() + eps)) @ q_right.T)
    return w


@pytest.mark.parametrize(
    ("shape", "geometry", "sides"),
    [
        ((5, 3), "bi", (True, True)),
        ((4, 6), "bi", (True, True)),
        ((5, 3), "uni", (False, True)),
        ((3, 6), "uni", (True, False)),
    ],
)
def test_first_order_source_follows_the_authors_svd_and_qr_refresh(shape, geometry, sides):
    weight = _params(shapes=(shape,))[0].detach().double()
    grads = [[g[0].double()] for g in _random_grads((shape,), 13, seed=8)]
    options = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    expected = _first_order_reference(
        weight, [g[0] for g in grads], frequency=3, left=sides[0], right=sides[1], **options
    )
    param = torch.nn.Parameter(weight.clone())
    opt = BasisRotation([param], source="first", geometry=geometry, precondition_frequency=3, **options)
    _run([param], opt, grads)
    assert opt.state[param]["stat_left"] is None and opt.state[param]["stat_right"] is None  # no M M^T kept
    torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-9)


def test_first_update_puts_eps_beside_the_raw_second_moment():
    # SOAP and the authors, for rotated matrices: denominator sqrt(V) + eps, the bias corrections folded
    # into the step size lr sqrt(1 - b2^t) / (1 - b1^t). At t = 1: V = (1 - b2) g~^2, M = (1 - b1) g, so the
    # step is lr g / (|g| + eps / sqrt(1 - b2)). A diagonal gradient has signed-permutation bases, under
    # which the step is this elementwise formula. Unrotated parameters keep AdamW's sqrt(V / bc2) + eps.
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.99, 0.1, 0.01
    g = torch.tensor([[0.3, 0.0], [0.0, -2.0]], dtype=torch.float64)
    bias_grad = torch.tensor([0.3, -2.0], dtype=torch.float64)
    weight = torch.nn.Parameter(torch.tensor([[1.0, 0.2], [0.4, -0.5]], dtype=torch.float64))
    bias = torch.nn.Parameter(torch.tensor([1.0, -0.5], dtype=torch.float64))
    expected = weight.detach() * (1 - lr * wd) - lr * g / (g.abs() + eps / (1 - b2) ** 0.5)
    expected_bias = bias.detach() * (1 - lr * wd) - lr * bias_grad / (bias_grad.abs() + eps)  # AdamW's first step
    opt = BasisRotation([weight, bias], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    _run([weight, bias], opt, [[g, bias_grad]])
    torch.testing.assert_close(weight.detach(), expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(bias.detach(), expected_bias, rtol=0, atol=1e-15)
