"""The ablation table: keys that differ from the defaults and paired gains, against values by hand."""

import json

from benchmarks.es_ablation import markdown, rows


def _run(folder, name, config: str, evals: dict[int, list[float]]):
    (folder / f"{name}.config.toml").write_text(config)
    lines = [{"step": s, "eval_reward": sum(v) / len(v), "eval_per_prompt": v} for s, v in evals.items()]
    (folder / f"{name}.metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))


def test_rows_name_the_changed_keys_and_the_paired_gain(tmp_path):
    _run(tmp_path, "old", "[es]\nlr = 0.02\n[train]\nsteps = 40\n", {0: [0, 0, 1, 1], 40: [1, 1, 1, 0]})
    _run(tmp_path, "new", '[es]\nlr_schedule = "cosine"\n', {0: [0, 0, 1, 1], 80: [0, 0, 1, 1]})
    table = {r["run"]: r for r in rows(tmp_path)}
    # Saved before lr schedules existed: constant lr, and both changed keys are listed.
    assert table["old"]["set"] == ["es.lr=0.02", "es.lr_schedule=constant", "train.steps=40"]
    assert table["new"]["set"] == []
    # Per-prompt changes +1, +1, 0, -1: mean 0.25, sample std sqrt(11/12), s.e. = std / 2.
    assert abs(table["old"]["gain"] - 0.25) < 1e-12
    assert abs(table["old"]["paired_stderr"] - (11 / 12) ** 0.5 / 2) < 1e-12
    assert table["new"]["gain"] == 0 and table["old"]["best"] == 0.75
    assert markdown(list(table.values())).splitlines()[2].startswith("| old |")
