"""A plain-HF port of the authors' retrieval-head loop (Wu et al. 2024), the benchmark baseline.

Ported from ``retrieval_head_detection.py`` of nightdessert/Retrieval_Head (``find_needle_idx``,
``decode``, ``retrieval_calculate``, the prefill in ``evaluate_and_log`` and the ROUGE filter),
kept as the authors wrote it: an eager-attention Hugging Face model, ``output_attentions=True``
at every decoding step, and Python loops over layers and heads::

    q_outputs = model(input_ids=input_ids[:, :-1], use_cache=True)   # prefill stops one short
    inp = input_ids[:, -1]
    for step in range(decode_len):                                   # decode()
        outputs = model(input_ids=inp.view(1, 1), past_key_values=past_kv,
                        use_cache=True, output_attentions=True)
        inp = outputs.logits[0, -1].argmax()
        for layer, head:                                             # retrieval_calculate()
            values, idx = outputs.attentions[layer][0][head][-1].topk(1)
            if needle_start <= idx < needle_end and inp == prompt_ids[idx]:
                score[layer][head] += 1 / (needle_end - needle_start)
        if stop(inp): break
    counted = rouge_scorer(["rouge1"], use_stemmer=True).score(real_needle, response)
              ["rouge1"].recall * 100 > 50

Two inputs are given rather than searched, so the comparison uses the same definition on both
sides: the needle span (the authors' ``find_needle_idx(real_needle)`` is :func:`paper_span`
here; on byte-level BPE it finds nothing, see the workbench's ``span = "paper_search"``) and the
stop rule (the authors stop at the Llama-2 newline token ``<0x0A>`` or id 144; the port takes
the workbench's rule: EOS / end of turn, or a newline once the answer has text). Nothing of the
workbench's scoring code is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


def paper_span(tokenizer: Any, prompt_ids: list[int], needle: str) -> tuple[int, int]:
    """The authors' ``find_needle_idx``: first window whose token *set* overlaps the set of
    ``needle``'s tokens (tokenised alone, no special tokens) by more than 0.9; (-1, -1) if none."""
    needle_ids = tokenizer(needle, add_special_tokens=False)["input_ids"]
    span_len = len(needle_ids)
    want = set(needle_ids)
    for i in range(len(prompt_ids)):
        window = set(prompt_ids[i : i + span_len])
        if len(window & want) / len(want) > 0.9:
            return i, i + span_len
    return -1, -1


@dataclass
class AuthorsResult:
    score: list[list[float]]  # [layer][head]
    response: str
    recall: float  # ROUGE-1 recall in [0, 1] (the authors keep it x100)
    steps: int


def authors_sample(
    model: Any,
    tokenizer: Any,
    prompt_ids: torch.Tensor,
    span: tuple[int, int],
    real_needle: str,
    *,
    decode_len: int,
    stop: Callable[[int, list[int]], bool],
) -> AuthorsResult:
    """One sample through the authors' prefill, ``decode`` and ``retrieval_calculate``."""
    from rouge_score import rouge_scorer

    cfg = model.config
    layer_num, head_num = cfg.num_hidden_layers, cfg.num_attention_heads
    needle_start, needle_end = span
    retrieval_score = [[[0.0, ""] for _ in range(head_num)] for _ in range(layer_num)]
    input_ids = prompt_ids[None]
    output: list[int] = []
    with torch.no_grad():
        q_outputs = model(input_ids=input_ids[:, :-1], use_cache=True, return_dict=True)
        past_kv = q_outputs.past_key_values
        inp = input_ids[:, -1]
        for _ in range(decode_len):
            inp = inp.view(1, 1)
            outputs = model(
                input_ids=inp, past_key_values=past_kv, use_cache=True, output_attentions=True
            )
            past_kv = outputs.past_key_values
            inp = outputs.logits[0, -1].argmax()
            step_token = tokenizer.convert_ids_to_tokens(inp.item())
            output.append(inp.item())
            attention_maxtrix = outputs.attentions
            for layer_idx in range(layer_num):
                for head_idx in range(head_num):
                    values, idx = attention_maxtrix[layer_idx][0][head_idx][-1].topk(1)
                    for _v, i in zip(values, idx, strict=True):
                        if needle_start <= i < needle_end and inp.item() == prompt_ids[i].item():
                            retrieval_score[layer_idx][head_idx][0] += 1 / (
                                needle_end - needle_start
                            )
                            retrieval_score[layer_idx][head_idx][1] += step_token
                            break
            if stop(inp.item(), output[:-1]):
                break
    response = tokenizer.decode(output, skip_special_tokens=True).strip()
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    recall = scorer.score(real_needle, response)["rouge1"].recall
    score = [[float(retrieval_score[la][h][0]) for h in range(head_num)] for la in range(layer_num)]
    return AuthorsResult(score, response, recall, len(output))


def eager_hf_model(name: str) -> tuple[Any, Any]:
    """A fresh Hugging Face model of a named workbench model (same weights), eager attention."""
    from workbench.models.known import fingerprint, get_entry
    from workbench.models.loading import _hf_from_gguf, _hf_from_tiny

    entry = get_entry(name)
    if entry.source == "gguf":
        hf, tok, _ = _hf_from_gguf(entry, fingerprint(name))
    else:
        hf, tok = _hf_from_tiny(entry)
    hf.config._attn_implementation = "eager"
    hf.eval()
    return hf, tok
