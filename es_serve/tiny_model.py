"""Tiny random decoder models (Llama, Mistral, Qwen2, Qwen3, Gemma 2/3, Phi-3) with a real BPE tokenizer.

Tests and quick demos need a model that vLLM and transformers both load like any Hugging Face
checkpoint, without a model hub. Head size 64 because vLLM's CPU attention kernels support only a
fixed list of head sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS_WORDS = (
    "the a one two three four five six seven eight nine ten plus minus times equals answer is what "
    "how many numbers target use each once result question think step first then so total sum "
    "difference product countdown reach make with and of to in 0 1 2 3 4 5 6 7 8 9 + - * / = ( ) ? ."
).split()


def _corpus(lines: int = 400) -> list[str]:
    import random

    rng = random.Random(0)
    out = []
    for _ in range(lines):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        words = " ".join(rng.choice(CORPUS_WORDS) for _ in range(12))
        out.append(f"What is {a} + {b}? The answer is {a + b}. {words}")
    return out


def build_tokenizer(path: str | Path, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(str(path))
    return fast


# Architectures with a tiny builder: name -> (transformers config class, class name in config.json, extra
# config fields). Each carries the trait that makes it differ from Llama for es-serve: Qwen2's q/k/v
# biases, Qwen3's and Gemma 3's q/k norms, Gemma 2's logit soft-capping and (1 + w) norms, Phi-3's
# checkpoint-fused qkv_proj and gate_up_proj.
TINY_ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"query_pre_attn_scalar": 64, "sliding_window": 64, "attn_logit_softcapping": 50.0},
    ),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"query_pre_attn_scalar": 64, "sliding_window": 64}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"original_max_position_embeddings": 512}),
}
# Gemma multiplies embeddings by sqrt(hidden): with the others' scale the embedding would drown the
# blocks' contributions and the tied head would just repeat the input token.
EMBED_STD = {"gemma2": 0.05, "gemma3": 0.05}


def build_tiny_model(
    path: str | Path,
    architecture: str = "llama",
    seed: int = 0,
    layers: int = 2,
    hidden: int = 128,
    intermediate: int = 256,
) -> Path:
    """Writes config, safetensors weights and tokenizer of a tiny random `architecture` to `path`."""
    import torch
    import transformers

    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"no tiny builder for {architecture!r}; choose one of {', '.join(TINY_ARCHITECTURES)}")
    config_class, class_name, extra = TINY_ARCHITECTURES[architecture]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path)
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    fields.update(extra)
    config = getattr(transformers, config_class)(**fields)
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(config)
    # Wider than the default init so that greedy outputs depend visibly on the weights; biases and
    # norm weights random too, so that a reload that lost or reset one would change the outputs (the
    # Llama keeps its unit norms: tests and recorded runs depend on its exact weights).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08 if "embed" not in name else EMBED_STD.get(architecture, 0.5))
            elif architecture == "llama":
                continue
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            else:
                p.add_(torch.randn_like(p), alpha=0.1)
    model.save_pretrained(str(path), safe_serialization=True)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = [class_name]
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def build_tiny_llama(
    path: str | Path, seed: int = 0, layers: int = 2, hidden: int = 128, intermediate: int = 256
) -> Path:
    """The tiny Llama of the tests and of `model.name = tiny-llama`."""
    return build_tiny_model(path, "llama", seed, layers, hidden, intermediate)
