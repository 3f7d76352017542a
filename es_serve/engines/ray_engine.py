"""The Ray engine: K replicas of one engine evaluate slices of a population; only seeds and fitness
cross the network for the update.

The driver (this process) scores the completions and shapes the fitness as with one engine. An ES
update is a pure function of the generation's seed, its noise epoch and the N shaped fitness values,
so that is all the driver sends; every replica rebuilds the low-rank factors from the seed and merges
them into its own float32 masters. Replicas stay bitwise identical because they run the same
deterministic float32 arithmetic on the same inputs; a sha256 checksum of the trained matrices is
compared every `engine.checksum_every` updates, and a replica that disagrees gets a copy of the
weights of a healthy one.

Faults: a replica that dies while generating has its members re-run on the survivors (a member's
output depends only on its seed and its prompts, so the step's result is unchanged); a replica that
dies while updating just drops out. A replica that does not answer a call within
`engine.ray_timeout_s` is treated as dead the same way (killed, its work re-run, replaced). A replacement is started in the background and joins at the next
step boundary, restored from the run's latest checkpoint plus the replay log after it.

Per-step traffic is measured by serialising the exact call arguments and results (`traffic`).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..config import Config, ConfigError
from ..types import Completion, Generation, PopulationResult, Sampling
from .ray_replica import MAX_DRIFT, Replica, drift_per_update, weights_checksum, within_drift

log = logging.getLogger(__name__)

TRAFFIC_KEYS = (
    "net/generate_sent_bytes",
    "net/generate_received_bytes",
    "net/update_sent_bytes",
    "net/update_received_bytes",
    "net/eval_sent_bytes",
    "net/eval_received_bytes",
    "net/weights_bytes",
    "net/control_sent_bytes",
    "net/control_received_bytes",
)


def connect(address: str | None, replicas: int, replica_cpus: float) -> bool:
    """Connects this process to Ray; True when it did (so `close` disconnects again)."""
    import ray

    if ray.is_initialized():
        return False
    if address in (None, "", "local"):
        # A private single-machine cluster; logical CPUs may exceed physical ones so that K
        # replicas can share a small machine (they then share its cores).
        cpus = max(os.cpu_count() or 1, math.ceil(replicas * replica_cpus))
        start_local_ray(num_cpus=cpus)
        return True
    hint = (
        "Start one with `ray start --head` on the head node (and `ray start --address=HEAD_IP:6379` on each "
        "worker) or `ray up launch/configs/ray-cluster.yaml`; engine.ray_address=local runs the replicas on "
        "this machine without a cluster"
    )
    # Ray retries an unreachable address for minutes; a plain TCP probe fails in seconds instead.
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if sep and host and port.isdigit():
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise ConfigError(f"engine.ray_address={address!r}: nothing answers there ({exc}). {hint}") from None
    try:
        ray.init(address=address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"engine.ray_address={address!r}: no Ray cluster could be reached ({str(exc).strip()}). {hint}"
        ) from None
    return True


def start_local_ray(**init_kwargs) -> None:
    """Starts a private Ray cluster on this machine whose every service listens on 127.0.0.1.

    ray.init alone advertises the machine's interface address, and rewrites an explicit
    `_node_ip_address="127.0.0.1"` to that address too. Ray's switch for single-machine use
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read into ray_constants when ray is imported) makes it pick
    the loopback address instead; it is set for this process and for what it spawns, and only here,
    so that joining a real cluster (`auto`, host:port) still advertises a reachable address.
    """
    import ray
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(include_dashboard=False, **init_kwargs)
    finally:
        os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        ray_constants.ENABLE_RAY_CLUSTER = True
    node_ip = ray.util.get_node_ip_address()
    if node_ip != "127.0.0.1":
        ray.shutdown()
        raise RuntimeError(f"the local Ray cluster advertises {node_ip}, not 127.0.0.1; refusing to run on it")


def _drift_gain(rule) -> float:
    """How much more rounding drift between CPU kinds one merge may leave than plain sgd's GEMM.

    Momentum carries each step's gradient (and its rounding) on with weight mu^k, at most 1 / (1 - mu) in
    all; Adam divides by the square root of its second moment, which no such linear bound covers, so its
    replicas must agree bitwise (one CPU kind) or be resynchronised at every check that finds them apart.
    """
    if rule.name == "momentum":
        return 1.0 / (1.0 - rule.momentum)
    if rule.name == "adam":
        return math.inf
    return 1.0


def split(items: Sequence[int], parts: int, unit: int = 1) -> list[list[int]]:
    """Contiguous, balanced slices of whole groups of `unit` (antithetic pairs stay together)."""
    groups = [list(items[i : i + unit]) for i in range(0, len(items), unit)]
    parts = max(1, min(parts, len(groups)))
    base, extra = divmod(len(groups), parts)
    out, start = [], 0
    for p in range(parts):
        count = base + (1 if p < extra else 0)
        out.append([i for g in groups[start : start + count] for i in g])
        start += count
    return out


class _Handle:
    """One actor and what the driver knows about it."""

    def __init__(self, actor, number: int):
        self.actor, self.number = actor, number
        self.ready = actor.info.remote()
        self.info: dict = {}

    def __repr__(self) -> str:
        where = f" on {self.info['host']} pid {self.info['pid']}" if self.info else ""
        return f"replica {self.number}{where}"


class RayEngine:
    def __init__(self, config: Config, model_dir: str | Path, replace_dead: bool = True):
        import ray
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
        self.config, self.model_dir, self.replace_dead = config, model_dir, replace_dead
        eng = config.engine
        self.checksum_every = eng.checksum_every
        self.timeout = eng.ray_timeout_s
        local = eng.ray_address in (None, "", "local")
        if local and eng.kind == "vllm" and not (eng.replica_gpus or 0):
            # Replicas start concurrently and each checks only itself; together they share one node.
            from ..engines import plan_for
            from .sizing import check_replicas_fit

            check_replicas_fit(plan_for(config, model_dir), eng.replicas)
        self._owns_ray = connect(eng.ray_address, eng.replicas, eng.replica_cpus)
        self._remote = ray.remote(Replica)
        gpus = eng.replica_gpus
        if gpus is None:
            gpus = 1 if eng.kind == "vllm" and ray.cluster_resources().get("GPU", 0) > 0 else 0
        self._options = {"num_cpus": eng.replica_cpus, "num_gpus": gpus, "max_restarts": 0}
        if eng.kind == "vllm" and not gpus and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # vLLM's CPU engine pins its compute threads to cores it picks alone; replicas sharing a
            # node would all pick the same ones (two engines on this 2-core machine ran 4x slower
            # each). Unpinned, each keeps to its share of threads and the OS spreads them.
            threads = str(max(1, int(eng.replica_cpus)))
            env = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": threads}
            self._options["runtime_env"] = {"env_vars": env}
        self._config_dict = config.model_dump()
        self._spawned = 0
        self.replicas: list[_Handle] = []
        self.joining: list[_Handle] = []
        self.run = None
        self.updates = 0
        self._rule = None  # the optimizer of the last update
        self._drift = 0.0  # rounding drift the merges since the replicas last agreed bitwise may explain
        self.events: list[dict] = []
        self.traffic: dict[str, int] = dict.fromkeys(TRAFFIC_KEYS, 0)
        self.totals: dict[str, int] = dict.fromkeys(TRAFFIC_KEYS, 0)
        try:
            self.replicas = [self._spawn() for _ in range(eng.replicas)]
            for handle in self.replicas:
                self._wait_started(handle)
                handle.info = self._get(handle.ready, f"starting {handle}")
        except BaseException:
            self.close()
            raise
        self.targets = self.replicas[0].info["targets"]
        self._weight_bytes = sum(t.out_features * t.in_features * 4 for t in self.targets)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

    # -- plumbing -----------------------------------------------------------------------------
    def _spawn(self) -> _Handle:
        self._spawned += 1
        actor = self._remote.options(**self._options).remote(self._config_dict, str(self.model_dir))
        return _Handle(actor, self._spawned)

    def _wait_started(self, handle: _Handle, patience: float = 60.0) -> None:
        """Waits for an actor; says why when the cluster cannot place it (Ray would wait silently)."""
        import ray

        while not ray.wait([handle.ready], timeout=patience)[0]:
            log.warning(
                "es-serve: %r has not started after %.0f s; each replica asks for %s and the cluster has %s free "
                "(lower engine.replica_cpus / engine.replica_gpus or add nodes)",
                handle,
                patience,
                self._options,
                ray.available_resources(),
            )

    def _get(self, ref, what: str):
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            return ray.get(ref, timeout=self.timeout)
        except RayActorError as exc:
            raise RuntimeError(f"{what} failed: {exc}") from exc
        except GetTimeoutError as exc:
            raise RuntimeError(f"{what}: no answer within {self.timeout:g} s (engine.ray_timeout_s)") from exc

    def _count(self, key: str, nbytes: int) -> None:
        self.traffic[key] = self.traffic.get(key, 0) + nbytes
        self.totals[key] = self.totals.get(key, 0) + nbytes

    def _call(self, phase: str, handle: _Handle, method: str, *args):
        from ray import cloudpickle

        self._count(f"net/{phase}_sent_bytes", len(cloudpickle.dumps(args)))
        return getattr(handle.actor, method).remote(*args)

    def _received(self, phase: str, value) -> None:
        from ray import cloudpickle

        self._count(f"net/{phase}_received_bytes", len(cloudpickle.dumps(value)))

    def _lost(self, handle: _Handle, exc: BaseException) -> None:
        import ray

        if handle not in self.replicas:
            return
        self.replicas.remove(handle)
        try:
            ray.kill(handle.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone is the expected case
            pass
        self.events.append({"event": "lost", "replica": handle.number, "update": self.updates})
        why = type(exc).__name__
        if isinstance(exc, TimeoutError):
            why = f"no answer within {self.timeout:g} s, engine.ray_timeout_s; treated as dead"
        log.warning("es-serve: %r lost (%s); its work goes to the %d others", handle, why, len(self))
        if self.replace_dead:
            self.joining.append(self._spawn())

    def __len__(self) -> int:
        return len(self.replicas)

    def _broadcast(self, phase: str, method: str, *args) -> dict[_Handle, object]:
        """The same call on every replica; a replica that dies meanwhile is dropped."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        refs = [(h, self._call(phase, h, method, *args)) for h in list(self.replicas)]
        deadline = time.monotonic() + self.timeout
        out = {}
        for handle, ref in refs:
            try:
                value = ray.get(ref, timeout=max(deadline - time.monotonic(), 0.0))
            except RayActorError as exc:
                self._lost(handle, exc)
                continue
            except GetTimeoutError:
                self._lost(handle, TimeoutError(method))
                continue
            self._received(phase, value)
            out[handle] = value
        if not out:
            raise RuntimeError(f"every replica died during {method}; the run directory can be resumed with --resume")
        return out

    def attach_run(self, run) -> None:
        """The run directory: where a joining replica finds the checkpoint and the replay log."""
        self.run = run

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    # -- generation ---------------------------------------------------------------------------
    def generate_population(self, gen: Generation, prompts: Sequence[str], sampling: Sampling) -> PopulationResult:
        self.admit_joining()
        self.traffic = dict.fromkeys(TRAFFIC_KEYS, 0)
        self.traffic["replicas"] = len(self.replicas)
        n = gen.population.size
        unit = 2 if gen.population.antithetic else 1
        rows: dict[int, list[Completion]] = {}
        result = self._scatter(
            "generate", "generate_members", list(range(n)), unit, lambda part: (gen, part, list(prompts), sampling)
        )
        tokens = 0
        for part, res in result:
            tokens += res.tokens
            rows.update(zip(part, res.completions, strict=True))
        return PopulationResult([rows[i] for i in range(n)], self._last_seconds, tokens)

    def _scatter(self, phase: str, method: str, items: list[int], unit: int, make_args, reslice: bool = True):
        """Splits `items` over the replicas, re-running the part of any replica that dies on the others."""
        import ray
        from ray.exceptions import RayActorError

        start = time.perf_counter()
        pending, deadlines = {}, {}

        def submit(part_items: list[int]) -> None:
            if not self.replicas:
                raise RuntimeError(
                    f"every replica died during {method}; the run directory can be resumed with --resume"
                )
            parts = split(part_items, len(self.replicas), unit) if reslice else [part_items]
            for handle, part in zip(self.replicas, parts, strict=False):
                ref = self._call(phase, handle, method, *make_args(part))
                pending[ref], deadlines[ref] = (handle, part), time.monotonic() + self.timeout

        submit(items)
        done = []
        while pending:
            wait = max(min(deadlines[r] for r in pending) - time.monotonic(), 0.0)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait)
            if not ready:
                # A replica that hangs is as good as dead: kill it, re-run its part on the others, replace it.
                now = time.monotonic()
                for ref in [r for r in pending if deadlines[r] <= now]:
                    handle, part = pending.pop(ref)
                    self._lost(handle, TimeoutError(method))
                    submit(part)
                continue
            (ref,) = ready
            handle, part = pending.pop(ref)
            try:
                value = ray.get(ref)
            except RayActorError as exc:
                self._lost(handle, exc)
                submit(part)
                continue
            self._received(phase, value)
            done.append((part, value))
        self._last_seconds = time.perf_counter() - start
        return sorted(done, key=lambda pv: pv[0][0] if pv[0] else -1)

    def generate(
        self, prompts: Sequence[str], sampling: Sampling, gen: Generation | None = None, member: int | None = None
    ) -> list[Completion]:
        """Unperturbed model (or one member). Greedy requests are spread over the replicas; sampled ones
        stay on one replica because their seeds are keyed by the prompt's index in the call."""
        prompts = list(prompts)
        greedy = sampling.temperature == 0
        result = self._scatter(
            "eval",
            "generate",
            list(range(len(prompts))),
            1,
            lambda part: ([prompts[j] for j in part], sampling, gen, member),
            reslice=greedy,
        )
        return [c for _, value in result for c in value]

    # -- the update ---------------------------------------------------------------------------
    def apply_update(self, gen: Generation, shaped_fitness, lr: float, scaling: str = "mean", optimizer=None):
        """Sends the seed, epoch, N shaped fitness values and the optimizer's settings; every replica merges
        the update (and steps its own copy of the optimizer state) itself."""
        import torch

        from adapters import Optimizer

        self.updates += 1
        check = bool(self.checksum_every) and self.updates % self.checksum_every == 0
        pop = gen.population
        rule = Optimizer.from_record(optimizer)
        self._drift += drift_per_update((pop.size // 2 if pop.antithetic else pop.size) * pop.rank) * _drift_gain(rule)
        shaped = [float(x) for x in torch.as_tensor(shaped_fitness).reshape(-1)]
        spec = (pop.size, pop.rank, pop.sigma, pop.antithetic)
        self._rule = rule
        record = rule.record() if rule.stateful else None  # sgd: nothing more to send than before
        results = self._broadcast(
            "update", "apply_update", gen.seed, gen.epoch, gen.step, spec, shaped, lr, scaling, check, record
        )
        if not check:
            return None
        return self._verify(results, current=(gen, shaped, lr, scaling, rule))

    # -- checksums and resynchronisation --------------------------------------------------------
    def checksum(self) -> str:
        """The replicas' agreed checksum, after repairing any replica that disagrees."""
        return self._verify(self._broadcast("control", "checksum"))

    def checksums(self) -> list[str]:
        return list(self._broadcast("control", "checksum").values())

    def _verify(self, checksums: dict[_Handle, str], current=None) -> str:
        counts = Counter(checksums.values())
        best, votes = counts.most_common(1)[0]
        if len(counts) == 1:
            self._drift = 0.0
            return best
        if votes * 2 > len(checksums):
            healthy, how = best, "majority"
        else:
            # No majority (two replicas, one each): the run directory decides, else the oldest replica.
            reference = self._reference_checksum(current)
            if reference in counts:
                healthy, how = reference, "run directory"
            else:
                healthy, how = checksums[min(checksums, key=lambda h: h.number)], "oldest replica"
        source = next(h for h, c in checksums.items() if c == healthy)
        differing = [h for h, value in checksums.items() if value != healthy]
        # Bitwise disagreement is expected between CPU kinds (BLAS summation order): tolerated while
        # it stays within the rounding drift of the updates since the replicas last agreed exactly;
        # resynchronising then would only repeat at every check.
        reference = self._get(source.actor.fingerprint.remote(), f"fingerprinting {source}")
        tolerated = False
        for handle in differing:
            theirs = self._get(handle.actor.fingerprint.remote(), f"fingerprinting {handle}")
            if self._drift <= MAX_DRIFT and within_drift(reference, theirs, self._drift):
                self.events.append({"event": "drift", "replica": handle.number, "allowance": self._drift})
                tolerated = True
                continue
            why = "beyond rounding drift" if self._drift <= MAX_DRIFT else "drift allowance used up"
            self._resync(handle, source, healthy, why=f"checksum differs, {why} ({how} decided)")
        if not tolerated:
            self._drift = 0.0  # every replica now holds the source's weights
        return healthy

    def _reference_checksum(self, current=None) -> str | None:
        """The checksum the replicas should have: base model + checkpoint + replay (+ the step in flight),
        over the weights and the optimizer state."""
        if self.run is None or not self.run.exists():
            return None
        from adapters import OptimizerState, apply_update

        from ..weights import base_weights, restore_run

        targets, weights = base_weights(self.model_dir, self.config.es.modules)
        step, state = restore_run(self.run, targets, weights)
        if current is not None:
            gen, shaped, lr, scaling, rule = current
            if gen.step != step + 1:
                return None  # the log and the engine are not in step (not a Trainer-driven update)
            if rule.stateful and state is None:
                state = OptimizerState(rule.name)
            apply_update(
                weights, targets, gen.population, gen.seed, gen.epoch, shaped, lr, scaling, optimizer=rule, state=state
            )
        return weights_checksum({**weights, **(state.tensors() if state is not None else {})})

    def _resync(self, handle: _Handle, source: _Handle, expected: str, why: str) -> None:
        # Weights and optimizer state go from one replica's object store to the other's; the driver
        # never holds them.
        state = source.actor.full_state.remote()
        got = self._get(handle.actor.load_full_state.remote(state), f"resynchronising {handle}")
        self._count("net/weights_bytes", self._weight_bytes * self._state_factor())
        if got != expected:
            raise RuntimeError(
                f"{handle} still disagrees after copying the weights of {source} (checksum {got[:12]} != "
                f"{expected[:12]}): the replicas do not compute alike; check that they run the same es-serve, "
                "torch and hardware kind"
            )
        self.events.append({"event": "resync", "replica": handle.number, "source": source.number, "why": why})
        log.warning("es-serve: %r resynchronised from %r: %s", handle, source, why)

    def _state_factor(self) -> int:
        """Bytes of weights plus optimizer state, in units of the weights (momentum doubles, Adam triples)."""
        name = self._rule.name if self._rule is not None else self.config.es.optimizer
        return 1 + {"momentum": 1, "adam": 2}.get(name, 0)

    # -- replicas joining ----------------------------------------------------------------------
    def admit_joining(self, block: bool = False) -> int:
        """Restores the replicas that finished starting and adds them; returns how many joined."""
        import ray
        from ray.exceptions import RayActorError

        waiting, joined = [], 0
        for handle in self.joining:
            ready, _ = ray.wait([handle.ready], timeout=None if block else 0)
            if not ready:
                waiting.append(handle)
                continue
            try:
                handle.info = ray.get(handle.ready)
                self._bootstrap(handle)
            except RayActorError as exc:
                log.warning("es-serve: a replacement replica failed to start (%s); continuing without it", exc)
                continue
            self.replicas.append(handle)
            joined += 1
        self.joining = waiting
        return joined

    def add_replica(self) -> None:
        """Starts one more replica and waits until it has caught up with the others."""
        self.joining.append(self._spawn())
        self.admit_joining(block=True)

    def _bootstrap(self, handle: _Handle) -> None:
        import ray
        from ray import cloudpickle

        expected = self._verify(self._broadcast("control", "checksum")) if self.replicas else None
        event = {"event": "join", "replica": handle.number}
        if self.run is not None and self.run.exists():
            step = self.run.committed_step()
            ckpt_step, path = self.run.latest_checkpoint(at_most=step)
            checkpoint = self.run.load_checkpoint(path, optimizer_state=True) if path is not None else None
            after = ckpt_step if path is not None else 0
            entries = [e for e in self.run.replay() if after < e["step"] <= step]
            ref = ray.put(checkpoint) if checkpoint else None
            got = self._get(handle.actor.restore.remote(ref, entries, after), f"restoring {handle}")
            sent = sum(t.numel() * t.element_size() for t in checkpoint.values()) if checkpoint else 0
            self._count("net/weights_bytes", sent + len(cloudpickle.dumps(entries)))
            event.update(checkpoint_step=after, replayed_steps=len(entries), step=step)
            if expected is None or got == expected:
                self.events.append(event)
                return
        if expected is None:
            raise RuntimeError(f"{handle} has no run directory to restore from and no healthy replica to copy")
        source = min(self.replicas, key=lambda h: h.number)
        self._resync(handle, source, expected, why="joined; copied from a running replica")
        event["copied_from"] = source.number
        self.events.append(event)

    # -- weights ------------------------------------------------------------------------------
    def state_dict(self):
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        for handle in list(self.replicas):
            try:
                weights = ray.get(handle.actor.state_dict.remote(), timeout=self.timeout)
            except RayActorError as exc:
                self._lost(handle, exc)
                continue
            except GetTimeoutError:
                self._lost(handle, TimeoutError("state_dict"))
                continue
            self._count("net/weights_bytes", self._weight_bytes)
            return weights
        raise RuntimeError("every replica died; the run directory can be resumed with --resume")

    def optimizer_state(self) -> dict:
        import ray
        from ray.exceptions import RayActorError

        for handle in list(self.replicas):
            try:
                state = ray.get(handle.actor.optimizer_state.remote())
            except RayActorError as exc:
                self._lost(handle, exc)
                continue
            self._count("net/weights_bytes", sum(t.numel() * t.element_size() for t in state.values()))
            return state
        raise RuntimeError("every replica died; the run directory can be resumed with --resume")

    def load_state_dict(self, weights, optimizer_state: dict | None = None) -> str:
        import ray

        ref = ray.put(weights)
        state_ref = ray.put(optimizer_state) if optimizer_state else None
        results = self._broadcast("control", "load_state_dict", ref, state_ref)
        self._count("net/weights_bytes", self._weight_bytes * self._state_factor() * len(results))
        return self._verify(results)

    def close(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        for handle in self.replicas + self.joining:
            try:
                ray.kill(handle.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - closing must not fail on an already dead actor
                pass
        self.replicas, self.joining = [], []
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False
