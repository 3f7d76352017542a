"""What `es-serve compare` measures every method with: one held-out evaluator and a pausable training clock.

The held-out rows, their rendering and their scoring are es-serve's own (a `Trainer`'s `render` and
`score`), and every method's weights are evaluated by the same code: a float32 transformers model
answering greedily. So the curves of es-serve and GRPO start from the same per-prompt scores and
differ only by what training did, not by an engine's dtype or kernels.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch

from es_serve.types import Completion


class Stopwatch:
    """Wall-clock training time with evaluation paused out of it."""

    def __init__(self):
        self._started: float | None = None
        self._total = 0.0

    @property
    def running(self) -> bool:
        return self._started is not None

    def start(self) -> None:
        if self._started is None:
            self._started = time.perf_counter()

    def stop(self) -> None:
        if self._started is not None:
            self._total += time.perf_counter() - self._started
            self._started = None

    def seconds(self) -> float:
        running = time.perf_counter() - self._started if self._started is not None else 0.0
        return self._total + running

    @contextlib.contextmanager
    def paused(self):
        was_running = self.running
        self.stop()
        try:
            yield
        finally:
            if was_running:
                self.start()


class HeldOut:
    """The rows es-serve's Trainer evaluates (`task.eval_prompts` of them), answered greedily and scored.

    `scorer` is an es_serve Trainer (its engine is not used): its `render` gives the exact text es-serve
    generates from and its `score` calls the run's reward the way training does.
    """

    def __init__(self, scorer, model_dir: str | Path, max_tokens: int, batch: int = 32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.scorer, self.max_tokens, self.batch = scorer, max_tokens, batch
        self.tokenizer = tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        # The evaluator's own float32 copy: a method's weights are copied in, so no method is evaluated
        # through its training dtype, autocast or engine.
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.model.eval()
        self.rows = scorer.task.eval_rows(scorer.config.task.eval_prompts)
        self.texts = [scorer.render(r) for r in self.rows]
        self.ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in self.texts]
        # Prompts of one length go together, so no prompt is ever padded and a prompt's answer does not
        # depend on which others share its batch.
        order = sorted(range(len(self.ids)), key=lambda i: (len(self.ids[i]), i))
        self.batches: list[list[int]] = []
        for i in order:
            last = self.batches[-1] if self.batches else None
            if last and len(self.ids[last[0]]) == len(self.ids[i]) and len(last) < batch:
                last.append(i)
            else:
                self.batches.append([i])

    def _eos(self, model) -> list[int]:
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        return eos

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        """Copies a method's current weights (any subset of the model's tensors, by name) into the evaluator."""
        own = self.model.state_dict()
        unknown = sorted(set(weights) - set(own))
        if unknown:
            raise KeyError(f"weights the evaluator's model does not have: {', '.join(unknown[:5])}")
        with torch.no_grad():
            for name, value in weights.items():
                own[name].copy_(value.detach().to(torch.float32))

    @torch.no_grad()
    def answer(self) -> list[Completion]:
        model = self.model
        eos = self._eos(model)
        out: list[Completion | None] = [None] * len(self.ids)
        for group in self.batches:
            input_ids = torch.tensor([self.ids[i] for i in group], device=model.device)
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=self.max_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=eos,
                pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos[0],
            )[:, input_ids.shape[1] :].tolist()
            for i, tokens in zip(group, generated, strict=True):
                # A finished sequence is padded while its batch goes on; its answer ends at its first EOS.
                end = next((k + 1 for k, t in enumerate(tokens) if t in eos), len(tokens))
                tokens = tokens[:end]
                out[i] = Completion(self.tokenizer.decode(tokens, skip_special_tokens=True), tokens)
        return out

    def evaluate(self, weights: dict[str, torch.Tensor], step: int) -> dict:
        """Held-out scores of `weights` (name -> tensor, e.g. a model's state_dict) at training step `step`."""
        started = time.perf_counter()
        self.load(weights)
        completions = self.answer()
        scored, _ = self.scorer.score(self.rows, self.texts, [completions], step)
        per_prompt = [None if math.isnan(x) else float(x) for x in scored.matrix[0].tolist()]
        values = torch.tensor([x for x in per_prompt if x is not None], dtype=torch.float64)
        n = int(values.numel())
        return {
            "mean": float(values.mean()) if n else None,
            "stderr": float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else None,
            "per_prompt": per_prompt,
            "sample": completions[0].text[:200] if completions else "",
            "seconds": time.perf_counter() - started,
        }


def paired(first: list, last: list) -> dict | None:
    """Mean per-prompt change from `first` to `last` with its paired standard error."""
    pairs = [b - a for a, b in zip(first, last, strict=True) if a is not None and b is not None]
    if len(pairs) < 2:
        return None
    d = torch.tensor(pairs, dtype=torch.float64)
    return {
        "gain": float(d.mean()),
        "paired_stderr": float(d.std(unbiased=True) / math.sqrt(len(pairs))),
        "better": int((d > 0).sum()),
        "worse": int((d < 0).sum()),
        "prompts": len(pairs),
    }


def changed_from_checkpoint(model_dir: str | Path, current: dict[str, torch.Tensor]) -> dict:
    """How far `current` (name -> tensor) moved from the weights stored in the model directory."""
    from safetensors import safe_open

    moved, largest, compared = 0, 0.0, 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                if name not in current:
                    continue
                diff = (current[name].detach().to(torch.float32) - f.get_tensor(name).to(torch.float32)).abs().max()
                compared += 1
                moved += int(diff > 0)
                largest = max(largest, float(diff))
    return {"tensors_compared": compared, "tensors_changed": moved, "max_abs_change": largest}


def peak_rss_bytes() -> int:
    import resource

    # Linux reports kilobytes.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
