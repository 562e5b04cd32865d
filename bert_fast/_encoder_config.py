"""Reading a model directory for :class:`bert_fast.Encoder`: a sentence-transformers directory
(``modules.json``: pooling, normalization, ``max_seq_length``, prompts) or a Hugging Face one, and
the Encoder's device / dtype arguments. No weights are loaded here."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ._pooling import _check_modes

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
_LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_ST_TRANSFORMER = ("sentence_transformers.models.Transformer", "sentence_transformers.base.modules.transformer")
_ST_POOLING = "Pooling"
_ST_NORMALIZE = "Normalize"


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype={dtype} is not supported; use torch.float32, torch.bfloat16 or torch.float16")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype={dtype!r} is not supported; use 'fp32', 'bf16' or 'fp16' (or a torch.dtype)")


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a valid torch device (use 'cpu', 'cuda' or 'cuda:N')") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; use device='cpu'")
    return dev


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass
class _Config:
    modes: tuple[str, ...] = ("mean",)
    normalize: bool = False
    include_prompt: bool = True
    max_seq_length: int = 512
    do_lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None


def _pooling_config(path: str) -> tuple[tuple[str, ...], bool]:
    cfg = _read_json(os.path.join(path, "config.json"))
    if "pooling_mode" in cfg:
        modes = _check_modes(cfg["pooling_mode"])
    else:
        modes = tuple(mode for key, mode in _LEGACY_POOLING.items() if cfg.get(key, False)) or ("mean",)
    return modes, bool(cfg.get("include_prompt", True))


def _sentence_transformers_layout(path: str) -> tuple[str, _Config]:
    """(transformer module dir, config) from a sentence-transformers directory's ``modules.json``."""
    modules = _read_json(os.path.join(path, "modules.json"))
    cfg = _Config()
    transformer_dir = None
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(module.get("type", ""))
        sub = os.path.join(path, module.get("path", ""))
        name = kind.rsplit(".", 1)[-1]
        if kind in _ST_TRANSFORMER or name == "Transformer":
            transformer_dir = sub
            for fname in ("sentence_bert_config.json", "sentence_transformers_config.json"):
                if os.path.exists(os.path.join(sub, fname)):
                    st_cfg = _read_json(os.path.join(sub, fname))
                    if st_cfg.get("max_seq_length") is not None:
                        cfg.max_seq_length = int(st_cfg["max_seq_length"])
                    cfg.do_lower_case = bool(st_cfg.get("do_lower_case", False))
                    break
            else:
                cfg.max_seq_length = -1  # tokenizer's model_max_length, capped below
        elif name == _ST_POOLING:
            cfg.modes, cfg.include_prompt = _pooling_config(sub)
        elif name == _ST_NORMALIZE:
            cfg.normalize = True
        else:
            raise ValueError(
                f"{path}: the sentence-transformers module {kind!r} is not supported by bert_fast.Encoder "
                "(supported: Transformer, Pooling, Normalize); use SentenceTransformer with bert_fast.optimize"
            )
    if transformer_dir is None:
        raise ValueError(f"{path}: modules.json has no Transformer module")
    st_file = os.path.join(path, "config_sentence_transformers.json")
    if os.path.exists(st_file):
        st = _read_json(st_file)
        cfg.prompts = {str(k): str(v) for k, v in (st.get("prompts") or {}).items()}
        cfg.default_prompt_name = st.get("default_prompt_name")
    return transformer_dir, cfg


def _activation_from_config(config: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """sentence-transformers' CrossEncoder default: the saved ``activation_fn`` if it is a torch
    class, else sigmoid for one label and identity otherwise."""
    st = getattr(config, "sentence_transformers", None)
    path = st.get("activation_fn") if isinstance(st, dict) else None
    path = path or getattr(config, "sbert_ce_default_activation_function", None)
    if isinstance(path, str) and path.startswith("torch."):
        import importlib

        module_name, _, cls_name = path.rpartition(".")
        try:
            return getattr(importlib.import_module(module_name), cls_name)()
        except (ImportError, AttributeError):
            pass
    return torch.sigmoid if config.num_labels == 1 else None


def read_model_dir(path: str | os.PathLike) -> tuple[str, _Config, Any]:
    """(transformer weights dir, Encoder settings, transformers config) of a model directory,
    without loading weights. Raises ``FileNotFoundError`` / ``ValueError`` for what the Encoder
    cannot load."""
    import transformers

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist (give a local model directory)")
    if os.path.exists(os.path.join(path, "modules.json")):
        model_dir, cfg = _sentence_transformers_layout(path)
    elif os.path.exists(os.path.join(path, "config.json")):
        model_dir, cfg = path, _Config(max_seq_length=-1)
    else:
        raise FileNotFoundError(
            f"{path!r} is not a model directory: it has neither modules.json (sentence-transformers) "
            "nor config.json (Hugging Face)"
        )
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir!r} has no config.json")
    hf_config = transformers.AutoConfig.from_pretrained(model_dir)
    from .families import supported_model_types

    if hf_config.model_type not in supported_model_types():
        raise ValueError(
            f"{path}: model_type {hf_config.model_type!r} is not supported "
            f"(supported: {', '.join(supported_model_types())})"
        )
    return model_dir, cfg, hf_config
