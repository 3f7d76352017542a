"""Loading rewards by name, file, module and entry point; the restricted loader; error messages."""

import importlib.metadata
import textwrap

import pytest

from rewards import ENTRY_POINT_GROUP, RemoteReward, RewardLoadError, builtin_rewards, load_reward

REWARD_SOURCE = textwrap.dedent(
    """
    def shout(completions, **kwargs):
        return [float(c.isupper()) for c in completions]

    def per_item(completion, answer):
        return float(completion == answer)
    """
)


def check_shout(reward):
    result = reward.score(["p", "q"], [["HI", "hi"]], {"answer": ["HI", "x"]})
    assert result.matrix.tolist() == [[1.0, 0.0]]


@pytest.fixture()
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_SOURCE)
    return path


def test_from_file_path(reward_file):
    reward = load_reward(f"{reward_file}:shout")
    assert reward.name == "shout"
    check_shout(reward)
    assert load_reward(f"{reward_file}:per_item").score(["p"], [["a"]], {"answer": ["a"]}).matrix.item() == 1.0


def test_from_module(tmp_path, monkeypatch):
    (tmp_path / "es_serve_test_rewards_mod.py").write_text(REWARD_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    check_shout(load_reward("es_serve_test_rewards_mod:shout"))


def fake_entry_points(monkeypatch, tmp_path, **targets):
    (tmp_path / "es_serve_test_plugin.py").write_text(REWARD_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = importlib.metadata.EntryPoints(
        importlib.metadata.EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)
        for name, value in targets.items()
    )
    real = importlib.metadata.entry_points

    def entry_points(**params):
        return eps.select(**params) if params.get("group") == ENTRY_POINT_GROUP else real(**params)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_from_entry_point(tmp_path, monkeypatch):
    fake_entry_points(monkeypatch, tmp_path, loud="es_serve_test_plugin:shout")
    reward = load_reward("loud")
    assert reward.name == "loud"
    check_shout(reward)
    # Installed rewards are trusted like built-ins, so the restricted loader accepts them too.
    check_shout(load_reward("loud", restricted=True))
    with pytest.raises(RewardLoadError) as info:
        load_reward("quiet")
    assert "loud" in str(info.value)


def test_restricted_loader_refuses_imports_and_foreign_paths(tmp_path, reward_file):
    other = tmp_path.parent / "elsewhere.py"
    other.write_text(REWARD_SOURCE)
    for spec in ("os:system", "rewards.answers:numeric", "http://127.0.0.1:1/reward"):
        with pytest.raises(RewardLoadError, match="refused") as info:
            load_reward(spec, restricted=True, reward_dir=tmp_path)
        assert "numeric" in str(info.value)  # the message lists what is allowed
    for spec in (f"{other}:shout", "../elsewhere.py:shout"):
        with pytest.raises(RewardLoadError, match="outside the reward directory"):
            load_reward(spec, restricted=True, reward_dir=tmp_path)
    with pytest.raises(RewardLoadError, match="no reward directory"):
        load_reward(f"{reward_file}:shout", restricted=True)
    with pytest.raises(RewardLoadError, match="only reward names"):
        load_reward(lambda completions, **kw: [0.0], restricted=True)
    # Built-ins and files inside the operator's directory (absolute or relative to it) are fine.
    assert load_reward("numeric", restricted=True).name == "numeric"
    check_shout(load_reward("my_rewards.py:shout", restricted=True, reward_dir=tmp_path))
    check_shout(load_reward(f"{reward_file}:shout", restricted=True, reward_dir=tmp_path))


def test_unknown_name_lists_builtins():
    with pytest.raises(RewardLoadError) as info:
        load_reward("accuracy")
    message = str(info.value)
    assert "unknown reward 'accuracy'" in message
    for name in builtin_rewards():
        assert name in message
    assert "file.py:function" in message


def test_load_errors_name_what_was_wrong(tmp_path, reward_file):
    with pytest.raises(RewardLoadError, match="has no 'missing'; callables there: per_item, shout"):
        load_reward(f"{reward_file}:missing")
    with pytest.raises(RewardLoadError, match="does not exist"):
        load_reward(f"{tmp_path}/nope.py:shout")
    with pytest.raises(RewardLoadError, match="cannot import module"):
        load_reward("no_such_module_here:fn")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('oops')\n")
    with pytest.raises(RewardLoadError, match="importing .*broken.py failed: RuntimeError: oops"):
        load_reward(f"{broken}:fn")
    with pytest.raises(RewardLoadError, match="my_rewards.py:function_name"):
        load_reward("my_rewards.py")


def test_url_spec_gives_a_remote_reward():
    reward = load_reward("http://127.0.0.1:9/get_reward")
    assert isinstance(reward, RemoteReward) and reward.url == "http://127.0.0.1:9/get_reward"
