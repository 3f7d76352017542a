import pytest

from es_serve.config import ConfigError, dump_config, load_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[es]\npopulation = 16\nsigma = 0.01\n[task]\nname = "countdown"\n')
    config = load_config(path, ["es.rank=2", "task.prompts_per_step=8", "reward.fn=mod:fn", "es.shaping=rank"])
    assert (config.es.population, config.es.sigma, config.es.rank) == (16, 0.01, 2)
    assert (config.task.name, config.task.prompts_per_step, config.reward.fn) == ("countdown", 8, "mod:fn")
    assert config.es.shaping == "rank"
    # The dump is a full, re-loadable configuration.
    again = tmp_path / "again.toml"
    again.write_text(dump_config(config))
    assert load_config(again) == config


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["es.populaton=8"], "unknown key 'es.populaton'; allowed here: population, rank"),
        (["bogus.x=1"], "unknown key 'bogus'"),
        (["es.population=seven"], "es.population: Input should be a valid integer"),
        (["es.population=7"], "es.population=7 is odd"),
        (["es.sigma=0"], "es.sigma: Input should be greater than 0"),
        (["es.shaping=softmax"], "es.shaping: Input should be 'centered', 'centered_raw', 'zscore' or 'rank'"),
        (["es.optimizer=lion"], "es.optimizer: Input should be 'sgd', 'momentum' or 'adam' (got 'lion')"),
        (["es.momentum=1"], "es.momentum: Input should be less than 1"),
        (["es.adam_eps=0"], "es.adam_eps: Input should be greater than 0"),
        (["es.lr_schedule=step"], "es.lr_schedule: Input should be 'constant', 'linear' or 'cosine'"),
        (["es.lr_min_ratio=2"], "es.lr_min_ratio: Input should be less than or equal to 1"),
        (["es.warmup_steps=-1"], "es.warmup_steps: Input should be greater than or equal to 0"),
        (["es.sigma_min_ratio=0"], "es.sigma_min_ratio: Input should be greater than 0"),
        (["es.rank=0"], "es.rank: Input should be greater than or equal to 1"),
        (["population"], "--set expects KEY=VALUE"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    assert message in str(exc.value)


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[es\npopulation=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_shipped_launch_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "launch" / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        load_config(path)


def test_a_run_saved_before_lr_schedules_resumes_with_a_constant_lr(tmp_path):
    # A fresh config gets the main job's cosine decay; a run directory written before the key existed
    # trained every step at es.lr and must go on doing so.
    assert load_config().es.lr_schedule == "cosine"
    saved = tmp_path / "config.toml"
    saved.write_text("[es]\npopulation = 16\nlr = 0.01\n[train]\nsteps = 40\n")
    assert load_config(saved, saved_run=True).es.lr_schedule == "constant"
    assert load_config(saved).es.lr_schedule == "cosine"
    explicit = tmp_path / "explicit.toml"
    explicit.write_text('[es]\nlr_schedule = "linear"\n')
    assert load_config(explicit, saved_run=True).es.lr_schedule == "linear"


def test_a_job_record_saved_before_lr_schedules_keeps_a_constant_lr():
    from es_serve.config import Config, saved_before_schedules

    # The server stores a job's full config at submission; one written before the key existed lacks it.
    old = Config().model_dump(mode="json", exclude_none=True)
    del old["es"]["lr_schedule"]
    assert Config.model_validate(saved_before_schedules(old)).es.lr_schedule == "constant"
    assert "lr_schedule" not in old["es"]  # the record itself is not rewritten
    new = Config().model_dump(mode="json", exclude_none=True)
    assert Config.model_validate(saved_before_schedules(new)).es.lr_schedule == "cosine"


@pytest.mark.parametrize(
    "setting, message",
    [
        ("es.populaton=8", "unknown key 'es.populaton'"),
        ("task.name=arithmetc", "unknown task 'arithmetc'; tasks: arithmetic"),
        ("reward.fn=numerc", "unknown reward 'numerc'; built-in rewards: "),
        ("model.name=smollm2-1350m", "unknown model 'smollm2-1350m'"),
    ],
)
def test_a_mistyped_name_is_reported_without_importing_torch(setting, message):
    """`es-serve train` with a mistyped key, task, reward or model answers at once: nothing on the way to
    those checks imports torch (two to three seconds)."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        f"import sys; from launch.cli import main; code = main(['train', '--set', {setting!r}]); "
        "assert 'torch' not in sys.modules, 'torch imported on the configuration path'; sys.exit(code)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
    )
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
