"""The helpers around SAM's step, each on its own: DDP's local clean pass, the overflow agreement,
the GradScaler half-step and m-sharpness (SAM's own numerical tests are in test_sam_optim.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from sam_overparam.optim import SAM
from sam_overparam.optim.amp import scaled_second_half
from sam_overparam.optim.distributed import found_inf_on_any_rank, local_gradients
from sam_overparam.optim.msharpness import chunked_step


class _DataParallelLike(nn.Linear):
    """A module with ``no_sync()``, as DDP has, that counts how often it was entered."""

    def __init__(self) -> None:
        super().__init__(3, 2)
        self.entered = 0

    @contextlib.contextmanager
    def no_sync(self):
        self.entered += 1
        yield


def _closure(model, x, y):
    def closure(*chunk):
        xs, ys = chunk[0] if chunk else (x, y)
        loss = nn.functional.cross_entropy(model(xs), ys)
        loss.backward()
        return loss

    return closure


def test_local_gradients_uses_no_sync_only_where_there_is_one():
    model = _DataParallelLike()
    with local_gradients(model):
        pass
    assert model.entered == 1
    for plain in (nn.Linear(2, 2), None):
        with local_gradients(plain):  # nothing to enter: a null context
            pass


def test_overflow_flag_is_local_without_a_process_group():
    assert found_inf_on_any_rank(True, _DataParallelLike()) is True
    assert found_inf_on_any_rank(False, _DataParallelLike()) is False
    assert found_inf_on_any_rank(True, nn.Linear(2, 2)) is True  # no no_sync(): never a collective


def test_chunked_step_equals_one_chunk_sam_step_and_checks_its_weights():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    reference, chunked = _DataParallelLike(), _DataParallelLike()
    chunked.load_state_dict(reference.state_dict())
    opt_ref = SAM(reference.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, model=reference)
    opt_chunked = SAM(chunked.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, model=chunked)
    opt_ref.step(_closure(reference, x, y))
    loss = chunked_step(opt_chunked, _closure(chunked, x, y), [(x, y)], [1.0])
    assert float(loss) > 0 and chunked.entered == 1  # the clean pass ran without gradient sync
    for p, q in zip(reference.parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="chunk_weights are required"):
        chunked_step(opt_chunked, _closure(chunked, x, y), [(x, y)], None)
    with pytest.raises(ValueError, match="one weight per chunk"):
        chunked_step(opt_chunked, _closure(chunked, x, y), [(x, y)], [0.5, 0.5])


def test_scaled_second_half_skips_a_step_whose_clean_gradient_overflowed():
    model = nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, model=model)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))  # the scaler starts tracking the scale on its first scale()
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    loss = scaled_second_half(
        opt, lambda: pytest.fail("no perturbed pass after an overflow"), torch.tensor(1.0), scaler
    )
    scaler.update()
    assert float(loss) == 1.0 and scaler.get_scale() < 4.0
    for p, p0 in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, p0)
