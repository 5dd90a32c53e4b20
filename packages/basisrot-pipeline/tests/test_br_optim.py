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
