"""A task read from the user's data through Hugging Face `datasets`.

`task.dataset` is a JSONL / JSON / CSV / Parquet file, a directory written by `save_to_disk` (or a
folder of data files), or a Hub id when the Hub is reachable. The data stays in Arrow, memory-mapped
from the datasets cache; rows are fetched by index, P at a time, never read whole into Python.

Rows handed to the trainer are `{"prompt": <the prompt column>, **every other column}`; the prompt
is a string or a list of chat messages (TRL's "conversational" form) and the other columns reach
rewards as keyword arguments. The trainer renders both through the model's chat template (a string
as a one-turn user message), so plain and chat data differ only in what rewards are handed.

Splits: with `task.eval_dataset` / `task.eval_split` the held-out rows are that data's first
`task.eval_prompts` rows; otherwise `task.eval_prompts` rows drawn from the training data with
`task.seed` are held out and never trained on. Training visits the remaining rows in a shuffled
order, a new shuffle every epoch; `sample(n, step)` is a pure function of (seed, n, step), so a
resumed run continues the same order.
"""

from __future__ import annotations

import functools
import os
import random
import re
from pathlib import Path

import numpy as np

from .paths import resolve_inside

# What each file suffix is read with (the `datasets` packaged builders).
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# Keyword arguments a reward function gets from the trainer; a column must not take one of these names.
RESERVED_COLUMNS = (
    "prompts",
    "completions",
    "completion",
    "completion_ids",
    "trainer_state",
    "log_extra",
    "log_metric",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class DatasetTaskError(ValueError):
    """A problem with the task's data, phrased for the user; `field` is the configuration key to fix."""

    def __init__(self, message: str, field: str = "task.dataset"):
        super().__init__(message)
        self.field = field


class DatasetTask:
    """Task interface (sample, eval_rows, name, default_reward) over a `datasets.Dataset`."""

    # The row keys that are the prompt rather than columns for the reward.
    prompt_keys = ("prompt",)
    # Plain-string prompts reach a model with a chat template as a one-turn user message, as the
    # built-in tasks' prompts do; rewards still get strings (TRL's rule: the prompt column decides).
    plain_prompts_as_chat = True
    default_reward = None

    def __init__(
        self,
        train,
        *,
        eval_data=None,
        eval_size: int = 128,
        seed: int = 0,
        prompt_column: str = "prompt",
        name: str = "dataset",
        source: str = "the dataset",
    ):
        if eval_size < 1:
            raise DatasetTaskError(f"task.eval_prompts must be at least 1, got {eval_size}", "task.eval_prompts")
        self.name, self.seed, self.eval_size = name, seed, eval_size
        self.prompt_column, self.source = prompt_column, source
        self.conversational = check_prompts(train, prompt_column, source) == "chat"
        self.train = train
        if eval_data is not None:
            if check_prompts(eval_data, prompt_column, f"the eval data of {source}") != check_prompts(
                train, prompt_column, source
            ):
                raise DatasetTaskError(
                    f"the eval data's {prompt_column!r} column is not of the same kind as the training data's "
                    "(one holds strings, the other chat messages)",
                    "task.eval_dataset",
                )
            if eval_size > len(eval_data):
                raise DatasetTaskError(
                    f"task.eval_prompts={eval_size} but the eval data has {len(eval_data)} rows; "
                    f"lower task.eval_prompts to at most {len(eval_data)}",
                    "task.eval_prompts",
                )
            self.eval_data = eval_data
            self.eval_index = np.arange(eval_size, dtype=np.int64)
            self.train_index = None  # every training row
        else:
            rows = len(train)
            if eval_size >= rows:
                raise DatasetTaskError(
                    f"task.eval_prompts={eval_size} would hold out all {rows} rows of {source}, leaving none "
                    f"to train on; lower task.eval_prompts (below {rows}) or give task.eval_dataset",
                    "task.eval_prompts",
                )
            rng = np.random.default_rng([seed, 0x0E7A1])
            self.eval_data = train
            self.eval_index = rng.choice(rows, size=eval_size, replace=False)
            self.train_index = np.setdiff1d(np.arange(rows, dtype=np.int64), self.eval_index, assume_unique=True)
        self.train_rows = len(train) if self.train_index is None else len(self.train_index)

    # -- the Task interface ---------------------------------------------------------------------
    def sample(self, n: int, step) -> list[dict]:
        """n training rows. `step` (from 1) picks the next n rows of the shuffled epochs; a
        random.Random or numpy Generator draws n rows at random instead."""
        if isinstance(step, random.Random):
            positions = [step.randrange(self.train_rows) for _ in range(n)]
            return self._rows(self.train, self._train_rows(np.asarray(positions, dtype=np.int64)))
        if hasattr(step, "integers"):
            return self._rows(self.train, self._train_rows(step.integers(self.train_rows, size=n)))
        if not isinstance(step, int | np.integer) or isinstance(step, bool):
            raise TypeError(f"sample(n, step) needs a step number or a random generator, got {type(step).__name__}")
        if step < 1:
            raise ValueError(f"training steps count from 1, got {step}")
        start = (int(step) - 1) * n
        index = np.empty(n, dtype=np.int64)
        for k, position in enumerate(range(start, start + n)):
            epoch, offset = divmod(position, self.train_rows)
            index[k] = self._epoch_order(epoch)[offset]
        return self._rows(self.train, index)

    def eval_rows(self, n: int | None = None) -> list[dict]:
        """The first n held-out rows (all of them when n is None); the same for every call."""
        n = self.eval_size if n is None else n
        if n > self.eval_size:
            raise DatasetTaskError(
                f"{self.source} holds out {self.eval_size} eval prompts, {n} were asked for", "task.eval_prompts"
            )
        return self._rows(self.eval_data, self.eval_index[:n])

    def epoch(self, step: int, n: int) -> float:
        """Training epochs completed after `step` steps of n prompts."""
        return step * n / self.train_rows

    def reward(self, **_):
        raise DatasetTaskError("a dataset task has no default reward: set reward.fn", "reward.fn")

    # -- internals ------------------------------------------------------------------------------
    @functools.lru_cache(maxsize=2)  # noqa: B019 (the task lives as long as the run; two epochs at a step boundary)
    def _epoch_order(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch, 0x7A15]).permutation(self.train_rows)
        return order if self.train_index is None else self.train_index[order]

    def _train_rows(self, positions: np.ndarray) -> np.ndarray:
        return positions if self.train_index is None else self.train_index[positions]

    def _rows(self, data, index) -> list[dict]:
        index = [int(i) for i in index]
        if not index:
            return []
        batch = data[index]  # one Arrow take: only these rows leave the memory map
        columns = list(batch)
        out = []
        for j in range(len(index)):
            row = {c: batch[c][j] for c in columns}
            out.append({"prompt": row.pop(self.prompt_column), **row})
        return out

    def __repr__(self) -> str:
        return (
            f"DatasetTask({self.source!r}, rows={len(self.train)}, train={self.train_rows}, "
            f"eval={self.eval_size}, seed={self.seed})"
        )


def load_dataset_task(cfg, *, data_dir=None, restricted: bool = False, cache_dir=None) -> DatasetTask:
    """The DatasetTask a TaskConfig describes; raises DatasetTaskError naming the key to fix.

    `restricted` (a server job): files only, inside `data_dir` (relative names from there).
    """
    train = open_dataset(
        cfg.dataset, cfg.split, field="task.dataset", data_dir=data_dir, restricted=restricted, cache_dir=cache_dir
    )
    eval_data = None
    if cfg.eval_dataset or cfg.eval_split:
        eval_data = open_dataset(
            cfg.eval_dataset or cfg.dataset,
            cfg.eval_split or ("train" if cfg.eval_dataset else cfg.split),
            field="task.eval_dataset" if cfg.eval_dataset else "task.eval_split",
            data_dir=data_dir,
            restricted=restricted,
            cache_dir=cache_dir,
        )
        if not cfg.eval_dataset and cfg.eval_split == cfg.split:
            raise DatasetTaskError(
                f"task.eval_split={cfg.eval_split!r} is the training split; choose another split, or leave it out "
                "to hold out task.eval_prompts rows of the training data",
                "task.eval_split",
            )
    task = DatasetTask(
        train,
        eval_data=eval_data,
        eval_size=cfg.eval_prompts,
        seed=cfg.seed,
        prompt_column=cfg.prompt_column,
        name=cfg.name,
        source=cfg.dataset,
    )
    return task


def open_dataset(spec: str, split: str, *, field: str, data_dir=None, restricted=False, cache_dir=None):
    """A `datasets.Dataset` from a file, a saved directory or a Hub id, or one DatasetTaskError."""
    split_field = "task.eval_split" if field != "task.dataset" else "task.split"
    if restricted:
        if data_dir is None:
            raise DatasetTaskError(
                f"{field} {spec!r} refused: this server accepts no dataset files (start it with --data-dir DIR "
                "and name files inside DIR)",
                field,
            )
        path = resolve_inside(spec, data_dir)
        if path is None:
            root = Path(data_dir).expanduser().resolve()
            raise DatasetTaskError(f"{field} {spec!r} refused: it is outside the data directory {root}", field)
        if not path.exists():
            raise DatasetTaskError(f"{field}: no file or directory {spec!r} in the data directory", field)
    else:
        path = Path(spec).expanduser()
    if path.exists():
        return _local(path, split, field=field, split_field=split_field, cache_dir=cache_dir)
    if path.suffix in BUILDERS or spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise DatasetTaskError(f"{field}: no such file or directory: {spec}", field)
    return _hub(spec, split, field=field, split_field=split_field, cache_dir=cache_dir)


def _local(path: Path, split: str, *, field: str, split_field: str, cache_dir):
    import datasets

    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        try:
            data = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise DatasetTaskError(f"{field}: cannot read the saved dataset {path}: {exc}", field) from None
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise DatasetTaskError(
                    f"{split_field}={split!r}: {path} has the splits {', '.join(data)}; choose one of them",
                    split_field,
                )
            return data[split]
        if split != "train":
            raise DatasetTaskError(
                f"{split_field}={split!r}: {path} holds one dataset, not splits; leave {split_field} out", split_field
            )
        return data
    if path.is_file():
        builder = BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DatasetTaskError(
                f"{field}: {path} is not a dataset file; use .jsonl, .json, .csv or .parquet, or a directory "
                "written by Dataset.save_to_disk",
                field,
            )
        if split != "train":
            raise DatasetTaskError(
                f"{split_field}={split!r}: a single file is one split; leave {split_field} out "
                "(give held-out data as its own file in task.eval_dataset)",
                split_field,
            )
        return _read(
            lambda: datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir),
            f"{field}: cannot read {path}",
            field,
        )
    # A folder of data files: the datasets folder builder picks the format and the splits from the names.
    return _read(
        lambda: datasets.load_dataset(str(path), split=split, cache_dir=cache_dir),
        f"{field}: cannot read the folder {path} (split {split!r})",
        field,
    )


def _hub(spec: str, split: str, *, field: str, split_field: str, cache_dir):
    import datasets

    if _offline():
        raise DatasetTaskError(
            f"{field}: {spec!r} is not a local file or directory, and the Hugging Face Hub is offline here "
            "(HF_HUB_OFFLINE=1). Give a local file, or load it where the Hub is reachable and "
            "save it with Dataset.save_to_disk(DIR), or set HF_HUB_OFFLINE=0 if this machine can reach the Hub",
            field,
        )
    return _read(
        lambda: datasets.load_dataset(spec, split=split, cache_dir=cache_dir),
        f"{field}: cannot load {spec!r} (split {split!r}) from the Hub",
        field,
    )


def _read(load, what: str, field: str):
    import datasets

    # Progress bars would bury the one-line error a bad file gets among their lines.
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return load()
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        cause = exc.__cause__ or exc
        if "corresponds to no data" in str(cause):  # how `datasets` reports a split without rows
            raise DatasetTaskError(f"{what}: it has no rows", field) from None
        raise DatasetTaskError(f"{what}: {type(cause).__name__}: {cause}", field) from None
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _offline() -> bool:
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    return False


def check_prompts(data, column: str, source: str) -> str:
    """'text' or 'chat': what the prompt column holds; raises DatasetTaskError for anything else."""
    import pyarrow.compute as pc

    names = list(data.column_names)
    if len(data) == 0:
        raise DatasetTaskError(f"{source} has no rows", "task.dataset")
    if column not in names:
        raise DatasetTaskError(
            f"task.prompt_column {column!r} is not a column of {source}; its columns: {', '.join(names)}",
            "task.prompt_column",
        )
    clash = [c for c in names if c in RESERVED_COLUMNS or (c == "prompt" and column != "prompt")]
    if clash:
        raise DatasetTaskError(
            f"{source} has column(s) {', '.join(clash)}, names the reward's own arguments take "
            f"(prompt, {', '.join(RESERVED_COLUMNS)}); rename them",
            "task.dataset",
        )
    kind = _prompt_kind(data.features[column])
    if kind is None:
        raise DatasetTaskError(
            f"task.prompt_column {column!r} of {source} holds {data.features[column]}; a prompt must be a string "
            "or a list of chat messages ({'role': ..., 'content': ...})",
            "task.prompt_column",
        )
    values = data.data.column(column)
    empty = values.null_count
    if kind == "chat" and len(values):
        empty += int(pc.sum(pc.equal(pc.list_value_length(values), 0)).as_py() or 0)
    if empty:
        raise DatasetTaskError(
            f"task.prompt_column {column!r} of {source}: {empty} row(s) have no prompt (null or empty); "
            "remove them or fill them in",
            "task.prompt_column",
        )
    return kind


def _prompt_kind(feature) -> str | None:
    import datasets

    if isinstance(feature, datasets.Value):
        return "text" if feature.dtype in ("string", "large_string") else None
    lists = tuple(
        getattr(datasets, n) for n in ("List", "LargeList", "Sequence") if isinstance(getattr(datasets, n, None), type)
    )
    inner = (
        feature.feature if isinstance(feature, lists) else feature[0] if isinstance(feature, list) and feature else None
    )
    if isinstance(inner, dict) and {"role", "content"} <= inner.keys():
        content = inner["content"]
        if isinstance(content, datasets.Value) and content.dtype in ("string", "large_string"):
            return "chat"
    return None
