"""Write a tiny random-weight HF Llama plus a local word-level tokenizer, for vLLM on CPU.

A standalone script: run it with the vLLM venv's python (it needs torch, transformers and
tokenizers, which the product venv does not have), so it must not import `verify` or `sim`.

    <vllm venv>/bin/python make_tiny_hf.py OUT_DIR [--seed 0] [--layers 4] [--eos-heavy]

Recipe: /work/shared/reference/cpu_engines.md, "make_tiny_hf". No weights are downloaded.

Vocab (one token per word, so text-only servers give exact counts too):

    id     0      1     2      3 .. 31999
        <unk>   <s>   </s>   ▁w0 .. ▁w31996     (" w5 w17" -> [8, 20])

The lm_head is re-drawn with std 3/sqrt(hidden) so logits are spread out, and its rows for the
special tokens are zero so greedy decoding never picks them.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

VOCAB_SIZE = 32000
HIDDEN_SIZE = 512
INTERMEDIATE_SIZE = 1408
NUM_LAYERS = 4
NUM_HEADS = 8
NUM_KV_HEADS = 8
MAX_POSITION_EMBEDDINGS = 4096
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def build_tokenizer():  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for i in range(VOCAB_SIZE - len(SPECIAL_TOKENS)):
        vocab[f"▁w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def build_model(seed: int, num_layers: int, eos_heavy: bool):  # -> LlamaForCausalLM
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=num_layers,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        lm_head = model.lm_head.weight
        lm_head.normal_(0.0, 3.0 / math.sqrt(HIDDEN_SIZE))
        lm_head[: len(SPECIAL_TOKENS)] = 0.0
        if eos_heavy:  # "</s>" becomes the argmax everywhere, for testing ignore_eos
            model.model.embed_tokens.weight[:, 0] = 50.0
            lm_head[2, 0] = 10.0
    return model.to(torch.bfloat16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a tiny random-weight HF Llama.")
    parser.add_argument("out", type=Path, help="model folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=NUM_LAYERS)
    parser.add_argument("--eos-heavy", action="store_true", help="make </s> the argmax")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save_pretrained(args.out)
    build_model(args.seed, args.layers, args.eos_heavy).save_pretrained(
        args.out, safe_serialization=True
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
