"""`es-serve train` on the user's own JSONL chat data with a TRL reward, and its bad-input messages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = '''
import json, os

def probe(prompts, completions, completion_ids, trainer_state, log_metric, **columns):
    """Writes down what it was handed; logs the mean completion length in tokens."""
    with open(os.environ["PROBE_OUT"], "a") as f:
        f.write(json.dumps({"prompts": prompts, "completions": completions, "ids": completion_ids,
                            "step": trainer_state.global_step, "columns": sorted(columns)}) + "\\n")
    log_metric("mean_ids", sum(len(ids) for ids in completion_ids) / len(completion_ids))
    return [float(len(set(c[0]["content"]))) for c in completions]
'''


def es_serve(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-data")
    return dict(
        os.environ,
        ES_SERVE_CACHE=str(root / "cache"),
        HF_DATASETS_CACHE=str(root / "datasets"),
        PROBE_OUT=str(root / "probe.jsonl"),
    )


def test_train_on_a_jsonl_chat_dataset_with_a_trl_reward(env, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    sets = [
        "model.name=tiny-llama",
        "engine.kind=dense",
        f"task.dataset={ROOT / 'launch/examples/sums-chat.jsonl'}",
        "task.system_prompt='Answer briefly.'",
        "task.prompts_per_step=2",
        "task.eval_prompts=2",
        f"reward.fn={probe}:probe,trl.rewards:think_format_reward",
        "es.population=4",
        "es.sigma=0.3",
        "generation.max_tokens=4",
        "train.steps=2",
        "train.eval_every=2",
    ]
    args = [x for s in sets for x in ("--set", s)]
    result = es_serve("train", *args, "--out", str(tmp_path / "run"), "--quiet", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [json.loads(line) for line in Path(env["PROBE_OUT"]).read_text().splitlines()]
    assert [s["step"] for s in seen] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 2]  # eval, 4 members x 2 steps, eval
    for s in seen:
        assert s["prompts"][0][0] == {"role": "system", "content": "Answer briefly."}
        assert s["prompts"][0][1]["role"] == "user" and s["prompts"][0][1]["content"].startswith("What is ")
        assert all(c == [{"role": "assistant", "content": c[0]["content"]}] for c in s["completions"])
        assert all(1 <= len(ids) <= 4 and all(isinstance(t, int) for t in ids) for ids in s["ids"])
        assert s["columns"] == ["log_extra", "solution"]  # the dataset column, and TRL's log_extra
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    for m in metrics[1:]:
        calls = [s for s in seen[1:9] if s["step"] == m["step"]]
        means = [sum(map(len, s["ids"])) / len(s["ids"]) for s in calls]
        assert m["mean_ids"] == pytest.approx(sum(means) / len(means))
        assert "reward/think_format_reward" in m and "reward/probe" in m
    assert metrics[0]["eval_mean_ids"] == pytest.approx(sum(map(len, seen[0]["ids"])) / 2)


@pytest.mark.parametrize(
    "sets,expected",
    [
        (["task.dataset=no/such/file.jsonl"], "task.dataset: no such file or directory: no/such/file.jsonl"),
        (["task.dataset=launch/examples/sums.jsonl", "task.prompt_column=question"], "its columns: prompt, answer"),
        (["task.dataset=launch/examples/sums.jsonl", "task.eval_prompts=64"], "would hold out all 64 rows"),
    ],
)
def test_bad_dataset_input_is_one_line_and_exit_2(sets, expected, env, tmp_path):
    sets = ["model.name=tiny-llama", "reward.fn=numeric", *sets]
    args = [x for s in sets for x in ("--set", s)]
    result = es_serve("train", *args, "--out", str(tmp_path / "run"), env=env)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    # `python -m launch.cli` adds runpy's own warning line; the error itself is one line.
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("<frozen runpy>")]
    assert lines == [line for line in lines if line.startswith("es-serve: error: ")] and len(lines) == 1, lines
