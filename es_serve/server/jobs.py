"""Jobs: their records on disk (`<runs>/jobs/<id>.json`), the queue, and the one worker thread.

A job is a training configuration plus a run directory (`<runs>/<id>`). The worker runs one job
at a time through the ordinary Trainer, so a job's run directory is exactly what `es-serve train`
writes and `es-serve train --resume` or `es-serve export` accept. After a restart, queued jobs are
queued again and interrupted ones resume from their last committed step.
"""

from __future__ import annotations

import json
import secrets
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path

from ..config import Config
from ..run_dir import RunDir, atomic_write
from .engine_slot import EngineSlot, LockedEngine
from .settings import ServerSettings

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINISHED = frozenset({SUCCEEDED, FAILED, CANCELLED})
# Metrics fields worth carrying in a job record and in step events (the per-prompt eval list is not).
SUMMARY_KEYS = (
    "step",
    "reward_mean",
    "reward_std",
    "reward_max",
    "eval_reward",
    "eval_stderr",
    "gen_tokens",
    "gen_seconds",
    "gen_tok_s",
    "update_seconds",
    "step_seconds",
)


def summary(record: dict) -> dict:
    return {k: record[k] for k in SUMMARY_KEYS if k in record}


class JobStore:
    """One JSON file per job, replaced atomically on every change."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, dict] = {}
        self.lock = threading.Lock()
        for path in sorted(self.dir.glob("job-*.json")):
            try:
                job = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                print(f"es-serve: skipping unreadable job record {path}: {exc}", file=sys.stderr)
                continue
            self.jobs[job["id"]] = job

    def save(self, job: dict) -> None:
        with self.lock:
            self.jobs[job["id"]] = job
            atomic_write(self.dir / f"{job['id']}.json", json.dumps(job, indent=1).encode())

    def update(self, job_id: str, **fields) -> dict:
        with self.lock:
            job = dict(self.jobs[job_id], **fields)
        self.save(job)
        return job

    def get(self, job_id: str) -> dict | None:
        with self.lock:
            job = self.jobs.get(job_id)
            return dict(job) if job is not None else None

    def all(self) -> list[dict]:
        with self.lock:
            return sorted((dict(j) for j in self.jobs.values()), key=lambda j: (j["created"], j["id"]))


class JobManager:
    def __init__(self, settings: ServerSettings, slot: EngineSlot):
        self.settings, self.slot = settings, slot
        settings.runs.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(settings.jobs_dir)
        self.queue: deque[str] = deque()
        self.cv = threading.Condition()
        self.current: str | None = None
        self.trainer = None
        self.closing = False
        self.steps_done = 0  # steps finished by this process, for /metrics
        self.thread = threading.Thread(target=self._work, name="es-serve-jobs", daemon=True)

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Queues what a previous server left unfinished (interrupted jobs first), then starts the worker."""
        jobs = [j for j in self.store.all() if j["status"] in (RUNNING, QUEUED)]
        # A job that was running when the server died (or was stopped) goes first: it was first in line.
        for job in sorted(jobs, key=lambda j: j["started"] is None):
            if job["status"] == RUNNING:
                self.store.update(job["id"], status=QUEUED)
            self.queue.append(job["id"])
        self.thread.start()

    def request_stop(self) -> None:
        """Stops after the step in progress (SIGTERM): the job stays queued and resumes at the next start."""
        with self.cv:
            self.closing = True
            if self.trainer is not None:
                self.trainer.stop_requested = True
            self.cv.notify_all()

    def join(self, timeout: float | None = None) -> None:
        self.request_stop()
        if self.thread.is_alive():
            self.thread.join(timeout)

    # -- the API's operations -------------------------------------------------------------------
    def submit(self, config: Config) -> dict:
        job_id = f"job-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"
        job = {
            "id": job_id,
            "status": QUEUED,
            "created": time.time(),
            "started": None,
            "finished": None,
            "model": config.model.name,
            "task": config.task.name,
            "steps": config.train.steps,
            "step": 0,
            "last": None,
            "error": None,
            "pure_tok_s": None,
            "run_dir": str((self.settings.runs / job_id).resolve()),
            "config": config.model_dump(mode="json", exclude_none=True),
        }
        with self.cv:
            if self.closing:
                raise RuntimeError("the server is shutting down; submit the job again after it restarts")
            self.store.save(job)
            self.queue.append(job_id)
            self.cv.notify_all()
        return job

    def cancel(self, job_id: str) -> dict:
        with self.cv:
            job = self.store.get(job_id)
            if job is None or job["status"] in FINISHED:
                return job
            if job_id in self.queue:
                self.queue.remove(job_id)
                return self.store.update(job_id, status=CANCELLED, finished=time.time())
            # Running: it stops after the step in progress, which stays committed.
            job = self.store.update(job_id, cancel_requested=True)
            if self.current == job_id and self.trainer is not None:
                self.trainer.stop_requested = True
            return job

    def get(self, job_id: str) -> dict | None:
        job = self.store.get(job_id)
        if job is not None and job["status"] == QUEUED:
            with self.cv:
                job["queue_position"] = list(self.queue).index(job_id) if job_id in self.queue else None
        return job

    def jobs(self) -> list[dict]:
        return [self.get(j["id"]) for j in self.store.all()]

    def queue_length(self) -> int:
        with self.cv:
            return len(self.queue)

    # -- the worker -----------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self.cv:
                while not self.queue and not self.closing:
                    self.cv.wait()
                if self.closing:
                    return
                job_id = self.queue.popleft()
                self.current = job_id
            try:
                self._run(job_id)
            except BaseException as exc:  # a failing job must not take the server down
                traceback.print_exc()
                self.store.update(job_id, status=FAILED, finished=time.time(), error=f"{type(exc).__name__}: {exc}")
                with self.slot.lock:
                    # The engine may hold half-updated weights or be broken: rebuild on next use.
                    if self.slot.holder == job_id:
                        self.slot.close()
            finally:
                with self.cv:
                    self.current, self.trainer = None, None

    def _run(self, job_id: str) -> None:
        from ..models import resolve_model
        from ..trainer import Trainer
        from .validation import job_task, load_job_reward

        job = self.store.get(job_id)
        if job is None or job["status"] != QUEUED:
            return
        config = Config.model_validate(job["config"])
        task = job_task(config, self.settings)
        reward = load_job_reward(config, task, self.settings)
        model_dir = resolve_model(config.model.name)
        run = RunDir(job["run_dir"])
        resuming = run.exists()
        job = self.store.update(
            job_id,
            status=RUNNING,
            started=job["started"] or time.time(),
            error=None,
            resumed=job.get("resumed", 0) + resuming,
        )
        with self.slot.lock:
            engine = self.slot.ensure(config, model_dir)
            # Fresh or resumed, the trainer starts from the model's own weights (resume replays onto them).
            self.slot.reset()
            self.slot.holder = job_id
        trainer = Trainer(config, run.path, LockedEngine(engine, self.slot.lock), task, reward)
        with self.cv:
            self.trainer = trainer
            if self.closing or job.get("cancel_requested"):
                trainer.stop_requested = True
        if job.get("pure_tok_s") is None and not trainer.stop_requested:
            job = self.store.update(job_id, pure_tok_s=_pure_inference_tok_s(trainer, engine, self.slot.lock))

        def on_step(report) -> None:
            self.steps_done += report.step > 0
            fields = {"step": report.step, "last": summary(report.record)}
            if report.record.get("eval_reward") is not None:
                fields["eval_reward"] = report.record["eval_reward"]
            self.store.update(job_id, **fields)

        trainer.train(resume=resuming, on_step=on_step)
        self._finish(job_id, trainer, engine)

    def _finish(self, job_id: str, trainer, engine) -> None:
        from ..plot import plot_metrics

        job = self.store.get(job_id)
        done = trainer.step >= trainer.config.train.steps
        if trainer.step and trainer.run.latest_checkpoint()[0] < trainer.step:
            # The replay log alone would rebuild these weights; a checkpoint makes resuming and serving fast.
            with self.slot.lock:
                trainer.save_checkpoint(trainer.step)
        try:
            plot_metrics(trainer.run.metrics(), trainer.run.plot_path, f"{job['model']} on {job['task']} ({job_id})")
        except Exception as exc:  # the plot is a convenience; the metrics are on disk either way
            print(f"es-serve: could not plot {job_id}: {exc}", file=sys.stderr)
        if done:
            self.store.update(job_id, status=SUCCEEDED, finished=time.time(), step=trainer.step)
        elif job.get("cancel_requested"):
            self.store.update(job_id, status=CANCELLED, finished=time.time(), step=trainer.step)
        else:
            # Stopped by a shutdown: queued again, so the next server start resumes it.
            self.store.update(job_id, status=QUEUED, step=trainer.step, interrupted=True)


def _pure_inference_tok_s(trainer, engine, lock) -> float | None:
    """Tokens/s of the unperturbed model on one step's worth of requests: the baseline ES is compared to."""
    config = trainer.config
    rows = trainer.task.sample(config.task.prompts_per_step, 1)
    prompts = [trainer.render(r) for r in rows] * config.es.population
    with lock:
        started = time.perf_counter()
        completions = engine.generate(prompts, trainer.sampling)
        seconds = time.perf_counter() - started
    tokens = sum(len(c.token_ids) for c in completions)
    return tokens / seconds if seconds > 0 else None
