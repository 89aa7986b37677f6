"""Write the tiny random-weight Llama as a GGUF file for llama-server.

Same shape as the HF model that vLLM serves (make_tiny_hf.py): 4 layers, hidden 512, FFN 1408,
8 heads, 8 KV heads, vocab 32,000, context 4096; F16 matrices, F32 norms (45.6 M parameters,
about 92 MB). Recipe: /work/shared/reference/cpu_engines.md, "Tiny GGUF written with gguf".

SentencePiece-style ("llama") vocab:

    id      0      1     2      3 .. 258        259    260 .. 353         354 .. 31999
         <unk>   <s>   </s>   <0x00>..<0xFF>     ▁     ▁! .. ▁~           ▁w0 .. ▁w31645
         UNKNOWN CONTROL       BYTE              NORMAL (▁ + printable ASCII; filler words)

The byte tokens must exist: the SPM tokenizer throws on a text byte it cannot map. Every prefix
of a filler word is a token too ("▁w", "▁w3", "▁w31"), so " w31" tokenizes to one id.

The output rows of the control and byte tokens are zero and the rest are drawn with a large
std (3/sqrt(hidden)), so greedy decoding never picks them and sampling almost never does: a
random model otherwise emits bytes >= 0x80, and llama-server holds back incomplete UTF-8,
which drops stream chunks.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np

from sim.errors import ServetwinError

VOCAB_SIZE = 32000
HIDDEN_SIZE = 512
INTERMEDIATE_SIZE = 1408
NUM_LAYERS = 4
NUM_HEADS = 8
NUM_KV_HEADS = 8
CONTEXT_LENGTH = 4096
RMS_NORM_EPS = 1e-6
ROPE_FREQ_BASE = 10000.0
INIT_STD = 0.02  # HF LlamaConfig.initializer_range

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
FIRST_BYTE_ID = 3
FIRST_TEXT_ID = FIRST_BYTE_ID + 256  # 259


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise ServetwinError(
            "verify.testbed: writing the tiny GGUF needs the 'gguf' package, which is not "
            "installed. Fix: pip install 'servetwin[testbed]' (or: pip install 'gguf>=0.10')"
        ) from exc
    return gguf


def spm_vocab(vocab_size: int = VOCAB_SIZE) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types (gguf.TokenType values) of the tiny SPM vocab."""
    gguf = _import_gguf()
    kind = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"]
    types = [kind.UNKNOWN, kind.CONTROL, kind.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [kind.BYTE] * 256
    # "▁" is SPM's space, so "▁" + " " is just "▁".
    tokens += ["▁"] + ["▁" + chr(c) for c in range(0x21, 0x7F)]
    num_fillers = vocab_size - len(tokens)
    if num_fillers < 0:
        raise ServetwinError(f"spm_vocab: vocab_size = {vocab_size}: must be >= {len(tokens)}")
    tokens += [f"▁w{i}" for i in range(num_fillers)]
    types += [kind.NORMAL] * (vocab_size - len(types))
    # SPM merges take the highest score first; lower ids win ties of equal-length paths.
    scores = [0.0] * FIRST_TEXT_ID + [-float(i) for i in range(FIRST_TEXT_ID, vocab_size)]
    return tokens, scores, [int(t) for t in types]


def write_tiny_gguf(
    path: str | Path,
    *,
    seed: int = 0,
    num_layers: int = NUM_LAYERS,
    eos_heavy: bool = False,
) -> Path:
    """Write the model to `path`. Same seed, same bytes.

    `eos_heavy` makes "</s>" the argmax everywhere (embedding column 0 = 50, the "</s>" output
    row = 10 at index 0), for testing `ignore_eos`.
    """
    gguf = _import_gguf()
    path = Path(path)
    rng = np.random.default_rng(seed)
    h, f, v = HIDDEN_SIZE, INTERMEDIATE_SIZE, VOCAB_SIZE
    head_dim = h // NUM_HEADS

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float16)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(h)
    writer.add_block_count(num_layers)
    writer.add_feed_forward_length(f)
    writer.add_head_count(NUM_HEADS)
    writer.add_head_count_kv(NUM_KV_HEADS)
    writer.add_layer_norm_rms_eps(RMS_NORM_EPS)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(ROPE_FREQ_BASE)
    writer.add_vocab_size(v)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    tokens, scores, types = spm_vocab(v)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(False)  # token-id prompts arrive exactly as sent
    writer.add_add_eos_token(False)

    # Arrays in PyTorch (out, in) layout, as convert_hf_to_gguf.py passes them.
    token_embd = normal((v, h), INIT_STD)
    if eos_heavy:
        token_embd[:, 0] = 50.0
    writer.add_tensor("token_embd.weight", token_embd)
    kv_dim = NUM_KV_HEADS * head_dim
    for i in range(num_layers):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", ones(h))
        writer.add_tensor(f"{blk}.attn_q.weight", normal((h, h), INIT_STD))
        writer.add_tensor(f"{blk}.attn_k.weight", normal((kv_dim, h), INIT_STD))
        writer.add_tensor(f"{blk}.attn_v.weight", normal((kv_dim, h), INIT_STD))
        writer.add_tensor(f"{blk}.attn_output.weight", normal((h, h), INIT_STD))
        writer.add_tensor(f"{blk}.ffn_norm.weight", ones(h))
        writer.add_tensor(f"{blk}.ffn_gate.weight", normal((f, h), INIT_STD))
        writer.add_tensor(f"{blk}.ffn_up.weight", normal((f, h), INIT_STD))
        writer.add_tensor(f"{blk}.ffn_down.weight", normal((h, f), INIT_STD))
    writer.add_tensor("output_norm.weight", ones(h))
    output = normal((v, h), 3.0 / math.sqrt(h))
    output[:FIRST_TEXT_ID] = 0.0  # control and byte tokens never win
    if eos_heavy:
        output[EOS_ID, 0] = 10.0
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the tiny random-weight Llama GGUF.")
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=NUM_LAYERS)
    parser.add_argument("--eos-heavy", action="store_true", help="make </s> the argmax")
    args = parser.parse_args(argv)
    write_tiny_gguf(args.out, seed=args.seed, num_layers=args.layers, eos_heavy=args.eos_heavy)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
