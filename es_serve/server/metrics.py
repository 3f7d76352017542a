"""`GET /metrics`: the server's Prometheus metrics, through prometheus_client with a registry of its own.

Counters and histograms are updated where things happen (a step committed, a completion answered);
gauges about jobs are read from the job records at scrape time. Per-job series exist only for one
job, the running one (or, when none runs, the one that ran last), so the number of series stays
fixed however many jobs the server has seen; `GET /v1/jobs` keeps every job's figures.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
# Step times run from well under a second (a tiny model) to minutes (a large population on CPU).
STEP_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# (metric, help, where the value is in a job record)
JOB_GAUGES = (
    ("es_serve_job_step", "last committed step of the current job", ("step",)),
    ("es_serve_job_reward_mean", "mean population reward at the current job's last step", ("last", "reward_mean")),
    ("es_serve_job_eval_reward", "held-out reward at the current job's last evaluation", ("eval_reward",)),
    (
        "es_serve_job_gen_tokens_per_second",
        "ES generation tokens/s at the current job's last step",
        ("last", "gen_tok_s"),
    ),
    ("es_serve_job_pure_tokens_per_second", "tokens/s of plain inference on one step's requests", ("pure_tok_s",)),
)


class ServerMetrics:
    """What the server counts. `observe_completion` is the completion handlers' one call."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.steps = Counter("es_serve_steps", "ES steps finished by this server process", registry=r)
        self.step_seconds = Histogram(
            "es_serve_step_seconds", "wall time of one ES step", buckets=STEP_BUCKETS, registry=r
        )
        self.completion_requests = Counter("es_serve_completion_requests", "completion requests answered", registry=r)
        self.completion_errors = Counter(
            "es_serve_completion_errors", "completion requests refused or failed (4xx/5xx)", registry=r
        )
        self.completion_tokens = Counter("es_serve_completion_tokens", "tokens generated for completions", registry=r)
        self.prompt_tokens = Counter("es_serve_prompt_tokens", "prompt tokens of answered completions", registry=r)
        self.completion_latency = Histogram(
            "es_serve_completion_latency_seconds",
            "time from a completion request's arrival to its answer",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "es_serve_rejected_requests", "requests answered 429 because a queue was full", ["queue"], registry=r
        )

    def attach(self, manager, stats=None) -> None:
        """Adds the scrape-time gauges of the job manager (and the completion batcher's counters)."""
        self.registry.register(_JobCollector(manager, stats))

    def step_done(self, record: dict) -> None:
        if record.get("step", 0) > 0:
            self.steps.inc()
            if record.get("step_seconds") is not None:
                self.step_seconds.observe(record["step_seconds"])

    def observe_completion(
        self, seconds: float, completion_tokens: int = 0, prompt_tokens: int = 0, status: str = "ok"
    ) -> None:
        """One completion request answered (`status` "ok"), or refused or failed (any other status)."""
        if status != "ok":
            self.completion_errors.inc()
            return
        self.completion_requests.inc()
        self.completion_latency.observe(seconds)
        self.completion_tokens.inc(completion_tokens)
        self.prompt_tokens.inc(prompt_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _JobCollector:
    def __init__(self, manager, stats):
        self.manager, self.stats = manager, stats

    def describe(self):
        return []  # read at scrape time; nothing to check at registration

    def collect(self):
        manager = self.manager
        queue = GaugeMetricFamily("es_serve_queue_length", "jobs waiting for the engine")
        queue.add_metric([], manager.queue_length())
        yield queue
        jobs = manager.jobs()
        counts = dict.fromkeys(STATUSES, 0)
        for job in jobs:
            counts[job["status"]] = counts.get(job["status"], 0) + 1
        by_status = GaugeMetricFamily("es_serve_jobs", "jobs by status", labels=["status"])
        for status, n in counts.items():
            by_status.add_metric([status], n)
        yield by_status
        current = _current(manager, jobs)
        for name, text, path in JOB_GAUGES:
            family = GaugeMetricFamily(name, text, labels=["job", "model"])
            value = current
            for key in path:
                value = (value or {}).get(key)
            if current is not None and value is not None:
                family.add_metric([current["id"], current["model"]], float(value))
            yield family
        stats = self.stats
        if stats is not None:
            batches = CounterMetricFamily("es_serve_completion_batches", "batched generate calls for completions")
            batches.add_metric([], getattr(stats, "batches", 0))
            yield batches
            tok_s = getattr(stats, "tok_s", None)
            gauge = GaugeMetricFamily(
                "es_serve_inference_tokens_per_second", "completion tokens per second of generate time"
            )
            if tok_s is not None:
                gauge.add_metric([], tok_s)
            yield gauge


def _current(manager, jobs: list[dict]) -> dict | None:
    """The running job, else the one that started last: the only job with its own series."""
    running = manager.current
    if running is not None:
        job = next((j for j in jobs if j["id"] == running), None)
        if job is not None:
            return job
    started = [j for j in jobs if j.get("started")]
    return max(started, key=lambda j: (j["started"], j["id"])) if started else None
