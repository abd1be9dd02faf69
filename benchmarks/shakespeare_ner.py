"""Named-entity data built from the Shakespeare plays minibert ships (minibert.assets), as span JSONL.

No NER corpus installs from a package registry, so this one is made from the plays by rule (distant
supervision), and it is labelled the same way everywhere, so that a model can learn it:

    PER  the characters' names, from the speaker headings written in capitals (**KING CLAUDIUS** gives
         "King Claudius" and "Claudius"; role headings such as "First Clown" are not names), found in
         the dialogue in title case, the longest name first; a one-word name that the plays also
         use as a common word in lower case ("Patience") is left out
    LOC  the places of the scene headings ("SCENE I. Elsinore. A platform before the castle." gives
         "Elsinore"): a heading sentence whose words are all capitalised (of/the/and apart), or a
         capitalised word inside one that is not its first word, not a name, not a title ("Lord") and
         not used in lower case

A sentence is a run of dialogue up to ., ? or !; those with an entity are kept, and as many without.
The plays are split whole (test plays are unseen in training), so names must be told from context.

    python benchmarks/shakespeare_ner.py OUT_DIR     # train/validation/test .jsonl, {"text", "spans"}
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

from minibert.assets import shakespeare_dir

TITLES = {"KING", "QUEEN", "LORD", "LADY", "PRINCE", "PRINCESS", "DUKE", "DUCHESS", "SIR", "EARL", "COUNT", "COUNTESS",
          "CARDINAL", "BISHOP", "ARCHBISHOP", "MISTRESS", "MASTER", "FRIAR", "YOUNG", "OLD", "DOCTOR", "CAPTAIN"}
SMALL = {"of", "the", "and", "de", "le", "la", "in", "on", "at", "to"}
TEST_PLAYS = {"hamlet", "twelfth-night", "julius-caesar", "henry-v", "the-tempest"}
VALIDATION_PLAYS = {"macbeth", "much-ado-about-nothing", "richard-ii"}
WORD = re.compile(r"[A-Za-z][A-Za-z'-]*[A-Za-z]|[A-Za-z]")


def _names(heading: str) -> set[str]:
    """Names in a capitalised speaker heading: the whole title-cased name and the name without titles."""
    names = set()
    for part in re.split(r"\s*(?:&|,| and )\s*", heading):
        words = part.split()
        if not words or any(not w.isupper() for w in words):
            continue  # "First Clown", "Ghost": roles, not names
        names.add(" ".join(w.capitalize() for w in words))
        bare = [w for w in words if w not in TITLES]
        if bare:
            names.add(" ".join(w.capitalize() for w in bare))
    return {n for n in names if len(n) > 2}


def _places(heading: str) -> set[str]:
    places = set()
    for sentence in re.split(r"\.\s+|\.$|;\s*|,\s*", heading):
        words = WORD.findall(sentence)
        if not words:
            continue
        if all(w[0].isupper() or w in SMALL for w in words) and words[0] not in ("A", "An", "Another"):
            phrase = words[1:] if words[0] == "The" else words
            while phrase and phrase[-1] in SMALL:
                phrase = phrase[:-1]
            if phrase:
                places.add(" ".join(phrase))
        else:
            places.update(w for w in words[1:] if w[0].isupper() and not w.isupper() and len(w) > 2)
    return places


def _read_play(path: Path) -> tuple[set[str], set[str], list[str]]:
    """(names, places, dialogue sentences) of one play."""
    names, places, speeches, speech = set(), set(), [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("**") and line.endswith("**"):
            names |= _names(line.strip("*").strip())
            speeches.append(" ".join(speech))
            speech = []
        elif line.startswith("### SCENE"):
            places |= _places(line.split(".", 1)[1] if "." in line else "")
        elif line and not line.startswith(("#", "_")):
            speech.append(line)
    speeches.append(" ".join(speech))
    sentences = [s.strip() for text in speeches for s in re.split(r"(?<=[.?!])\s+", text) if s.strip()]
    return names, places, sentences


def _entity_pattern(names: set[str], places: set[str]) -> tuple[re.Pattern, dict[str, str]]:
    kinds = {**{p: "LOC" for p in places}, **{n: "PER" for n in names}}  # a name that is also a place: PER
    phrases = sorted(kinds, key=lambda p: (-len(p), p))  # the longest first
    return re.compile(r"(?<![A-Za-z'-])(" + "|".join(map(re.escape, phrases)) + r")(?![A-Za-z-])"), kinds


def build(out_dir: str | Path, max_train: int | None = None, seed: int = 0) -> dict[str, int]:
    """Write train/validation/test.jsonl under out_dir; returns the number of sentences in each."""
    plays = sorted(shakespeare_dir().glob("*/*.md"))
    read = {p.stem: _read_play(p) for p in plays}
    names = set().union(*(n for n, _, _ in read.values()))
    # Verse capitalises every line's first word, so a name that is also a common word ("Patience",
    # "Hope") would be found everywhere: a one-word name seen in lower case in the plays is dropped.
    lower_words = {w for _, _, sentences in read.values() for s in sentences for w in WORD.findall(s) if w.islower()}
    names = {n for n in names if " " in n or n.lower() not in lower_words}
    places = set().union(*(p for _, p, _ in read.values())) - {n for n in names}
    places = {p for p in places if " " in p or (p.lower() not in lower_words and p.upper() not in TITLES)}
    pattern, kinds = _entity_pattern(names, places)
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for stem, (_, _, sentences) in read.items():
        split = "test" if stem in TEST_PLAYS else "validation" if stem in VALIDATION_PLAYS else "train"
        with_entities, without = [], []
        for sentence in sentences:
            if not 3 <= len(sentence.split()) <= 40:
                continue
            spans = [{"start": m.start(), "end": m.end(), "label": kinds[m.group(1)]} for m in pattern.finditer(sentence)]
            (with_entities if spans else without).append({"text": sentence, "spans": spans})
        rng.shuffle(without)
        splits[split] += with_entities + without[: len(with_entities)]
    for split, records in splits.items():
        rng.shuffle(records)
        if split == "train" and max_train:
            del records[max_train:]
        elif max_train:
            del records[max_train // 4 :]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (out_dir / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    return {split: len(records) for split, records in splits.items()}


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "runs/shakespeare-ner"))
