"""A small, deterministic text-classification dataset for tests and smoke runs (no downloads).

Each class owns a vocabulary of made-up topical words; all classes share a larger set of filler words.
A sentence (5..30 words) mixes its own class's topical words (15-45 % of the words, at least one) with filler
and a few topical words of *other* classes, so the label is learnable from the words but short sentences
can be ambiguous: a tiny model gets well above chance without a trivial 100 %.
"""

from __future__ import annotations

import numpy as np

from fedslip.config import DataConfig
from fedslip.data.text import TextData, make_dataset
from fedslip.errors import UserError

DEFAULT_CLASSES = 4
TOPIC_WORDS = 30  # per class
FILLER_WORDS = 80  # shared
MIN_LEN, MAX_LEN = 5, 30
NOISE = 0.08  # share of words drawn from another class's vocabulary
VOCAB_SEED, TRAIN_SEED, TEST_SEED = 1234, 0, 1

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _vocabulary(n_words: int, rng: np.random.Generator) -> list[str]:
    """`n_words` distinct pronounceable pseudo-words of 2-3 consonant-vowel syllables."""
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n_words:
        word = "".join(rng.choice(list(_CONSONANTS)) + rng.choice(list(_VOWELS))
                       for _ in range(int(rng.integers(2, 4))))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _sentence(label: int, topics: list[list[str]], filler: list[str], rng: np.random.Generator) -> str:
    n_classes = len(topics)
    length = int(rng.integers(MIN_LEN, MAX_LEN + 1))
    p_topic = rng.uniform(0.15, 0.45)
    words = []
    for _ in range(length):
        u = rng.random()
        if u < p_topic:
            words.append(topics[label][rng.integers(len(topics[label]))])
        elif u < p_topic + NOISE and n_classes > 1:
            other = (label + 1 + int(rng.integers(n_classes - 1))) % n_classes
            words.append(topics[other][rng.integers(len(topics[other]))])
        else:
            words.append(filler[rng.integers(len(filler))])
    if not any(w in topics[label] for w in words):
        words[int(rng.integers(length))] = topics[label][rng.integers(len(topics[label]))]
    return " ".join(words)


def make_synthetic(num_classes: int, per_class: int, seed: int) -> tuple[list[str], list[int]]:
    """`per_class` sentences of each class, in a shuffled order; the vocabulary is the same for every seed."""
    words = _vocabulary(num_classes * TOPIC_WORDS + FILLER_WORDS, np.random.default_rng(VOCAB_SEED))
    topics = [words[c * TOPIC_WORDS:(c + 1) * TOPIC_WORDS] for c in range(num_classes)]
    filler = words[num_classes * TOPIC_WORDS:]
    rng = np.random.default_rng(seed)
    labels = [c for c in range(num_classes) for _ in range(per_class)]
    order = rng.permutation(len(labels))
    labels = [labels[i] for i in order]
    return [_sentence(c, topics, filler, rng) for c in labels], labels


def load_synthetic(cfg: DataConfig) -> TextData:
    n = cfg.num_classes or DEFAULT_CLASSES
    if cfg.synthetic_per_class < 1:
        raise UserError(f"data.synthetic_per_class = {cfg.synthetic_per_class}: must be >= 1")
    train_texts, train_labels = make_synthetic(n, cfg.synthetic_per_class, TRAIN_SEED)
    test_texts, test_labels = make_synthetic(n, cfg.synthetic_per_class, TEST_SEED)
    return TextData(make_dataset(train_texts, train_labels), make_dataset(test_texts, test_labels),
                    [f"topic_{c}" for c in range(n)], n,
                    f"synthetic ({n} classes, {cfg.synthetic_per_class} per class in train and in test)")
