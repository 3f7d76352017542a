"""Turning a reward spec (a config string) into a Reward.

A spec is one of:
- a built-in name (BUILTIN_REWARDS);
- a name another package registered in the entry-point group `es_serve.rewards`, for example in its
  pyproject.toml: [project.entry-points."es_serve.rewards"] my_reward = "my_pkg.rewards:score";
- `path/to/file.py:function` (relative paths from the working directory);
- `package.module:function`;
- `http://host:port/path` or https: a RemoteReward with default settings;
- `verl:` followed by a file or module spec: a verl `compute_score` function (rewards.verl_convention).
Several specs separated by commas (or a list of specs) are combined, with `weights` (default 1).
Built-in names win over entry points of the same name.

The object a spec names may be a reward function (see rewards.calling), a Reward instance, or a
Reward subclass constructible without arguments.

`restricted=True` (implied by giving `reward_dir`) is for specs that come from outside (an HTTP
request): only built-ins, entry points, and `.py` files inside the operator's `reward_dir`
(relative paths are taken from there) are accepted; module imports and URLs are refused, so a request can never import arbitrary code or
make the server call arbitrary hosts.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .answers import exact, math_answer, numeric
from .base import CombinedReward, Reward
from .calling import FunctionReward
from .countdown_rule import countdown
from .errors import RewardLoadError
from .formatting import format_answer_tag, format_number, length_penalty
from .paths import resolve_inside
from .scoring import as_reward
from .verl_convention import PREFIX as VERL_PREFIX
from .verl_convention import verl_reward

ENTRY_POINT_GROUP = "es_serve.rewards"

BUILTIN_REWARDS: dict[str, Callable[[], Reward]] = {
    "numeric": lambda: FunctionReward(numeric, text_only=True),
    "exact": lambda: FunctionReward(exact, text_only=True),
    "math": lambda: FunctionReward(math_answer, text_only=True),
    "countdown": lambda: FunctionReward(countdown, text_only=True),
    "format_number": format_number,
    "format_answer_tag": format_answer_tag,
    "length_penalty": length_penalty,
}


def builtin_rewards() -> list[str]:
    return sorted(BUILTIN_REWARDS)


def entry_point_rewards() -> dict[str, importlib.metadata.EntryPoint]:
    """Rewards installed packages registered under `es_serve.rewards`, by name."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def load_reward(
    spec: str | Sequence | Reward | Callable,
    weights: Sequence[float] | None = None,
    *,
    restricted: bool = False,
    reward_dir: str | Path | None = None,
) -> Reward:
    """The Reward for `spec` (see the module docstring); several specs become one CombinedReward.

    Giving `reward_dir` implies `restricted`: a directory of allowed files means nothing otherwise.
    """
    restricted = restricted or reward_dir is not None
    specs = _split(spec)
    if not specs:
        raise RewardLoadError(f"empty reward spec; {_allowed(restricted, reward_dir)}")
    rewards = [resolve_reward(s, restricted=restricted, reward_dir=reward_dir) for s in specs]
    if weights is None:
        weights = [1.0] * len(rewards)
    weights = [float(w) for w in weights]
    if len(weights) != len(rewards):
        names = ", ".join(r.name for r in rewards)
        raise RewardLoadError(
            f"{len(weights)} reward weights for {len(rewards)} rewards ({names}); give one per reward"
        )
    if not all(math.isfinite(w) for w in weights):
        raise RewardLoadError(f"reward weights must be finite numbers, got {weights}")
    if len(rewards) == 1 and weights[0] == 1.0:
        return rewards[0]
    return CombinedReward(list(zip(rewards, weights, strict=True)))


def resolve_reward(
    spec: str | Reward | Callable, *, restricted: bool = False, reward_dir: str | Path | None = None
) -> Reward:
    """One spec (no commas) as a Reward; `reward_dir` implies `restricted`, as in load_reward."""
    restricted = restricted or reward_dir is not None
    if not isinstance(spec, str):
        if restricted:
            raise RewardLoadError(f"only reward names are accepted here, got a {type(spec).__name__}")
        return as_reward(spec)
    spec = spec.strip()
    if spec.startswith(VERL_PREFIX):
        return _verl(spec, restricted, reward_dir)
    if spec.startswith(("http://", "https://")):
        if restricted:
            raise _refused(spec, "reward server URLs are not accepted", reward_dir)
        from .remote import RemoteReward

        return RemoteReward(spec)
    if ":" in spec:
        source, _, attr = spec.rpartition(":")
        if not source or not attr:
            raise RewardLoadError(f"reward spec {spec!r} must be path/to/file.py:function or module:function")
        if source.endswith(".py") or "/" in source or "\\" in source:
            return _from_file(spec, source, attr, restricted, reward_dir)
        if restricted:
            raise _refused(spec, "module imports are not accepted", reward_dir)
        return _from_module(spec, source, attr)
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]()
    installed = _entry_points_or_none()
    if spec in installed:
        return _from_entry_point(spec, installed[spec])
    hint = ""
    if spec.endswith(".py") or "." in spec:
        hint = f" (to load a function from a file or module write {spec}:function_name)"
    raise RewardLoadError(f"unknown reward {spec!r}{hint}; {_allowed(restricted, reward_dir)}")


def _split(spec) -> list:
    if isinstance(spec, str):
        return [s.strip() for s in spec.split(",") if s.strip()]
    if isinstance(spec, Sequence):
        return [s for item in spec for s in (_split(item) if isinstance(item, str) else [item])]
    return [spec]


def _verl(spec: str, restricted: bool, reward_dir) -> Reward:
    inner = spec[len(VERL_PREFIX) :].strip()
    if inner.endswith(".py") or ":" not in inner:
        inner += ":compute_score"  # verl's own default name
    source, _, attr = inner.rpartition(":")
    if not source or not attr:
        raise RewardLoadError(f"reward spec {spec!r} must be verl:path/to/file.py[:function] or verl:module:function")
    if source.endswith(".py") or "/" in source or "\\" in source:
        obj = _file_object(spec, source, attr, restricted, reward_dir)
    elif restricted:
        raise _refused(spec, "module imports are not accepted", reward_dir)
    else:
        obj = _module_object(spec, source, attr)
    try:
        return verl_reward(obj)
    except TypeError as exc:
        raise RewardLoadError(f"reward spec {spec!r}: {exc}") from None


def _from_file(spec: str, source: str, attr: str, restricted: bool, reward_dir) -> Reward:
    return _wrap(spec, _file_object(spec, source, attr, restricted, reward_dir))


def _file_object(spec: str, source: str, attr: str, restricted: bool, reward_dir):
    path = Path(source).expanduser()
    if restricted:
        if reward_dir is None:
            raise _refused(spec, "files are not accepted (no reward directory is configured)", reward_dir)
        path = resolve_inside(path, reward_dir)
        if path is None:
            root = Path(reward_dir).expanduser().resolve()
            raise _refused(spec, f"the file is outside the reward directory {root}", reward_dir)
    if path.suffix != ".py":
        raise RewardLoadError(f"reward spec {spec!r}: {path} is not a .py file")
    if not path.is_file():
        raise RewardLoadError(f"reward spec {spec!r}: file {path} does not exist")
    path = path.resolve()
    # One module name per file path, so classes defined there can be found again (pickling,
    # dataclasses) and reloading the same file replaces the earlier copy.
    module_name = "es_serve_reward_" + hashlib.sha1(str(path).encode()).hexdigest()[:16]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise RewardLoadError(f"reward spec {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return _attribute(spec, module, attr, str(path))


def _from_module(spec: str, source: str, attr: str) -> Reward:
    return _wrap(spec, _module_object(spec, source, attr))


def _module_object(spec: str, source: str, attr: str):
    try:
        module = importlib.import_module(source)
    except ImportError as exc:
        raise RewardLoadError(f"reward spec {spec!r}: cannot import module {source!r}: {exc}") from exc
    return _attribute(spec, module, attr, f"module {source}")


def _from_entry_point(name: str, ep: importlib.metadata.EntryPoint) -> Reward:
    try:
        obj = ep.load()
    except Exception as exc:
        raise RewardLoadError(
            f"reward {name!r} (entry point {ENTRY_POINT_GROUP} -> {ep.value}) failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    reward = as_reward(obj, name=name)
    if isinstance(reward, FunctionReward):
        reward.name = name
    return reward


def _attribute(spec: str, module, attr: str, where: str):
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise RewardLoadError(
                f"reward spec {spec!r}: {where} has no {attr!r}; callables there: {', '.join(found) or 'none'}"
            )
        obj = getattr(obj, part)
    return obj


def _wrap(spec: str, obj) -> Reward:
    try:
        return as_reward(obj)
    except RewardLoadError as exc:
        raise RewardLoadError(f"reward spec {spec!r}: {exc}") from None


def _entry_points_or_none() -> dict:
    try:
        return entry_point_rewards()
    except Exception:  # a broken installed distribution must not hide the built-ins
        return {}


def _allowed(restricted: bool, reward_dir) -> str:
    installed = sorted(_entry_points_or_none())
    parts = [f"built-in rewards: {', '.join(builtin_rewards())}"]
    parts.append(f"installed ({ENTRY_POINT_GROUP} entry points): {', '.join(installed) if installed else 'none'}")
    if restricted:
        parts.append(
            f"or a .py file inside {Path(reward_dir).expanduser().resolve()} as file.py:function "
            "(verl:file.py:function for verl's compute_score)"
            if reward_dir is not None
            else "no file or module rewards are accepted here"
        )
    else:
        parts.append(
            "or path/to/file.py:function, module:function, verl:file.py:function (verl's compute_score), "
            "or an http(s):// reward server URL"
        )
    return "; ".join(parts)


def _refused(spec: str, why: str, reward_dir) -> RewardLoadError:
    return RewardLoadError(f"reward spec {spec!r} refused: {why}; {_allowed(True, reward_dir)}")
