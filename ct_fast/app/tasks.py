"""The subject-verb agreement world of the demo (the paper's first experiment, at small scale).

A procedural English-like language: singular and plural subjects, distractor nouns of either number
between subject and verb, present-tense verbs that agree with the subject, several templates. The
*agreement-neutral* text uses past tense or a modal ("will"), where the verb form does not depend on
number — the "general capability" that circuit-tuning should leave alone. The target task is
subject-verb *disagreement*: after the prefix, the verb form of the other number.

Example::

    world = AgreementWorld(seed=0)
    world.sentence(rng)                  # 'the keys near the cabinet are here .'
    world.task_example(rng)              # prompt 'the dog with the birds', agree 'runs', disagree 'run'
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SUBJECTS = [("dog", "dogs"), ("cat", "cats"), ("teacher", "teachers"), ("farmer", "farmers"), ("pilot", "pilots"),
            ("doctor", "doctors"), ("student", "students"), ("bird", "birds"), ("horse", "horses"),
            ("king", "kings"), ("girl", "girls"), ("boy", "boys"), ("author", "authors"), ("man", "men"),
            ("woman", "women"), ("child", "children")]
OBJECTS = [("key", "keys"), ("cabinet", "cabinets"), ("table", "tables"), ("house", "houses"), ("tree", "trees"),
           ("garden", "gardens"), ("river", "rivers"), ("book", "books"), ("car", "cars"), ("box", "boxes")]
PREPOSITIONS = ["near", "with", "behind", "of", "beside"]
# (singular, plural, past, base, kind): kind decides what may follow the verb
VERBS = [("runs", "run", "ran", "run", "intransitive"), ("sleeps", "sleep", "slept", "sleep", "intransitive"),
         ("walks", "walk", "walked", "walk", "intransitive"), ("eats", "eat", "ate", "eat", "intransitive"),
         ("likes", "like", "liked", "like", "transitive"), ("sees", "see", "saw", "see", "transitive"),
         ("wants", "want", "wanted", "want", "transitive"), ("knows", "know", "knew", "know", "transitive"),
         ("has", "have", "had", "have", "transitive"), ("is", "are", None, "be", "copula")]
ADVERBS = ["quickly", "slowly", "today", "at night", "in the garden", "every day", "near the river", "again"]
ADJECTIVES = ["happy", "tired", "here", "old", "small", "busy"]


@dataclass
class TaskExample:
    """A disagreement probe: ``prompt`` ends right before the verb; ``agree``/``disagree`` verb forms."""

    prompt: str
    agree: str
    disagree: str
    plural: bool


class AgreementWorld:
    """Sentence generators over a fixed lexicon (``vocabulary()`` lists every word)."""

    def __init__(self, distractor_prob: float = 0.7):
        self.distractor_prob = distractor_prob

    @staticmethod
    def vocabulary() -> list[str]:
        words = {".", "the", "that", "will"}
        for pair in SUBJECTS + OBJECTS:
            words.update(pair)
        words.update(PREPOSITIONS)
        for v in VERBS:
            words.update(w for w in v[:4] if w)
        for phrase in ADVERBS + ADJECTIVES:
            words.update(phrase.split())
        return sorted(words)

    def _subject_phrase(self, rng: random.Random) -> tuple[str, bool]:
        """'the dog' / 'the dogs near the key' / 'the men that the boy likes' ..., and whether it is plural."""
        plural = rng.random() < 0.5
        subj = rng.choice(SUBJECTS)[plural]
        phrase = f"the {subj}"
        if rng.random() < self.distractor_prob:
            if rng.random() < 0.75:
                noun = rng.choice(OBJECTS + SUBJECTS)[rng.random() < 0.5]
                phrase += f" {rng.choice(PREPOSITIONS)} the {noun}"
            else:  # a relative clause whose own verb agrees with its own subject
                inner_plural = rng.random() < 0.5
                inner = rng.choice(SUBJECTS)[inner_plural]
                verb = rng.choice([v for v in VERBS if v[4] == "transitive"])
                phrase += f" that the {inner} {verb[1] if inner_plural else verb[0]}"
        return phrase, plural

    @staticmethod
    def _continuation(kind: str, rng: random.Random) -> str:
        if kind == "transitive":
            return f"the {rng.choice(OBJECTS)[rng.random() < 0.5]}"
        if kind == "copula":
            return rng.choice(ADJECTIVES)
        return rng.choice(ADVERBS)

    def sentence(self, rng: random.Random) -> str:
        """A grammatical present-tense sentence (the verb agrees with the subject)."""
        phrase, plural = self._subject_phrase(rng)
        verb = rng.choice(VERBS)
        return f"{phrase} {verb[1] if plural else verb[0]} {self._continuation(verb[4], rng)} ."

    def neutral_sentence(self, rng: random.Random) -> str:
        """An agreement-neutral sentence: past tense or 'will' + base form, same nouns and templates."""
        phrase, _ = self._subject_phrase(rng)
        verb = rng.choice([v for v in VERBS if v[2]])
        form = verb[2] if rng.random() < 0.6 else f"will {verb[3]}"
        return f"{phrase} {form} {self._continuation(verb[4], rng)} ."

    def task_example(self, rng: random.Random) -> TaskExample:
        """A prefix up to the present-tense verb, with the agreeing and the disagreeing verb form."""
        phrase, plural = self._subject_phrase(rng)
        verb = rng.choice(VERBS)
        agree, disagree = (verb[1], verb[0]) if plural else (verb[0], verb[1])
        return TaskExample(phrase, agree, disagree, plural)

    def corpus(self, n: int, seed: int, neutral_fraction: float = 0.3) -> list[str]:
        """``n`` pre-training sentences: agreeing present tense, with ``neutral_fraction`` neutral ones."""
        rng = random.Random(seed)
        return [self.neutral_sentence(rng) if rng.random() < neutral_fraction else self.sentence(rng)
                for _ in range(n)]


def word_tokenizer(words: list[str]):
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` (+ [PAD], [UNK], [BOS]), BOS prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]"]
    vocab = {w: i for i, w in enumerate(specials + list(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[BOS]", padding_side="right")
