"""TRL's reward functions, unchanged, on a chat dataset through the Trainer; verl's compute_score files.

The engine is scripted (each member answers every prompt with a fixed text and fixed token ids), so
every reward value below is worked out by hand from TRL's documented formulas.
"""

import json
import math

import pytest
import torch

from es_serve.config import load_config
from es_serve.trainer import Trainer
from es_serve.types import Completion, PopulationResult
from rewards import load_reward, task_from_config

trl_rewards = pytest.importorskip("trl.rewards")

# Member 0 reasons in <think> tags and boxes 1/3 in 5 distinct tokens; member 1 boxes 7 in 8 repeated tokens.
SCRIPT = [
    ("<think>ok</think>The answer is \\boxed{\\frac{1}{3}}", [1, 2, 3, 4, 5]),
    ("\\boxed{7}", [9] * 8),
]
SOLUTIONS = {0: "\\frac{1}{3}", 1: "7", 2: ""}  # id 2: a gold answer math-verify cannot parse


class ChatTokenizer:
    chat_template = "role tags"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class ScriptedEngine:
    tokenizer = ChatTokenizer()
    targets = {}

    def __init__(self):
        self.updates = []

    def generate_population(self, gen, prompts, sampling):
        rows = [[Completion(*SCRIPT[i]) for _ in prompts] for i in range(gen.population.size)]
        return PopulationResult(rows, seconds=1.0, tokens=sum(len(c.token_ids) for r in rows for c in r))

    def generate(self, prompts, sampling):
        return [Completion(*SCRIPT[0]) for _ in prompts]

    def apply_update(self, gen, shaped, lr, scaling, optimizer=None):
        self.updates.append(shaped)

    def state_dict(self):
        return {"w": torch.zeros(1)}

    def optimizer_state(self):
        return {}


SEEN = []


def probe(prompts, completions, completion_ids, trainer_state, log_metric, log_extra, **columns):
    """Records what a TRL-style reward is handed, and logs as TRL's rewards do."""
    SEEN.append(
        {
            "prompts": prompts,
            "completions": completions,
            "completion_ids": completion_ids,
            "step": trainer_state.global_step,
            "max_steps": trainer_state.max_steps,
            "columns": sorted(columns),
        }
    )
    log_metric("probe_tokens", sum(len(ids) for ids in completion_ids) / len(completion_ids))
    log_extra("probe_first_word", [c[0]["content"].split()[0] for c in completions])
    return [0.0] * len(completions)


@pytest.fixture
def chat_data(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [
        {"prompt": [{"role": "user", "content": f"Problem {i}"}], "solution": SOLUTIONS[i], "id": i} for i in range(3)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    factories = tmp_path / "trl_factories.py"
    factories.write_text(
        "from trl.rewards import get_cosine_scaled_reward, get_repetition_penalty_reward, "
        "get_soft_overlong_punishment\n"
        "cosine = get_cosine_scaled_reward(max_len=10)\n"
        "repetition = get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0)\n"
        "overlong = get_soft_overlong_punishment(max_completion_len=6, soft_punish_cache=2)\n"
    )
    return path, factories


def _config(path, **extra):
    sets = [
        f"task.dataset={json.dumps(str(path))}",
        f"task.eval_dataset={json.dumps(str(path))}",
        "task.eval_prompts=3",
        "task.prompts_per_step=3",
        "task.system_prompt='Think first.'",
        "es.population=2",
        "train.steps=2",
        "train.eval_every=2",
        "model.name=tiny-llama",
    ]
    return load_config(None, sets + [f"{k}={v}" for k, v in extra.items()])


def _cosine(correct: bool, length: int, max_len: int = 10) -> float:
    lo, hi = (0.5, 1.0) if correct else (-0.5, -1.0)
    return lo + 0.5 * (hi - lo) * (1 + math.cos(min(length / max_len, 1.0) * math.pi))


def _by_hand(member: int, row_id: int) -> dict:
    """Each TRL reward's value for one member's completion of one row, from TRL's docstrings."""
    boxed = {0: 0, 1: 1}[member]  # member 0 boxes 1/3 (row 0's answer), member 1 boxes 7 (row 1's)
    length = len(SCRIPT[member][1])
    parseable = row_id != 2
    correct = parseable and boxed == row_id
    return {
        "think_format_reward": 1.0 if member == 0 else 0.0,
        "accuracy_reward": float(correct) if parseable else None,
        # Member 1 never closes a </think>: incomplete reasoning scores 0 before the gold is looked at.
        "reasoning_accuracy_reward": (float(correct) if parseable else None) if member == 0 else 0.0,
        "cosine_scaled_reward": _cosine(correct, length) if parseable else None,
        "repetition_penalty_reward": 0.0 if member == 0 else -(1 - 1 / 7),  # 7 bigrams, 1 distinct
        "soft_overlong_punishment_reward": (4 - 5) / 2 if member == 0 else -1.0,  # 5 in the soft band; 8 > 6
    }


SPECS = [
    "trl.rewards:think_format_reward",
    "trl.rewards:accuracy_reward",
    "trl.rewards:reasoning_accuracy_reward",
    "{f}:cosine",
    "{f}:repetition",
    "{f}:overlong",
]


def test_every_trl_reward_runs_unchanged_on_a_chat_dataset(chat_data, tmp_path):
    exported = {n for n in trl_rewards.__all__ if callable(getattr(trl_rewards, n))}
    assert exported == {
        "think_format_reward",
        "accuracy_reward",
        "reasoning_accuracy_reward",
        "get_cosine_scaled_reward",
        "get_repetition_penalty_reward",
        "get_soft_overlong_punishment",
    }, "trl.rewards exports a function this test does not cover"
    path, factories = chat_data
    config = _config(path)
    reward = load_reward([s.format(f=factories) for s in SPECS] + [probe], weights=[1.0] * 7)
    trainer = Trainer(config, tmp_path / "run", ScriptedEngine(), task_from_config(config.task), reward)
    trainer.start(resume=False)
    rows = trainer.task.sample(3, 1)
    prompts = [trainer.render(r) for r in rows]
    assert prompts[0] == f"<system>Think first.<user>Problem {rows[0]['id']}<assistant>"
    population = trainer.engine.generate_population(trainer.generation(1), prompts, trainer.sampling)
    SEEN.clear()
    scored, (logged, extra) = trainer.score(rows, prompts, population.completions, 1)

    for name, expected_of in _by_hand_table(rows).items():
        got = scored.per_reward[name]
        for member in range(2):
            for p, row in enumerate(rows):
                want = expected_of[member][p]
                if want is None:
                    assert torch.isnan(got[member, p]), (name, member, row["id"])
                else:
                    assert got[member, p].item() == pytest.approx(want, abs=1e-12), (name, member, row["id"])

    # TRL's arguments, as GRPOTrainer passes them for conversational prompts.
    member0 = SEEN[0]
    assert member0["prompts"][0] == [
        {"role": "system", "content": "Think first."},
        {"role": "user", "content": f"Problem {rows[0]['id']}"},
    ]
    assert member0["completions"][0] == [{"role": "assistant", "content": SCRIPT[0][0]}]
    assert [s["completion_ids"] for s in SEEN] == [[SCRIPT[0][1]] * 3, [SCRIPT[1][1]] * 3]
    assert member0["step"] == 1 and member0["max_steps"] == 2
    # The state carries every field of the transformers TrainerState that TRL passes.
    import dataclasses

    from transformers import TrainerState

    from es_serve.types import TrainerState as OurState

    assert {f.name for f in dataclasses.fields(TrainerState)} <= {f.name for f in dataclasses.fields(OurState)}
    assert member0["columns"] == ["id", "solution"]
    # log_metric: the mean over the step's calls; log_extra: TRL's completions-table columns.
    assert logged["probe_tokens"] == pytest.approx((5 + 8) / 2)
    assert extra["probe_first_word"] == ["<think>ok</think>The"] * 3 + ["\\boxed{7}"] * 3
    assert extra["solution"] == [r["solution"] for r in rows] * 4  # accuracy and reasoning_accuracy, 2 members


def _by_hand_table(rows):
    table = {}
    for member in range(2):
        for p, row in enumerate(rows):
            for name, value in _by_hand(member, row["id"]).items():
                table.setdefault(name, [[None] * len(rows) for _ in range(2)])[member][p] = value
    return table


def test_what_rewards_log_lands_in_metrics_jsonl(chat_data, tmp_path):
    path, _ = chat_data
    config = _config(path)
    trainer = Trainer(config, tmp_path / "run", ScriptedEngine(), task_from_config(config.task), load_reward(probe))
    SEEN.clear()
    metrics = trainer.train()
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert [s["step"] for s in SEEN] == [0, 1, 1, 2, 2, 2]  # eval at 0; two members per step; eval at 2
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["probe_tokens"] == pytest.approx(6.5)
    assert lines[1]["log_extra"]["probe_first_word"] == ["<think>ok</think>The"] * 3 + ["\\boxed{7}"] * 3
    assert lines[0]["eval_probe_tokens"] == lines[2]["eval_probe_tokens"] == 5.0  # eval: member 0's script
    assert lines[2]["eval_log_extra"]["probe_first_word"] == ["<think>ok</think>The"] * 3


def test_builtin_tasks_keep_giving_plain_strings(tmp_path):
    config = load_config(None, ["es.population=2", "task.prompts_per_step=2", "train.steps=1"])
    seen = []

    def old_style(prompts, completions, **columns):
        seen.append((prompts, completions, sorted(columns)))
        return [float(len(c)) for c in completions]

    trainer = Trainer(config, tmp_path / "run", ScriptedEngine(), task_from_config(config.task), load_reward(old_style))
    rows = trainer.task.sample(2, 1)
    prompts = [trainer.render(r) for r in rows]
    population = trainer.engine.generate_population(trainer.generation(1), prompts, trainer.sampling)
    scored, _ = trainer.score(rows, prompts, population.completions, 1)
    got_prompts, got_completions, columns = seen[0]
    assert got_prompts == prompts and all(isinstance(p, str) for p in got_prompts)
    assert got_completions == [SCRIPT[0][0]] * 2
    assert "completion_ids" in columns and "messages" not in columns and "answer" in columns
    assert scored.matrix[1].tolist() == [float(len(SCRIPT[1][0]))] * 2


def test_builtin_rewards_read_text_on_chat_data(chat_data, tmp_path):
    path, _ = chat_data
    config = _config(path)
    trainer = Trainer(
        config, tmp_path / "run", ScriptedEngine(), task_from_config(config.task), load_reward("format_answer_tag")
    )
    rows = trainer.task.sample(3, 1)
    prompts = [trainer.render(r) for r in rows]
    population = trainer.engine.generate_population(trainer.generation(1), prompts, trainer.sampling)
    scored, _ = trainer.score(rows, prompts, population.completions, 1)
    assert scored.matrix.tolist() == [[0.0] * 3, [0.0] * 3]  # neither script has an <answer> tag


VERL_FILE = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    assert data_source == "local/sums" and extra_info["split"] == "train", (data_source, extra_info)
    ok = solution_str.strip() == "\\\\boxed{" + ground_truth + "}"
    return {"score": 1.0 if ok else 0.0, "length": float(len(solution_str))}
"""


def test_a_verl_compute_score_file_works_through_the_verl_prefix(tmp_path):
    data = tmp_path / "verl.jsonl"
    rows = [
        {
            "data_source": "local/sums",
            "prompt": [{"role": "user", "content": f"{i} + 4?"}],
            "reward_model": {"style": "rule", "ground_truth": str(i + 4)},
            "extra_info": {"split": "train", "index": i},
        }
        for i in range(4)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "score.py").write_text(VERL_FILE)
    config = load_config(
        None,
        [
            f"task.dataset={json.dumps(str(data))}",
            "task.eval_prompts=1",
            "task.prompts_per_step=3",
            "es.population=2",
        ],
    )
    reward = load_reward(f"verl:{tmp_path / 'score.py'}")
    trainer = Trainer(config, tmp_path / "run", ScriptedEngine(), task_from_config(config.task), reward)
    rows = trainer.task.sample(3, 1)
    prompts = [trainer.render(r) for r in rows]
    population = trainer.engine.generate_population(trainer.generation(1), prompts, trainer.sampling)
    scored, (logged, _) = trainer.score(rows, prompts, population.completions, 1)
    # Only member 1 boxes a number, 7, which is row 3's answer.
    expected = [[0.0] * 3, [1.0 if r["reward_model"]["ground_truth"] == "7" else 0.0 for r in rows]]
    assert scored.matrix.tolist() == expected
    assert logged["length"] == pytest.approx((len(SCRIPT[0][0]) + len(SCRIPT[1][0])) / 2)
    with pytest.raises(Exception, match="refused"):
        load_reward(f"verl:{tmp_path / 'score.py'}", reward_dir=tmp_path / "elsewhere")


def test_per_sample_rewards_get_the_same_forms_one_sample_at_a_time():
    from rewards import FunctionReward

    seen = []

    def one(prompt, completion, completion_ids, answer):
        seen.append((prompt, completion, completion_ids, answer))
        return float(completion[0]["content"] == answer)

    chat = [[{"role": "user", "content": "1 + 1?"}], [{"role": "user", "content": "2 + 2?"}]]
    result = FunctionReward(one).score(
        chat, [["2", "5"], ["3", "4"]], {"answer": ["2", "4"]}, completion_ids=[[[7], [8]], [[9], [10]]]
    )
    assert result.matrix.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert seen[1] == (chat[1], [{"role": "assistant", "content": "5"}], [8], "4")
    text = FunctionReward(lambda completion, **_: float(completion == "4"), text_only=True)
    assert text.score(chat, [["2", "5"], ["3", "4"]]).matrix.tolist() == [[0.0, 0.0], [0.0, 1.0]]


def test_plain_string_datasets_reach_the_model_as_a_chat_turn_and_rewards_as_strings(tmp_path):
    data = tmp_path / "plain.csv"
    data.write_text("question,answer\n" + "".join(f"{i} + 1?,{i + 1}\n" for i in range(5)))
    config = load_config(
        None,
        [
            f"task.dataset={json.dumps(str(data))}",
            "task.prompt_column=question",
            "task.system_prompt='Be brief.'",
            "task.eval_prompts=1",
            "task.prompts_per_step=2",
            "es.population=2",
        ],
    )
    seen = []

    def reward(prompts, completions, answer, **_):
        seen.append((prompts, completions, answer))
        return [0.0] * len(prompts)

    trainer = Trainer(config, tmp_path / "run", ScriptedEngine(), task_from_config(config.task), load_reward(reward))
    rows = trainer.task.sample(2, 1)
    prompts = [trainer.render(r) for r in rows]
    assert prompts == [f"<system>Be brief.<user>{r['prompt']}<assistant>" for r in rows]
    population = trainer.engine.generate_population(trainer.generation(1), prompts, trainer.sampling)
    trainer.score(rows, prompts, population.completions, 1)
    assert seen[0] == (prompts, [SCRIPT[0][0]] * 2, [r["answer"] for r in rows])
