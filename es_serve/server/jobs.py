"""Jobs: their records on disk (`<runs>/jobs/<id>.json`), the queue, and the one worker thread.

A job is a training configuration plus a run directory (`<runs>/<id>`). The worker runs one job
at a time through the ordinary Trainer, so a job's run directory is exactly what `es-serve train`
writes and `es-serve train --resume` or `es-serve export` accept. After a restart, queued jobs are
queued again and interrupted ones resume from their last committed step.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections import deque
from pathlib import Path

from ..config import Config, saved_before_schedules
from ..run_dir import RunDir, atomic_write
from .engine_slot import EngineSlot, LockedEngine
from .settings import ServerSettings

log = logging.getLogger(__name__)
JOB_LOG = "job.log"  # in the run directory: everything logged while the job ran, tracebacks included
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

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


class QueueFull(RuntimeError):
    """The job queue holds --max-queued-jobs jobs already."""


class JobStore:
    """One JSON file per job, replaced atomically on every change.

    Every change is a read-modify-write of the record under one lock, so two updates (a cancel and
    the worker's status change) never interleave and lose a field.
    """

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, dict] = {}
        self.lock = threading.RLock()
        for path in sorted(self.dir.glob("job-*.json")):
            try:
                job = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                log.warning("skipping unreadable job record %s: %s", path, exc)
                continue
            self.jobs[job["id"]] = job

    def save(self, job: dict) -> None:
        with self.lock:
            self._write(job)

    def _write(self, job: dict) -> None:
        self.jobs[job["id"]] = job
        atomic_write(self.dir / f"{job['id']}.json", json.dumps(job, indent=1).encode())

    def update(self, job_id: str, **fields) -> dict:
        with self.lock:
            job = dict(self.jobs[job_id], **fields)
            self._write(job)
            return dict(job)

    def get(self, job_id: str) -> dict | None:
        with self.lock:
            job = self.jobs.get(job_id)
            return dict(job) if job is not None else None

    def all(self) -> list[dict]:
        with self.lock:
            return sorted((dict(j) for j in self.jobs.values()), key=lambda j: (j["created"], j["id"]))


class JobManager:
    def __init__(self, settings: ServerSettings, slot: EngineSlot, metrics=None):
        self.settings, self.slot, self.metrics = settings, slot, metrics
        settings.runs.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(settings.jobs_dir)
        self.queue: deque[str] = deque()
        self.cv = threading.Condition()
        self.current: str | None = None
        self.trainer = None
        self.closing = False
        self.steps_done = 0  # steps finished by this process
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
            if len(self.queue) >= self.settings.max_queued_jobs:
                raise QueueFull(
                    f"{len(self.queue)} jobs are already waiting (at most {self.settings.max_queued_jobs}, "
                    "--max-queued-jobs); submit again later"
                )
            self.store.save(job)
            self.queue.append(job_id)
            self.cv.notify_all()
        return job

    def cancel(self, job_id: str) -> dict:
        """Queued: dropped at once. Taken by the worker (loading, building the engine, training): the
        request is recorded, and the worker honours it at its next stage boundary (after the step in
        progress, which stays committed). The worker reads the flag under the same lock it is set under,
        so a cancel arriving at any moment is seen."""
        with self.cv:
            job = self.store.get(job_id)
            if job is None or job["status"] in FINISHED:
                return job
            if job_id in self.queue:
                self.queue.remove(job_id)
                log.info("job %s cancelled while queued", job_id)
                return self.store.update(job_id, status=CANCELLED, finished=time.time())
            job = self.store.update(job_id, cancel_requested=True)
            log.info("job %s: cancel requested; it stops at the next step boundary", job_id)
            if self.current == job_id and self.trainer is not None:
                self.trainer.stop_requested = True
            return job

    def cancel_requested(self, job_id: str) -> bool:
        with self.cv:
            return bool((self.store.get(job_id) or {}).get("cancel_requested"))

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
            handler = self._job_log(job_id)
            try:
                self._run(job_id)
            except BaseException as exc:  # a failing job must not take the server down
                log.exception("job %s failed", job_id)
                self.store.update(job_id, status=FAILED, finished=time.time(), error=f"{type(exc).__name__}: {exc}")
                with self.slot.lock:
                    # The engine may hold half-updated weights or be broken: rebuild on next use.
                    if self.slot.holder == job_id:
                        self.slot.close()
            finally:
                with self.cv:
                    self.current, self.trainer = None, None
                if handler is not None:
                    logging.getLogger().removeHandler(handler)
                    handler.close()

    def _job_log(self, job_id: str) -> logging.Handler | None:
        """Everything this worker thread logs while the job runs, appended to the job's job.log."""
        job = self.store.get(job_id)
        if job is None:
            return None
        try:
            path = Path(job["run_dir"])
            path.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(path / JOB_LOG, encoding="utf-8")
        except OSError as exc:
            log.warning("job %s: cannot write its log: %s", job_id, exc)
            return None
        worker = threading.get_ident()
        handler.addFilter(lambda record: record.thread == worker)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.INFO)
        root = logging.getLogger()
        root.addHandler(handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            # The job log keeps INFO lines even when the console shows only warnings.
            for name in ("es_serve", "rewards"):
                if logging.getLogger(name).getEffectiveLevel() > logging.INFO:
                    logging.getLogger(name).setLevel(logging.INFO)
        return handler

    def _run(self, job_id: str) -> None:
        from ..models import resolve_model
        from ..trainer import Trainer
        from .validation import job_task, load_job_reward

        job = self.store.get(job_id)
        if job is None or job["status"] != QUEUED:
            return
        if self.cancel_requested(job_id):
            return self._cancelled(job_id, "before it started")
        config = Config.model_validate(saved_before_schedules(job["config"]))
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
        log.info(
            "job %s: %s on %s, %d steps%s",
            job_id,
            config.model.name,
            config.task.name,
            config.train.steps,
            " (resuming)" if resuming else "",
        )
        with self.slot.lock:
            engine = self.slot.ensure(config, model_dir)
            # Fresh or resumed, the trainer starts from the model's own weights (resume replays onto them).
            self.slot.reset()
            self.slot.holder = job_id
        if self.cancel_requested(job_id):  # arrived while the engine was being built
            return self._cancelled(job_id, "while its engine was being built")
        trainer = Trainer(config, run.path, LockedEngine(engine, self.slot.lock), task, reward)
        with self.cv:
            self.trainer = trainer
            if self.closing or self.cancel_requested(job_id):
                trainer.stop_requested = True
        if job.get("pure_tok_s") is None and not trainer.stop_requested:
            job = self.store.update(job_id, pure_tok_s=_pure_inference_tok_s(trainer, engine, self.slot.lock))

        def on_step(report) -> None:
            self.steps_done += report.step > 0
            if self.metrics is not None:
                self.metrics.step_done(report.record)
            rec = report.record
            log.info(
                "job %s step %d: reward %s, eval %s, %.2f s",
                job_id,
                report.step,
                _fmt(rec.get("reward_mean")),
                _fmt(rec.get("eval_reward")),
                rec.get("step_seconds") or 0.0,
            )
            fields = {"step": report.step, "last": summary(report.record)}
            if report.record.get("eval_reward") is not None:
                fields["eval_reward"] = report.record["eval_reward"]
            self.store.update(job_id, **fields)

        ran = False
        if not trainer.stop_requested:
            trainer.train(resume=resuming, on_step=on_step)
            ran = True
        self._finish(job_id, trainer, engine, ran)

    def _cancelled(self, job_id: str, when: str) -> None:
        log.info("job %s cancelled %s", job_id, when)
        self.store.update(job_id, status=CANCELLED, finished=time.time())

    def _finish(self, job_id: str, trainer, engine, ran: bool = True) -> None:
        from ..plot import plot_metrics

        job = self.store.get(job_id)
        done = ran and trainer.step >= trainer.config.train.steps
        if trainer.step and trainer.run.latest_checkpoint()[0] < trainer.step:
            # The replay log alone would rebuild these weights; a checkpoint makes resuming and serving fast.
            with self.slot.lock:
                trainer.save_checkpoint(trainer.step)
        try:
            plot_metrics(trainer.run.metrics(), trainer.run.plot_path, f"{job['model']} on {job['task']} ({job_id})")
        except Exception as exc:  # the plot is a convenience; the metrics are on disk either way
            log.warning("could not plot %s: %s", job_id, exc)
        if done:
            log.info("job %s succeeded at step %d", job_id, trainer.step)
            self.store.update(job_id, status=SUCCEEDED, finished=time.time(), step=trainer.step)
        elif self.cancel_requested(job_id):
            log.info("job %s cancelled at step %d", job_id, trainer.step)
            self.store.update(job_id, status=CANCELLED, finished=time.time(), step=trainer.step)
        else:
            log.info(
                "job %s interrupted at step %d by the shutdown; it resumes at the next start", job_id, trainer.step
            )
            # Stopped by a shutdown: queued again, so the next server start resumes it.
            self.store.update(job_id, status=QUEUED, step=trainer.step, interrupted=True)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


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
