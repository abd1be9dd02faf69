"""explanations.html: a page that shows what each prediction rests on, one self-contained file.

Every explained prediction is a card: the text with each word shaded by its attribution (blue for the
explained prediction, red against it; the darker, the larger its share of the text's largest attribution),
the label and its probability, and the completeness check of the attributions. The sort key, confidence,
is the explained score: the probability of the label (or entity) that is explained, a regression's value. A menu sorts the cards by
confidence. The page loads nothing (a Content-Security-Policy forbids every request), so it opens offline
and can be mailed as it is.

    write_page("explanations.html", records)   # records as predictions.jsonl holds them (with --explain)

A record is a prediction with its text and explanation: {"text", "text_pair"?, "label" | "labels" | "value",
"explains", "explained_score", "attributions", "completeness", "gold"?}, or for a token classifier
{"text", "entities": [{"entity", "text", "start", "end", "score", "explains", ...}]}.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from pathlib import Path

TITLE = "minibert: what the predictions rest on"
FOR_RGB, AGAINST_RGB = (33, 102, 172), (178, 24, 43)  # ColorBrewer RdBu's ends: apart for most colour vision

STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1100px; padding: 0 16px; color: #1a1a1a; }
header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ddd; padding: 8px 0; }
h1 { font-size: 20px; margin: 4px 0; }
.legend span { padding: 1px 6px; border-radius: 3px; }
.card { border: 1px solid #ddd; border-radius: 6px; margin: 10px 0; padding: 8px 12px; }
.meta { font-size: 13px; color: #555; }
.label { font-weight: 600; color: #1a1a1a; font-size: 15px; }
.wrong { color: #b2182b; font-weight: 600; }
.text { margin: 6px 0; white-space: pre-wrap; }
.text span.w { border-radius: 3px; padding: 0 1px; }
.text span.entity { outline: 2px solid #555; outline-offset: 1px; }
.pair { color: #555; font-size: 13px; margin: 2px 0; }
.check { font-size: 12px; color: #777; margin: 0; }
.check.off { color: #b2182b; }
"""

# Sorting moves the cards; "#sort=desc" (or asc) in the address opens the page sorted.
SCRIPT = """
const cards = document.getElementById("cards"), menu = document.getElementById("sort");
function sortCards(key) {
  const items = Array.from(cards.children);
  items.sort((a, b) => key === "input" ? a.dataset.order - b.dataset.order
    : (key === "asc" ? 1 : -1) * (a.dataset.confidence - b.dataset.confidence) || a.dataset.order - b.dataset.order);
  items.forEach((item) => cards.appendChild(item));
}
menu.addEventListener("change", () => sortCards(menu.value));
const asked = location.hash.match(/sort=(asc|desc|input)/);
if (asked) { menu.value = asked[1]; sortCards(asked[1]); }
"""


def _shade(attribution: float, largest: float) -> str:
    share = abs(attribution) / largest if largest > 0 else 0.0
    r, g, b = FOR_RGB if attribution >= 0 else AGAINST_RGB
    alpha = 0.06 + 0.64 * share  # the faintest word still shows which side it is on
    text = "#fff" if alpha > 0.45 else "inherit"
    return f"background: rgba({r}, {g}, {b}, {alpha:.2f}); color: {text}"


def _shaded_text(text: str, words: Sequence[dict], entity: tuple[int, int] | None = None) -> str:
    """The text with a span per word, the characters between words (spaces) copied as they are."""
    largest = max((abs(w["attribution"]) for w in words), default=0.0)
    pieces, cursor = [], 0
    for w in sorted(words, key=lambda w: w["start"]):
        pieces.append(html.escape(text[cursor : w["start"]]))
        inside = entity is not None and entity[0] <= w["start"] and w["end"] <= entity[1]
        pieces.append(f'<span class="w{" entity" if inside else ""}" style="{_shade(w["attribution"], largest)}" '
                      f'title="{w["attribution"]:+.4f}">{html.escape(text[w["start"] : w["end"]])}</span>')
        cursor = w["end"]
    pieces.append(html.escape(text[cursor:]))
    return "".join(pieces)


def _headline(record: dict) -> tuple[str, bool]:
    """What was predicted, as the card's title, and whether the explained score is a probability."""
    if "label" in record:
        return record["label"], True
    if "labels" in record:
        return ", ".join(record["labels"]) or "(no label)", True
    return f'{record["value"]:.4g}', False


def cards_from_records(records: Iterable[dict]) -> list[dict]:
    """One card per explained prediction: a text's (classification, multi-label, regression), or each
    entity of a token classifier's {"text", "entities"}."""
    cards = []
    for record in records:
        if "entities" in record:
            for entity in record["entities"]:
                if "attributions" in entity:
                    cards.append({**entity, "texts": [record["text"]], "headline": f'{entity["entity"]}: {entity["text"]}',
                                  "probability": True, "highlight": (entity["start"], entity["end"])})
        elif "attributions" in record:
            headline, probability = _headline(record)
            cards.append({**record, "texts": [record["text"]] + ([record["text_pair"]] if "text_pair" in record else []),
                          "headline": headline, "probability": probability})
    return cards


def _card(order: int, card: dict) -> str:
    texts = card["texts"]
    first = [w for w in card["attributions"] if not w.get("segment")]
    second = [w for w in card["attributions"] if w.get("segment")]
    score = card["explained_score"]
    shown = f"{100 * score:.1f}%" if card["probability"] else f"{score:.4g}"
    gold_html = ""
    if card.get("gold") is not None:
        gold = card["gold"]
        wrong = card["probability"] and gold != card.get("label", card.get("labels"))  # a value is never exactly right
        gold_html = f' · gold <span class="{"wrong" if wrong else ""}">{html.escape(str(gold))}</span>'
    check = card["completeness"]
    check_html = (f'<p class="check{"" if check["within_tolerance"] else " off"}">attributions sum to '
                  f'{check["attribution_sum"]:+.4f}; the explained score moves {check["score_change"]:+.4f} from the '
                  f'empty text ({check["steps"]} steps{"" if check["within_tolerance"] else ", outside the tolerance"})</p>')
    body = f'<p class="text">{_shaded_text(texts[0], first, card.get("highlight"))}</p>'
    if len(texts) > 1:
        body += f'<p class="text pair">{_shaded_text(texts[1], second)}</p>'
    return (f'<article class="card" data-order="{order}" data-confidence="{score:.6f}">'
            f'<div class="meta"><span class="label">{html.escape(card["headline"])}</span> {shown}{gold_html}'
            f' · explains the {html.escape(card["explains"])}</div>{body}{check_html}</article>')


def render_page(records: Iterable[dict], title: str = TITLE) -> str:
    cards = cards_from_records(records)
    if not cards:
        raise ValueError("no prediction has attributions to show: explain them first (explain=True, --explain)")
    legend = (f'<span style="{_shade(1.0, 1.0)}">for the prediction</span> '
              f'<span style="{_shade(-1.0, 1.0)}">against it</span> '
              "(integrated gradients; the darker, the larger the share of the text's largest attribution; "
              "hover a word for its value)")
    return "\n".join([
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # Nothing may be fetched: the page is one file that works offline.
        ("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
         "script-src 'unsafe-inline'\">"),
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f'<header><h1>{html.escape(title)}</h1><div class="legend">{legend}</div>',
        ('<label>Sort by <select id="sort"><option value="input">input order</option>'
         '<option value="desc">most confident first</option><option value="asc">least confident first</option>'
         f"</select></label> · {len(cards)} explained prediction{'s' * (len(cards) != 1)}</header>"),
        '<main id="cards">', *(_card(i, card) for i, card in enumerate(cards)), "</main>",
        f"<script>{SCRIPT}</script></body></html>",
    ]) + "\n"


def write_page(path: str | Path, records: Iterable[dict], title: str = TITLE) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_page(records, title), encoding="utf-8")
    tmp.replace(path)
    return path
