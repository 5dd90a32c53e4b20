"""Generic block discovery, Conv1D handling and replay of every captured block argument."""

from __future__ import annotations

import pytest
import torch
from rp_models import make_model
from transformers.pytorch_utils import Conv1D

from recon_prune.model_adapter import (
    UnsupportedModelError,
    block_output,
    capture_block_inputs,
    find_decoder_blocks,
    find_linears,
    run_blocks,
    to_native_layout,
    weight_matrix,
)

EXPECTED_PATHS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "gemma2": "model.layers",
    "mixtral": "model.layers",
    "qwen2": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
}


@pytest.mark.parametrize("kind", list(EXPECTED_PATHS))
def test_blocks_found_and_replay_reproduces_the_model(kind: str, calib_ids: torch.Tensor) -> None:
    model = make_model(kind, layers=3)
    path, blocks = find_decoder_blocks(model)
    assert path == EXPECTED_PATHS[kind] and len(blocks) == 3
    hidden, inputs = capture_block_inputs(model, calib_ids, device="cpu")
    with torch.no_grad():
        reference = model(input_ids=calib_ids, output_hidden_states=True, use_cache=False).hidden_states
        torch.testing.assert_close(hidden, reference[0])
        x = hidden
        for i in range(2):  # the last entry of hidden_states has the final norm applied
            x = run_blocks([blocks[i]], inputs[i : i + 1], x)
            torch.testing.assert_close(x, reference[i + 1], rtol=1e-5, atol=1e-5)


# Models whose blocks take different arguments (sliding-window vs full attention) and a
# mixture-of-experts model; with block 0's arguments replayed, Gemma2's block 1 was off by 3.1.
PER_LAYER_KINDS = ["llama", "opt", "gpt2", "mistral-sliding", "qwen2-sliding", "gemma2", "mixtral"]


@pytest.mark.parametrize("kind", PER_LAYER_KINDS)
def test_every_block_replays_with_its_own_arguments(kind: str, calib_ids: torch.Tensor) -> None:
    model = make_model(kind, layers=4)
    _, blocks = find_decoder_blocks(model)
    outputs: dict[int, torch.Tensor] = {}
    handles = [
        block.register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, block_output(out)))
        for i, block in enumerate(blocks)
    ]
    with torch.no_grad():
        reference = model(input_ids=calib_ids, output_hidden_states=True, use_cache=False).hidden_states
    for handle in handles:
        handle.remove()
    hidden, inputs = capture_block_inputs(model, calib_ids, device="cpu")
    assert len(inputs) == len(blocks)
    with torch.no_grad():
        x = hidden
        for i, block in enumerate(blocks):
            x = run_blocks([block], [inputs[i]], x)
            torch.testing.assert_close(x, outputs[i], rtol=1e-5, atol=1e-5)
            if i < len(blocks) - 1:  # the last entry of hidden_states has the final norm applied
                torch.testing.assert_close(x, reference[i + 1], rtol=1e-5, atol=1e-5)
        # a run of several blocks takes their arguments in order
        torch.testing.assert_close(run_blocks(list(blocks), inputs, hidden), outputs[len(blocks) - 1])


def test_sliding_window_blocks_get_their_own_mask(calib_ids: torch.Tensor) -> None:
    """The test above can fail: block 0's arguments replayed to Gemma2's sliding and full layers differ."""
    model = make_model("gemma2", layers=2)
    _, blocks = find_decoder_blocks(model)
    hidden, inputs = capture_block_inputs(model, calib_ids, device="cpu")
    with torch.no_grad():
        reference = model(input_ids=calib_ids, output_hidden_states=True, use_cache=False).hidden_states
        after_block_0 = run_blocks([blocks[0]], [inputs[0]], hidden)
        own = run_blocks([blocks[1]], [inputs[1]], after_block_0)
        replayed_block_0 = run_blocks([blocks[1]], [inputs[0]], after_block_0)
    assert (replayed_block_0 - own).abs().max() > 0.1
    with pytest.raises(ValueError, match="2 blocks but the arguments of 1"):
        run_blocks(list(blocks), inputs[:1], hidden)
    assert reference[1].shape == own.shape


def test_llama_replay_includes_rotary_position_embeddings(calib_ids: torch.Tensor) -> None:
    _, calls = capture_block_inputs(make_model("llama"), calib_ids[:1], device="cpu")
    inputs = calls[0]
    cos, sin = inputs.kwargs["position_embeddings"]
    assert cos.shape == sin.shape and cos.shape[1] == calib_ids.shape[1]
    assert inputs.kwargs.get("use_cache") in (None, False)


def test_gpt2_conv1d_is_transposed() -> None:
    block = find_decoder_blocks(make_model("gpt2"))[1][0]
    linears = find_linears(block)
    assert set(linears) == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    c_fc = linears["mlp.c_fc"]
    assert isinstance(c_fc, Conv1D)
    matrix = weight_matrix(c_fc)
    assert matrix.shape == (c_fc.nf, c_fc.weight.shape[0])  # (out, in)
    x = torch.randn(3, c_fc.weight.shape[0])
    torch.testing.assert_close(c_fc(x), x @ matrix.T + c_fc.bias)
    assert torch.equal(to_native_layout(c_fc, matrix), c_fc.weight)


def test_unsupported_model_error_names_what_was_found() -> None:
    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.parts = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.ReLU()])

    with pytest.raises(
        UnsupportedModelError,
        match=r"cannot find the decoder blocks of Mlp.*found module lists: parts \(2 x Linear/ReLU\)",
    ):
        find_decoder_blocks(Mlp())
    with pytest.raises(UnsupportedModelError, match="found module lists: none"):
        find_decoder_blocks(torch.nn.Linear(3, 3))
