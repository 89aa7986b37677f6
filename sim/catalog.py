"""Model and GPU catalog: shapes from a Hugging Face ``config.json``, GPUs as spec records.

A model is bundled (``sim/data/models/<org>--<model>_config.json``), named by alias, or given
as a path to a ``config.json`` (or a folder holding one). A GPU is bundled in
``sim/data/gpus.yaml`` or given as a YAML file with the same fields.

Tensor parallelism follows vLLM's sharding (``vllm/model_executor/layers/linear.py``):

    QKV, gate/up, q_b, kv_b, experts  column-parallel   out_features / tp
    O, down                           row-parallel      in_features  / tp
    lm_head, embedding                vocab-parallel    vocab / tp (rounded up)
    MLA q_a / kv_a, router, norms     replicated
    KV heads                          max(1, kv_heads / tp): replicated when tp > kv_heads

Parameter counts leave out biases and per-head q/k norms (< 0.05 % for every bundled model).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import CatalogError, ConfigError

DATA_DIR = Path(__file__).with_name("data")
MODELS_DIR = DATA_DIR / "models"
GPUS_FILE = DATA_DIR / "gpus.yaml"

# Bytes per weight / KV element. fp8 applies to decoder linear weights only (see weight_bytes).
DTYPE_BYTES: Mapping[str, int] = {"bf16": 2, "fp16": 2, "fp8": 1}
ACTIVATION_BYTES = 2  # activations, embeddings, lm_head, norms and router stay 16-bit


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise CatalogError(
            "dtype", f"{dtype!r} is not a known dtype", f"use one of {', '.join(DTYPE_BYTES)}"
        )
    return DTYPE_BYTES[dtype]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class LinearShape:
    """One weight matrix as a single GPU holds it: y[T, out] = x[T, in] @ W[in, out]."""

    kind: str
    in_features: int
    out_features: int
    count: int  # how many copies the model has (layers carrying it)
    quantizable: bool  # False: stays 16-bit under fp8 (lm_head, router)

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int  # MLA: qk_nope_head_dim + qk_rope_head_dim
    intermediate_size: int  # dense MLP width (MoE models: of their dense layers)
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    # MoE; num_experts == 0 means dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # total width of always-on shared experts
    num_dense_layers: int = 0  # dense-MLP layers of an MoE model (DeepSeek first_k_dense_replace)
    # MLA (DeepSeek-V3); kv_lora_rank == 0 means standard multi-head / grouped attention.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0  # 0: queries are projected directly from the hidden state
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    # Sliding-window layers (gpt-oss alternates sliding and full attention).
    num_sliding_layers: int = 0
    sliding_window: int = 0

    def __post_init__(self) -> None:
        def bad(field: str, rule: str) -> CatalogError:
            value = getattr(self, field)
            return CatalogError(
                self.name, f"{field} = {value!r}: {rule}", "check the model's config.json"
            )

        for field in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
        ):
            if getattr(self, field) < 1:
                raise bad(field, "must be >= 1")
        if not self.is_mla and self.num_attention_heads % self.num_kv_heads:
            raise bad(
                "num_kv_heads", f"must divide num_attention_heads = {self.num_attention_heads}"
            )
        if self.is_moe:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise bad(
                    "num_experts_per_tok", f"must be in [1, num_experts = {self.num_experts}]"
                )
            if self.moe_intermediate_size < 1:
                raise bad("moe_intermediate_size", "must be >= 1 for an MoE model")
            if not 0 <= self.num_dense_layers < self.num_layers:
                raise bad("num_dense_layers", f"must be in [0, num_layers = {self.num_layers})")
        if self.is_mla and min(self.qk_rope_head_dim, self.qk_nope_head_dim, self.v_head_dim) < 1:
            raise bad(
                "kv_lora_rank", "MLA needs qk_rope_head_dim, qk_nope_head_dim and v_head_dim >= 1"
            )
        if not 0 <= self.num_sliding_layers <= self.num_layers:
            raise bad("num_sliding_layers", f"must be in [0, num_layers = {self.num_layers}]")
        if self.num_sliding_layers and self.sliding_window < 1:
            raise bad("sliding_window", "must be >= 1 when some layers use sliding windows")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers if self.is_moe else 0

    @property
    def num_full_attention_layers(self) -> int:
        return self.num_layers - self.num_sliding_layers

    # -- tensor parallelism ----------------------------------------------------------------

    def check_tp(self, tp: int) -> None:
        """vLLM refuses a TP degree that does not split the heads evenly; so do we."""
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ConfigError(f"tp = {tp!r}: must be an integer >= 1")
        if self.num_attention_heads % tp:
            raise ConfigError(
                f"tp = {tp} does not divide the {self.num_attention_heads} "
                f"attention heads of {self.name}; pick a divisor"
            )
        kv = self.num_kv_heads
        if not self.is_mla and kv % tp and tp % kv:
            raise ConfigError(
                f"tp = {tp} and the {kv} KV heads of {self.name} do not divide "
                f"one another; pick a tp that does"
            )

    def kv_heads_per_gpu(self, tp: int = 1) -> int:
        self.check_tp(tp)
        return max(1, self.num_kv_heads // tp)

    # -- shapes ----------------------------------------------------------------------------

    def linear_shapes(self, tp: int = 1) -> tuple[LinearShape, ...]:
        """Every weight matrix except the routed experts, as one GPU of a TP group holds it."""
        self.check_tp(tp)
        h, heads = self.hidden_size, self.num_attention_heads // tp
        layers = self.num_layers
        shapes = list(self._attention_shapes(tp, heads))
        dense_layers = self.num_dense_layers if self.is_moe else layers
        if dense_layers:
            inter = _ceil_div(self.intermediate_size, tp)
            shapes += [
                LinearShape("gate_up", h, 2 * inter, dense_layers, True),
                LinearShape("down", inter, h, dense_layers, True),
            ]
        moe_layers = self.num_moe_layers
        if moe_layers:
            if self.shared_expert_intermediate_size:
                inter = _ceil_div(self.shared_expert_intermediate_size, tp)
                shapes += [
                    LinearShape("shared_gate_up", h, 2 * inter, moe_layers, True),
                    LinearShape("shared_down", inter, h, moe_layers, True),
                ]
            shapes.append(LinearShape("router", h, self.num_experts, moe_layers, False))
        shapes.append(LinearShape("lm_head", h, _ceil_div(self.vocab_size, tp), 1, False))
        return tuple(shapes)

    def _attention_shapes(self, tp: int, heads: int) -> list[LinearShape]:
        h, layers = self.hidden_size, self.num_layers
        if not self.is_mla:
            kv = self.kv_heads_per_gpu(tp)
            return [
                LinearShape("qkv", h, (heads + 2 * kv) * self.head_dim, layers, True),
                LinearShape("o", heads * self.head_dim, h, layers, True),
            ]
        # DeepSeek MLA (vllm/model_executor/models/deepseek_v2.py): the down-projections
        # q_a and kv_a are replicated; q_b, kv_b are column-parallel, o is row-parallel.
        qk_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        kv_a_out = self.kv_lora_rank + self.qk_rope_head_dim
        shapes = []
        if self.q_lora_rank:
            shapes += [
                LinearShape("q_a", h, self.q_lora_rank, layers, True),
                LinearShape("q_b", self.q_lora_rank, heads * qk_dim, layers, True),
            ]
        else:
            shapes.append(LinearShape("q", h, heads * qk_dim, layers, True))
        kv_b_out = heads * (self.qk_nope_head_dim + self.v_head_dim)
        return [
            *shapes,
            LinearShape("kv_a", h, kv_a_out, layers, True),
            LinearShape("kv_b", self.kv_lora_rank, kv_b_out, layers, True),
            LinearShape("o", heads * self.v_head_dim, h, layers, True),
        ]

    def expert_shapes(self, tp: int = 1) -> tuple[LinearShape, ...]:
        """One routed expert's matrices on one GPU (TP splits every expert); empty if dense."""
        self.check_tp(tp)
        if not self.is_moe:
            return ()
        inter = _ceil_div(self.moe_intermediate_size, tp)
        h, n = self.hidden_size, self.num_moe_layers
        return (
            LinearShape("expert_gate_up", h, 2 * inter, n, True),
            LinearShape("expert_down", inter, h, n, True),
        )

    def _norm_numel(self) -> int:
        per_layer = 2 * self.hidden_size + self.q_lora_rank + self.kv_lora_rank
        return self.num_layers * per_layer + self.hidden_size

    def _param_numel(self, experts: int, tp: int, dtype: str | None) -> int:
        """Σ elements (dtype None) or bytes (dtype given) of the weights one GPU holds."""
        wb = 1 if dtype is None else dtype_bytes(dtype)
        ab = 1 if dtype is None else ACTIVATION_BYTES
        total = 0
        for s in self.linear_shapes(tp):
            if s.kind == "lm_head" and self.tie_word_embeddings:
                continue  # shares the embedding matrix
            total += s.numel * s.count * (wb if s.quantizable else ab)
        for s in self.expert_shapes(tp):
            total += experts * s.numel * s.count * wb
        embedding = _ceil_div(self.vocab_size, tp) * self.hidden_size
        return total + (embedding + self._norm_numel()) * ab

    # -- derived sizes ---------------------------------------------------------------------

    @property
    def num_params(self) -> int:
        return self._param_numel(self.num_experts, 1, None)

    @property
    def num_active_params(self) -> int:
        """Parameters one token uses: all but the routed experts it is not sent to."""
        return self._param_numel(self.num_experts_per_tok, 1, None)

    def weight_bytes(self, dtype: str = "bf16", tp: int = 1) -> int:
        """Bytes of weights on one GPU of a TP group (tp = 1: the whole model).

        fp8 quantises the decoder's linear layers only; embedding, lm_head, router and norms
        stay 16-bit, as in FP8 checkpoints (ModelOpt, llm-compressor) served by vLLM/SGLang.
        """
        return self._param_numel(self.num_experts, tp, dtype)

    def kv_bytes_per_token(self, dtype: str = "bf16", tp: int = 1) -> int:
        """KV-cache bytes one token occupies on one GPU, all layers.

        Standard attention caches K and V: 2 · layers · kv_heads_per_gpu · head_dim.
        MLA caches the compressed latent plus the shared rope key, replicated on every rank:
        layers · (kv_lora_rank + qk_rope_head_dim). Sliding-window layers are counted in
        full: an upper bound for gpt-oss, whose sliding layers keep only the last window.
        """
        b = dtype_bytes(dtype)
        if self.is_mla:
            return self.num_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * b
        return 2 * self.num_layers * self.kv_heads_per_gpu(tp) * self.head_dim * b

    def prefill_attn_flops_per_pair(self) -> int:
        """FLOPs of one (query, key) pair in one layer, all heads: QKᵀ plus PV."""
        if self.is_mla:  # prefill runs MLA as plain MHA on the decompressed K, V
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            return 2 * self.num_attention_heads * (qk + self.v_head_dim)
        return 4 * self.num_attention_heads * self.head_dim

    def decode_attn_flops_per_pair(self) -> int:
        if self.is_mla:  # decode absorbs W_UK/W_UV and attends over the latent directly
            latent = self.kv_lora_rank + self.qk_rope_head_dim
            return 2 * self.num_attention_heads * (latent + self.kv_lora_rank)
        return 4 * self.num_attention_heads * self.head_dim


# -- reading config.json --------------------------------------------------------------------


def _get_int(
    cfg: Mapping[str, Any], key: str, where: str, default: int | None = None, minimum: int = 1
) -> int:
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise CatalogError(
                where,
                f"missing field '{key}'",
                "a Hugging Face config.json of a decoder model needs it",
            )
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CatalogError(
            where,
            f"field '{key}' = {value!r}: must be an integer >= {minimum}",
            "fix the value in the config.json",
        )
    return value


def _first_int(cfg: Mapping[str, Any], keys: tuple[str, ...], where: str, default: int) -> int:
    for key in keys:
        if cfg.get(key) is not None:
            return _get_int(cfg, key, where, minimum=0)
    return default


def _dense_layer_count(cfg: Mapping[str, Any], num_layers: int, where: str) -> int:
    """Layers whose MLP is dense in an MoE model (HF Qwen3-MoE and DeepSeek-V3 rules)."""
    first_dense = _get_int(cfg, "first_k_dense_replace", where, 0, minimum=0)
    freq = _first_int(cfg, ("moe_layer_freq", "decoder_sparse_step"), where, 1) or 1
    mlp_only = cfg.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list) or not all(isinstance(i, int) for i in mlp_only):
        raise CatalogError(
            where,
            f"field 'mlp_only_layers' = {mlp_only!r}: must be a list of layer indices",
            "fix the value in the config.json",
        )
    if "decoder_sparse_step" in cfg:  # Qwen-MoE: layer i is sparse iff (i + 1) % step == 0
        sparse = [i not in mlp_only and (i + 1) % freq == 0 for i in range(num_layers)]
    else:  # DeepSeek: sparse iff i >= first_k_dense_replace and i % moe_layer_freq == 0
        sparse = [i >= first_dense and i % freq == 0 for i in range(num_layers)]
    return sparse.count(False)


def model_from_config(cfg: Mapping[str, Any], name: str, where: str) -> ModelSpec:
    """Build a ModelSpec from a parsed config.json; ``where`` names the file in errors."""
    if not isinstance(cfg, Mapping):
        raise CatalogError(
            where, "config.json must hold a JSON object", "pass a Hugging Face config.json"
        )
    layers = _get_int(cfg, "num_hidden_layers", where)
    hidden = _get_int(cfg, "hidden_size", where)
    heads = _get_int(cfg, "num_attention_heads", where)
    tie = cfg.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise CatalogError(
            where,
            f"field 'tie_word_embeddings' = {tie!r}: must be true or false",
            "fix the value in the config.json",
        )
    fields: dict[str, Any] = dict(
        name=name,
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=_get_int(cfg, "num_key_value_heads", where, heads),
        intermediate_size=_get_int(cfg, "intermediate_size", where),
        vocab_size=_get_int(cfg, "vocab_size", where),
        max_position_embeddings=_get_int(cfg, "max_position_embeddings", where),
        tie_word_embeddings=tie,
    )
    if cfg.get("kv_lora_rank") is not None:
        mla = {
            k: _get_int(cfg, k, where)
            for k in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
        }
        mla["q_lora_rank"] = _get_int(cfg, "q_lora_rank", where, 0, minimum=0)
        fields.update(mla, head_dim=mla["qk_nope_head_dim"] + mla["qk_rope_head_dim"])
    elif cfg.get("head_dim") is not None:
        fields["head_dim"] = _get_int(cfg, "head_dim", where)
    elif hidden % heads:
        raise CatalogError(
            where,
            f"hidden_size = {hidden} is not a multiple of num_attention_heads = {heads}",
            "add a 'head_dim' field",
        )
    else:
        fields["head_dim"] = hidden // heads
    experts = _first_int(cfg, ("num_experts", "num_local_experts", "n_routed_experts"), where, 0)
    if experts:
        moe_inter = _get_int(cfg, "moe_intermediate_size", where, fields["intermediate_size"])
        shared = _get_int(cfg, "n_shared_experts", where, 0, minimum=0) * moe_inter
        fields.update(
            num_experts=experts,
            moe_intermediate_size=moe_inter,
            num_experts_per_tok=_first_int(
                cfg, ("num_experts_per_tok", "experts_per_token"), where, 0
            ),
            shared_expert_intermediate_size=_get_int(
                cfg, "shared_expert_intermediate_size", where, shared, minimum=0
            ),
            num_dense_layers=_dense_layer_count(cfg, layers, where),
        )
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and "sliding_attention" in layer_types:
        fields.update(
            num_sliding_layers=layer_types.count("sliding_attention"),
            sliding_window=_get_int(cfg, "sliding_window", where),
        )
    try:
        return ModelSpec(**fields)
    except CatalogError as e:  # name the file, not the model
        raise CatalogError(where, e.message, e.fix) from None


# Name tokens that mark a variant with the base model's shape.
_VARIANT_TOKENS = frozenset({"instruct", "chat", "base", "it", "hf", "fp8", "dynamic", "thinking"})


def _model_key(name: str) -> str:
    """Reduce a model id to the shape it names.

    Case, organisation, a leading "Meta-", and suffixes that do not change the shape
    (Instruct/Chat/Base, FP8, dated revisions such as -2507 or -0324) are dropped, so
    "nvidia/Llama-3.1-8B-Instruct-FP8", "Llama-3.1-8B" and "meta-llama/Meta-Llama-3.1-8B"
    all give "llama-3.1-8b".
    """
    tokens = name.strip().rsplit("/", 1)[-1].lower().split("-")
    tokens = [t for t in tokens if t and t not in _VARIANT_TOKENS and not re.fullmatch(r"\d{4}", t)]
    if tokens[:1] == ["meta"]:
        tokens = tokens[1:]
    return "-".join(tokens)


def bundled_models() -> dict[str, Path]:
    """Bundled Hugging Face repo id → its config.json."""
    return {
        p.name.removesuffix("_config.json").replace("--", "/"): p
        for p in sorted(MODELS_DIR.glob("*_config.json"))
    }


def resolve_model_name(name: str) -> str | None:
    """The bundled repo id whose shape ``name`` (an id, alias or variant) names, or None."""
    key = _model_key(name)
    matches = [model_id for model_id in bundled_models() if _model_key(model_id) == key]
    return matches[0] if len(matches) == 1 else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CatalogError(
            f"{path}:{e.lineno}",
            f"not valid JSON ({e.msg})",
            "fix the file or download the model's config.json again",
        ) from None
    except OSError as e:
        raise CatalogError(str(path), f"cannot read ({e.strerror})", "check the path") from None


def load_model(name_or_path: str | Path) -> ModelSpec:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise CatalogError(
                str(path),
                "no config.json in this folder",
                "point at the folder of a Hugging Face model or its config.json",
            )
    if path.is_file():
        cfg = _read_json(path)
        name = cfg.get("_name_or_path") if isinstance(cfg, dict) else None
        if not isinstance(name, str) or not name:
            name = path.parent.name if path.name == "config.json" else path.stem
        return model_from_config(cfg, name, str(path))
    text = str(name_or_path)
    model_id = None if text.endswith(".json") else resolve_model_name(text)
    if model_id is None:
        raise CatalogError(
            f"model {text!r}",
            "not a bundled model and no such file",
            f"use one of {', '.join(bundled_models())}, or the path of a config.json",
        )
    path = bundled_models()[model_id]
    return model_from_config(_read_json(path), model_id, str(path))


# -- GPUs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuSpec:
    """Dense (no-sparsity) tensor-core peaks; bandwidths in bytes/s, one direction."""

    name: str
    bf16_flops_per_s: float
    fp8_flops_per_s: float  # GPUs without FP8 tensor cores repeat the bf16 figure
    hbm_bytes_per_s: float
    hbm_capacity_bytes: int
    nvlink_bytes_per_s: float | None  # per GPU, one direction; None: no NVLink
    pcie_bytes_per_s: float
    notes: str = ""
    source: str = ""

    @property
    def tp_link_bytes_per_s(self) -> float:
        """The link a TP all-reduce runs over: NVLink where present, else PCIe."""
        return self.nvlink_bytes_per_s or self.pcie_bytes_per_s

    def flops_per_s(self, dtype: str) -> float:
        dtype_bytes(dtype)
        return self.fp8_flops_per_s if dtype == "fp8" else self.bf16_flops_per_s


_GPU_NUMBERS = (
    "bf16_flops_per_s",
    "fp8_flops_per_s",
    "hbm_bytes_per_s",
    "hbm_capacity_bytes",
    "nvlink_bytes_per_s",
    "pcie_bytes_per_s",
)
_GPU_TEXT = ("notes", "source")


def _positive_number(value: Any, where: str, field: str) -> float:
    # PyYAML (YAML 1.1) reads 3.35e12 without a '+' in the exponent as a string; accept it.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise CatalogError(
            where,
            f"field '{field}' = {value!r}: must be a positive number",
            "give it in base units (FLOP/s, bytes/s, bytes)",
        )
    return float(value)


def gpu_from_dict(data: Any, name: str, where: str) -> GpuSpec:
    if not isinstance(data, Mapping):
        raise CatalogError(
            where, "a GPU spec must be a mapping of fields", f"give {', '.join(_GPU_NUMBERS)}"
        )
    unknown = sorted(set(data) - set(_GPU_NUMBERS) - set(_GPU_TEXT) - {"name", "aliases"})
    if unknown:
        raise CatalogError(
            where,
            f"unknown field(s) {', '.join(map(str, unknown))}",
            f"valid fields: name, aliases, {', '.join(_GPU_NUMBERS + _GPU_TEXT)}",
        )
    values: dict[str, Any] = {}
    for field in _GPU_NUMBERS:
        if field not in data:
            raise CatalogError(
                where, f"missing field '{field}'", "null is allowed for nvlink_bytes_per_s only"
            )
        if field == "nvlink_bytes_per_s" and not data[field]:
            values[field] = None
        else:
            values[field] = _positive_number(data[field], where, field)
    values["hbm_capacity_bytes"] = int(values["hbm_capacity_bytes"])
    for field in _GPU_TEXT:
        text = data.get(field, "")
        if not isinstance(text, str):
            raise CatalogError(where, f"field '{field}' must be text", "quote it")
        values[field] = text.strip()
    return GpuSpec(name=str(data.get("name", name)), **values)


def _gpu_key(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise CatalogError(where, f"not valid YAML ({e})", "fix the file") from None
    except OSError as e:
        raise CatalogError(str(path), f"cannot read ({e.strerror})", "check the path") from None


def bundled_gpus() -> dict[str, Any]:
    data = _read_yaml(GPUS_FILE)
    return dict(data["gpus"])


def load_gpu(name_or_path: str | Path) -> GpuSpec:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return gpu_from_dict(_read_yaml(path), path.stem, str(path))
    text = str(name_or_path)
    gpus = bundled_gpus()
    key = _gpu_key(text)
    for gpu_name, entry in gpus.items():
        names = [gpu_name, *entry.get("aliases", [])]
        if key in {_gpu_key(n) for n in names}:
            return gpu_from_dict(entry, gpu_name, f"{GPUS_FILE}: gpus.{gpu_name}")
    raise CatalogError(
        f"gpu {text!r}",
        "not a bundled GPU and no such file",
        f"use one of {', '.join(gpus)}, or the path of a GPU YAML file",
    )
