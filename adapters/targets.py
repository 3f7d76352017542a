"""Which weight matrices ES perturbs, named the way both transformers and vLLM can find them."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

# Every linear weight of the decoder blocks; embeddings, lm_head, norms and biases stay frozen as
# in the official LLM runs (they are shared by all tokens and make the noise far less local).
DEFAULT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

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


def find_targets(
    params: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    modules: Iterable[str] = DEFAULT_MODULES,
) -> list[Target]:
    """The perturbed matrices of a decoder model, ordered by layer then by the order of `modules`."""
    modules = tuple(modules)
    if not modules:
        raise ValueError("no target modules given: name at least one, e.g. 'q_proj'")
    items = list(params.items() if isinstance(params, Mapping) else params)
    found: dict[tuple[int, str], Target] = {}
    for name, tensor in items:
        match = _PARAM.match(name)
        if not match or match.group(3) not in modules:
            continue
        if tensor.dim() != 2:
            raise ValueError(f"target {name} is not a matrix (shape {tuple(tensor.shape)})")
        layer, module = int(match.group(1)), match.group(3)
        found[(layer, module)] = Target(layer, module, tensor.shape[0], tensor.shape[1], name)
    seen = {module for _, module in found}
    missing = [m for m in modules if m not in seen]
    if missing:
        available = sorted({n.split(".")[-2] for n, _ in items if n.endswith(".weight")})
        raise ValueError(f"target modules {missing} not found in the model; it has {available}")
    order = {m: i for i, m in enumerate(modules)}
    return sorted(found.values(), key=lambda t: (t.layer, order[t.module]))
