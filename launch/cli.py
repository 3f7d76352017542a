"""The `es-serve` command line."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, MemoryError, NotImplementedError, KeyError)


def _fail(message: str, code: int = 2) -> int:
    print(f"es-serve: error: {message}", file=sys.stderr)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="es-serve", description="Train LLMs with evolution strategies through vLLM.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run ES training (the embedded default needs no arguments)")
    train.add_argument("config", nargs="?", help="TOML configuration file")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    train.add_argument("--out", help="run directory (default: runs/<time>-<task>)")
    train.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last committed step")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    sub.add_parser("models", help="list the known model names")

    bench = sub.add_parser(
        "bench", add_help=False, help="training throughput against pure inference and the peers' ways (see --help)"
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)

    compare = sub.add_parser(
        "compare", add_help=False, help="es-serve against TRL's GRPOTrainer on the same job and budget (see --help)"
    )
    compare.add_argument("compare_args", nargs=argparse.REMAINDER)

    export = sub.add_parser(
        "export", help="write a run's trained model as a Hugging Face directory (sharded safetensors, model card)"
    )
    export.add_argument("run_dir")
    export.add_argument("out_dir")
    export.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors file, e.g. 500MB (default 5GB, as the Hub's)"
    )
    export.add_argument("--push-to-hub", metavar="REPO", help="also upload the directory to this Hub model repository")
    export.add_argument("--private", action="store_true", help="create the Hub repository as private")

    serve = sub.add_parser("serve", help="the training server: jobs API, live metrics, OpenAI-style completions")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key", default=os.environ.get("ES_SERVE_API_KEY"), help="require 'Authorization: Bearer KEY'"
    )
    serve.add_argument("--runs", default="runs", help="directory of job records and run directories")
    serve.add_argument("--rewards-dir", help="directory whose .py files jobs may name as reward.fn=file.py:function")
    serve.add_argument("--data-dir", help="directory whose dataset files jobs may name as task.dataset")
    serve.add_argument(
        "--engine",
        choices=("vllm", "dense"),
        default="vllm",
        help="engine for completions on a model no job has loaded yet",
    )
    serve.add_argument("--max-tokens", type=int, default=1024, help="cap on generated tokens per completion")
    serve.add_argument(
        "--max-queued-jobs", type=int, default=100, help="jobs that may wait for the engine; beyond, 429 (default 100)"
    )
    serve.add_argument(
        "--max-pending-completions",
        type=int,
        default=1024,
        help="completion requests that may wait or run at once; beyond, 429 with Retry-After (default 1024)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error", "critical"),
        help="console log level (each job's job.log keeps INFO and above)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["bench"], ["compare"]):
        # Their options belong to benchmarks/throughput.py and benchmarks/compare.py; argparse would claim
        # them for this parser.
        argv = [argv[0], "--", *argv[1:]]
    args = _parser().parse_args(argv)
    if not getattr(args, "push_to_hub", None):  # a push is an explicit request for the network
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "models":
            return _models()
        if args.command == "bench":
            from benchmarks.throughput import main as bench

            rest = args.bench_args
            return bench(rest[1:] if rest[:1] == ["--"] else rest)
        if args.command == "compare":
            from benchmarks.compare import main as compare

            rest = args.compare_args
            return compare(rest[1:] if rest[:1] == ["--"] else rest)
        if args.command == "export":
            return _export(args)
        if args.command == "serve":
            return _serve(args)
    except USER_ERRORS as exc:
        if os.environ.get("ES_SERVE_DEBUG"):
            raise
        return _fail(str(exc).strip("'\""))
    return 1


def _models() -> int:
    from es_serve.models import list_models

    for name, description, cached in list_models():
        print(f"{name:16s} {'cached ' if cached else 'not yet'}  {description}")
    print("Any local Hugging Face model directory is accepted as model.name too.")
    return 0


def _export(args) -> int:
    from es_serve.export import export_run

    shard = args.max_shard_size
    out = export_run(
        Path(args.run_dir),
        Path(args.out_dir),
        max_shard_size=int(shard) if shard.isdigit() else shard,
        push_to=args.push_to_hub,
        private=args.private,
    )
    print(f"exported {args.run_dir} to {out}" + (f" and pushed it to {args.push_to_hub}" if args.push_to_hub else ""))
    return 0


def _serve(args) -> int:
    from es_serve.server import ServerSettings, serve

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    if args.rewards_dir and not Path(args.rewards_dir).is_dir():
        raise FileNotFoundError(f"--rewards-dir {args.rewards_dir} is not a directory")
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise FileNotFoundError(f"--data-dir {args.data_dir} is not a directory")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    for flag in ("max_queued_jobs", "max_pending_completions"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    settings = ServerSettings(
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        runs=Path(args.runs),
        rewards_dir=Path(args.rewards_dir) if args.rewards_dir else None,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        engine=args.engine,
        max_tokens=args.max_tokens,
        max_queued_jobs=args.max_queued_jobs,
        max_pending_completions=args.max_pending_completions,
        log_level=args.log_level,
    )
    try:
        return serve(settings)
    except OSError as exc:
        raise ValueError(str(exc)) from None


def _load(args):
    from es_serve.config import ConfigError, load_config, validate

    if args.resume:
        from es_serve.run_dir import RunDir

        run = RunDir(args.resume)
        if not run.exists():
            raise ConfigError(f"--resume {args.resume}: no run there (config.toml is missing)")
        saved = load_config(run.config_path, saved_run=True)
        config = load_config(run.config_path, args.overrides, saved_run=True)
        # reward.timeout_s does not change what a step computes, so a resume may raise it.
        changed = [
            k
            for k in ("model", "es", "task", "reward", "generation")
            if getattr(saved, k).model_dump(exclude={"timeout_s"})
            != getattr(config, k).model_dump(exclude={"timeout_s"})
        ]
        if changed:
            raise ConfigError(
                f"--resume cannot change [{', '.join(changed)}]: the replay log depends on them; "
                "only train.*, engine.* and reward.timeout_s may change when resuming"
            )
        return config, run.path
    config = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.task.name}"
    validate(config.model_dump())
    return config, out


def _train(args) -> int:
    from es_serve.config import ConfigError

    try:
        config, out = _load(args)
        from es_serve.models import resolve_model
        from rewards import load_reward, task_from_config

        # Cheap checks first: a typo in the task should not wait for a model conversion.
        if config.task.dataset and not config.reward.fn:
            raise ConfigError(
                "a dataset task has no default reward: set reward.fn (a built-in name such as numeric, "
                "path/to/file.py:function, module:function such as trl.rewards:accuracy_reward, or verl:file.py)"
            )
        task = task_from_config(config.task)
        reward = load_reward(config.reward.fn or task.default_reward, weights=config.reward.weights)
        model_dir = resolve_model(config.model.name)
    except ConfigError as exc:
        return _fail(str(exc))

    from es_serve.engines import build_engine
    from es_serve.plot import plot_metrics
    from es_serve.trainer import Trainer, eval_gain

    print(f"es-serve: model {config.model.name} ({model_dir}), task {config.task.name}, run directory {out}")
    engine = build_engine(config, model_dir)
    trainer = Trainer(config, out, engine, task, reward)

    def stop(signum, frame):
        if trainer.stop_requested:
            raise KeyboardInterrupt
        trainer.stop_requested = True
        print("\nes-serve: stopping after the step in progress (send again to abort it)", file=sys.stderr)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    bar = _progress(config.train.steps, args.quiet)

    def on_step(report):
        rec = report.record
        plot_metrics(trainer.run.metrics(), trainer.run.plot_path, f"{config.model.name} on {config.task.name}")
        bar.update(report.step, rec)

    from rewards.errors import RewardError

    try:
        trainer.train(resume=bool(args.resume), on_step=on_step)
    except RewardError as exc:
        # Raised before the failing step changed any weight: every committed step is on disk.
        bar.close()
        return _fail(f"{exc}; the run is intact at step {trainer.step}: continue with --resume {out}", code=1)
    bar.close()
    gain = eval_gain(trainer.run.metrics())
    if gain:
        print(
            f"es-serve: held-out eval reward {gain['first']:.3f} at step {gain['first_step']} -> "
            f"{gain['last']:.3f} at step {gain['last_step']}: {gain['gain']:+.3f} "
            f"(paired s.e. {gain['paired_stderr']:.3f} over {gain['prompts']} prompts)"
        )
    print(f"es-serve: run directory {out} (metrics.jsonl, reward_curve.png, checkpoints/)")
    return 0


class _progress:
    """A tqdm bar showing step, reward, eval reward and generation tokens/s."""

    def __init__(self, total: int, quiet: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, disable=quiet, unit="step", dynamic_ncols=True)
        self.eval = None

    def update(self, step: int, rec: dict) -> None:
        if rec.get("eval_reward") is not None:
            self.eval = rec["eval_reward"]
        self.bar.n = step
        post = {}
        if rec.get("reward_mean") is not None:
            post["reward"] = f"{rec['reward_mean']:.3f}"
        if self.eval is not None:
            post["eval"] = f"{self.eval:.3f}"
        if rec.get("gen_tok_s"):
            post["tok/s"] = f"{rec['gen_tok_s']:.0f}"
        self.bar.set_postfix(post, refresh=True)

    def close(self) -> None:
        self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
