"""The model of ``train_effect`` and the attention it runs: :func:`tfp_kernels.varlen_attention` over the
``cu_seqlens`` of the packed batch, registered as a transformers attention function.

Why not transformers' own CPU attention: ``sdpa``/``eager`` find the segments from position ids that restart
at 0 and build a (T, T) mask over the whole flat batch; with pack attention the position ids restart at every
pack, so the two modes would go through different mask code, and the mask grows with the square of the batch.
:data:`ATTENTION` reads the segments from ``cu_seq_lens_q`` (what ``PackedBatch.to_hf_kwargs()`` passes, as
``DataCollatorWithFlattening`` does for flash-attention) in both modes: the condition's segments are exactly
what attention sees. transformers gives a registered function no mask (``attention_mask`` is None).
"""

from __future__ import annotations

import math

import torch

from tfp_kernels import varlen_attention

#: Name of the attention function registered with transformers by :func:`register_attention`.
ATTENTION = "tfp_packed"

#: Tiny Llama configurations (from scratch, byte tokenizer): hidden size, layers, heads, MLP width. "small"
#: (177k parameters with the byte tokenizer) is the default: on 2 CPU cores it learns the default run's tasks
#: within the time budget; "medium" (886k) learns too little in it.
TINY_CONFIGS = {
    "small": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 192},
    "medium": {
        "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 384,
    },
    "smoke": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
}


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A transformers attention function: causal attention inside each segment of ``kwargs["cu_seq_lens_q"]``.

    Args:
        module: the attention module (unused).
        query: (1, H, T, Dh); key, value: (1, H_kv, T, Dh): the flat packed batch (batch dimension 1).
        attention_mask: must be None (a mask would mean a padded batch, which this function does not read).
        dropout: must be 0 (the varlen kernels have no dropout).
        scaling: softmax scale (default ``1 / sqrt(Dh)``).
        kwargs: ``cu_seq_lens_q`` (S + 1,) int32 on the device of ``query`` and ``max_length_q`` (int), as
            ``PackedBatch.to_hf_kwargs()`` gives them; ``cu_seq_lens_k`` must be the same tensor or equal.

    Returns:
        ``(out, None)`` with ``out`` (1, T, H, Dh).

    Raises:
        ValueError: no ``cu_seq_lens_q``, an attention mask, a batch dimension other than 1, dropout.
    """
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        raise ValueError(
            f"attn_implementation={ATTENTION!r} needs the packed batch's segments: call the model with "
            "cu_seq_lens_q / max_length_q (PackedBatch.to_hf_kwargs())"
        )
    cu_k = kwargs.get("cu_seq_lens_k")
    if cu_k is not None and cu_k is not cu_seqlens and not torch.equal(cu_k, cu_seqlens):
        raise ValueError("cu_seq_lens_k differs from cu_seq_lens_q: only self-attention is supported")
    if attention_mask is not None:
        raise ValueError(f"attn_implementation={ATTENTION!r} takes no attention_mask (the segments come from "
                         "cu_seq_lens_q)")
    if query.shape[0] != 1:
        raise ValueError(f"the packed batch must have batch dimension 1 (flat [1, T]), got {query.shape[0]}")
    if dropout:
        raise ValueError(f"attention dropout {dropout} is not supported by {ATTENTION!r}")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scaling is None else scaling
    out = varlen_attention(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        cu_seqlens=cu_seqlens,
        max_seqlen=kwargs.get("max_length_q"),
        softmax_scale=scale,
        causal=True,
        validate=False,
    )
    return out.unsqueeze(0), None


def register_attention() -> str:
    """Register :func:`packed_attention` with transformers as :data:`ATTENTION`; returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, packed_attention)
    return ATTENTION


def tiny_llama(vocab_size: int, max_len: int, seed: int, size: str = "small", *, bos=1, eos=2, pad=0):
    """A randomly initialised ``LlamaForCausalLM`` (float32, CPU) of the size ``TINY_CONFIGS[size]``, with
    :data:`ATTENTION`; ``torch.manual_seed(seed)`` before the initialisation (the same weights for a seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    register_attention()
    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_len,
        num_key_value_heads=TINY_CONFIGS[size]["num_attention_heads"],
        tie_word_embeddings=True,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=False,
        **TINY_CONFIGS[size],
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(config, attn_implementation=ATTENTION)


def load_pretrained(path: str, seed: int, *, lora_rank: int = 0, dtype: str = "auto"):
    """A local causal LM (``AutoModelForCausalLM.from_pretrained(path, local_files_only=True)``) with
    :data:`ATTENTION`, optionally wrapped in LoRA adapters of rank ``lora_rank`` (``peft``; the adapters'
    initialisation follows ``torch.manual_seed(seed)``)."""
    from transformers import AutoModelForCausalLM

    register_attention()
    kwargs = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
    model = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, attn_implementation=ATTENTION, **kwargs
    )
    model.config.use_cache = False
    torch.manual_seed(seed)
    if lora_rank:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise SystemExit("--lora needs the 'peft' package (pip install peft)") from None
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora_rank, lora_alpha=2 * lora_rank, target_modules="all-linear", task_type="CAUSAL_LM"
            ),
        )
    return model


def count_parameters(model) -> dict:
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
