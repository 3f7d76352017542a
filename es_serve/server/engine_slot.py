"""The server's one engine, the lock that serializes every call into it, and whose weights it holds.

vLLM's LLM object is not thread-safe and training and completions share it, so every engine call
(training step, evaluation, completion batch, weight swap) runs under `EngineSlot.lock`.
"""

from __future__ import annotations

import threading
from pathlib import Path

from ..config import Config
from ..engines.sizing import resolve_dtype

LOCKED_METHODS = frozenset({"generate", "generate_population", "generate_members", "apply_update"})
LOCKED_METHODS |= {"state_dict", "optimizer_state", "load_state_dict", "checksum"}


class Busy(RuntimeError):
    """The engine is training another job, so it cannot switch to other weights now."""


def engine_key(config: Config, model_dir: Path) -> tuple:
    """Everything build_engine sizes the engine by: equal keys mean the engine can be reused."""
    es = config.es
    return (
        str(model_dir),
        config.engine.kind,
        resolve_dtype(config.model.dtype),
        config.model.max_model_len,
        config.engine.memory_fraction,
        tuple(es.modules),
        es.population,
        es.rank,
        es.antithetic,
        config.task.prompts_per_step,
        config.generation.max_tokens,
        es.seed,
    )


class LockedEngine:
    """The engine as the trainer sees it: the same object, with each call taken under the slot's lock."""

    def __init__(self, engine, lock: threading.RLock):
        self._engine, self._lock = engine, lock

    def __getattr__(self, name):
        attr = getattr(self._engine, name)
        if name not in LOCKED_METHODS:
            return attr

        def locked(*args, **kwargs):
            with self._lock:
                return attr(*args, **kwargs)

        return locked


class EngineSlot:
    def __init__(self):
        self.lock = threading.RLock()
        self.engine = None
        self.key: tuple | None = None
        self.config: Config | None = None
        self.model_dir: Path | None = None
        # The job whose weights the engine holds (its live weights while it trains); None: base weights.
        self.holder: str | None = None

    @property
    def model(self) -> str | None:
        return self.config.model.name if self.config is not None else None

    def ensure(self, config: Config, model_dir: Path):
        """The engine for `config`, built (replacing the current one) unless the current one fits.

        The caller holds the lock. A reused engine keeps whatever weights it had: callers that need
        the base weights call `reset`.
        """
        from ..engines import build_engine

        key = engine_key(config, model_dir)
        if self.engine is not None and self.key == key:
            self.config = config
            return self.engine
        self.close()
        self.engine = build_engine(config, model_dir)
        self.key, self.config, self.model_dir, self.holder = key, config, Path(model_dir), None
        return self.engine

    def reset(self) -> None:
        """Back to the model's own weights (the caller holds the lock)."""
        from ..weights import base_weights

        if self.holder is None:
            return
        _, weights = base_weights(self.model_dir, self.config.es.modules)
        self.engine.load_state_dict(weights)
        self.holder = None

    def load_job(self, job_id: str, config: Config, model_dir: Path, run_dir: Path) -> None:
        """The engine holding a finished job's weights: last checkpoint plus its replay log."""
        from ..export import trained_weights
        from ..run_dir import RunDir

        if self.holder == job_id:
            return
        engine = self.ensure(config, model_dir)
        _, weights = trained_weights(RunDir(run_dir), model_dir, config.es.modules)
        engine.load_state_dict(weights)
        self.holder = job_id

    def close(self) -> None:
        engine, self.engine, self.key, self.config, self.holder = self.engine, None, None, None, None
        if engine is not None and hasattr(engine, "close"):
            engine.close()
