"""`es-serve export`: a run's trained model as a Hugging Face directory a user can publish.

The base model is loaded with transformers in its own dtype, the trained matrices (the last committed
step: latest checkpoint plus the replay log after it) are written into it, and transformers'
`save_pretrained` writes sharded safetensors. A model card (README.md) records the base model, task,
reward, ES settings, steps and the held-out gain. `--push-to-hub` uploads the directory with
huggingface_hub.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from .config import load_config
from .run_dir import RunDir
from .weights import base_weights, restore_run

DEFAULT_MAX_SHARD_SIZE = "5GB"
# Written by save_pretrained or by this module; everything else in the base directory (tokenizer,
# chat template, ...) is copied as it is.
_NOT_COPIED = ("config.json", "generation_config.json", "README.md", "model.safetensors.index.json")


_SIZE = re.compile(r"^\d+(?:[KMG]i?B)?$")


class HubError(ValueError):
    """The Hub cannot be reached or refused the upload; the message says what to do."""


def trained_weights(run: RunDir, model_dir: Path, modules) -> tuple[int, dict[str, torch.Tensor]]:
    """The weights at the last committed step: latest checkpoint plus the replay log after it (a momentum or
    Adam run replays with the checkpoint's optimizer state; only the weights are exported)."""
    targets, weights = base_weights(model_dir, modules)
    step, _ = restore_run(run, targets, weights)
    return step, weights


def _stored_dtype(model_dir: Path, names) -> torch.dtype:
    """The dtype the base checkpoint stores the trained matrices in (the export keeps it)."""
    from safetensors import safe_open

    wanted = set(names)
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                if name in wanted:
                    return f.get_tensor(name).dtype
    raise FileNotFoundError(f"the trained matrices are not in the safetensors files of {model_dir}")


def check_push_target(repo_id: str, out_dir: Path) -> None:
    """Refuses a push before any work when it cannot happen (bad id, Hub offline)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from .models import hub_offline

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubError(f"--push-to-hub {repo_id!r} is not a Hub repository id (user/name): {exc}") from None
    if hub_offline():
        raise HubError(
            f"--push-to-hub {repo_id}: the Hugging Face Hub is offline here (HF_HUB_OFFLINE is set); "
            f"nothing was written. Export without --push-to-hub and upload later with "
            f"`hf upload {repo_id} {out_dir}`, or unset HF_HUB_OFFLINE where the Hub is reachable"
        )


def push_to_hub(out_dir: Path, repo_id: str, private: bool = False) -> str:
    """Uploads `out_dir` to the model repository `repo_id` (created if missing); returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id, folder_path=str(out_dir), repo_type="model", commit_message="Upload es-serve export"
        )
    except Exception as exc:  # network, auth and permission errors all end here with one message
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubError(
            f"could not push {out_dir} to the Hub repository {repo_id}: {reason}. The export is complete "
            f"on disk; log in with `hf auth login` (or set HF_TOKEN) and upload it with `hf upload {repo_id} {out_dir}`"
        ) from None
    return str(url)


def export_run(
    run_dir: Path,
    out_dir: Path,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    push_to: str | None = None,
    private: bool = False,
) -> Path:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from .model_card import model_card
    from .models import resolve_model

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    run = RunDir(run_dir)
    if not run.exists():
        raise FileNotFoundError(f"{run_dir} is not an es-serve run directory (config.toml is missing)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new directory")
    if not (isinstance(max_shard_size, int) and max_shard_size > 0) and not _SIZE.match(str(max_shard_size)):
        raise ValueError(f"--max-shard-size {max_shard_size!r} is not a size: use bytes or e.g. 500MB, 2GB, 1GiB")
    if push_to:
        check_push_target(push_to, out_dir)
    config = load_config(run.config_path, saved_run=True)
    model_dir = resolve_model(config.model.name)
    step, trained = trained_weights(run, model_dir, config.es.modules)
    dtype = _stored_dtype(model_dir, trained)

    hf_logging.disable_progress_bar()  # a CLI step, not a download: its bars would bury the result line
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    params = dict(model.named_parameters())
    unknown = sorted(set(trained) - set(params))
    if unknown:
        raise ValueError(f"transformers names the parameters of {model_dir} differently; missing: {unknown[:3]}")
    with torch.no_grad():
        for name, value in trained.items():
            params[name].copy_(value.to(dtype))

    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        for item in model_dir.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and item.name not in _NOT_COPIED:
                if not item.name.startswith((".", "es-serve-")):
                    shutil.copy2(item, tmp / item.name)
        modules = list(dict.fromkeys(name.split(".")[-2] for name in trained))
        (tmp / "README.md").write_text(model_card(config, run, step, push_to or out_dir.name, modules))
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if push_to:
        push_to_hub(out_dir, push_to, private=private)
    return out_dir
