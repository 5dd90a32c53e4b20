"""Tiny random causal LMs built from configs (no downloads) for the recon-prune tests."""

from __future__ import annotations

import torch
import transformers

VOCAB = 96


def make_model(kind: str, *, seed: int = 0, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        return transformers.LlamaForCausalLM(config).eval()
    if kind == "mistral-sliding":  # every layer sees only the last 4 tokens
        config = transformers.MistralConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            sliding_window=4,
        )
        return transformers.MistralForCausalLM(config).eval()
    if kind == "mistral":
        config = transformers.MistralConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        return transformers.MistralForCausalLM(config).eval()
    if kind == "qwen2-sliding":  # layers from max_window_layers on see only the last 4 tokens
        config = transformers.Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
        )
        return transformers.Qwen2ForCausalLM(config).eval()
    if kind == "gemma2":  # alternating sliding-window (4 tokens) and full attention layers
        config = transformers.Gemma2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            sliding_window=4,
        )
        return transformers.Gemma2ForCausalLM(config).eval()
    if kind == "mixtral":  # transformers 5 stores the experts as fused 3-d parameters
        config = transformers.MixtralConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            num_local_experts=4,
            num_experts_per_tok=2,
        )
        return transformers.MixtralForCausalLM(config).eval()
    if kind == "qwen2-moe":  # fused experts, a shared expert and its one-output gate
        config = transformers.Qwen2MoeConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            num_experts=4,
            num_experts_per_tok=2,
        )
        return transformers.Qwen2MoeForCausalLM(config).eval()
    if kind == "gpt-oss":  # experts stored transposed, (experts, in, out), with biases and a clamped gate
        config = transformers.GptOssConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
        )
        return transformers.GptOssForCausalLM(config).eval()
    if kind == "qwen2":
        config = transformers.Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        return transformers.Qwen2ForCausalLM(config).eval()
    if kind == "opt":
        config = transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
        return transformers.OPTForCausalLM(config).eval()
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=layers,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=1,
        )
        return transformers.GPT2LMHeadModel(config).eval()
    raise ValueError(kind)


def byte_llama(*, layers: int = 2, context: int = 64) -> torch.nn.Module:
    """A tiny random Llama over recon-prune's byte vocabulary plus EOS (id 256), built from a config."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=257,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        eos_token_id=256,
        pad_token_id=256,
        bos_token_id=None,
    )
    return transformers.LlamaForCausalLM(config).eval()


def save_byte_llama(path, *, layers: int = 2):
    """:func:`byte_llama` with recon-prune's byte-level tokenizer, saved as a model directory."""
    from recon_prune.tiny_model import byte_tokenizer

    byte_llama(layers=layers).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
