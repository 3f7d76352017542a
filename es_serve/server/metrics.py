"""`GET /metrics`: Prometheus text exposition of jobs, steps, rewards, tokens/s and the queue."""

from __future__ import annotations

from .batcher import BatchStats
from .jobs import JobManager


def _line(name: str, value, labels: dict | None = None) -> str | None:
    if value is None:
        return None
    label = ""
    if labels:
        label = "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"
    return f"{name}{label} {float(value):.6g}"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


HELP = {
    "es_serve_queue_length": ("gauge", "jobs waiting for the engine"),
    "es_serve_jobs": ("gauge", "jobs by status"),
    "es_serve_steps_total": ("counter", "ES steps finished by this server process"),
    "es_serve_job_step": ("gauge", "last committed step of a job"),
    "es_serve_job_reward_mean": ("gauge", "mean population reward at the job's last step"),
    "es_serve_job_eval_reward": ("gauge", "held-out reward at the job's last evaluation"),
    "es_serve_job_gen_tokens_per_second": ("gauge", "ES generation tokens/s at the job's last step"),
    "es_serve_job_pure_tokens_per_second": ("gauge", "tokens/s of plain inference on one step's requests"),
    "es_serve_completion_requests_total": ("counter", "completion requests answered"),
    "es_serve_completion_batches_total": ("counter", "batched generate calls for completions"),
    "es_serve_completion_tokens_total": ("counter", "tokens generated for completions"),
    "es_serve_inference_tokens_per_second": ("gauge", "completion tokens per second of generate time"),
}


def render(manager: JobManager, stats: BatchStats) -> str:
    lines: dict[str, list[str]] = {name: [] for name in HELP}
    jobs = manager.jobs()
    lines["es_serve_queue_length"].append(_line("es_serve_queue_length", manager.queue_length()))
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job["status"]] = counts.get(job["status"], 0) + 1
    for status in ("queued", "running", "succeeded", "failed", "cancelled"):
        lines["es_serve_jobs"].append(_line("es_serve_jobs", counts.get(status, 0), {"status": status}))
    lines["es_serve_steps_total"].append(_line("es_serve_steps_total", manager.steps_done))
    for job in jobs:
        labels = {"job": job["id"], "model": job["model"]}
        last = job.get("last") or {}
        lines["es_serve_job_step"].append(_line("es_serve_job_step", job.get("step"), labels))
        lines["es_serve_job_reward_mean"].append(_line("es_serve_job_reward_mean", last.get("reward_mean"), labels))
        lines["es_serve_job_eval_reward"].append(_line("es_serve_job_eval_reward", job.get("eval_reward"), labels))
        lines["es_serve_job_gen_tokens_per_second"].append(
            _line("es_serve_job_gen_tokens_per_second", last.get("gen_tok_s"), labels)
        )
        lines["es_serve_job_pure_tokens_per_second"].append(
            _line("es_serve_job_pure_tokens_per_second", job.get("pure_tok_s"), labels)
        )
    lines["es_serve_completion_requests_total"].append(_line("es_serve_completion_requests_total", stats.requests))
    lines["es_serve_completion_batches_total"].append(_line("es_serve_completion_batches_total", stats.batches))
    lines["es_serve_completion_tokens_total"].append(_line("es_serve_completion_tokens_total", stats.completion_tokens))
    lines["es_serve_inference_tokens_per_second"].append(_line("es_serve_inference_tokens_per_second", stats.tok_s))
    out = []
    for name, (kind, text) in HELP.items():
        out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        out += [x for x in lines[name] if x is not None]
    return "\n".join(out) + "\n"
