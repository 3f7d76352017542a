"""`es-serve compare` end to end on a tiny model: es-serve and one GRPO learning rate under a budget of seconds.

The figures in the JSON are checked against what the runs did and against references built here
without the code under test: the held-out prompts rendered from the task and the tokenizer's chat
template, the first evaluation recomputed with plain transformers greedy decoding and the reward
written below, the gains recomputed from the per-prompt scores.
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from es_serve.engines.sizing import resolve_dtype

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

EVAL_PROMPTS, MAX_TOKENS, POPULATION, PROMPTS_PER_STEP = 12, 6, 4, 2
BUDGET_MINUTES, EVAL_EVERY_MINUTES = 0.1, 0.05
REWARD = """
def distinct_characters(prompts, completions, **columns):
    return [float(len(set(c))) for c in completions]
"""


def _distinct_characters(text: str) -> float:
    return float(len(set(text)))


@pytest.fixture(scope="module")
def unsure_model(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with its (tied) embedding scaled down, so its next-token distribution is broad:
    sampled completions differ and GRPO's groups get rewards that differ."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("unsure-llama")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    weights = load_file(str(path / "model.safetensors"))
    weights = {k: v * 0.1 if "embed" in k else v for k, v in weights.items()}
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _command(*args):
    return [sys.executable, "-m", "launch.cli", "compare", *args]


@pytest.fixture(scope="module")
def compared(unsure_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    (tmp / "varied.py").write_text(REWARD)
    out = tmp / "compare_arithmetic.json"
    sets = [
        f"model.name={unsure_model}",
        f"task.eval_prompts={EVAL_PROMPTS}",
        f"generation.max_tokens={MAX_TOKENS}",
        f"es.population={POPULATION}",
        f"task.prompts_per_step={PROMPTS_PER_STEP}",
        "es.sigma=0.05",
        "es.lr=0.05",
        # More steps than the budget allows, so es-serve's run ends at the budget, as GRPO's does.
        "train.steps=100000",
        "engine.memory_fraction=0.15",
        f"reward.fn={tmp / 'varied.py'}:distinct_characters",
    ]
    cmd = _command(*(a for s in sets for a in ("--set", s)))
    cmd += ["--minutes", str(BUDGET_MINUTES), "--eval-every-minutes", str(EVAL_EVERY_MINUTES)]
    cmd += ["--grpo-lrs", "1e-4", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), out, unsure_model


def test_both_methods_evaluate_the_same_rows_from_the_same_start(compared):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rewards import get_task

    data, _, model_dir = compared
    es, grpo = data["runs"]
    assert (es["method"], grpo["method"]) == ("es-serve", "grpo")
    # The held-out rows es-serve's Trainer evaluates: the task's first held-out rows through the chat template.
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rows = get_task("arithmetic", seed=0).eval_rows(EVAL_PROMPTS)
    expected = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        for r in rows
    ]
    assert es["eval_prompts"] == grpo["eval_prompts"] == expected
    # Before training both runs hold the base model, so their first evaluations agree prompt by prompt, and
    # with plain greedy decoding of each prompt alone scored by the reward above.
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    reference = []
    for text in expected:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False)
        reference.append(_distinct_characters(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)))
    assert es["evals"][0]["per_prompt"] == grpo["evals"][0]["per_prompt"] == reference
    assert es["evals"][0]["mean"] == pytest.approx(sum(reference) / len(reference))
    # The prompts vary in what the base model scores, so the held-out mean has a real standard error.
    sd = torch.tensor(reference, dtype=torch.float64).std(unbiased=True).item()
    assert es["evals"][0]["stderr"] == pytest.approx(sd / math.sqrt(EVAL_PROMPTS)) and sd > 0
    # GRPO got es-serve's prompt tokens (TRL rendered the same chat template).
    assert grpo["settings"]["prompt_tokens_match_es_serve"] is True


def test_counts_budget_and_evaluation_schedule(compared):
    data, _, _ = compared
    es, grpo = data["runs"]
    budget = BUDGET_MINUTES * 60
    per_step = {"es-serve": POPULATION * PROMPTS_PER_STEP, "grpo": 8}  # TRL's default: 8 completions of 1 prompt
    for run in (es, grpo):
        name = run["label"]
        assert run["steps"] >= 1 and run["completions"] == run["steps"] * per_step[run["method"]], name
        assert run["settings"]["completions_per_step"] == per_step[run["method"]], name
        # Every evaluation point says how far training had got, in completions and in steps.
        for point in run["evals"]:
            assert point["completions"] == point["step"] * per_step[run["method"]], name
        # The run stopped at the first step boundary at or past the budget: the step before the last ended
        # inside it, and the clock ran to at least the budget.
        ends = [s["train_minutes"] * 60 for s in run["step_records"]]
        assert len(ends) == run["steps"], name
        assert (ends[-2] if len(ends) > 1 else 0.0) < budget <= run["train_seconds"], name
        if run["method"] == "es-serve":
            assert run["stopped_by"] == "budget", name
        # Evaluation is off the clock: at 0, at each period crossed inside the budget, and at the end.
        minutes = [p["minutes"] for p in run["evals"]]
        assert minutes[0] == 0 and minutes == sorted(minutes), name
        assert minutes[-1] * 60 == pytest.approx(run["train_seconds"]), name
        assert all(m >= EVAL_EVERY_MINUTES for m in minutes[1:]), name
        assert run["eval_seconds"] == pytest.approx(sum(p["seconds"] for p in run["evals"])), name
        assert run["threads"] == data["meta"]["threads"] == 1, name
        assert run["peak_rss_bytes"] > 100 * 2**20 and run["gen_tokens"] > 0 and run["gen_seconds"] > 0, name
        # Both trainings really moved the model.
        assert run["weights"]["tensors_changed"] > 0 and run["weights"]["max_abs_change"] > 0, name
    assert grpo["settings"]["learning_rate"] == grpo["lr"] == 1e-4
    assert grpo["settings"]["beta"] == 0.0 and grpo["settings"]["num_generations"] == 8
    assert grpo["settings"]["max_completion_length"] == MAX_TOKENS and grpo["settings"]["use_vllm"] is False
    assert "vLLM colocate" in data["meta"]["grpo_generation"]
    # bfloat16 autocast only where the CPU computes bf16 natively; the trained weights stay float32 either way.
    native_bf16 = resolve_dtype("auto") == "bfloat16"
    assert grpo["dtype"] == ("bfloat16 autocast, float32 weights" if native_bf16 else "float32")
    assert grpo["weights_dtype"] == "float32"


def test_gains_table_and_plot_match_the_runs(compared):
    import statistics

    from PIL import Image

    data, out, _ = compared
    assert data["best_grpo"] == "GRPO lr=0.0001"
    for summary, run in zip(data["summary"], data["runs"], strict=True):
        first, last = run["evals"][0]["per_prompt"], run["evals"][-1]["per_prompt"]
        diffs = [b - a for a, b in zip(first, last, strict=True)]
        change = summary["change"]
        assert change["gain"] == pytest.approx(statistics.fmean(diffs))
        assert change["paired_stderr"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(len(diffs)))
        assert (change["better"], change["worse"]) == (sum(d > 0 for d in diffs), sum(d < 0 for d in diffs))
        assert summary["last"] == pytest.approx(statistics.fmean(last))
    es_last, grpo_last = (run["evals"][-1]["per_prompt"] for run in data["runs"])
    head = data["head_to_head"]["es_serve_minus_best_grpo"]
    assert head["gain"] == pytest.approx(statistics.fmean(e - g for e, g in zip(es_last, grpo_last, strict=True)))
    table = out.with_suffix(".md").read_text()
    for summary in data["summary"]:
        row = next(line for line in table.splitlines() if line.startswith(f"| {summary['label']}"))
        assert f"| {summary['steps']} | {summary['completions']} |" in row
        assert f"{summary['change']['gain']:+.3f} ± {summary['change']['paired_stderr']:.3f}" in row
    assert "vLLM colocate mode is not an option on CPU" in table
    with Image.open(out.with_suffix(".png")) as image:
        assert image.size == (800, 450)
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 24)) > 50  # drawn curves, not a blank canvas


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "task.name=sudoku"], "unknown task 'sudoku'"),
        (["--minutes", "0"], "--minutes must be a positive number"),
        (["--eval-every-minutes", "-1"], "--eval-every-minutes must be positive"),
        (["--grpo-lrs", "0"], "--grpo-lrs must be positive"),
        (["--grpo-set", "no_such_field=1"], "'no_such_field' is not a GRPOConfig field"),
    ],
)
def test_bad_input_gets_one_line_and_exit_2(args, message, tmp_path):
    proc = subprocess.run(_command(*args, "--out", str(tmp_path / "x.json")), capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("es-serve: error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "x.json").exists()


def test_missing_trl_is_named(tmp_path):
    # A `trl` that cannot be imported, first on the path, stands in for an environment without TRL.
    (tmp_path / "trl").mkdir()
    (tmp_path / "trl" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'trl'\", name='trl')\n")
    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{root}"}
    proc = subprocess.run(_command("--minutes", "1"), capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("es-serve: error:")]
    assert "TRL is not installed" in line and "pip install" in line
