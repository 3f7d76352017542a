"""Dataset tasks: every file kind, the seeded epoch order, resume, the held-out split, bad input."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from es_serve.config import TaskConfig
from rewards import DatasetTaskError, task_from_config

ROWS = 23


def _chat_rows(n=ROWS):
    return [
        {"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1), "id": i} for i in range(n)
    ]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same rows in every format, written without `datasets` (the reference is the rows themselves)."""
    root = tmp_path_factory.mktemp("data")
    rows = _chat_rows()
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = [{"question": f"What is {i} + 1?", "answer": str(i + 1), "id": i} for i in range(ROWS)]
    with open(root / "plain.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "answer", "id"])
        writer.writeheader()
        writer.writerows(plain)
    pq.write_table(pa.Table.from_pylist(rows), root / "chat.parquet")
    import datasets

    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(_chat_rows(7))}
    ).save_to_disk(str(root / "saved"))
    return root


def _task(**keys):
    return task_from_config(TaskConfig(**keys))


def _ids(rows):
    return [r["id"] for r in rows]


@pytest.mark.parametrize("name", ["chat.jsonl", "chat.parquet", "saved", "plain.csv"])
def test_every_kind_of_file_gives_the_same_rows_memory_mapped(files, name):
    import datasets

    column = "question" if name.endswith(".csv") else "prompt"
    task = _task(dataset=str(files / name), prompt_column=column, eval_prompts=5)
    assert isinstance(task.train.data, datasets.table.MemoryMappedTable)  # Arrow on disk, not Python lists
    held = task.eval_rows()
    trained = [row for step in range(1, 7) for row in task.sample(3, step)]  # 18 = every training row
    assert sorted(_ids(held) + _ids(trained)) == list(range(ROWS))
    for row in held + trained:
        i = row["id"]
        assert str(row["answer"]) == str(i + 1)  # CSV infers integers
        if column == "prompt":
            assert row["prompt"] == [{"role": "user", "content": f"What is {i} + 1?"}]
        else:
            assert row["prompt"] == f"What is {i} + 1?" and "question" not in row
    assert task.conversational is (column == "prompt")


def test_epochs_are_seeded_shuffles_of_the_training_rows(files):
    task = _task(dataset=str(files / "chat.jsonl"), eval_prompts=3, seed=4)  # 20 training rows
    order = _ids(row for step in range(1, 11) for row in task.sample(4, step))  # 40 rows: two epochs
    first, second = order[:20], order[20:]
    held = set(_ids(task.eval_rows()))
    assert sorted(first) == sorted(second) == sorted(set(range(ROWS)) - held)
    assert first != second  # a new shuffle each epoch
    assert first != sorted(first)
    other = _task(dataset=str(files / "chat.jsonl"), eval_prompts=3, seed=5)
    assert _ids(row for step in range(1, 6) for row in other.sample(4, step)) != first


def test_sample_is_a_pure_function_of_the_step_so_resume_continues_exactly(files):
    path = str(files / "chat.jsonl")
    walked = _task(dataset=path, eval_prompts=3)
    straight = [_ids(walked.sample(3, step)) for step in range(1, 16)]
    # A resumed run builds a fresh task and asks for step 9 first, then goes on.
    resumed = _task(dataset=path, eval_prompts=3)
    assert [_ids(resumed.sample(3, step)) for step in range(9, 16)] == straight[8:]
    assert _ids(_task(dataset=path, eval_prompts=3).sample(3, 12)) == straight[11]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 7])
def test_held_out_rows_are_fixed_and_never_trained_on(files, seed):
    task = _task(dataset=str(files / "chat.jsonl"), eval_prompts=6, seed=seed)
    held = _ids(task.eval_rows())
    assert len(set(held)) == 6 and held == _ids(task.eval_rows()) == _ids(task.eval_rows(6))
    assert _ids(task.eval_rows(2)) == held[:2]
    trained = {i for step in range(1, 30) for i in _ids(task.sample(5, step))}
    assert trained == set(range(ROWS)) - set(held)


def test_eval_dataset_and_eval_split_are_used_as_given(files):
    task = _task(dataset=str(files / "saved"), eval_split="test", eval_prompts=4)
    assert _ids(task.eval_rows()) == [0, 1, 2, 3]  # the test split's first rows, in order
    assert task.train_rows == ROWS  # nothing of the training split is held out
    task = _task(dataset=str(files / "chat.jsonl"), eval_dataset=str(files / "chat.parquet"), eval_prompts=5)
    assert _ids(task.eval_rows()) == [0, 1, 2, 3, 4]


def _bad(files, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("prompt,answer\n")
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("".join(json.dumps({"prompt": i, "answer": i}) + "\n" for i in range(3)))
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": None}) + "\n")
    clash = tmp_path / "clash.jsonl"
    clash.write_text(json.dumps({"prompt": "a", "completion_ids": [1]}) + "\n")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    chat = str(files / "chat.jsonl")
    return [
        ({"dataset": str(tmp_path / "missing.jsonl")}, "task.dataset", "no such file or directory"),
        ({"dataset": chat, "prompt_column": "question"}, "task.prompt_column", "its columns: prompt, answer, id"),
        ({"dataset": str(empty)}, "task.dataset", "has no rows"),
        ({"dataset": str(numbers)}, "task.prompt_column", "a prompt must be a string or a list of chat messages"),
        ({"dataset": str(nulls), "eval_prompts": 1}, "task.prompt_column", "1 row(s) have no prompt"),
        ({"dataset": str(clash)}, "task.dataset", "completion_ids"),
        ({"dataset": str(text)}, "task.dataset", "use .jsonl, .json, .csv or .parquet"),
        ({"dataset": chat, "eval_prompts": ROWS}, "task.eval_prompts", f"would hold out all {ROWS} rows"),
        ({"dataset": chat, "eval_dataset": chat, "eval_prompts": ROWS + 1}, "task.eval_prompts", "has 23 rows"),
        ({"dataset": str(files / "saved"), "eval_split": "dev"}, "task.eval_split", "has the splits train, test"),
        ({"dataset": chat, "split": "test"}, "task.split", "a single file is one split"),
        ({"dataset": chat, "name": "arithmetic"}, "task.name", "is a built-in task"),
        ({"eval_dataset": chat}, "task.eval_dataset", "set task.dataset too"),
    ]


def test_every_bad_input_gets_one_message_naming_the_key(files, tmp_path):
    for keys, field, text in _bad(files, tmp_path):
        with pytest.raises(DatasetTaskError) as info:
            _task(**{"eval_prompts": 3, **keys})
        assert info.value.field == field, (keys, str(info.value))
        assert text in str(info.value), (keys, str(info.value))
        assert "\n" not in str(info.value)


def test_a_hub_id_offline_says_so_without_trying_the_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetTaskError, match="Hub is offline here") as info:
        _task(dataset="someone/some-dataset")
    assert info.value.field == "task.dataset" and "save_to_disk" in str(info.value)


def test_server_jobs_name_dataset_files_only_inside_the_data_dir(files, tmp_path):
    inside = dict(dataset="chat.jsonl", eval_prompts=3)
    task = task_from_config(TaskConfig(**inside), data_dir=files, restricted=True)
    assert task.train_rows == ROWS - 3
    for spec, why in [
        (str(files / ".." / "elsewhere.jsonl"), "outside the data directory"),
        ("../chat.jsonl", "outside the data directory"),
        ("someone/some-dataset", "no file or directory"),
    ]:
        with pytest.raises(DatasetTaskError, match=why):
            task_from_config(TaskConfig(dataset=spec), data_dir=files, restricted=True)
    with pytest.raises(DatasetTaskError, match="start it with --data-dir"):
        task_from_config(TaskConfig(**inside), data_dir=None, restricted=True)
