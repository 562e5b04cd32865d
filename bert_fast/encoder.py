"""``bert_fast.Encoder``: encode many texts by token budget, with no padding anywhere.

How :meth:`Encoder.encode` runs:

1. Tokenize with the model's fast tokenizer (truncation to ``max_seq_length`` exactly as
   sentence-transformers does: ``truncation=True``, special tokens added), in chunks of
   :data:`TOKENIZE_CHUNK` texts on a background thread, so the next chunk is tokenized while the
   model runs on the current one.
2. Sort each chunk's texts by token count (longest first) and pack consecutive texts into
   batches of at most ``batch_tokens`` real tokens (a text longer than the budget goes alone).
3. Run each batch as **packed input**, the layout of HF's ``DataCollatorWithFlattening``:
   ``input_ids`` of shape (1, T), ``position_ids`` restarting at 0 for every text, and
   ``cu_seq_lens_q/k`` (int32, cumulative, from 0 to T) with ``max_length_q/k``. The model runs
   its padding-free path on it, so the work is proportional to the real tokens, whatever the mix
   of lengths.
4. Pool per text with segment ops over the (T, hidden) output (``index_add`` / ``scatter_reduce``;
   sums in fp32), normalize if asked, and write each row to its input position.

Compared with ``SentenceTransformer.encode`` (sorts, then batches a fixed *count* of texts and pads
each batch to its longest text), nothing is spent on padding tokens, and large budgets keep the
GEMMs large even for short texts. Results equal sentence-transformers' up to fp32 rounding.

Limits: BERT-family checkpoints only (``model_type`` bert, roberta, xlm-roberta, camembert, electra,
distilbert: :mod:`bert_fast.families`); of sentence-transformers' modules,
``Transformer``, ``Pooling`` and ``Normalize`` are supported (a ``Dense`` or other module raises).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

__all__ = ["Encoder", "POOLING_MODES", "TOKENIZE_CHUNK", "pack_lengths", "read_model_dir"]

#: Pooling modes of sentence-transformers' ``Pooling`` module that the Encoder implements.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
#: Texts tokenized per background step (and sorted together before packing).
TOKENIZE_CHUNK = 8192

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


def _check_modes(pooling: str | Sequence[str]) -> tuple[str, ...]:
    modes = (pooling,) if isinstance(pooling, str) else tuple(pooling)
    if not modes:
        raise ValueError(f"pooling must name at least one mode of {POOLING_MODES}")
    for mode in modes:
        if mode not in POOLING_MODES:
            raise ValueError(f"pooling={mode!r} is not a known pooling mode; use one of {POOLING_MODES}")
    return modes


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def pack_lengths(lengths: Sequence[int], batch_tokens: int) -> list[tuple[int, int]]:
    """Split consecutive ``lengths`` into ``[start, end)`` batches of at most ``batch_tokens`` tokens.

    Greedy in order; a single length above the budget forms a batch alone. With lengths sorted,
    batches hold texts of similar length (which keeps the attention work per batch even).
    """
    batches: list[tuple[int, int]] = []
    start, total = 0, 0
    for i, n in enumerate(lengths):
        if i > start and total + n > batch_tokens:
            batches.append((start, i))
            start, total = i, 0
        total += n
    if start < len(lengths):
        batches.append((start, len(lengths)))
    return batches


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


def _takes(model: torch.nn.Module, name: str) -> bool:
    import inspect

    return name in inspect.signature(type(model).forward).parameters


class Encoder:
    """Batch encoder over a bert_fast model: token-budget packing, padding-free, input order kept.

    Build it with :meth:`from_pretrained`. :meth:`encode` gives sentence embeddings (like
    ``SentenceTransformer.encode``); :meth:`score` gives cross-encoder scores for text pairs (like
    ``CrossEncoder.predict``) when the directory holds a ``BertForSequenceClassification``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: _Config, device: torch.device) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.device = device
        self._lock = threading.Lock()
        #: tokens run by the last encode()/score() call (after truncation, special tokens included)
        self.last_tokens = 0

    # ------------------------------------------------------------------------------------------
    # loading
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        backend: str | None = None,
        max_seq_length: int | None = None,
    ) -> Encoder:
        """Load a sentence-transformers directory or a Hugging Face BERT directory (local only).

        * sentence-transformers layout (``modules.json``): pooling from ``1_Pooling/config.json``,
          normalization when a ``Normalize`` module is listed, ``max_seq_length`` from
          ``sentence_bert_config.json``, prompts from ``config_sentence_transformers.json``.
        * plain Hugging Face BERT (``config.json``): mean pooling, no normalization,
          ``max_seq_length`` = the tokenizer's ``model_max_length`` capped at
          ``max_position_embeddings``. A ``BertForSequenceClassification`` checkpoint (a reranker)
          is loaded with its head, for :meth:`score`.

        ``device``: ``None``/``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda:N"``.
        ``dtype``: ``"fp32"`` (default), ``"bf16"``, ``"fp16"`` or a ``torch.dtype``.
        ``backend``: bert_fast kernel backend (``None`` = automatic). ``max_seq_length``: override
        the truncation length (at most ``max_position_embeddings``).
        """
        import transformers

        from . import modeling

        path = os.fspath(path)
        dev = _resolve_device(device)
        torch_dtype = _resolve_dtype(dtype)
        if max_seq_length is not None and (
            not isinstance(max_seq_length, int) or isinstance(max_seq_length, bool) or max_seq_length < 2
        ):
            raise ValueError(f"max_seq_length must be an int >= 2, got {max_seq_length!r}")
        from .families import FAMILIES

        model_dir, cfg, hf_config = read_model_dir(path)
        fam = next(f for f in FAMILIES if hf_config.model_type in f.model_types)
        # RoBERTa-style positions start after the padding index: fewer usable positions.
        limit = int(hf_config.max_position_embeddings)
        if fam.padding_positions:
            limit -= int(hf_config.pad_token_id) + 1
        if max_seq_length is not None and max_seq_length > limit:
            raise ValueError(
                f"max_seq_length={max_seq_length} exceeds the model's maximum sequence length {limit} "
                f"(max_position_embeddings={hf_config.max_position_embeddings})"
            )
        archs = hf_config.architectures or []
        base_name = "BertModel" if fam.name == "bert" else fam.base
        clf_name = base_name[: -len("Model")] + "ForSequenceClassification"
        if clf_name in archs:
            model = getattr(modeling, clf_name).from_pretrained(model_dir, backend=backend, dtype=torch_dtype)
            cfg.activation = _activation_from_config(hf_config)
        else:
            model = getattr(modeling, base_name).from_pretrained(model_dir, backend=backend, dtype=torch_dtype)
        model = model.to(dev).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{path}: bert_fast.Encoder needs a fast tokenizer (tokenizer.json)")
        if max_seq_length is not None:
            cfg.max_seq_length = max_seq_length
        elif cfg.max_seq_length <= 0:
            cfg.max_seq_length = int(min(tokenizer.model_max_length, limit))
        return cls(model, tokenizer, cfg, dev)

    # ------------------------------------------------------------------------------------------
    # properties
    # ------------------------------------------------------------------------------------------

    @property
    def is_cross_encoder(self) -> bool:
        from .families import family_of

        return family_of(self.model) is None  # a task model (sequence classification) around the encoder

    @property
    def _bert(self) -> torch.nn.Module:
        return self.model.base_model if self.is_cross_encoder else self.model

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_seq_length(self) -> int:
        return self.config.max_seq_length

    def get_sentence_embedding_dimension(self, pooling: str | Sequence[str] | None = None) -> int:
        """Width of :meth:`encode`'s rows (hidden size times the number of pooling modes)."""
        modes = self.config.modes if pooling is None else _check_modes(pooling)
        return int(self._bert.config.hidden_size) * len(modes)

    # ------------------------------------------------------------------------------------------
    # tokenization and packing
    # ------------------------------------------------------------------------------------------

    def _tokenize(self, first: list[str], second: list[str] | None) -> list[tuple[list[int], list[int] | None]]:
        if self.config.do_lower_case:
            first = [t.lower() for t in first]
            second = None if second is None else [t.lower() for t in second]
        from .families import family_of

        with_types = second is not None and family_of(self._bert).has_token_types  # DistilBERT: none
        enc = self.tokenizer(
            first,
            second,
            truncation="longest_first",
            max_length=self.config.max_seq_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=with_types,
        )
        ids = enc["input_ids"]
        types = enc["token_type_ids"] if with_types else [None] * len(ids)
        return list(zip(ids, types))

    def _chunks(
        self, first: list[str], second: list[str] | None
    ) -> Iterator[tuple[int, list[tuple[list[int], list[int] | None]]]]:
        """Yields (offset, tokenized chunk); chunk k+1 is tokenized on a thread while k is consumed."""
        starts = list(range(0, len(first), TOKENIZE_CHUNK))
        if not starts:
            return

        def work(s: int):
            end = s + TOKENIZE_CHUNK
            return self._tokenize(first[s:end], None if second is None else second[s:end])

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bert_fast-tokenize") as pool:
            pending: Future = pool.submit(work, starts[0])
            for k, s in enumerate(starts):
                chunk = pending.result()
                if k + 1 < len(starts):
                    pending = pool.submit(work, starts[k + 1])
                yield s, chunk

    def _batches(
        self, first: list[str], second: list[str] | None, batch_tokens: int
    ) -> Iterator[tuple[np.ndarray, list[tuple[list[int], list[int] | None]]]]:
        """Yields (input positions, tokenized texts) per packed batch."""
        for offset, chunk in self._chunks(first, second):
            lengths = np.fromiter((len(ids) for ids, _ in chunk), dtype=np.int64, count=len(chunk))
            order = np.argsort(-lengths, kind="stable")
            for s, e in pack_lengths(lengths[order].tolist(), batch_tokens):
                idx = order[s:e]
                yield idx + offset, [chunk[i] for i in idx]

    def _run_packed(self, items: list[tuple[list[int], list[int] | None]]):
        """One packed forward. Returns (model output, cu_seqlens (int64, CPU), lengths (int64, CPU))."""
        lengths = torch.tensor([len(ids) for ids, _ in items], dtype=torch.int64)
        total = int(lengths.sum())
        ids = torch.tensor([t for ids, _ in items for t in ids], dtype=torch.int64)
        cu = torch.zeros(len(items) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=cu[1:])
        # position ids restart at 0 for every text: arange(T) minus each token's sequence start
        pos = torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(cu[:-1], lengths)
        max_len = int(lengths.max())
        cu32 = cu.to(torch.int32).to(self.device)
        kwargs: dict[str, Any] = {
            "input_ids": ids.unsqueeze(0).to(self.device),
            "position_ids": pos.unsqueeze(0).to(self.device),
            "cu_seq_lens_q": cu32,
            "cu_seq_lens_k": cu32,
            "max_length_q": max_len,
            "max_length_k": max_len,
            # the ids come from the tokenizer and the offsets from us: skip the model's host-side checks
            "validate_inputs": False,
        }
        if items[0][1] is not None:
            types = torch.tensor([t for _, tt in items for t in tt], dtype=torch.int64)
            kwargs["token_type_ids"] = types.unsqueeze(0).to(self.device)
        from .families import takes_packed_kwargs

        if not takes_packed_kwargs(self.model) and len(items) > 1 and not _takes(self.model, "position_ids"):
            # transformers 4.x DistilBERT task models take neither packed keywords nor position_ids:
            # one forward per sequence (only score() reaches here; encode() runs the base model).
            logits = [self._run_packed([item])[0].logits for item in items]
            return SimpleNamespace(logits=torch.cat(logits)), cu, lengths
        if not takes_packed_kwargs(self.model):
            # transformers 4.x task models pass no extra keywords on: the restarting position_ids
            # alone mark the sequences (the model derives the offsets from them).
            for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "validate_inputs"):
                del kwargs[key]
            if len(items) == 1:  # no restart to detect: one plain unpadded row, default positions
                del kwargs["position_ids"]
        out = self.model(**kwargs, return_dict=True)
        return out, cu, lengths

    # ------------------------------------------------------------------------------------------
    # pooling
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _pool(
        h: torch.Tensor, cu: torch.Tensor, lengths: torch.Tensor, modes: tuple[str, ...], skip: int
    ) -> torch.Tensor:
        """Pool the packed (T, hidden) states per sequence with segment ops; fp32 result (n, dim).

        ``skip``: leading tokens of every sequence left out (a prompt with ``include_prompt=False``,
        as sentence-transformers does; its CLS pooling moves past the prompt when the text is longer).
        """
        dev = h.device
        n, hidden = lengths.numel(), h.shape[-1]
        cu_d, len_d = cu.to(dev), lengths.to(dev)
        starts = cu_d[:-1]
        seg = torch.repeat_interleave(torch.arange(n, device=dev), len_d)
        pos = torch.arange(h.shape[0], device=dev) - torch.repeat_interleave(starts, len_d)
        x, xs, xp, eff = h, seg, pos, len_d
        if skip:
            keep = pos >= skip
            x, xs, xp = h[keep], seg[keep], pos[keep]
            eff = len_d - skip
        x32 = x.float()
        out: list[torch.Tensor] = []
        mean_sum = None
        for mode in modes:
            if mode == "cls":
                first = starts + torch.where(len_d > skip, skip, 0) if skip else starts
                out.append(h[first].float())
            elif mode == "lasttoken":
                out.append(h[cu_d[1:] - 1].float())
            elif mode in ("mean", "mean_sqrt_len_tokens"):
                if mean_sum is None:
                    mean_sum = torch.zeros(n, hidden, device=dev, dtype=torch.float32).index_add_(0, xs, x32)
                denom = eff.clamp(min=1).to(torch.float32).unsqueeze(1)
                out.append(mean_sum / (denom if mode == "mean" else denom.sqrt()))
            elif mode == "max":
                init = torch.full((n, hidden), float("-inf"), device=dev, dtype=torch.float32)
                out.append(init.scatter_reduce(0, xs.unsqueeze(1).expand(-1, hidden), x32, reduce="amax"))
            elif mode == "weightedmean":
                w = (xp + 1).to(torch.float32)
                num = torch.zeros(n, hidden, device=dev, dtype=torch.float32).index_add_(0, xs, x32 * w.unsqueeze(1))
                den = torch.zeros(n, device=dev, dtype=torch.float32).index_add_(0, xs, w)
                out.append(num / den.clamp(min=1e-9).unsqueeze(1))
        return torch.cat(out, dim=-1) if len(out) > 1 else out[0]

    # ------------------------------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _check_common(batch_tokens: Any, output: Any, show_progress_bar: Any) -> None:
        if not isinstance(batch_tokens, int) or isinstance(batch_tokens, bool) or batch_tokens < 1:
            raise ValueError(f"batch_tokens must be a positive int (tokens per packed batch), got {batch_tokens!r}")
        if output not in ("numpy", "torch"):
            raise ValueError(f"output must be 'numpy' or 'torch', got {output!r}")
        if show_progress_bar is not None and not isinstance(show_progress_bar, bool):
            raise TypeError(f"show_progress_bar must be True, False or None, got {show_progress_bar!r}")

    def _resolve_prompt(self, prompt: str | None, prompt_name: str | None) -> str:
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if prompt is not None:
            return prompt
        if prompt_name is None:
            prompt_name = self.config.default_prompt_name
            if prompt_name is None:
                return ""
        if prompt_name not in self.config.prompts:
            raise ValueError(
                f"prompt_name={prompt_name!r} is not one of this model's prompts {sorted(self.config.prompts)}"
            )
        return self.config.prompts[prompt_name]

    def _prompt_length(self, prompt: str) -> int:
        """Prompt tokens without the trailing special token (sentence-transformers' definition)."""
        ids = self._tokenize([prompt], None)[0][0]
        n = len(ids)
        if ids and ids[-1] in set(self.tokenizer.all_special_ids):
            n -= 1
        return n

    def _progress(self, show: bool | None, total: int, what: str):
        if not show:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=what, unit="text", dynamic_ncols=True)

    @torch.inference_mode()
    def encode(
        self,
        texts: str | Sequence[str],
        batch_tokens: int = 16384,
        normalize: bool | None = None,
        pooling: str | Sequence[str] | None = None,
        prompt: str | None = None,
        prompt_name: str | None = None,
        output: str = "numpy",
        show_progress_bar: bool | None = None,
    ) -> np.ndarray | torch.Tensor:
        """Sentence embeddings of ``texts``, float32, shape (len(texts), dim), in input order.

        ``batch_tokens``: real tokens per packed batch (a longer text runs alone).
        ``normalize``: L2-normalize rows (``None``: as the directory says — a ``Normalize`` module).
        ``pooling``: ``"mean"``, ``"cls"``, ``"max"``, ``"mean_sqrt_len_tokens"``, ``"weightedmean"``,
        ``"lasttoken"`` or a sequence of them, concatenated (``None``: the directory's).
        ``prompt`` / ``prompt_name``: text prepended to every input (or one of the directory's named
        prompts; the default prompt applies when both are ``None``).
        ``output``: ``"numpy"`` or ``"torch"`` (a CPU tensor). ``show_progress_bar``: tqdm bar with
        texts and tokens/s (``None``: off). A single ``str`` gives a 1-D result.
        """
        single = isinstance(texts, str)
        items = [texts] if single else texts
        if not isinstance(items, (list, tuple)):
            raise TypeError(
                f"texts must be a str or a list/tuple of str, got {type(texts).__name__} "
                "(wrap other sequences in list())"
            )
        for i, t in enumerate(items):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is a {type(t).__name__}, not a str")
        self._check_common(batch_tokens, output, show_progress_bar)
        if normalize is not None and not isinstance(normalize, bool):
            raise TypeError(f"normalize must be True, False or None, got {normalize!r}")
        modes = self.config.modes if pooling is None else _check_modes(pooling)
        prompt_text = self._resolve_prompt(prompt, prompt_name)
        skip = 0
        if prompt_text and not self.config.include_prompt:
            skip = self._prompt_length(prompt_text)
        do_norm = self.config.normalize if normalize is None else normalize
        inputs = [prompt_text + t for t in items] if prompt_text else list(items)

        dim = self.get_sentence_embedding_dimension(modes)
        result = torch.empty(len(inputs), dim, dtype=torch.float32)
        bar = self._progress(show_progress_bar, len(inputs), "encode")
        tokens = 0
        try:
            t0 = time.perf_counter()
            with self._lock:
                for where, batch in self._batches(inputs, None, batch_tokens):
                    out, cu, lengths = self._run_packed(batch)
                    pooled = self._pool(out.last_hidden_state[0], cu, lengths, modes, skip)
                    if do_norm:
                        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                    result[torch.from_numpy(where)] = pooled.to("cpu", torch.float32)
                    tokens += int(lengths.sum())
                    if bar is not None:
                        bar.update(len(batch))
                        bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f}")
        finally:
            self.last_tokens = tokens
            if bar is not None:
                bar.close()
        if single:
            result = result[0]
        return result.numpy() if output == "numpy" else result

    @torch.inference_mode()
    def score(
        self,
        pairs: Sequence[Sequence[str]],
        batch_tokens: int = 16384,
        activation: bool = True,
        output: str = "numpy",
        show_progress_bar: bool | None = None,
    ) -> np.ndarray | torch.Tensor:
        """Cross-encoder scores of (query, passage) ``pairs``, float32, in input order.

        Pairs are tokenized together (``token_type_ids`` 0/1, ``longest_first`` truncation to
        ``max_seq_length``), packed by ``batch_tokens`` and run through the classifier, which pools
        each sequence's first token. As ``CrossEncoder.predict``: shape (n,) for one label,
        (n, num_labels) otherwise; with ``activation`` the model's activation is applied (the saved
        ``activation_fn``, else sigmoid for one label, none for several).
        """
        if not self.is_cross_encoder:
            raise ValueError(
                "score() needs a cross-encoder: load a BertForSequenceClassification (reranker) directory"
            )
        if not isinstance(pairs, (list, tuple)):
            raise TypeError(f"pairs must be a list/tuple of (str, str) pairs, got {type(pairs).__name__}")
        for i, p in enumerate(pairs):
            if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p)):
                raise TypeError(f"pairs[{i}] must be a pair (str, str), got {p!r:.80}")
        self._check_common(batch_tokens, output, show_progress_bar)
        num_labels = int(self.model.config.num_labels)
        result = torch.empty(len(pairs), num_labels, dtype=torch.float32)
        bar = self._progress(show_progress_bar, len(pairs), "score")
        try:
            with self._lock:
                first = [p[0] for p in pairs]
                second = [p[1] for p in pairs]
                for where, batch in self._batches(first, second, batch_tokens):
                    out, cu, lengths = self._run_packed(batch)
                    logits = out.logits.float()
                    if logits.shape[0] != len(batch):
                        raise RuntimeError(
                            f"the classifier returned {logits.shape[0]} rows for {len(batch)} packed sequences; "
                            "this bert_fast model does not support packed input"
                        )
                    if activation and self.config.activation is not None:
                        logits = self.config.activation(logits)
                    result[torch.from_numpy(where)] = logits.cpu()
                    if bar is not None:
                        bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()
        if num_labels == 1:
            result = result[:, 0]
        return result.numpy() if output == "numpy" else result

