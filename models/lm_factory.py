"""Tokenizers and causal LMs for every LM system: tiny offline models by default, hub names or local folders on
request, LoRA adapters (peft) and 4-bit NF4 quantisation (bitsandbytes).

    tokenizer = build_tokenizer(texts, vocab_size=512, cache_dir=".cache/tokenizers")
    model = build_causal_lm("tiny-llama", tokenizer, lora=LoraSettings(r=8))
    model = build_causal_lm("EleutherAI/pythia-70m-deduped", load_in_4bit=True, lora=LoraSettings())

Nothing here reaches a model hub unless the caller names one; ``trust_remote_code`` is off unless the caller
turns it on.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<bos>", "<eos>"
TINY_ARCHITECTURES = ("tiny-llama", "tiny-smollm3")
PRETRAIN_FOLDER = os.path.join("checkpoints", "pretrain")
"""Where ``configs/pretrain/<name>.yaml`` writes its Hugging Face folder: ``<this>/<name>/hf/model``."""
PRETRAINED_PATH = re.compile(r"(?:^|/)checkpoints/pretrain/([^/]+)/")
DEFAULT_CACHE = os.environ.get("EXPERIENTIAL_AGENTS_CACHE", os.path.join("~", ".cache", "experiential-agents"))
# Attention projections per architecture family, used when the caller asks for target_modules="auto".
_ATTENTION_PROJECTIONS = {
    "gpt_neox": ["query_key_value", "dense"],
    "gpt2": ["c_attn", "c_proj"],
}
_DEFAULT_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _hub_error(name: str, error: Exception) -> OSError:
    return OSError(
        f"could not load {name!r}: it is neither a local folder nor in the Hugging Face cache, and the hub cannot be "
        f"reached ({type(error).__name__}). Download it on a machine with internet access "
        f"(`huggingface-cli download {name} --local-dir /path/to/{name.split('/')[-1]}`) and pass that folder "
        f"instead, or use the offline default 'tiny-llama'."
    )


def pretrain_command(name: str) -> str | None:
    """The command that builds ``name`` when it is a pretrained base's folder (``<...>/checkpoints/pretrain/<config
    name>/...``, where ``configs/pretrain/<config name>.yaml`` exports it), else ``None``."""
    match = PRETRAINED_PATH.search(Path(name).as_posix())
    return f"python train.py fit --config configs/pretrain/{match.group(1)}.yaml" if match else None


def require_reachable(name: str, timeout: float = 3.0) -> None:
    """Fail at once, naming ``name``, when it is neither a local folder nor cached and the hub cannot be reached
    (``from_pretrained`` itself retries for about a minute before it gives up); a missing pretrained base's folder
    fails with the command that builds it."""
    if os.path.isdir(name):
        return
    command = pretrain_command(name)
    if command is not None:
        raise FileNotFoundError(f"the pretrained base {name!r} does not exist: build it with `{command}`")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return
    from huggingface_hub import try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(name, f), str) for f in ("config.json", "tokenizer_config.json")):
        return
    error = hub_connection_error(timeout)
    if error is not None:
        raise _hub_error(name, error) from error


def hub_connection_error(timeout: float = 3.0) -> OSError | None:
    """The error of opening a connection to the Hugging Face hub, or ``None`` when it can be reached (a quick
    check before a library that retries for a minute)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    try:
        socket.create_connection((urlparse(constants.ENDPOINT).hostname, 443), timeout=timeout).close()
    except OSError as error:
        return error
    return None


# --- tokenizers -----------------------------------------------------------------------------------------------
def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    cache_dir: str | os.PathLike | None = None,
    min_frequency: int = 2,
    extra_special_tokens: list[str] | None = None,
    split_digits: bool = False,
):
    """A byte-level BPE tokenizer trained on ``texts``, cached on disk and wrapped as ``PreTrainedTokenizerFast``.

    The cache key is a hash of the texts and settings, so the same corpus reuses the same tokenizer (ids stay stable
    across runs and phases) and a different corpus gets its own. ``<pad>``, ``<bos>`` and ``<eos>`` are ids 0-2.

    Args:
        texts: Training text (any iterable of strings; read once).
        vocab_size: Target vocabulary size, including the 256 byte symbols and the special tokens.
        cache_dir: Folder for cached tokenizers (``None``: ``$EXPERIENTIAL_AGENTS_CACHE/tokenizers``).
        min_frequency: Merges seen fewer times than this are not learned.
        extra_special_tokens: Further tokens never split (e.g. grammar sentinels).
        split_digits: One token per digit (as the Llama and SmolLM2 tokenizers do), so numbers compare digit by digit.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *(extra_special_tokens or [])]
    if vocab_size < 256 + len(specials):
        minimum = 256 + len(specials)
        raise ValueError(f"vocab_size must be at least {minimum} (bytes + special tokens), got {vocab_size}")
    texts = list(texts)
    if not texts or not any(t.strip() for t in texts):
        raise ValueError("build_tokenizer needs at least one non-empty text")
    settings = [vocab_size, min_frequency, specials] + (["split_digits"] if split_digits else [])
    digest = hashlib.sha256(json.dumps(settings).encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    folder = Path(os.path.expanduser(cache_dir or os.path.join(DEFAULT_CACHE, "tokenizers"))) / digest.hexdigest()[:16]
    if (folder / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=extra_special_tokens or None,
    )
    # Write to a temporary folder and rename: concurrent runs never read a half-written tokenizer.
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent))
    wrapped.save_pretrained(str(tmp))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process won the race; use its copy
        pass
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """A hub or local tokenizer, with a pad token (its EOS) when it has none; clear error when offline."""
    from transformers import AutoTokenizer

    require_reachable(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise _hub_error(name_or_path, error) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --- models ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter settings (peft ``LoraConfig``)."""

    r: int = 8
    """Rank of the low-rank update."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: list[str] | str = "auto"
    """Module names to adapt; ``auto`` picks the attention projections of the architecture."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class LMSettings:
    """The causal LM a phase trains: which model, its size when built offline, LoRA, 4-bit and memory options."""

    model_name: str = "tiny-llama"
    """``tiny-llama`` / ``tiny-smollm3`` (built offline from a config), a hub name or a local folder."""
    hidden_size: int = 128
    """Width of a tiny model (ignored for hub models and folders)."""
    num_layers: int = 2
    """Decoder layers of a tiny model."""
    num_heads: int = 4
    """Attention heads of a tiny model."""
    lora: LoraSettings | None = None
    """A LoRA adapter to train on the frozen base; ``null`` trains every weight."""
    load_in_4bit: bool = False
    """Quantise the base to 4-bit NF4 with bitsandbytes (needs ``lora``), on the device the Trainer trains on."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about a third more compute)."""
    trust_remote_code: bool = False
    """Let ``from_pretrained`` run code shipped with a hub model (off unless you opt in)."""

    def __post_init__(self) -> None:
        if min(self.hidden_size, self.num_layers, self.num_heads) < 1:
            raise ValueError("hidden_size, num_layers and num_heads must be >= 1")
        if self.load_in_4bit and self.lora is None:
            raise ValueError("load_in_4bit needs a LoRA adapter (set lora)")

    @property
    def size(self) -> dict[str, int]:
        """The size arguments of ``build_causal_lm`` for a tiny model."""
        return {"hidden_size": self.hidden_size, "num_layers": self.num_layers, "num_heads": self.num_heads}


def tiny_config(
    architecture: str,
    tokenizer,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 512,
):
    """The ``transformers`` config of a small decoder (Llama or SmolLM3 architecture) sized for ``tokenizer``."""
    from transformers import LlamaConfig, SmolLM3Config

    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {architecture!r}; expected one of {TINY_ARCHITECTURES}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    if architecture == "tiny-llama":
        return LlamaConfig(**common)
    # SmolLM3 skips RoPE in every fourth layer ("NoPE"); keep that pattern at any depth.
    return SmolLM3Config(**common, no_rope_layers=[int((i + 1) % 4 != 0) for i in range(num_layers)])


def is_decoder_layer(module: nn.Module) -> bool:
    """A transformer block of a ``transformers`` decoder (the unit it checkpoints: ``GradientCheckpointingLayer``)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers before 4.52: the blocks are named ``...DecoderLayer`` / ``...Layer``
        return type(module).__name__.endswith(("DecoderLayer", "Block")) or type(module).__name__ == "GPTNeoXLayer"
    return isinstance(module, GradientCheckpointingLayer)


def decoder_layer_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP wrapping / activation-checkpointing policy (``torch.distributed.fsdp.wrap`` signature): every decoder
    layer is its own unit, whatever the architecture."""
    return recurse or is_decoder_layer(module)


def lora_targets(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Resolve ``auto`` to the attention projections of ``model``'s architecture and check the names exist."""
    if target_modules == "auto":
        model_type = getattr(getattr(model, "config", None), "model_type", "")
        target_modules = _ATTENTION_PROJECTIONS.get(model_type, _DEFAULT_PROJECTIONS)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in target_modules if t not in names]
    if missing:
        raise ValueError(
            f"LoRA target modules {missing} are not in this model ({type(model).__name__}); "
            f"use target_modules='auto' or names such as {sorted(n for n in names if 'proj' in n or 'attn' in n)[:8]}"
        )
    return list(target_modules)


def quantization_config(compute_dtype: torch.dtype = torch.float32):
    """4-bit NF4 with double quantisation (QLoRA's recipe)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def build_causal_lm(
    name_or_config="tiny-llama",
    tokenizer=None,
    *,
    lora: LoraSettings | None = None,
    adapter_path: str | None = None,
    load_in_4bit: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    device_map: str | None = None,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 512,
) -> nn.Module:
    """A causal LM, optionally 4-bit and with a trainable LoRA adapter.

    Args:
        name_or_config: ``tiny-llama`` / ``tiny-smollm3`` (built from a config, offline, needs ``tokenizer``), a
            ``transformers`` config object, a local folder or a hub name (loaded with ``from_pretrained``).
        tokenizer: Sizes the vocabulary of a model built from a config.
        lora: Add a fresh trainable LoRA adapter with these settings (the base weights are frozen).
        adapter_path: Load a saved LoRA adapter, trainable (peft's default ``is_trainable=False`` would freeze it).
        load_in_4bit: Quantise the linear layers to 4-bit NF4 (bitsandbytes; on CPU too, with ``device_map='cpu'``).
        state_dict: Plain (merged) weights to load before quantising and adding adapters, e.g. an earlier phase's.
        trust_remote_code: Let ``from_pretrained`` run code shipped with the model (off unless you opt in).
        dtype: Parameter dtype of the unquantised weights.
        device_map: Passed to ``from_pretrained`` (``cpu`` by default when quantising).
        hidden_size, num_layers, num_heads, max_positions: Size of a model built from a config.
    """
    from transformers import AutoModelForCausalLM, PretrainedConfig

    if lora is not None and adapter_path is not None:
        raise ValueError("pass either lora (a fresh adapter) or adapter_path (a saved one), not both")
    if isinstance(name_or_config, str) and name_or_config in TINY_ARCHITECTURES:
        if tokenizer is None:
            raise ValueError(f"{name_or_config!r} is built from a config and needs the tokenizer that sizes it")
        name_or_config = tiny_config(name_or_config, tokenizer, hidden_size, num_layers, num_heads, max_positions)
    if isinstance(name_or_config, PretrainedConfig):
        model = AutoModelForCausalLM.from_config(name_or_config, dtype=dtype)
    else:
        model = _from_pretrained(str(name_or_config), trust_remote_code, dtype=dtype)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
        if missing or unexpected:
            raise ValueError(f"state_dict does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if load_in_4bit:
        model = quantize_4bit(model, dtype, device_map or "cpu")
    if adapter_path is not None:
        from peft import PeftModel

        if not os.path.isdir(adapter_path):
            raise FileNotFoundError(f"adapter_path {adapter_path!r} is not a folder with a saved LoRA adapter")
        model = PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
    elif lora is not None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora_targets(model, lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    elif load_in_4bit:
        raise ValueError("a 4-bit model can only be trained through adapters: pass lora or adapter_path")
    return model


def _from_pretrained(name: str, trust_remote_code: bool, **kwargs) -> nn.Module:
    from transformers import AutoModelForCausalLM

    require_reachable(name)
    try:
        return AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as error:
        if os.path.isdir(name):
            raise
        raise _hub_error(name, error) from error


def quantize_4bit(model: nn.Module, compute_dtype: torch.dtype = torch.float32, device_map: str = "cpu") -> nn.Module:
    """Reload ``model`` with its linear layers in 4-bit NF4 (through a temporary folder, as bitsandbytes
    quantises while loading), ready for k-bit adapter training."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        quantized = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quantization_config(compute_dtype), device_map=device_map, dtype=compute_dtype
        )
    keep_4bit_layout(quantized)
    return prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False)


def keep_4bit_layout(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights.

    On CPUs with AVX512-BF16, bitsandbytes >= 0.48 rewrites a ``Linear4bit`` weight in place into a CPU-only layout
    at its first forward in eval mode. That layout changes the weight's shape, fails on layers whose output size is
    not a multiple of 32 (``shape '[32, 0]' is invalid``), and breaks the training path after an evaluation pass.
    Training alternates evaluation and updates, so the weights stay in the standard NF4 layout.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain weights of ``model`` with any LoRA adapter merged in (the live model is left untouched)."""
    from peft import PeftModel

    if getattr(model, "is_loaded_in_4bit", False) or getattr(
        getattr(model, "base_model", None), "is_loaded_in_4bit", False
    ):
        raise ValueError("merged weights of a 4-bit model are not exported; train this phase without load_in_4bit")
    if isinstance(model, PeftModel):
        model = copy.deepcopy(model).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def export_hf(model: nn.Module, tokenizer, folder: str | os.PathLike, merged: bool = True,
              replace: bool = False) -> dict[str, str]:
    """Hugging Face folders of a trained LM under ``folder``: ``model`` (the weights with any LoRA adapter merged
    in, and the tokenizer; ``AutoModelForCausalLM.from_pretrained`` loads it) and, for a LoRA model, ``adapter``
    (``PeftModel.from_pretrained`` on the base model). A 4-bit model, or ``merged=False``, exports its adapter only.
    With ``replace``, ``folder`` is written beside itself first and then swapped in, so a reader never finds a
    half-written model and nothing of an earlier export is left. Returns the paths."""
    folder = Path(folder)
    if not replace:
        return _write_hf(model, tokenizer, folder, folder, merged)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    written = _write_hf(model, tokenizer, staging, folder, merged)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
    return written


def _write_hf(model: nn.Module, tokenizer, folder: Path, final: Path, merged: bool) -> dict[str, str]:
    """Write the folders of ``export_hf`` under ``folder``; the paths returned are under ``final``."""
    from peft import PeftModel

    written = {}
    if isinstance(model, PeftModel):
        model.save_pretrained(folder / "adapter")
        tokenizer.save_pretrained(folder / "adapter")
        written["adapter"] = str(final / "adapter")
    four_bit = getattr(model, "is_loaded_in_4bit", False) or getattr(
        getattr(model, "base_model", None), "is_loaded_in_4bit", False)
    if merged and not four_bit:
        plain = copy.deepcopy(model).merge_and_unload() if isinstance(model, PeftModel) else model
        plain.save_pretrained(folder / "model")
        tokenizer.save_pretrained(folder / "model")
        written["model"] = str(final / "model")
    return written


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
