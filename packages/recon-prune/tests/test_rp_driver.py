"""End-to-end pruning on tiny random Llama, OPT and GPT-2 models; resume; save/reload; bad input."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import torch
from rp_models import VOCAB, make_model

import recon_prune.checkpoint as checkpoint
import recon_prune.driver as driver
from recon_prune import CalibrationData, PruneConfig, UnsupportedModelError, prune
from recon_prune.model_adapter import find_decoder_blocks, find_linears, weight_matrix

FAST = {"epochs": 2, "blocksize": 16, "device": "cpu"}


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_end_to_end_unstructured(kind: str, method: str, calib_ids: torch.Tensor) -> None:
    model = make_model(kind)
    errors = {}
    for reconstruction in ("none", "br+gp"):
        pruned = copy.deepcopy(model)
        report = prune(
            pruned, calib_ids, PruneConfig(method=method, sparsity=0.5, reconstruction=reconstruction, **FAST)
        )
        assert len(report.block_errors) == 2 and all(e is not None and e >= 0 for e in report.block_errors)
        for name, fraction in report.sparsity["layers"].items():
            assert fraction >= 0.5, name  # exactly half pruned (dead inputs may add zeros)
        for name, mask in report.masks.items():
            module = pruned.get_submodule(name)
            assert mask.shape == module.weight.shape
            assert torch.all(module.weight[~mask] == 0)
        assert torch.isfinite(pruned(input_ids=calib_ids[:2]).logits).all()
        errors[reconstruction] = report.final_block_error
    assert errors["br+gp"] < errors["none"]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_end_to_end_nm(kind: str, calib_ids: torch.Tensor) -> None:
    model = make_model(kind)
    report = prune(model, calib_ids, PruneConfig(method="sparsegpt", pattern="2:4", reconstruction="br", **FAST))
    for block in find_decoder_blocks(model)[1]:
        for module in find_linears(block).values():
            w = weight_matrix(module)
            assert torch.all((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2)
    assert report.config["pattern"] == "2:4"


@pytest.mark.parametrize("reconstruction", ["br+gp+cr", "br+cr", "br", "lr"])
def test_resumed_run_equals_uninterrupted(reconstruction: str, calib_ids: torch.Tensor, tmp_path) -> None:
    config = PruneConfig(method="sparsegpt", reconstruction=reconstruction, **FAST)
    reference = make_model("llama", layers=3)
    ref_report = prune(reference, calib_ids, config)

    killed = make_model("llama", layers=3)

    def kill(i: int, _report) -> None:
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prune(killed, calib_ids, config, checkpoint_dir=tmp_path, block_callback=kill)
    resumed = make_model("llama", layers=3)  # a fresh process reloads the dense model
    report = prune(resumed, calib_ids, config, checkpoint_dir=tmp_path)
    assert report.resumed_from_block == 2
    ours, theirs = reference.state_dict(), resumed.state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert torch.equal(value, theirs[name]), name
    assert report.block_errors == pytest.approx(ref_report.block_errors, rel=0, abs=0)
    assert set(report.masks) == set(ref_report.masks)


def test_checkpoint_of_another_run_is_refused(calib_ids: torch.Tensor, tmp_path) -> None:
    prune(make_model("llama"), calib_ids, PruneConfig(reconstruction="none", **FAST), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="belongs to a different run"):
        prune(make_model("llama"), calib_ids, PruneConfig(reconstruction="br", **FAST), checkpoint_dir=tmp_path)


def test_save_pretrained_reload_gives_identical_weights_and_sparsity(calib_ids: torch.Tensor, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from recon_prune.evaluate import sparsity_report

    for kind in ("llama", "gpt2"):
        model = make_model(kind)
        report = prune(model, calib_ids, PruneConfig(method="wanda", reconstruction="br", **FAST))
        model.save_pretrained(tmp_path / kind)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / kind)
        ours, theirs = model.state_dict(), reloaded.state_dict()
        assert ours.keys() == theirs.keys()
        for name, value in ours.items():
            assert torch.equal(value, theirs[name]), name
        assert sparsity_report(reloaded) == report.sparsity


def test_gp_targets_equal_dense_model_activations(calib_ids: torch.Tensor, monkeypatch) -> None:
    model = make_model("llama", layers=3)
    with torch.no_grad():
        dense_hidden = model(input_ids=calib_ids, output_hidden_states=True, use_cache=False).hidden_states
    seen = []
    real_train = driver.train_blocks

    def spy(blocks, inputs, x, targets, hparams, **kw):
        seen.append((x.clone(), targets.clone()))
        return real_train(blocks, inputs, x, targets, hparams, **kw)

    monkeypatch.setattr(driver, "train_blocks", spy)
    prune(model, calib_ids, PruneConfig(method="magnitude", reconstruction="br+gp", **FAST))
    for i in range(2):
        torch.testing.assert_close(seen[i][1], dense_hidden[i + 1], rtol=1e-5, atol=1e-6)
    # BR (without GP) instead targets the dense block applied to the *sparse* inputs
    seen.clear()
    model = make_model("llama", layers=3)
    prune(model, calib_ids, PruneConfig(method="magnitude", reconstruction="br", **FAST))
    assert not torch.allclose(seen[1][1], dense_hidden[2], atol=1e-6)


def test_self_generated_rows_join_reconstruction_but_not_mask_statistics(calib_ids: torch.Tensor, monkeypatch) -> None:
    extra = torch.randint(0, VOCAB, (4, calib_ids.shape[1]), generator=torch.Generator().manual_seed(5))
    config = PruneConfig(method="wanda", reconstruction="br", **FAST)
    only_real, with_generated = make_model("llama"), make_model("llama")
    report_a = prune(only_real, calib_ids, config)
    sizes = []
    real_train = driver.train_blocks
    monkeypatch.setattr(
        driver, "train_blocks", lambda b, i, x, *a, **k: (sizes.append(x.shape[0]), real_train(b, i, x, *a, **k))[1]
    )
    report_b = prune(with_generated, CalibrationData(input_ids=calib_ids, generated_ids=extra), config)
    first_block = [k for k in report_a.masks if ".0." in k]
    assert all(torch.equal(report_a.masks[k], report_b.masks[k]) for k in first_block)  # masks from real text only
    assert sizes == [12, 12]


def test_bad_inputs_fail_before_any_work(calib_ids: torch.Tensor) -> None:
    model = make_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedModelError, match="cannot find the decoder blocks"):
        prune(torch.nn.Sequential(torch.nn.Linear(2, 2)), calib_ids, PruneConfig())
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        prune(model, torch.zeros(2, 65, dtype=torch.long), PruneConfig())
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        prune(model, torch.full((2, 8), VOCAB), PruneConfig())
    with pytest.raises(ValueError, match="2-D"):
        prune(model, torch.zeros(8, dtype=torch.long), PruneConfig())
    with pytest.raises(TypeError, match="PruneConfig"):
        prune(model, calib_ids, {"method": "wanda"})
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value)


def test_bfloat16_model_keeps_its_dtype_and_exact_zeros(calib_ids: torch.Tensor) -> None:
    model = make_model("llama").to(torch.bfloat16)
    report = prune(model, calib_ids, PruneConfig(method="sparsegpt", reconstruction="br+gp+cr", **FAST))
    for name, mask in report.masks.items():
        weight = model.get_submodule(name).weight
        assert weight.dtype == torch.bfloat16 and torch.all(weight[~mask] == 0)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_nm_pattern_that_does_not_divide_the_width_is_refused_early(calib_ids: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="not divisible by M=64"):
        prune(make_model("llama"), calib_ids, PruneConfig(pattern="2:64", blocksize=128))


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_end_to_end_llama_family(kind: str, calib_ids: torch.Tensor) -> None:
    model = make_model(kind)
    report = prune(model, calib_ids, PruneConfig(method="sparsegpt", reconstruction="br+gp", **FAST))
    assert report.blocks_path == "model.layers" and report.sparsity["overall"] >= 0.5


@pytest.mark.parametrize("reconstruction", ["br", "br+gp+cr", "br+cr"])
def test_reported_errors_equal_sparse_vs_dense_hidden_states(reconstruction: str, calib_ids: torch.Tensor) -> None:
    """The per-depth error, recomputed from the final pruned and the dense model's hidden states."""
    dense = make_model("llama", layers=4)
    pruned = copy.deepcopy(dense)
    report = prune(pruned, calib_ids, PruneConfig(method="wanda", reconstruction=reconstruction, **FAST))
    with torch.no_grad():
        h_dense = dense(input_ids=calib_ids, output_hidden_states=True).hidden_states
        h_sparse = pruned(input_ids=calib_ids, output_hidden_states=True).hidden_states
    for i in range(3):  # the last entry of hidden_states has the final norm applied
        expected = torch.nn.functional.mse_loss(h_sparse[i + 1], h_dense[i + 1]).item()
        assert report.block_errors[i] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("kind", ["gemma2", "qwen2-sliding"])
def test_reported_errors_are_right_when_blocks_take_different_masks(kind: str, calib_ids: torch.Tensor) -> None:
    """Sliding-window and full-attention blocks in one model: each block runs with its own mask."""
    dense = make_model(kind, layers=4)
    pruned = copy.deepcopy(dense)
    report = prune(pruned, calib_ids, PruneConfig(method="sparsegpt", reconstruction="br", **FAST))
    with torch.no_grad():
        h_dense = dense(input_ids=calib_ids, output_hidden_states=True).hidden_states
        h_sparse = pruned(input_ids=calib_ids, output_hidden_states=True).hidden_states
    for i in range(3):  # the last entry of hidden_states has the final norm applied
        expected = torch.nn.functional.mse_loss(h_sparse[i + 1], h_dense[i + 1]).item()
        assert report.block_errors[i] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("reconstruction", ["br", "br+gp", "br+cr", "br+gp+cr"])
def test_every_parameter_keeps_its_own_requires_grad_flag(reconstruction: str, calib_ids: torch.Tensor) -> None:
    model = make_model("llama", layers=3)
    _, blocks = find_decoder_blocks(model)
    blocks[1].self_attn.q_proj.weight.requires_grad_(False)  # frozen before pruning: stays frozen
    blocks[2].input_layernorm.weight.requires_grad_(False)
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    assert not all(before.values()) and any(before.values())
    report = prune(model, calib_ids, PruneConfig(method="wanda", reconstruction=reconstruction, **FAST))
    assert all(step["steps"] > 0 for step in report.reconstruction)  # the blocks were trained
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before


def test_lr_is_the_sparsegpt_update_and_a_no_op_for_wanda(calib_ids: torch.Tensor) -> None:
    dense = make_model("llama")
    runs = {}
    for method in ("sparsegpt", "wanda"):
        for reconstruction in ("none", "lr"):
            model = copy.deepcopy(dense)
            runs[method, reconstruction] = (
                model,
                prune(model, calib_ids, PruneConfig(method=method, reconstruction=reconstruction, **FAST)),
            )
    for name, value in runs["wanda", "none"][0].state_dict().items():
        assert torch.equal(value, runs["wanda", "lr"][0].state_dict()[name])
    assert runs["sparsegpt", "lr"][1].final_block_error < runs["sparsegpt", "none"][1].final_block_error
    # without LR, SparseGPT's kept weights are the dense weights themselves
    none_model, none_report = runs["sparsegpt", "none"]
    for name, mask in none_report.masks.items():
        torch.testing.assert_close(
            none_model.get_submodule(name).weight[mask], dense.get_submodule(name).weight[mask], rtol=0, atol=0
        )


def _assert_same_result(reference, ref_report, resumed, report) -> None:
    ours, theirs = reference.state_dict(), resumed.state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert torch.equal(value, theirs[name]), name
    assert report.block_errors == pytest.approx(ref_report.block_errors, rel=0, abs=0)
    assert all(torch.equal(mask, ref_report.masks[name]) for name, mask in report.masks.items())


@pytest.mark.parametrize(
    ("reconstruction", "crash"),
    [("br", "block file"), ("br+cr", "block file"), ("br+gp+cr", "block file"), ("br+cr", "buffers file")],
)
def test_crash_in_the_middle_of_a_checkpoint_save_resumes_exactly(
    reconstruction: str, crash: str, calib_ids: torch.Tensor, tmp_path, monkeypatch
) -> None:
    """A kill after some files of step 2 are written but before its state.json resumes at block 1."""
    config = PruneConfig(method="sparsegpt", reconstruction=reconstruction, **FAST)
    reference = make_model("llama", layers=3)
    ref_report = prune(reference, calib_ids, config)

    real_save = checkpoint.Checkpoint._save
    prefix = "block_" if crash == "block file" else "buffers"

    def save_then_die(self, name: str, obj) -> None:
        real_save(self, name, obj)
        if name.startswith(prefix) and "step0002" in name:  # the first such file of block 1's save
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.Checkpoint, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        prune(make_model("llama", layers=3), calib_ids, config, checkpoint_dir=tmp_path)
    monkeypatch.setattr(checkpoint.Checkpoint, "_save", real_save)
    assert list(tmp_path.glob(f"{prefix}*step0002.pt"))  # the orphan the committed state must ignore
    resumed = make_model("llama", layers=3)
    report = prune(resumed, calib_ids, config, checkpoint_dir=tmp_path)
    assert report.resumed_from_block == 1
    _assert_same_result(reference, ref_report, resumed, report)
    state = json.loads((tmp_path / "state.json").read_text())
    owned = {*state["block_files"].values(), state["buffers_file"]}
    assert {p.name for p in tmp_path.glob("*.pt")} == owned  # orphans and superseded files are removed


def test_checkpoint_of_other_weights_of_the_same_architecture_is_refused(calib_ids: torch.Tensor, tmp_path) -> None:
    config = PruneConfig(reconstruction="none", **FAST)

    def stop(i: int, _report) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prune(make_model("llama", seed=0), calib_ids, config, checkpoint_dir=tmp_path, block_callback=stop)
    assert checkpoint.weights_digest(make_model("llama", seed=0)) == checkpoint.weights_digest(
        make_model("llama", seed=0)
    )
    with pytest.raises(ValueError, match="belongs to a different run \\(other model weights"):
        prune(make_model("llama", seed=1), calib_ids, config, checkpoint_dir=tmp_path)
    report = prune(make_model("llama", seed=0), calib_ids, config, checkpoint_dir=tmp_path)
    assert report.resumed_from_block == 1


@pytest.mark.parametrize("reconstruction", ["br", "br+gp+cr"])
def test_finished_blocks_return_to_the_device_they_started_on(
    reconstruction: str, calib_ids: torch.Tensor, monkeypatch
) -> None:
    """Home ``cpu``, compute ``cpu:1`` and offload ``cpu:0`` are distinct device values (torch runs all
    three on the CPU), so a block left on either the compute or the offload device is visible."""
    model = make_model("llama", layers=3)
    blocks = list(find_decoder_blocks(model)[1])
    last_target: dict[int, torch.device] = {}
    real_to = torch.nn.Module.to

    def recording_to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None and any(self is b for b in blocks):
            last_target[id(self)] = device
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    config = PruneConfig(
        method="wanda", reconstruction=reconstruction, offload_device="cpu:0", **(FAST | {"device": "cpu:1"})
    )
    prune(model, calib_ids, config)
    monkeypatch.setattr(torch.nn.Module, "to", real_to)
    assert [last_target[id(b)] for b in blocks] == [torch.device("cpu")] * 3
    assert torch.isfinite(model(input_ids=calib_ids[:2]).logits).all()


@pytest.mark.parametrize("reconstruction", ["lr", "br", "br+gp", "br+gp+cr"])
def test_no_dense_copy_of_a_block_is_made(reconstruction: str, calib_ids: torch.Tensor, monkeypatch) -> None:
    """Dense targets come from the block itself before pruning; only CR without GP keeps a copy."""

    real_deepcopy = copy.deepcopy

    def no_module_copy(obj, *args, **kwargs):
        if isinstance(obj, torch.nn.Module):
            raise AssertionError(f"a copy of {type(obj).__name__} was made")
        return real_deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", no_module_copy)
    report = prune(
        make_model("llama"), calib_ids, PruneConfig(method="sparsegpt", reconstruction=reconstruction, **FAST)
    )
    assert report.sparsity["overall"] >= 0.5


def test_config_calibration_shape_is_checked_and_the_actual_shape_recorded(calib_ids: torch.Tensor) -> None:
    model = make_model("llama")
    with pytest.raises(ValueError, match=r"config\.nsamples=4 but the calibration has 8 real samples"):
        prune(model, calib_ids, PruneConfig(nsamples=4, **FAST))
    with pytest.raises(ValueError, match=r"config\.seq_len=32 but the calibration has 16 tokens per sample"):
        prune(model, calib_ids, PruneConfig(seq_len=32, **FAST))
    report = prune(model, calib_ids, PruneConfig(reconstruction="none", **FAST))  # preset says 64 x 512
    assert (report.config["nsamples"], report.config["seq_len"]) == (8, 16)
    report = prune(make_model("llama"), calib_ids, PruneConfig(reconstruction="none", nsamples=8, seq_len=16, **FAST))
    assert (report.config["nsamples"], report.config["seq_len"]) == (8, 16)


def test_checkpoint_deletes_only_its_own_files(calib_ids: torch.Tensor, tmp_path) -> None:
    """A user's files in --checkpoint-dir survive, a killed save's temporary file does not."""
    foreign = {"my_model.pt": b"user weights", "block_0000.pt": b"older layout", "notes.step0001.pt": b"x"}
    for name, content in foreign.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / ".block_0000.step0009.pt.tmp").write_bytes(b"half-written")
    prune(make_model("llama"), calib_ids, PruneConfig(reconstruction="br", **FAST), checkpoint_dir=tmp_path)
    for name, content in foreign.items():
        assert (tmp_path / name).read_bytes() == content, name
    state = json.loads((tmp_path / "state.json").read_text())
    owned = {*state["block_files"].values(), state["buffers_file"]}
    assert {p.name for p in tmp_path.iterdir()} == {*foreign, *owned, "state.json"}


@pytest.mark.parametrize("reconstruction", ["br+gp+cr", "br+cr"])
def test_rerun_of_a_finished_run_returns_the_same_model(reconstruction: str, calib_ids: torch.Tensor, tmp_path) -> None:
    """The finished state holds no CR window; a rerun loads every block final, in the model's dtype."""
    config = PruneConfig(method="sparsegpt", reconstruction=reconstruction, dtype="bfloat16", **FAST)
    first = make_model("llama", layers=3)
    first_report = prune(first, calib_ids, config, checkpoint_dir=tmp_path)
    rerun = make_model("llama", layers=3)
    report = prune(rerun, calib_ids, config, checkpoint_dir=tmp_path)
    assert report.resumed_from_block == 3
    assert {p.dtype for p in rerun.parameters()} == {torch.bfloat16}
    _assert_same_result(first, first_report, rerun, report)
    assert report.sparsity == first_report.sparsity


def test_checkpoint_of_an_older_format_is_named_as_such(calib_ids: torch.Tensor, tmp_path) -> None:
    old_state = {"fingerprint": "0" * 64, "next_block": 1, "report": {"block_errors": [0.1, None]}}
    (tmp_path / "state.json").write_text(json.dumps(old_state))
    with pytest.raises(ValueError, match="written by an older recon-prune"):
        prune(make_model("llama"), calib_ids, PruneConfig(reconstruction="br", **FAST), checkpoint_dir=tmp_path)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="maps file descriptors to paths through /proc")
def test_checkpoint_files_are_fsynced_before_the_state_commits_them(
    calib_ids: torch.Tensor, tmp_path, monkeypatch
) -> None:
    directory = os.path.realpath(tmp_path)
    events: list[tuple[str, str]] = []
    real_fsync, real_commit = os.fsync, checkpoint.write_json_atomic

    def recording_fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    def recording_commit(path, obj, **kwargs):
        result = real_commit(path, obj, **kwargs)
        events.append(("commit", json.dumps(obj)))
        return result

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(checkpoint, "write_json_atomic", recording_commit)
    prune(
        make_model("llama", layers=3), calib_ids, PruneConfig(reconstruction="br+cr", **FAST), checkpoint_dir=tmp_path
    )
    commits = [k for k, (kind, _) in enumerate(events) if kind == "commit"]
    assert len(commits) == 3
    for k in commits:
        state = json.loads(events[k][1])
        synced = [path for kind, path in events[:k] if kind == "fsync"]
        for name in (*state["block_files"].values(), state["buffers_file"]):
            # fsynced under its temporary name (.NAME.<8 hex>.tmp)
            temporary = re.compile(re.escape(os.path.join(directory, f".{name}.")) + r"[0-9a-f]{8}\.tmp")
            assert any(temporary.fullmatch(path) for path in synced), name
        last_file = max(i for i, (kind, path) in enumerate(events[:k]) if re.search(r"\.pt\.[0-9a-f]{8}\.tmp$", path))
        assert ("fsync", directory) in events[last_file:k]  # the renames are durable before the commit
        assert next(path for kind, path in events[k + 1 :] if kind == "fsync") == directory  # and the commit


def _masked_state(block: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The block's state dict as its forward sees it (masked weights under their plain names)."""
    state = {}
    for module_name, module in block.named_modules():
        if ".parametrizations" in module_name or module_name.startswith("parametrizations"):
            continue
        prefix = f"{module_name}." if module_name else ""
        for name, value in module.named_parameters(recurse=False):
            state[prefix + name] = value.detach().clone()
        if torch.nn.utils.parametrize.is_parametrized(module, "weight"):
            state[prefix + "weight"] = module.weight.detach().clone()
    return state


def _spy_on_training(monkeypatch, blocks) -> list[tuple[list[int], torch.Tensor, list[dict[str, torch.Tensor]]]]:
    """Record every train_blocks call as (block indices, target, states of the blocks as they enter it)."""
    calls = []
    real = driver.train_blocks

    def spy(trained, block_inputs, inputs, targets, hparams, **kwargs):
        indices = [next(j for j, b in enumerate(blocks) if b is block) for block in trained]
        calls.append((indices, targets.clone(), [_masked_state(block) for block in trained]))
        return real(trained, block_inputs, inputs, targets, hparams, **kwargs)

    monkeypatch.setattr(driver, "train_blocks", spy)
    return calls


@pytest.mark.parametrize("reconstruction", ["br+cr", "br+gp+cr"])
@pytest.mark.parametrize("cr_target", ["dense-window", "dense-block-on-reconstructed"])
def test_cr_trains_windows_up_to_the_last_block_alone(
    reconstruction: str, cr_target: str, calib_ids: torch.Tensor, monkeypatch
) -> None:
    """The authors' windows: [0], [0, 1], [1, 2], [2, 3], then [3] alone, so every block trains twice."""
    model = make_model("llama", layers=4)
    _, blocks = find_decoder_blocks(model)
    calls = _spy_on_training(monkeypatch, blocks)
    config = PruneConfig(method="wanda", reconstruction=reconstruction, cr_target=cr_target, **FAST)
    report = prune(model, calib_ids, config)
    assert [indices for indices, _, _ in calls] == [[0], [0, 1], [1, 2], [2, 3], [3]]
    assert all(sum(i in indices for indices, _, _ in calls) == 2 for i in range(4))
    assert report.reconstruction[-1]["last_alone_steps"] > 0


def test_cr_last_window_target_is_the_dense_last_block_on_its_final_inputs(calib_ids: torch.Tensor, monkeypatch):
    dense = make_model("llama", layers=3)
    model = copy.deepcopy(dense)
    _, blocks = find_decoder_blocks(model)
    calls = _spy_on_training(monkeypatch, blocks)
    prune(model, calib_ids, PruneConfig(method="wanda", reconstruction="br+cr", **FAST))
    indices, target, _ = calls[-1]
    assert indices == [2]
    # by hand: the model's own forward with the final blocks 0, 1 and the dense block 2
    reference = copy.deepcopy(dense)
    _, reference_blocks = find_decoder_blocks(reference)
    for j in (0, 1):
        reference_blocks[j].load_state_dict(blocks[j].state_dict())
    outputs = {}
    reference_blocks[2].register_forward_hook(lambda _m, _a, out: outputs.setdefault("last", out))
    with torch.no_grad():
        reference(input_ids=calib_ids)
    torch.testing.assert_close(target, outputs["last"], rtol=1e-4, atol=1e-5)


def test_cr_authors_target_is_the_dense_block_on_the_reconstructed_previous_block(
    calib_ids: torch.Tensor, monkeypatch
) -> None:
    """cr_target='dense-block-on-reconstructed': the window (i-1, i) trains towards the dense block i
    applied to the provisional block i-1 (as trained in window (i-2, i-1)) on block i-1's sparse inputs."""
    dense = make_model("llama", layers=4)
    model = copy.deepcopy(dense)
    _, blocks = find_decoder_blocks(model)
    calls = _spy_on_training(monkeypatch, blocks)
    config = PruneConfig(method="wanda", reconstruction="br+cr", cr_target="dense-block-on-reconstructed", **FAST)
    prune(model, calib_ids, config)
    for start in (0, 1):  # windows (0, 1) and (1, 2)
        indices, target, entering = calls[start + 1]
        assert indices == [start, start + 1]
        # by hand, through the model's own forward: the final blocks before the window, the
        # provisional block `start` as it entered the window, then the dense block start + 1
        reference = copy.deepcopy(dense)
        _, reference_blocks = find_decoder_blocks(reference)
        for j in range(start):
            reference_blocks[j].load_state_dict(blocks[j].state_dict())
        reference_blocks[start].load_state_dict(entering[0])
        with torch.no_grad():
            hidden = reference(input_ids=calib_ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(target, hidden[start + 2], rtol=1e-4, atol=1e-5)
        # and it is not the default dense-window target
        with torch.no_grad():
            dense_window = dense(input_ids=calib_ids, output_hidden_states=True).hidden_states[start + 2]
        assert (target - dense_window).abs().max() > 1e-3 or start == 0


def test_moe_report_counts_every_matrix_and_names_the_router_left_dense(calib_ids: torch.Tensor) -> None:
    """A tiny Mixtral pruned at 50%: the report counts the attention projections, every expert's slice
    of the fused expert tensors and the router it leaves dense (issue 12)."""
    model = make_model("mixtral")
    report = prune(model, calib_ids, PruneConfig(method="sparsegpt", sparsity=0.5, reconstruction="none", **FAST))
    zeros = total = 0
    for block in model.model.layers:
        for parameter in block.parameters():
            if parameter.dim() >= 2:
                zeros += int((parameter == 0).sum())
                total += parameter.numel()
    assert report.sparsity["overall"] == zeros / total
    assert 0.45 < report.sparsity["overall"] < 0.5  # everything but the small router is half pruned
    assert all(fraction >= 0.5 for fraction in report.sparsity["layers"].values())
    assert len(report.sparsity["layers"]) == 2 * (4 + 2 * 4)  # attention + 4 experts x 2 fused parameters
    reasons = {name: entry["reason"] for name, entry in report.sparsity["dense"].items()}
    assert reasons == {f"model.layers.{i}.mlp.gate.weight": "router: kept dense" for i in range(2)}
