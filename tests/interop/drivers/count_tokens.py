"""Count prompt tokens the way fschat 0.2.36's model_worker answers ``/count_token``:
``len(tokenizer(prompt).input_ids)`` with the model's own tokenizer. Runs under the FastChat venv.

$FC_VENV/bin/python tests/interop/drivers/count_tokens.py < {"model": path, "prompts": [str]}
    stdout: {"counts": [int, ...]}
"""

from __future__ import annotations

import json
import sys

from transformers import AutoTokenizer


def main() -> None:
    job = json.load(sys.stdin)
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    counts = [len(tokenizer(prompt).input_ids) for prompt in job["prompts"]]
    json.dump({"counts": counts}, sys.stdout)


if __name__ == "__main__":
    main()
