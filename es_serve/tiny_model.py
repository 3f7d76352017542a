"""A tiny random Llama with a real BPE tokenizer, built offline in about a second.

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


def build_tiny_llama(
    path: str | Path, seed: int = 0, layers: int = 2, hidden: int = 128, intermediate: int = 256
) -> Path:
    """Writes config, safetensors weights and tokenizer to `path`; returns it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path)
    config = LlamaConfig(
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
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Wider than the default init so that greedy outputs depend visibly on the weights.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 0.5)
    model.save_pretrained(str(path), safe_serialization=True)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path
