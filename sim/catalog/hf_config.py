"""Models from Hugging Face ``config.json`` files: parsing, bundled configs, name resolution.

A model is bundled (``sim/data/models/<org>--<model>_config.json``), named by alias, or given
as a path to a ``config.json`` (or a folder holding one).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CatalogError
from .model import ModelSpec

DATA_DIR = Path(__file__).parents[1] / "data"  # sim/data
MODELS_DIR = DATA_DIR / "models"


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
