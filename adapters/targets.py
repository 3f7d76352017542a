"""Which weight matrices ES perturbs, named the way both transformers and vLLM can find them.

Module names are those of the checkpoint. Most decoder checkpoints (Llama, Mistral, Qwen2/3, Gemma)
store q/k/v and gate/up as separate matrices; Phi-3 stores them fused (`qkv_proj`, `gate_up_proj`),
and vLLM serves LoRA on the fused matrix there. So on such a checkpoint the split names resolve to
the fused one: `q_proj, k_proj, v_proj` train `qkv_proj` (one rank-r perturbation of the fused
matrix, one noise draw), `gate_proj, up_proj` train `gate_up_proj`. The fused names may be given
directly too. Naming only part of a fused matrix is refused: its rows share one adapter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the configuration imports this module without torch
    import torch

# Every linear weight of the decoder blocks; embeddings, lm_head, norms and biases stay frozen as
# in the official LLM runs (they are shared by all tokens and make the noise far less local).
DEFAULT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Matrices some checkpoints store fused, and the split names they stand for.
FUSED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

_PARAM = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.weight$")


@dataclass(frozen=True)
class Target:
    """One perturbed matrix: W has shape (out, in) and y = x W^T."""

    layer: int
    module: str
    out_features: int
    in_features: int
    param: str  # the parameter name in the Hugging Face state dict

    @property
    def peft_prefix(self) -> str:
        return f"base_model.model.{self.param[: -len('.weight')]}"


def resolve_modules(requested: Iterable[str], available: Iterable[str]) -> tuple[str, ...]:
    """The checkpoint's module names for `requested`, in order, split names mapped to fused ones."""
    requested, available = tuple(requested), set(available)
    if not requested:
        raise ValueError("no target modules given: name at least one, e.g. 'q_proj'")
    resolved: list[str] = []
    for name in requested:
        fused = next((f for f, parts in FUSED_MODULES.items() if name in parts), None)
        if name not in available and fused in available:
            parts = FUSED_MODULES[fused]
            missing = [p for p in parts if p not in requested]
            if missing:
                raise ValueError(
                    f"es.modules names {name} but not {', '.join(missing)}: this checkpoint stores "
                    f"{', '.join(parts)} fused as {fused}, which is trained as one matrix; name all of "
                    f"{', '.join(parts)} or {fused}"
                )
            name = fused
        if name not in resolved:
            resolved.append(name)
    unknown = [m for m in resolved if m not in available]
    if unknown:
        raise ValueError(
            f"es.modules {unknown} not found in the model's decoder layers; this model has "
            f"{', '.join(sorted(available))}"
        )
    return tuple(resolved)


def find_targets(
    params: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    modules: Iterable[str] = DEFAULT_MODULES,
) -> list[Target]:
    """The perturbed matrices of a decoder model, ordered by layer then by the order of `modules`."""
    items = list(params.items() if isinstance(params, Mapping) else params)
    matrices = {}
    for name, tensor in items:
        match = _PARAM.match(name)
        if match:
            matrices[name] = (int(match.group(1)), match.group(3), tensor)
    modules = resolve_modules(modules, {module for _, module, _ in matrices.values()})
    found: dict[tuple[int, str], Target] = {}
    for name, (layer, module, tensor) in matrices.items():
        if module not in modules:
            continue
        if tensor.dim() != 2:
            raise ValueError(f"target {name} is not a matrix (shape {tuple(tensor.shape)})")
        found[(layer, module)] = Target(layer, module, tensor.shape[0], tensor.shape[1], name)
    order = {m: i for i, m in enumerate(modules)}
    return sorted(found.values(), key=lambda t: (t.layer, order[t.module]))
