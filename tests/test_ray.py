"""Replicas on a local Ray cluster: two CPU replicas of the tiny model, against one engine in-process.

The dense engine serves most tests (a replica starts in seconds); one test runs vLLM replicas.
"""

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")

from fakes import CountReward, Task  # noqa: E402

from es_serve.config import ConfigError, load_config  # noqa: E402
from es_serve.engines.dense import DenseEngine  # noqa: E402
from es_serve.engines.ray_engine import RayEngine, connect, split, start_local_ray  # noqa: E402
from es_serve.engines.ray_replica import drift_per_update, weights_checksum, weights_fingerprint, within_drift  # noqa: E402
from es_serve.run_dir import RunDir  # noqa: E402
from es_serve.trainer import Trainer  # noqa: E402
from es_serve.weights import base_weights, restore_run  # noqa: E402


def _config(**extra):
    sets = {
        "model.name": "tiny",
        "model.dtype": "float32",
        "es.population": 8,
        "es.sigma": 0.2,
        "es.lr": 0.05,
        "es.noise_reuse": 2,
        "task.prompts_per_step": 2,
        "task.eval_prompts": 4,
        "generation.max_tokens": 6,
        "train.steps": 5,
        "train.eval_every": 5,
        "train.checkpoint_every": 2,
        "engine.kind": "dense",
        "engine.replicas": 2,
        "engine.checksum_every": 2,
        "engine.memory_fraction": 0.05,
        "engine.replica_cpus": 0.5,  # four replicas fit the two-CPU test cluster
    }
    sets.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def _replica_weights(engine):
    return [ray.get(h.actor.state_dict.remote()) for h in engine.replicas]


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def cluster():
    start_local_ray(num_cpus=2, object_store_memory=100 * 2**20, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory):
    """The single-engine run every multi-replica run must reproduce bitwise: final weights and replay log."""
    run = tmp_path_factory.mktemp("single") / "run"
    engine = DenseEngine(tiny_model_dir, dtype=torch.float32)
    base = engine.state_dict()
    Trainer(_config(**{"engine.replicas": 1}), run, engine, Task(), CountReward()).train()
    return {"weights": engine.state_dict(), "replay": RunDir(run).replay(), "base": base}


@pytest.fixture(scope="module")
def engine(cluster, tiny_model_dir):
    """Two dense replicas, shared by the tests below; each test first resets them to the base model."""
    engine = RayEngine(_config(), tiny_model_dir)
    yield engine
    engine.close()


def _train(engine, single, run, on_step=None):
    engine.load_state_dict(single["base"])
    engine.updates, engine._drift = 0, 0.0
    trainer = Trainer(_config(), run, engine, Task(), CountReward())
    metrics = trainer.train(on_step=on_step)
    return trainer, metrics


def test_split_keeps_pairs_together_and_balances():
    assert split(range(8), 2, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split(range(6), 2, 2) == [[0, 1, 2, 3], [4, 5]]
    assert split(range(4), 3, 2) == [[0, 1], [2, 3]]
    assert split([4, 5], 2, 1) == [[4], [5]]


def test_unreachable_cluster_names_the_address_and_how_to_start_one():
    with pytest.raises(ConfigError) as exc:
        connect("127.0.0.1:1", 2, 1.0)
    assert "engine.ray_address='127.0.0.1:1'" in str(exc.value)
    assert "ray start --head" in str(exc.value)


def test_local_cluster_listens_on_loopback_only(cluster):
    import psutil

    assert ray.util.get_node_ip_address() == "127.0.0.1"
    ray.get(ray.remote(lambda: None).remote())  # at least one worker process is up
    loopback = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
    listening = []
    for proc in psutil.Process().children(recursive=True):
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        listening += [(proc.name(), c.laddr.ip) for c in conns if c.status == psutil.CONN_LISTEN]
    assert listening, "found no Ray process listening at all: the check would prove nothing"
    assert [item for item in listening if item[1] not in loopback] == []


def test_replicas_match_one_engine_and_the_update_is_seeds_plus_fitness(engine, single, tmp_path):
    trainer, metrics = _train(engine, single, tmp_path / "run")
    assert len(engine) == 2 and not engine.events
    weights = _replica_weights(engine)
    _assert_same(weights[0], weights[1])
    _assert_same(weights[0], single["weights"])
    # Same completions, hence the same rewards and shaped fitness at every step.
    assert trainer.run.replay() == single["replay"]
    n = engine.config.es.population
    steps = [m for m in metrics if m["step"] > 0]
    for m in steps:
        assert m["replicas"] == 2
        # Per replica: seed, epoch, step, population, N floats, lr, scaling (about 9 bytes per float).
        per_replica = m["net/update_sent_bytes"] / 2
        assert per_replica < 300 + 10 * n, m
        assert m["net/update_received_bytes"] < 2 * 100
        # Prompts out, completions back: text, not weights.
        assert 0 < m["net/generate_sent_bytes"] < 4000
        assert 0 < m["net/generate_received_bytes"] < 20000
    # Every second update also compares checksums; the replies then carry one sha256 each.
    assert steps[1]["net/update_received_bytes"] > steps[0]["net/update_received_bytes"]
    weight_bytes = sum(w.numel() * 4 for w in single["weights"].values())
    assert max(m["net/update_sent_bytes"] for m in steps) < weight_bytes / 1000


def test_update_bytes_do_not_depend_on_model_size(cluster, tiny_model_dir, tmp_path):
    from adapters import Population
    from es_serve.tiny_model import build_tiny_llama
    from es_serve.types import Generation, Sampling

    bigger = build_tiny_llama(tmp_path / "bigger", layers=4, hidden=256, intermediate=1024)
    traffic, params = {}, {}
    for name, path in (("tiny", tiny_model_dir), ("bigger", bigger)):
        engine = RayEngine(_config(), path)
        try:
            gen = Generation(Population(8, 1, 0.2), seed=0, epoch=0, step=1)
            engine.generate_population(gen, ["What is 1 + 2?", "The answer is"], engine_sampling := Sampling(6))
            engine.apply_update(gen, [0.5, -0.5, 1.0, -1.0, 0.25, 0.0, -0.25, 0.75], 0.05)
            assert engine_sampling.max_tokens == 6
            traffic[name] = dict(engine.traffic)
            params[name] = sum(t.out_features * t.in_features for t in engine.targets)
        finally:
            engine.close()
    assert params["bigger"] > 10 * params["tiny"]
    assert traffic["bigger"]["net/update_sent_bytes"] == traffic["tiny"]["net/update_sent_bytes"]
    assert traffic["bigger"]["net/update_received_bytes"] == traffic["tiny"]["net/update_received_bytes"]
    assert traffic["bigger"]["net/generate_sent_bytes"] == traffic["tiny"]["net/generate_sent_bytes"]
    print(f"\nparams {params}\ntraffic {traffic}")


def test_a_diverged_replica_is_detected_and_resynchronised(engine, single, tiny_model_dir, tmp_path):
    def corrupt_second(report):
        if report.step == 2:
            # After step 2's update: step 4's checksum (every 2 updates) must catch it.
            ray.get(engine.replicas[1].actor.corrupt.remote(1e-3))

    trainer, _ = _train(engine, single, tmp_path / "run", on_step=corrupt_second)
    resyncs = [e for e in engine.events if e["event"] == "resync"]
    assert [(e["replica"], e["source"]) for e in resyncs] == [(2, 1)]
    assert "run directory" in resyncs[0]["why"]  # two replicas, one vote each: the replay log decides
    weights = _replica_weights(engine)
    _assert_same(weights[0], weights[1])
    # The corrupted replica generated half of steps 3 and 4's members before step 4's check caught it, so
    # those steps' fitness may differ from the single engine's (with this lr schedule step 4's does): the
    # run's own replay log is what the repaired replicas must hold, rebuilt here by the driver's replay.
    replay = trainer.run.replay()
    assert replay[:2] == single["replay"][:2]
    targets, expected = base_weights(tiny_model_dir, trainer.config.es.modules)
    assert restore_run(trainer.run, targets, expected)[0] == 5
    for name, value in expected.items():
        assert torch.equal(weights[0][name], value), name
    if [e["shaped"] for e in replay] == [e["shaped"] for e in single["replay"]]:
        _assert_same(weights[0], single["weights"])
    # Without a run directory, the oldest replica is taken as the healthy one.
    engine.events.clear()
    engine.run = None
    ray.get(engine.replicas[1].actor.corrupt.remote(1e-3))
    assert len(set(engine.checksums())) == 2
    assert engine.checksum() == weights_checksum(expected)
    assert len(set(engine.checksums())) == 1


def test_drift_tolerance_separates_rounding_from_divergence():
    # One merge of K r = 4 terms: 2 gamma_5 (|W| + sum |t|) with gamma_k = k u / (1 - k u), u = 2^-24.
    u = 2.0**-24
    assert drift_per_update(4) == pytest.approx(2 * (5 * u / (1 - 5 * u)) * 2, rel=1e-12)
    w = {"m": torch.linspace(-1, 1, 400, dtype=torch.float32).reshape(20, 20)}
    one_ulp = {"m": torch.nextafter(w["m"], torch.full_like(w["m"], 2.0))}  # every entry, one ulp up
    assert one_ulp["m"].ne(w["m"]).all()
    base, moved = weights_fingerprint(w), weights_fingerprint(one_ulp)
    # One ulp of |w| <= 1 is at most 2^-23 relative: within one merge's allowance.
    assert within_drift(base, moved, drift_per_update(4))
    assert not within_drift(base, moved, 2.0**-30)
    nudged = {"m": w["m"].clone()}
    nudged["m"][3, 4] += 1e-3  # one entry off by far more than rounding
    assert not within_drift(base, weights_fingerprint(nudged), drift_per_update(4))
    # Sum of |w| is 200 here, so 1e-3 stays detectable while the allowance is below 1e-3 / 200.
    assert not within_drift(base, weights_fingerprint(nudged), 0.9 * 1e-3 / 200)
    assert within_drift(base, weights_fingerprint(nudged), 1.1 * 1e-3 / 200)
    assert not within_drift(base, {"other": (0.0, 0.0, 0.0)}, 1.0)


def test_rounding_drift_between_cpu_kinds_is_tolerated_not_resynchronised(engine, single, tmp_path):
    def drift_second(report):
        if report.step in (1, 3):
            # Another CPU's rounding: one ulp on 1% of the entries after updates 1 and 3.
            ray.get(engine.replicas[1].actor.drift.remote(0.01, report.step))

    engine.events.clear()
    _train(engine, single, tmp_path / "run", on_step=drift_second)
    assert [e["event"] for e in engine.events] == ["drift", "drift"]  # the checks after updates 2 and 4
    # Allowances after 2 and 4 merges of N = 8 antithetic members (K r = 4 terms each).
    assert [e["allowance"] for e in engine.events] == pytest.approx([2 * drift_per_update(4), 4 * drift_per_update(4)])
    first, second = _replica_weights(engine)
    _assert_same(first, single["weights"])
    assert any(not torch.equal(first[k], second[k]) for k in first)
    for k in first:
        # Two one-ulp nudges, each carried through the later updates' rounding: a few ulps of the matrix's scale.
        scale = float(first[k].abs().max()) * torch.finfo(torch.float32).eps
        assert float((first[k] - second[k]).abs().max()) <= 8 * scale, k


def test_adam_state_is_rebuilt_on_a_joining_replica_and_copied_on_resync(engine, tiny_model_dir, tmp_path):
    adam = {"es.optimizer": "adam", "es.lr": 0.01}
    alone = DenseEngine(tiny_model_dir, dtype=torch.float32)
    base = alone.state_dict()
    Trainer(_config(**adam, **{"engine.replicas": 1}), tmp_path / "single", alone, Task(), CountReward()).train()
    engine.load_state_dict(base)
    engine.updates, engine._drift = 0, 0.0
    engine.events.clear()
    ray.get(engine.replicas[1].actor.crash_at_step.remote(3))

    def join_then_corrupt(report):
        if report.step == 3:
            engine.admit_joining(block=True)  # from the step-2 checkpoint (with Adam's moments) + step 3's line
            # Only its Adam moments diverge: step 4's checksum covers them too.
            ray.get(engine.replicas[1].actor.corrupt.remote(1e-3, optimizer=True))

    Trainer(_config(**adam), tmp_path / "run", engine, Task(), CountReward()).train(on_step=join_then_corrupt)
    assert [e["event"] for e in engine.events] == ["lost", "join", "resync"]
    assert (engine.events[1]["checkpoint_step"], engine.events[1]["replayed_steps"]) == (2, 1)
    # Two replicas, one vote each: the run directory's weights and moments decided.
    assert "run directory" in engine.events[2]["why"]
    for replica in engine.replicas:
        _assert_same(ray.get(replica.actor.state_dict.remote()), alone.state_dict())
        _assert_same(ray.get(replica.actor.optimizer_state.remote()), alone.optimizer_state())


def test_a_replica_killed_mid_step_changes_nothing_and_a_replacement_catches_up(engine, single, tmp_path):
    engine.events.clear()
    ray.get(engine.replicas[1].actor.crash_at_step.remote(3))  # dies inside step 3's generation

    def wait_for_replacement(report):
        if report.step == 3:
            assert len(engine) == 1 and len(engine.joining) == 1
            engine.admit_joining(block=True)  # otherwise it joins whenever it has started

    trainer, _ = _train(engine, single, tmp_path / "run", on_step=wait_for_replacement)
    assert [e["event"] for e in engine.events] == ["lost", "join"]
    assert trainer.run.replay() == single["replay"]
    assert len(engine) == 2 and not engine.joining
    joined = engine.events[1]
    # Restored from the step-2 checkpoint plus step 3 from the replay log, not copied from a replica.
    assert (joined["checkpoint_step"], joined["replayed_steps"], joined["step"]) == (2, 1, 3)
    assert "copied_from" not in joined
    for weights in _replica_weights(engine):
        _assert_same(weights, single["weights"])
    engine.add_replica()  # a replica added after the run: from the final checkpoint
    assert len(engine) == 3 and engine.events[-1]["event"] == "join"
    assert engine.events[-1]["checkpoint_step"] == 5
    _assert_same(_replica_weights(engine)[-1], single["weights"])


def test_a_replica_that_hangs_is_timed_out_treated_as_dead_and_replaced(engine, single, tmp_path):
    engine.events.clear()
    replicas = len(engine)  # the module's engine may have gained one in an earlier test
    ray.get(engine.replicas[1].actor.hang_at_step.remote(2))  # blocks, alive, inside step 2's generation
    saved, engine.timeout = engine.timeout, 20.0  # a tiny dense step takes under a second here, even loaded

    def wait_for_replacement(report):
        if report.step == 2:
            assert len(engine) == replicas - 1 and len(engine.joining) == 1
            engine.admit_joining(block=True)

    try:
        trainer, _ = _train(engine, single, tmp_path / "run", on_step=wait_for_replacement)
    finally:
        engine.timeout = saved
    assert [e["event"] for e in engine.events] == ["lost", "join"]
    assert engine.events[0]["replica"] not in [h.number for h in engine.replicas] and len(engine) == replicas
    # The hung replica's members were re-run elsewhere: the run is the single engine's, bit for bit.
    assert trainer.run.replay() == single["replay"]
    for weights in _replica_weights(engine):
        _assert_same(weights, single["weights"])


@pytest.mark.vllm
def test_vllm_replicas_match_one_vllm_engine(cluster, tiny_model_dir, tmp_path):
    from es_serve.engines import build_local_engine

    # A quarter CPU each: the dense replicas of the tests above still hold the rest of the cluster.
    config = _config(
        **{"engine.kind": "vllm", "train.steps": 3, "engine.checksum_every": 1, "engine.replica_cpus": 0.25}
    )
    engine = RayEngine(config, tiny_model_dir)
    try:
        trainer = Trainer(config, tmp_path / "ray", engine, Task(), CountReward())
        trainer.train()
        assert len(engine) == 2 and not engine.events  # checksums compared after every update
        replicas = _replica_weights(engine)
    finally:
        engine.close()
    _assert_same(replicas[0], replicas[1])
    one = build_local_engine(_config(**{"engine.kind": "vllm", "train.steps": 3}), tiny_model_dir)
    try:
        alone = Trainer(config, tmp_path / "one", one, Task(), CountReward())
        alone.train()
        single = one.state_dict()
    finally:
        one.close()
    # The same fitness at every step, hence the same updates; an update that is skipped, repeated or
    # merged wrongly moves the weights by far more than the rounding allowance of 3 merges.
    assert trainer.run.replay() == alone.run.replay()
    assert within_drift(weights_fingerprint(single), weights_fingerprint(replicas[0]), 3 * drift_per_update(4))
    # Bitwise equality holds too when the in-process engine and the replicas compute alike; on this
    # machine the replicas (one thread each, unpinned) have been seen an ulp or two apart from it.
    differing = [k for k in single if not torch.equal(single[k], replicas[0][k])]
    for k in differing:
        scale = float(single[k].abs().max()) * torch.finfo(torch.float32).eps
        assert float((single[k] - replicas[0][k]).abs().max()) <= 4 * scale, k


def test_the_cluster_launcher_config_is_valid():
    yaml = pytest.importorskip("yaml")
    path = Path(__file__).parents[1] / "launch" / "configs" / "ray-cluster.yaml"
    config = yaml.safe_load(path.read_text())
    assert any("launch/setup.sh" in c for c in config["setup_commands"])
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # private API: the schema check is a bonus where it exists
        return
    validate_config(prepare_config(config))
    assert load_config(path.with_name("ray.toml")).engine.replicas > 1
