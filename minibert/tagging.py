"""Tag schemes for token classification, and decoding that only yields valid tag sequences.

A named-entity tagger predicts one tag per word: O (outside), or a prefix and an entity type,
B-PER / I-PER in the BIO scheme, B- I- E- S- (begin, inside, end, single) in BIOES. Taking each
word's most probable tag on its own can give sequences no annotator writes: O I-PER (an entity
started by I-), B-PER I-LOC (an entity that changes type), in BIOES B-PER O (never ended). Such
output then has to be repaired by guessing. Instead, the most probable *valid* sequence is found
exactly, by Viterbi over the per-word log-probabilities with the forbidden transitions at -inf
(as AllenNLP's `allowed_transitions` and CRF decoding do):

    scheme = tag_scheme(labels)                                   # "bio", "bioes" or None
    tags = decode_tags(log_probs, labels, scheme)                 # log_probs: (W, L), one row per word
    tags = decode_tags(logits, labels, scheme, crf=crf_weights)   # with a CRF's learned transitions

`scheme` None (plain tags such as PER / LOC / O, or IOB1 data, whose I- tags start entities) leaves
every sequence valid: decoding is then the per-word argmax.

W = words in the sentence (the first piece of each), L = number of tags.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SCHEMES = ("bio", "bioes")
_PREFIXES = {"bio": ("B", "I"), "bioes": ("B", "I", "E", "S")}


def split_tag(tag: str) -> tuple[str, str | None]:
    """("B", "PER") for "B-PER", ("O", None) for "O"; a tag without a one-letter prefix is (tag, None)."""
    if len(tag) > 2 and tag[1] == "-":
        return tag[0], tag[2:]
    return tag, None


def tag_scheme(labels: Sequence[str]) -> str | None:
    """The scheme a tag set is written in: "bioes" when it has E- or S- tags, "bio" when it has only
    O, B- and I- tags, None for anything else (plain tags, or a mixture)."""
    prefixes = set()
    for tag in labels:
        prefix, entity = split_tag(tag)
        if entity is None and tag != "O":
            return None
        prefixes.add(prefix)
    prefixes.discard("O")
    if not prefixes or not prefixes <= set(_PREFIXES["bioes"]):
        return None
    return "bioes" if prefixes & {"E", "S"} else "bio"


def allowed_transitions(labels: Sequence[str], scheme: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which tags may start a sentence, follow one another, and end a sentence under the scheme:
    start (L,), transitions (L, L) indexed [previous, next], end (L,), all bool.

    BIO:   I-X only after B-X or I-X (so never first).
    BIOES: I-X and E-X only after B-X or I-X; after B-X and I-X only I-X or E-X; a sentence ends
           after O, E- or S-. (O, B- and S- may follow O, E- and S-.)
    None:  everything is allowed.
    """
    n = len(labels)
    if scheme is None:
        return np.ones(n, bool), np.ones((n, n), bool), np.ones(n, bool)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown tag scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    parts = [split_tag(tag) for tag in labels]
    bad = [tag for tag, (prefix, entity) in zip(labels, parts) if tag != "O" and prefix not in _PREFIXES[scheme]]
    if bad:
        raise ValueError(f"tags {bad} are not {scheme.upper()} tags (O, {', '.join(p + '-X' for p in _PREFIXES[scheme])})")

    def continues(prefix: str) -> bool:  # the tag continues an entity begun before it
        return prefix in ("I", "E")

    def open_after(prefix: str) -> bool:  # an entity is still open after this tag
        return prefix in ("B", "I") if scheme == "bioes" else False

    start = np.array([not continues(p) for p, _ in parts])
    end = np.array([not open_after(p) for p, _ in parts])
    transitions = np.zeros((n, n), bool)
    for i, (p_prev, e_prev) in enumerate(parts):
        for j, (p_next, e_next) in enumerate(parts):
            if continues(p_next):  # I-X / E-X: only inside an X entity
                transitions[i, j] = p_prev in ("B", "I") and e_prev == e_next
            elif open_after(p_prev):  # BIOES: an open entity must continue
                transitions[i, j] = False
            else:
                transitions[i, j] = True
    return start, transitions, end


def viterbi(emissions: np.ndarray, transitions: np.ndarray, start: np.ndarray, end: np.ndarray) -> list[int]:
    """The tag sequence y maximising start[y0] + sum_t emissions[t, y_t] + sum_t transitions[y_{t-1}, y_t] + end[y_W-1].

    emissions (W, L), transitions (L, L) indexed [previous, next], start and end (L,): scores, -inf
    where forbidden. Ties go to the lower tag id. An empty sentence decodes to [].
    """
    emissions = np.asarray(emissions, dtype=np.float64)
    if len(emissions) == 0:
        return []
    score = start + emissions[0]  # (L,): best score of a path ending in each tag
    backpointers = []
    for row in emissions[1:]:
        candidates = score[:, None] + transitions  # (L previous, L next)
        backpointers.append(candidates.argmax(axis=0))
        score = candidates.max(axis=0) + row
    path = [int((score + end).argmax())]
    for back in reversed(backpointers):
        path.append(int(back[path[-1]]))
    return path[::-1]


@dataclass(frozen=True)
class CRFWeights:
    """A linear-chain CRF's learned scores (see minibert.crf): transitions (L, L) indexed
    [previous, next], start (L,) and end (L,)."""

    transitions: np.ndarray
    start: np.ndarray
    end: np.ndarray


def decode_tags(scores: np.ndarray, labels: Sequence[str], scheme: str | None, crf: CRFWeights | None = None) -> list[int]:
    """The best valid tag ids of one sentence.

    scores (W, L): one row per word. Without a CRF they are log-probabilities (log-softmax of the
    classifier's logits), so that the best sequence is the most probable one; with a CRF they are its
    emission scores (the logits) and the CRF's transition scores are added. Under `scheme` (bio,
    bioes) forbidden transitions are excluded; with neither, this is the per-word argmax.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scheme is None and crf is None:
        return [int(i) for i in scores.argmax(axis=-1)]
    start_ok, transitions_ok, end_ok = allowed_transitions(labels, scheme)
    forbidden = lambda ok: np.where(ok, 0.0, -np.inf)  # noqa: E731
    start, transitions, end = forbidden(start_ok), forbidden(transitions_ok), forbidden(end_ok)
    if crf is not None:
        start, transitions, end = start + crf.start, transitions + crf.transitions, end + crf.end
    return viterbi(scores, transitions, start, end)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis, in float64."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def detect_scheme(tag_sequences: Sequence[Sequence[str]], labels: Sequence[str]) -> str | None:
    """The scheme the training data is written in: tag_scheme of its labels, unless a sentence breaks
    that scheme's rules. Then the data is IOB1 (CoNLL-2003's original files, where I- starts an
    entity and B- only separates two adjacent ones) or inconsistent, and None is returned: decoding
    must not forbid what the data itself does."""
    scheme = tag_scheme(labels)
    if scheme is None:
        return None
    index = {tag: i for i, tag in enumerate(labels)}
    start, transitions, end = allowed_transitions(labels, scheme)
    for tags in tag_sequences:
        ids = [index[tag] for tag in tags]
        if ids and not (start[ids[0]] and end[ids[-1]] and transitions[ids[:-1], ids[1:]].all()):
            return None
    return scheme
