"""`es-serve bench` end to end on the tiny model: every figure the issue names, and honest memory."""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_bench_writes_ratios_baselines_table_and_plot(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "launch.cli", "bench", "--model", str(tiny_model_dir), "--population", "4"]
    cmd += ["--prompts", "2", "--max-tokens", "4", "--repeats", "2", "--naive-members", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in ("pure_tok_s", "es_gen_tok_s", "es_step_tok_s", "ratio_generation", "ratio_step"):
        assert data[key] > 0, key
    assert set(data["baselines"]) == {"peft_files_step_tok_s", "peft_files_gen_tok_s", "naive_full_rank_tok_s"}
    (row,) = data["results"]
    assert row["kernel"] == "es"
    assert len(row["pure_tok_s"]["runs"]) == 2 and len(row["es_gen_tok_s"]["runs"]) == 2
    assert data["ratio_generation"] == pytest.approx(row["es_gen_tok_s"]["median"] / row["pure_tok_s"]["median"])
    assert data["ratio_step"] == pytest.approx(row["es_step_tok_s"]["median"] / row["pure_tok_s"]["median"])
    # Members cost r (m + n) float32 numbers per matrix: the cached factors are exactly that, no more.
    mem = row["memory"]
    assert mem["members_cached"] == 4
    assert mem["member_cache_bytes"] == 4 * mem["numbers_per_member"] * 4
    assert mem["numbers_per_member"] < mem["numbers_per_member_full_rank"] / 20
    assert mem["peak_rss_bytes"] > 0
    table = out.with_suffix(".md").read_text()
    assert "| 4 | 1 |" in table and "ratio gen" in table
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_bench_refuses_bad_arguments():
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "bench", "--population", "5", "--max-tokens", "0"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "--population 5" in proc.stderr and "Traceback" not in proc.stderr
