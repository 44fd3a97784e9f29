"""Datasets for the command line: JSONL files in three formats, tokenised into padded batches.

- text:        ``{"text": "..."}`` — language-modelling loss on every token;
- completion:  ``{"prompt": "...", "completion": "..."}`` — loss on the completion only;
- contrastive: ``{"prompt": "...", "answer": "...", "wrong_answer": "..."}`` — loss on the answer, and
  the batch carries ``target_pos``/``answer``/``wrong_answer`` for the ``logit_diff``/``logprob_diff``
  metrics (the first token of each answer).

Batches are a pure function of the step (``batch_indices``), so a resumed run sees the same data.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ..errors import CTFastError

FORMATS = {"text": ("text",), "completion": ("prompt", "completion"),
           "contrastive": ("prompt", "answer", "wrong_answer")}


@dataclass
class Example:
    """One tokenised example: ``labels`` is -100 where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    target_pos: int | None = None
    answer: int | None = None
    wrong_answer: int | None = None


def detect_format(record: dict) -> str | None:
    for name in ("contrastive", "completion", "text"):
        if all(k in record for k in FORMATS[name]):
            return name
    return None


def read_jsonl(path: str) -> tuple[list[dict], str]:
    """Records of a JSONL file and their (single) format; errors name the file and line."""
    if not os.path.isfile(path):
        state = "is a directory, not a JSONL file" if os.path.isdir(path) else "does not exist"
        raise CTFastError(f"data file {path!r} {state}")
    records, fmt = [], None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise CTFastError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                  "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CTFastError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise CTFastError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            this = detect_format(rec)
            if this is None:
                raise CTFastError(
                    f"{path}:{lineno}: missing fields — a line needs 'text', or 'prompt' and 'completion', or "
                    f"'prompt', 'answer' and 'wrong_answer' (found {sorted(rec)})")
            bad = [k for k in FORMATS[this] if not isinstance(rec[k], str)]
            if bad:
                raise CTFastError(f"{path}:{lineno}: fields {bad} must be strings")
            if fmt is not None and this != fmt:
                raise CTFastError(f"{path}:{lineno}: a {this!r} line in a {fmt!r} file; use one format per file")
            fmt = this
            records.append(rec)
    if not records:
        raise CTFastError(f"data file {path!r} has no examples")
    return records, fmt


def encode(records: list[dict], fmt: str, tokenizer, max_length: int = 128, where: str = "data") -> list[Example]:
    """Tokenise records of one format (see module docstring)."""
    out = []
    for i, rec in enumerate(records, 1):
        if fmt == "text":
            ids = tokenizer(rec["text"]).input_ids[:max_length]
            if len(ids) < 2:
                raise CTFastError(f"{where} example {i}: text has fewer than 2 tokens")
            out.append(Example(ids, list(ids)))
            continue
        prompt = tokenizer(rec["prompt"]).input_ids
        if fmt == "completion":
            tail = tokenizer(rec["completion"], add_special_tokens=False).input_ids
            extra = {}
        else:
            tail = tokenizer(rec["answer"], add_special_tokens=False).input_ids
            wrong = tokenizer(rec["wrong_answer"], add_special_tokens=False).input_ids
            if not tail or not wrong or tail[0] == wrong[0]:
                raise CTFastError(f"{where} example {i}: 'answer' and 'wrong_answer' must start with different tokens")
            extra = dict(target_pos=len(prompt) - 1, answer=tail[0], wrong_answer=wrong[0])
        if not prompt or not tail:
            raise CTFastError(f"{where} example {i}: empty prompt or completion after tokenisation")
        if len(prompt) + len(tail) > max_length:
            raise CTFastError(f"{where} example {i}: {len(prompt) + len(tail)} tokens exceed --max-length {max_length}")
        out.append(Example(prompt + tail, [-100] * len(prompt) + tail, **extra))
    return out


def load_dataset(path: str, tokenizer, max_length: int = 128) -> tuple[list[Example], str]:
    records, fmt = read_jsonl(path)
    return encode(records, fmt, tokenizer, max_length, where=path), fmt


def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-padded batch: ``input_ids``, ``attention_mask``, ``labels`` (+ contrastive fields)."""
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        mask[b, :n] = 1
        labels[b, :n] = torch.tensor(e.labels)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if examples[0].answer is not None:
        for key in ("target_pos", "answer", "wrong_answer"):
            batch[key] = torch.tensor([getattr(e, key) for e in examples])
    return batch


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Example indices of ``step``: epochs of seeded permutations, consumed in order (pure in step)."""
    out = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        out.extend(perm[offset:offset + batch_size - len(out)])
    return out
