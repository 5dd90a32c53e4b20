"""``stdlib-tiny``: the embedded default model, a small Llama-architecture byte-level causal LM.

It is the offline stand-in for OPT-125M: a real model pretrained, on first use, on the train split
of the shin-common standard-library corpus (Python sources and their English docstrings, plus the
``pydoc`` reference prose), then cached. The tokenizer maps UTF-8 bytes 0..255 to ids 0..255 (id 256
is ``<|endoftext|>``); it is a ``tokenizers`` byte-level BPE with no merges, saved with the model,
so ``AutoTokenizer.from_pretrained(path)`` reloads it.

Recipe (:class:`TinyRecipe`): 4 blocks, width 128, 4 heads, SwiGLU width 384, context 512;
AdamW (lr 3e-3, betas (0.9, 0.95), weight decay 0.1), linear warm-up then cosine decay, batches of
32 x 256 random windows (480 steps, ~4M bytes), in float32. (``bf16=True`` turns on bf16 autocast; on a CPU
without native bf16 it is emulated and ran at 11 s per step against 1.1-1.5 s in float32, so it is off by
default.) The held-out (test split) perplexity per byte is recorded in ``stdlib_tiny_record.json`` next to
the weights.

The pretraining window (256) is saved in the model config as ``train_seq_len``; evaluation and the
CLI's calibration default to it, since the model never saw positions beyond it.

Cache: ``$RECON_PRUNE_CACHE`` or ``~/.cache/recon-prune``; the default recipe's model lives in
``stdlib-tiny-v2``, any other recipe's in ``stdlib-tiny-v2-<hash of the recipe>``. (``stdlib-tiny-v1``
was the bf16 recipe; its cache is never read as the v2 model.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

MODEL_NAME = "stdlib-tiny"
# v2: the default recipe trains in float32 (v1 used bf16 autocast, 11 s/step on CPUs without native bf16).
# A new name keeps a v1 cache from being reused as if it were built by the v2 recipe.
CACHE_VERSION = "stdlib-tiny-v2"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 257


@dataclass(kw_only=True)
class TinyRecipe:
    """Architecture and pretraining recipe of ``stdlib-tiny``. (Defaults: the cached model's recipe.)"""

    layers: int = 4
    hidden: int = 128
    heads: int = 4
    intermediate: int = 384
    context: int = 512
    train_seq_len: int = 256
    batch_size: int = 32
    steps: int = 480
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    eval_chunks: int = 64
    seed: int = 0
    bf16: bool = False  # bf16 autocast; emulated (about 8x slower than float32) on CPUs without native bf16

    def __post_init__(self) -> None:
        for name in (
            "layers",
            "hidden",
            "heads",
            "intermediate",
            "context",
            "train_seq_len",
            "batch_size",
            "steps",
            "eval_chunks",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}")
        if self.train_seq_len > self.context:
            raise ValueError(f"train_seq_len={self.train_seq_len} exceeds context={self.context}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")


def recipe_cache_name(recipe: TinyRecipe | None = None) -> str:
    """Cache directory name of the model built by ``recipe`` (the default recipe keeps the plain name)."""
    recipe = recipe or TinyRecipe()
    if recipe == TinyRecipe():
        return CACHE_VERSION
    canonical = json.dumps(dataclasses.asdict(recipe), sort_keys=True)
    return f"{CACHE_VERSION}-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"


def cache_dir() -> Path:
    root = os.environ.get("RECON_PRUNE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "recon-prune"


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map used by byte-level BPE (Radford et al., GPT-2)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=False)}


def byte_tokenizer() -> Any:
    """A fast tokenizer whose ids are the UTF-8 bytes (0..255) plus ``<|endoftext|>`` = 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    mapping = _bytes_to_unicode()
    vocab = {mapping[b]: b for b in range(256)}
    vocab[EOS_TOKEN] = 256
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([EOS_TOKEN])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, bos_token=None)


def build_model(recipe: TinyRecipe) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=recipe.hidden,
        intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=recipe.context,
        tie_word_embeddings=True,
        eos_token_id=256,
        pad_token_id=256,
        bos_token_id=None,
    )
    config.train_seq_len = recipe.train_seq_len  # saved in config.json: the default evaluation window
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(config)


def pretrain(recipe: TinyRecipe, output_dir: str | os.PathLike[str], *, show_progress: bool = True) -> dict[str, Any]:
    """Pretrain ``stdlib-tiny`` by ``recipe`` and save model, tokenizer and record to ``output_dir``."""
    from recon_prune.evaluate import perplexity
    from shin_common import progress, seed_everything, stdlib_corpus, write_run_record

    seed_everything(recipe.seed)
    corpus = stdlib_corpus()
    train = np.frombuffer(corpus.bytes("train"), dtype=np.uint8)
    model = build_model(recipe)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.95),
    )

    def schedule(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        frac = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = np.random.default_rng(recipe.seed)
    span = recipe.train_seq_len + 1
    started = time.perf_counter()
    bar = progress(range(recipe.steps), desc="pretraining stdlib-tiny", disable=None if show_progress else True)
    loss_value = float("nan")
    for step in bar:
        starts = rng.integers(0, train.size - span, size=recipe.batch_size)
        batch = torch.from_numpy(train[starts[:, None] + np.arange(span)[None, :]].astype(np.int64))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB_SIZE), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        if (step + 1) % 100 == 0 or step + 1 == recipe.steps:  # visible where the bar is not (no tty)
            log.info("pretraining stdlib-tiny: step %d/%d, loss %.3f nats/byte", step + 1, recipe.steps, loss_value)
    train_seconds = time.perf_counter() - started
    model.eval()
    test_ids = torch.frombuffer(bytearray(corpus.bytes("test")), dtype=torch.uint8).long()
    heldout = perplexity(model, test_ids, seq_len=recipe.train_seq_len, max_chunks=recipe.eval_chunks, batch_size=8)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    record = {
        "recipe": recipe,
        "final_train_loss": loss_value,
        "train_seconds": train_seconds,
        "train_tokens": recipe.steps * recipe.batch_size * recipe.train_seq_len,
        "heldout": heldout,
        "corpus": corpus.describe(),
    }
    write_run_record(out / "stdlib_tiny_record.json", config=recipe, metrics=record, seed=recipe.seed)
    log.info("stdlib-tiny: held-out perplexity %.3f per byte after %.0f s", heldout["perplexity"], train_seconds)
    return record


def stdlib_tiny_path(*, recipe: TinyRecipe | None = None, show_progress: bool = True) -> Path:
    """Directory of the cached ``stdlib-tiny`` model built by ``recipe`` (default: :class:`TinyRecipe`),
    pretraining it first if it is not cached."""
    target = cache_dir() / recipe_cache_name(recipe)
    if (target / "config.json").is_file() and (target / "stdlib_tiny_record.json").is_file():
        return target
    log.warning("stdlib-tiny is not cached at %s; pretraining it now (once; 7.5 minutes on 2 CPU cores)", target)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    pretrain(recipe or TinyRecipe(), staging, show_progress=show_progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # another process won the race; keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    else:
        os.replace(staging, target)
    return target


def load_model_and_tokenizer(name_or_path: str, *, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """``stdlib-tiny`` (built on first use) or any Hugging Face causal LM name/path.

    A local path that does not exist, a weights file that is truncated or garbage, or a pickled
    weights file holding code raises a one-line ``ValueError`` naming the path or file.
    """
    import pickle
    import zipfile

    from safetensors import SafetensorError

    from recon_prune.model_source import check_safetensors, resolve_model_source, weights_error

    path = str(stdlib_tiny_path()) if name_or_path == MODEL_NAME else resolve_model_source(name_or_path)
    local = Path(path).is_dir()
    if local:
        check_safetensors(Path(path))  # before transformers, whose error would not name the file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (pickle.UnpicklingError, SafetensorError, EOFError, zipfile.BadZipFile, RuntimeError) as exc:
        if not local or isinstance(exc, torch.OutOfMemoryError):  # only a file problem is reported as one
            raise
        raise weights_error(Path(path), exc) from exc
    record = Path(path) / "stdlib_tiny_record.json"
    if getattr(model.config, "train_seq_len", None) is None and record.is_file():  # cached before it was recorded
        from shin_common import read_json

        model.config.train_seq_len = int(read_json(record)["config"]["train_seq_len"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        detail = " ".join(str(exc).split())
        if local and any(Path(path).glob("tokenizer*")):
            raise ValueError(f"the tokenizer saved in {path!r} could not be loaded ({detail})") from exc
        raise ValueError(f"model {name_or_path!r} has no tokenizer saved with it ({detail})") from exc
    return model, tokenizer
