"""A reward and a task for loop tests: cheap, deterministic, and varying across members."""

from dataclasses import dataclass

import torch


@dataclass
class Scored:
    matrix: torch.Tensor
    valid: torch.Tensor
    per_reward: dict


class CountReward:
    """Counts a character in each completion; `fail_on_call=k` raises on the k-th call."""

    def __init__(self, fail_on_call=None):
        self.calls, self.fail_on_call = 0, fail_on_call

    def score(self, prompts, completions, columns, **extra):
        self.calls += 1
        if self.fail_on_call == self.calls:
            raise RuntimeError("reward server went away")
        m = torch.tensor([[float(c.count("e")) for c in row] for row in completions], dtype=torch.float64)
        return Scored(m, torch.ones_like(m, dtype=torch.bool), {"count": m})


class Task:
    default_reward = "count"

    def sample(self, n, step):
        return [{"prompt": f"What is {step} + {j}?", "answer": str(step + j)} for j in range(n)]

    def eval_rows(self, n):
        return [{"prompt": f"eval {j} plus", "answer": str(j)} for j in range(n)]
