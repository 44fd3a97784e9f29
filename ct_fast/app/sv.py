"""Subject-verb agreement on real English: the paper's first experiment on a pretrained model.

Sentences are built from templates over a small lexicon shipped with the package (``sv_lexicon.json``): a
singular or plural subject, optionally followed by a prepositional phrase whose noun is an *attractor*
(mostly of the other number) or by a relative clause, up to the main verb::

    The keys to the cabinet            -> agree ' are', disagree ' is'
    The author of the books            -> agree ' is',  disagree ' are'
    The doctors that the child likes   -> agree ' seem', ...
    The farmer that helps the students -> ...

Nouns and verbs come in two disjoint vocabularies: ``train`` (tuning sentences) and ``heldout`` (evaluation
sentences), so held-out accuracy measures whether the behaviour carries over to words never tuned on.

General capability is measured on real English prose that is never trained on: paragraphs of the Python
documentation shipped with the standard library (``pydoc_data``).

Example::

    task = SVTask("train")
    ex = task.example(random.Random(0))     # SVExample(prompt='The ...', agree=' is', disagree=' are', ...)
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass

from ..errors import CTFastError
from .data import Example

LEXICON_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sv_lexicon.json")
TEMPLATES = {"simple": 0.2, "pp": 0.45, "object_rc": 0.2, "subject_rc": 0.15}  # template -> probability


@dataclass
class SVExample:
    """A prefix that ends right before the main verb, and the verb's agreeing and disagreeing forms (each with
    its leading space)."""

    prompt: str
    agree: str
    disagree: str
    plural: bool
    template: str


def lexicon() -> dict:
    with open(LEXICON_FILE, encoding="utf-8") as f:
        return json.load(f)


class SVTask:
    """Sentence prefixes of one vocabulary split (``"train"`` or ``"heldout"``)."""

    def __init__(self, split: str = "train", attractor_mismatch: float = 0.7, tokenizer=None):
        lex = lexicon()
        if split not in ("train", "heldout"):
            raise CTFastError(f"sv split {split!r} is not 'train' or 'heldout'")
        words = lex[split]
        self.split, self.attractor_mismatch = split, attractor_mismatch
        self.nouns = [tuple(n) for n in words["nouns"]]
        self.animate = [n for n in self.nouns if n[2]]
        self.verbs = [tuple(v) for v in words["verbs"]]
        self.transitive = [tuple(v) for v in words["transitive"]]
        self.prepositions = lex["prepositions"]
        if tokenizer is not None:  # keep verbs whose two forms start with different tokens
            def distinct(pair):
                a, b = (tokenizer(" " + w, add_special_tokens=False).input_ids for w in pair)
                return bool(a) and bool(b) and a[0] != b[0]
            self.verbs = [v for v in self.verbs if distinct(v)]
            self.transitive = [v for v in self.transitive if distinct(v)]
            if not self.verbs:
                raise CTFastError("no verb of the sv lexicon has forms that this tokenizer tells apart")

    def _noun(self, rng, plural: bool, pool=None, avoid=None) -> str:
        choices = [n for n in (pool or self.nouns) if n[0] != avoid]
        return rng.choice(choices)[int(plural)]

    def example(self, rng: random.Random) -> SVExample:
        plural = rng.random() < 0.5
        template = rng.choices(list(TEMPLATES), weights=list(TEMPLATES.values()))[0]
        pool = self.animate if template == "subject_rc" else self.nouns
        lemma = rng.choice(pool)
        subject = lemma[int(plural)]
        other = (not plural) if rng.random() < self.attractor_mismatch else plural
        if template == "simple":
            prompt = f"The {subject}"
        elif template == "pp":
            prompt = f"The {subject} {rng.choice(self.prepositions)} the {self._noun(rng, other, avoid=lemma[0])}"
        elif template == "object_rc":  # the clause's own verb agrees with the clause's subject
            verb = rng.choice(self.transitive)
            prompt = f"The {subject} that the {self._noun(rng, other, self.animate, avoid=lemma[0])} {verb[int(other)]}"
        else:  # subject relative clause: its verb agrees with the main subject
            verb = rng.choice(self.transitive)
            prompt = f"The {subject} that {verb[int(plural)]} the {self._noun(rng, other, avoid=lemma[0])}"
        main = rng.choice(self.verbs)
        agree, disagree = (main[1], main[0]) if plural else (main[0], main[1])
        return SVExample(prompt, " " + agree, " " + disagree, plural, template)

    def examples(self, n: int, seed: int) -> list[SVExample]:
        rng = random.Random(seed)
        return [self.example(rng) for _ in range(n)]


def encode_sv(examples: list[SVExample], tokenizer, target: str = "disagree") -> list[Example]:
    """Contrastive ``Example``s: the prompt, then the ``target`` verb form (``"disagree"`` or ``"agree"``) as the
    only label; ``answer``/``wrong_answer`` are the first tokens of the target and the other form, at
    ``target_pos`` (the last prompt token)."""
    out = []
    for ex in examples:
        prompt = tokenizer(ex.prompt).input_ids
        want, other = (ex.disagree, ex.agree) if target == "disagree" else (ex.agree, ex.disagree)
        a = tokenizer(want, add_special_tokens=False).input_ids[0]
        b = tokenizer(other, add_special_tokens=False).input_ids[0]
        out.append(Example(prompt + [a], [-100] * len(prompt) + [a], target_pos=len(prompt) - 1, answer=a,
                           wrong_answer=b))
    return out


def sv_records(examples: list[SVExample], target: str = "disagree") -> list[dict]:
    """The examples as contrastive JSONL records (``ct-fast tune --data``'s format)."""
    return [{"prompt": ex.prompt, "answer": getattr(ex, target),
             "wrong_answer": ex.agree if target == "disagree" else ex.disagree} for ex in examples]


def reference_prose(max_paragraphs: int = 24, min_words: int = 30) -> list[str]:
    """Paragraphs of English prose from the Python documentation in the standard library (``pydoc_data``):
    the general-capability text (never trained on). Code blocks, grammar rules and tables are skipped;
    the selection is deterministic for a given Python version."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise CTFastError("the general-capability text comes from the standard library's pydoc_data, which this "
                          "Python lacks (some distributions package it separately)") from e
    out = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = block.split("\n")
            if any(line.startswith((" ", "\t")) for line in lines):  # code, grammar, indented notes
                continue
            text = " ".join(line.strip() for line in lines)
            words = text.split()
            letters = sum(c.isalpha() or c == " " for c in text) / max(1, len(text))
            if len(words) >= min_words and text.endswith(".") and letters > 0.9 and '"' not in text[:1]:
                out.append(text)
                break  # one paragraph per topic: varied text
        if len(out) >= max_paragraphs:
            break
    return out


__all__ = ["SVExample", "SVTask", "encode_sv", "lexicon", "reference_prose", "sv_records"]
