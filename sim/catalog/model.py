"""Model shapes: ModelSpec and the weight matrices one GPU of a TP group holds.

Tensor parallelism follows vLLM's sharding (``vllm/model_executor/layers/linear.py``):

    QKV, gate/up, q_b, kv_b, experts  column-parallel   out_features / tp
    O, down                           row-parallel      in_features  / tp
    lm_head, embedding                vocab-parallel    vocab / tp (rounded up)
    MLA q_a / kv_a, router, norms     replicated
    KV heads                          max(1, kv_heads / tp): replicated when tp > kv_heads

Parameter counts leave out biases and per-head q/k norms (< 0.05 % for every bundled model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import CatalogError, ConfigError

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
