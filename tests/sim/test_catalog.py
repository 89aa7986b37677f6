"""Model and GPU catalog: shapes, parameter counts, name resolution and error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sim.catalog import (
    GpuSpec,
    ModelSpec,
    bundled_gpus,
    bundled_models,
    load_gpu,
    load_model,
    resolve_model_name,
)
from sim.errors import CatalogError, ConfigError

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


def write_config(folder: Path, **overrides: object) -> Path:
    cfg = {**TINY_LLAMA, **overrides}
    cfg = {k: v for k, v in cfg.items() if v is not ...}  # ... deletes a field
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(cfg))
    return path


# -- shapes and counts, by hand from the config ----------------------------------------------


def test_llama_8b_parameter_count_exact() -> None:
    m = load_model("meta-llama/Meta-Llama-3.1-8B")
    h, layers, inter, vocab = 4096, 32, 14336, 128256
    qkv = h * (32 + 2 * 8) * 128
    o = 32 * 128 * h
    mlp = 3 * h * inter
    norms = layers * 2 * h + h
    expected = layers * (qkv + o + mlp) + 2 * vocab * h + norms
    assert expected == 8_030_261_248
    assert m.num_params == expected
    assert m.num_active_params == expected
    assert m.weight_bytes("bf16") == 2 * expected


@pytest.mark.parametrize(
    ("name", "total"),
    [("Llama-3.1-8B", 8.03e9), ("Llama-3.1-70B", 70.6e9), ("Qwen3-32B", 32.8e9)],
)
def test_dense_parameter_counts(name: str, total: float) -> None:
    assert load_model(name).num_params == pytest.approx(total, rel=0.01)


def test_moe_parameter_counts() -> None:
    qwen = load_model("Qwen3-30B-A3B")
    assert qwen.num_params == pytest.approx(30.5e9, rel=0.01)
    # Qwen's "3.3B activated" counts the embedding; ours gives 3.35e9.
    assert qwen.num_active_params == pytest.approx(3.3e9, rel=0.02)
    mixtral = load_model("Mixtral-8x7B-v0.1")
    assert mixtral.num_params == pytest.approx(46.7e9, rel=0.01)
    assert mixtral.num_active_params == pytest.approx(12.9e9, rel=0.01)
    deepseek = load_model("DeepSeek-V3")
    assert deepseek.num_params == pytest.approx(671e9, rel=0.01)
    assert deepseek.num_active_params == pytest.approx(37e9, rel=0.02)
    gpt_oss = load_model("gpt-oss-120b")
    assert gpt_oss.num_params == pytest.approx(116.8e9, rel=0.01)


def test_kv_bytes_per_token() -> None:
    llama = load_model("Llama-3.1-8B")
    assert llama.kv_bytes_per_token("bf16") == 2 * 32 * 8 * 128 * 2 == 131_072
    assert llama.kv_bytes_per_token("fp8") == 65_536
    assert llama.kv_bytes_per_token("bf16", tp=2) == 65_536
    # tp 16 > 8 KV heads: each GPU keeps one replicated KV head.
    assert llama.kv_bytes_per_token("bf16", tp=16) == 2 * 32 * 1 * 128 * 2
    # MLA caches latent (512) + rope key (64) per layer, replicated on every TP rank.
    deepseek = load_model("DeepSeek-V3")
    assert deepseek.kv_bytes_per_token("bf16") == 61 * (512 + 64) * 2
    assert deepseek.kv_bytes_per_token("bf16", tp=8) == 61 * (512 + 64) * 2


def test_fp8_weight_bytes_keep_embedding_and_lm_head_16_bit() -> None:
    m = load_model("Llama-3.1-8B")
    vocab_h = 128256 * 4096
    norms = 32 * 2 * 4096 + 4096
    linear = m.num_params - 2 * vocab_h - norms
    assert m.weight_bytes("fp8") == linear + 2 * (2 * vocab_h + norms)


def test_weight_bytes_per_gpu_split_by_tp() -> None:
    m = load_model("Llama-3.1-70B")
    assert m.weight_bytes("bf16", tp=8) == pytest.approx(m.weight_bytes("bf16", tp=4) / 2, rel=1e-3)
    shapes = {s.kind: s for s in m.linear_shapes(tp=8)}
    assert (shapes["qkv"].in_features, shapes["qkv"].out_features) == (8192, (8 + 2) * 128)
    assert (shapes["down"].in_features, shapes["down"].out_features) == (28672 // 8, 8192)


def test_family_fields() -> None:
    deepseek = load_model("deepseek-ai/DeepSeek-V3")
    assert deepseek.is_mla and deepseek.is_moe
    assert (deepseek.num_experts, deepseek.num_experts_per_tok) == (256, 8)
    assert deepseek.num_dense_layers == 3 and deepseek.num_moe_layers == 58
    assert deepseek.shared_expert_intermediate_size == 2048
    assert (deepseek.kv_lora_rank, deepseek.q_lora_rank) == (512, 1536)
    assert deepseek.head_dim == 128 + 64
    qwen = load_model("Qwen/Qwen3-30B-A3B")
    assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.moe_intermediate_size) == (128, 8, 768)
    assert qwen.num_dense_layers == 0 and qwen.head_dim == 128
    gpt_oss = load_model("openai/gpt-oss-20b")
    assert (gpt_oss.num_experts, gpt_oss.num_experts_per_tok) == (32, 4)
    assert gpt_oss.moe_intermediate_size == 2880 and gpt_oss.head_dim == 64
    assert (gpt_oss.num_sliding_layers, gpt_oss.sliding_window) == (12, 128)
    mixtral = load_model("mistralai/Mixtral-8x7B-v0.1")
    assert (mixtral.num_experts, mixtral.num_experts_per_tok) == (8, 2)
    tied = load_model("Qwen3-0.6B")
    assert tied.tie_word_embeddings
    assert tied.num_params == pytest.approx(0.6e9, rel=0.01)


def test_tp_that_does_not_split_heads_is_refused() -> None:
    m = load_model("Llama-3.1-8B")
    with pytest.raises(ConfigError, match="tp = 3"):
        m.linear_shapes(tp=3)
    with pytest.raises(ConfigError):
        m.kv_bytes_per_token("bf16", tp=0)


# -- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alias",
    [
        "meta-llama/Meta-Llama-3.1-8B",
        "meta-llama/Llama-3.1-8B",
        "Llama-3.1-8B",
        "llama-3.1-8b",
        "meta-llama/Llama-3.1-8B-Instruct",
        "nvidia/Llama-3.1-8B-Instruct-FP8",
    ],
)
def test_aliases_resolve_to_the_base_shape(alias: str) -> None:
    assert load_model(alias).name == "meta-llama/Meta-Llama-3.1-8B"


def test_variant_resolution() -> None:
    assert resolve_model_name("Qwen/Qwen3-30B-A3B-Instruct-2507") == "Qwen/Qwen3-30B-A3B"
    assert resolve_model_name("deepseek-ai/DeepSeek-V3-0324") == "deepseek-ai/DeepSeek-V3"
    assert resolve_model_name("mistralai/Mixtral-8x7B-Instruct-v0.1") == (
        "mistralai/Mixtral-8x7B-v0.1"
    )
    assert resolve_model_name("Llama-3.1-13B") is None


def test_every_bundled_model_resolves_to_itself() -> None:
    names = bundled_models()
    assert len(names) == 13  # 12 public models + the verify test model
    for name in names:
        assert resolve_model_name(name) == name
        assert load_model(name).name == name


def test_unknown_model_lists_bundled_names() -> None:
    with pytest.raises(CatalogError) as e:
        load_model("Llama-9-1T")
    text = str(e.value)
    assert "Llama-9-1T" in text
    for name in bundled_models():
        assert name in text


def test_missing_json_path_is_a_catalog_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="no such file"):
        load_model(str(tmp_path / "nope.json"))
    with pytest.raises(CatalogError, match=r"no config\.json"):
        load_model(tmp_path)


# -- user configs ---------------------------------------------------------------------------


def test_tiny_llama_from_file_and_folder(tmp_path: Path) -> None:
    path = write_config(tmp_path / "tiny-llama")
    for arg in (path, tmp_path / "tiny-llama", str(path)):
        m = load_model(arg)
        assert m.name == "tiny-llama"
        assert (m.num_layers, m.hidden_size, m.head_dim, m.num_kv_heads) == (4, 256, 64, 2)
        assert not m.is_moe and not m.is_mla
    per_layer = 256 * (4 + 2 * 2) * 64 + 256 * 256 + 3 * 256 * 512 + 2 * 256
    assert m.num_params == 4 * per_layer + 2 * 1000 * 256 + 256
    assert m.kv_bytes_per_token("bf16") == 2 * 4 * 2 * 64 * 2


def test_missing_field_names_file_and_field(tmp_path: Path) -> None:
    path = write_config(tmp_path, hidden_size=...)
    with pytest.raises(CatalogError) as e:
        load_model(path)
    assert str(path) in str(e.value) and "'hidden_size'" in str(e.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_hidden_layers", "4"),
        ("vocab_size", 0),
        ("num_attention_heads", True),
        ("tie_word_embeddings", "yes"),
        ("intermediate_size", 5.5),
    ],
)
def test_wrong_type_names_file_and_field(tmp_path: Path, field: str, value: object) -> None:
    path = write_config(tmp_path, **{field: value})
    with pytest.raises(CatalogError) as e:
        load_model(path)
    assert e.value.where == str(path)
    assert f"'{field}'" in e.value.message


def test_inconsistent_config_names_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, num_key_value_heads=3)
    with pytest.raises(CatalogError) as e:
        load_model(path)
    assert e.value.where == str(path) and "num_kv_heads" in e.value.message


def test_invalid_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{\n  "hidden_size": 256,\n  oops\n}')
    with pytest.raises(CatalogError) as e:
        load_model(path)
    assert e.value.where == f"{path}:3"


def test_model_spec_checks_its_own_fields() -> None:
    with pytest.raises(CatalogError, match="num_experts_per_tok"):
        ModelSpec(
            "bad",
            2,
            64,
            4,
            4,
            16,
            128,
            100,
            512,
            num_experts=8,
            num_experts_per_tok=9,
            moe_intermediate_size=32,
        )


# -- GPUs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["H100-SXM", "H100", "h100_sxm", "h100 sxm", "H100-SXM5"])
def test_gpu_aliases(alias: str) -> None:
    gpu = load_gpu(alias)
    assert gpu.name == "H100-SXM"
    assert gpu.hbm_bytes_per_s == 3.35e12
    assert gpu.bf16_flops_per_s == 989e12  # dense, not the 1,979 sparsity figure
    assert gpu.hbm_capacity_bytes == 80 * 2**30


def test_bundled_gpus_are_complete_and_cited() -> None:
    names = set(bundled_gpus())
    assert {"H100-SXM", "H200-SXM", "A100-SXM-80GB", "B200", "L40S"} <= names
    for name in names:
        gpu = load_gpu(name)
        assert gpu.source, name
        assert gpu.fp8_flops_per_s >= gpu.bf16_flops_per_s
        assert gpu.tp_link_bytes_per_s > 0


def test_l40s_has_no_nvlink_and_uses_pcie() -> None:
    gpu = load_gpu("l40s")
    assert gpu.nvlink_bytes_per_s is None
    assert gpu.tp_link_bytes_per_s == gpu.pcie_bytes_per_s == 32e9


def write_gpu_yaml(path: Path, **overrides: object) -> Path:
    fields = {
        "name": "MyGPU",
        "bf16_flops_per_s": "1.0e+15",
        "fp8_flops_per_s": 2e15,
        "hbm_bytes_per_s": "4e12",  # YAML 1.1 reads 4e12 as text; accepted
        "hbm_capacity_bytes": 96 * 2**30,
        "nvlink_bytes_per_s": 450e9,
        "pcie_bytes_per_s": 64e9,
        "source": "made up for a test",
    }
    fields.update(overrides)
    lines = [f"{k}: {v}" for k, v in fields.items() if v is not ...]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_user_gpu_yaml_loads(tmp_path: Path) -> None:
    gpu = load_gpu(write_gpu_yaml(tmp_path / "my_gpu.yaml"))
    assert gpu == GpuSpec(
        name="MyGPU",
        bf16_flops_per_s=1e15,
        fp8_flops_per_s=2e15,
        hbm_bytes_per_s=4e12,
        hbm_capacity_bytes=96 * 2**30,
        nvlink_bytes_per_s=450e9,
        pcie_bytes_per_s=64e9,
        source="made up for a test",
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hbm_bytes_per_s", ..., "missing field 'hbm_bytes_per_s'"),
        ("pcie_bytes_per_s", "fast", "'pcie_bytes_per_s'"),
        ("bf16_flops_per_s", -1, "'bf16_flops_per_s'"),
        ("tflops", 1, "unknown field(s) tflops"),
        ("efficiency_ceiling", 0.5, "'efficiency_ceiling' = 0.5: must be in [1, 16]"),
        ("efficiency_ceiling", "high", "'efficiency_ceiling'"),
    ],
)
def test_bad_user_gpu_yaml(tmp_path: Path, field: str, value: object, message: str) -> None:
    path = write_gpu_yaml(tmp_path / "gpu.yaml", **{field: value})
    with pytest.raises(CatalogError) as e:
        load_gpu(path)
    assert e.value.where == str(path)
    assert message in e.value.message


def test_efficiency_ceiling_is_one_unless_the_rates_are_nominal(tmp_path: Path) -> None:
    assert load_gpu(write_gpu_yaml(tmp_path / "a.yaml")).efficiency_ceiling == 1.0
    gpu = load_gpu(write_gpu_yaml(tmp_path / "b.yaml", efficiency_ceiling=4))
    assert gpu.efficiency_ceiling == 4.0
    # of the bundled entries only the CPU's rates are one host's, not ceilings
    nominal = {load_gpu(n).name for n in bundled_gpus() if load_gpu(n).efficiency_ceiling > 1}
    assert nominal == {"CPU-1core-AVX512"}


def test_unknown_gpu_lists_bundled_names() -> None:
    with pytest.raises(CatalogError) as e:
        load_gpu("TPU-v5")
    for name in ("H100-SXM", "H200-SXM", "A100-SXM-80GB", "B200", "L40S"):
        assert name in str(e.value)


def test_the_bundled_gpu_catalog_is_parsed_once_and_handed_out_as_copies() -> None:
    first = bundled_gpus()
    name = next(iter(first))
    first[name]["memory_gb"] = -1  # a caller changing its copy
    first.pop(name)
    again = bundled_gpus()
    assert name in again and again[name].get("memory_gb") != -1
