"""`es-serve` as a user runs it: bad configuration, SIGKILL and resume, plugin rewards, export."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = '''
def distinct_chars(prompts, completions, **columns):
    """TRL-style reward: varies a lot between members of a random model."""
    return [float(len(set(c))) for c in completions]
'''
TINY = [
    "model.name=tiny-llama",
    "es.population=8",
    "es.sigma=0.3",
    "es.lr=0.05",
    "task.name=arithmetic",
    "task.prompts_per_step=2",
    "task.eval_prompts=4",
    "generation.max_tokens=8",
    "train.steps=6",
    "train.eval_every=3",
    "train.checkpoint_every=4",
    "engine.memory_fraction=0.15",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = dict(os.environ, ES_SERVE_CACHE=str(tmp_path_factory.mktemp("cache")), VLLM_LOGGING_LEVEL="ERROR")
    return env


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "my_reward.py"
    path.write_text(PLUGIN)
    return f"{path}:distinct_chars"


def es_serve(*args, env, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, **kwargs
    )


def es_serve_in_background(*args, env, log):
    """`es-serve` started and left running; its output goes to the file `log` (a pipe left unread could fill)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "launch.cli", *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _sets(items):
    return [x for item in items for x in ("--set", item)]


@pytest.mark.parametrize(
    "sets,expected",
    [
        (["es.populaton=8"], "unknown key 'es.populaton'; allowed here: population"),
        (["es.population=eight"], "es.population: Input should be a valid integer"),
        (["es.population=7"], "es.population=7 is odd"),
        (["task.name=chess"], "unknown task 'chess'"),
        (["model.name=/no/such/model"], "unknown model '/no/such/model': known names are smollm2-135m, tiny-llama"),
        (["reward.fn=no_such_reward"], "no_such_reward"),
    ],
)
def test_bad_configuration_gives_one_clear_message(sets, expected, env, tmp_path):
    sets = ["model.name=tiny-llama", *sets]
    result = es_serve("train", *_sets(sets), "--out", str(tmp_path / "run"), env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr and "RuntimeWarning" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr


def test_models_lists_known_names(env):
    result = es_serve("models", env=env, timeout=60)
    assert result.returncode == 0
    assert "smollm2-135m" in result.stdout and "tiny-llama" in result.stdout


def _weights(run_dir, env):
    code = (
        "import sys, torch; from es_serve.export import trained_weights; from es_serve.run_dir import RunDir;"
        "from es_serve.models import resolve_model; from es_serve.config import load_config;"
        "run = RunDir(sys.argv[1]); c = load_config(run.config_path);"
        "step, w = trained_weights(run, resolve_model(c.model.name), c.es.modules);"
        "torch.save({'step': step, 'w': w}, sys.argv[2])"
    )
    out = Path(run_dir) / "weights.pt"
    subprocess.run([sys.executable, "-c", code, str(run_dir), str(out)], cwd=ROOT, env=env, check=True)
    return torch.load(out)


@pytest.mark.vllm
def test_sigkill_mid_step_then_resume_matches_an_uninterrupted_run(env, plugin, tmp_path):
    sets = _sets([*TINY, f"reward.fn={plugin}"])
    # The uninterrupted run goes alongside the one to be killed: they share nothing but the CPUs, and
    # most of each is starting Python and vLLM, which keeps one core busy.
    runs = {
        name: es_serve_in_background(
            "train", *sets, "--out", str(tmp_path / name), "--quiet", env=env, log=tmp_path / f"{name}.log"
        )
        for name in ("a", "b")
    }
    try:
        proc = runs["b"]
        replay = tmp_path / "b" / "replay.jsonl"
        deadline = time.time() + 500
        while time.time() < deadline and proc.poll() is None:
            if replay.exists() and replay.read_text().count("\n") >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = replay.read_text().count("\n")
        assert 3 <= killed_at < 6
        assert runs["a"].wait(timeout=600) == 0, (tmp_path / "a.log").read_text()[-2000:]
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
                run.wait()

    # The killed run resumes while run `a`, finished, is checked and exported.
    resumed = es_serve_in_background(
        "train", "--resume", str(tmp_path / "b"), "--quiet", env=env, log=tmp_path / "resume.log"
    )
    try:
        a = _weights(tmp_path / "a", env)
        assert a["step"] == 6
        base = _weights_of_base(env)
        assert any(not torch.equal(base[k], a["w"][k]) for k in base)
        # Export: a Hugging Face directory that transformers loads and that greedily says what the
        # engine said at the last evaluation.
        out = tmp_path / "exported"
        exported = es_serve("export", str(tmp_path / "a"), str(out), env=env, timeout=300)
        assert exported.returncode == 0, exported.stderr[-2000:]
        _check_export(out, tmp_path / "a", env)
        assert resumed.wait(timeout=600) == 0, (tmp_path / "resume.log").read_text()[-2000:]
    finally:
        if resumed.poll() is None:
            resumed.kill()
            resumed.wait()
    b = _weights(tmp_path / "b", env)
    assert b["step"] == 6
    assert a["w"].keys() == b["w"].keys()
    for name in a["w"]:
        assert torch.equal(a["w"][name], b["w"][name]), name
    metrics = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4, 5, 6]
    # The plugin reward really drove the run: its values are logged and the weights moved.
    assert all(m["reward_mean"] > 1 for m in metrics[1:])


def _weights_of_base(env):
    code = (
        "import sys, torch; from es_serve.weights import base_weights; from es_serve.models import resolve_model;"
        "from adapters import DEFAULT_MODULES; t, w = base_weights(resolve_model('tiny-llama'), DEFAULT_MODULES);"
        "torch.save(w, sys.argv[1])"
    )
    path = Path(env["ES_SERVE_CACHE"]) / "base.pt"
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, env=env, check=True)
    return torch.load(path)


def _check_export(out, run_dir, env):
    code = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from rewards import get_task
out, run = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(out)
model = AutoModelForCausalLM.from_pretrained(out)
row = get_task("arithmetic", seed=0).eval_rows(4)[0]
prompt = tok.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
gen = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
last = [json.loads(l) for l in open(run + "/metrics.jsonl")][-1]
print(json.dumps({"text": text, "engine": last["eval_sample"]}))
"""
    result = subprocess.run(
        [sys.executable, "-c", code, str(out), str(run_dir)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["text"] == seen["engine"]


def test_a_reward_past_its_timeout_ends_train_with_one_line_and_the_resume_command(env, tmp_path):
    hang = tmp_path / "hang.py"
    hang.write_text("import time\n\ndef hang(prompts, completions, **columns):\n    time.sleep(600)\n")
    sets = [s for s in TINY if not s.startswith("train.steps")] + ["train.steps=2", "engine.kind=dense"]
    sets += [f"reward.fn={hang}:hang", "reward.timeout_s=1"]
    run = tmp_path / "run"
    result = es_serve("train", *_sets(sets), "--out", str(run), "--quiet", env=env, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "reward 'hang' failed" in last and "reward.timeout_s" in last and f"--resume {run}" in last
    # The command it names works, with a larger timeout (the reward itself may not change on resume).
    again = es_serve("train", "--resume", str(run), "--set", "reward.timeout_s=2", "--quiet", env=env, timeout=300)
    assert again.returncode == 1 and "no result after 2 s" in again.stderr.strip().splitlines()[-1], again.stderr
