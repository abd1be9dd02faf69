"""Word attributions: integrated gradients against a float64 Riemann sum written out here, completeness,
word-piece aggregation with character offsets, and the scores that are explained."""

import logging

import numpy as np
import pytest
import torch

from minibert import attributions as A
from minibert.model import BertForSequenceClassification
from minibert.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_init_dir):
    """A tiny random classifier whose output moves with its input (BERT's N(0, 0.02) init barely does)."""
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(str(tiny_init_dir), num_labels=3, verbose=False,
                                                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.config.initializer_range = 0.4
    model.init_weights()
    return model.eval(), load_tokenizer(tiny_init_dir)


def riemann_integrated_gradients(model, input_ids, baseline, score, steps=2000):
    """IG as the paper defines it, by the midpoint rule in float64: the reference for captum's Gauss-Legendre."""
    model = model.double()
    embed = model.bert.embeddings.word
    x, x0 = embed(input_ids).detach(), embed(baseline).detach()  # (1, T, C)
    alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    path = (x0 + alphas[:, None, None] * (x - x0)).requires_grad_(True)  # (steps, T, C)
    handle = embed.register_forward_hook(lambda module, args, out: path)
    try:
        ids = input_ids.expand(steps, -1)
        total = score(model(ids, torch.ones_like(ids), torch.zeros_like(ids)).logits).sum()
        (grads,) = torch.autograd.grad(total, path)
    finally:
        handle.remove()
        model.float()
    return ((x - x0)[0] * grads.mean(dim=0)).sum(dim=-1).numpy()  # (T,)


def encode(tokenizer, text, pair=None):
    return tokenizer.encode(text) if pair is None else tokenizer.encode(text, pair)


def test_integrated_gradients_match_the_definition_and_are_complete(tiny):
    model, tokenizer = tiny
    encoding = encode(tokenizer, "a gripping, tender film that never lets go")
    ids = torch.tensor([encoding.ids])
    baseline = A.baseline_ids(ids, torch.tensor([encoding.special_tokens_mask]), tokenizer.token_to_id("[PAD]"))
    assert baseline[0].tolist() == [ids[0, 0].item()] + [0] * (ids.shape[1] - 2) + [ids[0, -1].item()]
    score = A.class_probability("classification", target=2)
    per_token, f_x, f_baseline, delta = A.token_attributions(model, ids, torch.zeros_like(ids), baseline, score, steps=50)
    reference = riemann_integrated_gradients(model, ids, baseline, score)
    assert abs(f_x - f_baseline) > 0.05  # the test means something only if the score moves
    np.testing.assert_allclose(per_token, reference, rtol=2e-3, atol=2e-5)
    assert per_token.sum() == pytest.approx(f_x - f_baseline, rel=1e-3)  # completeness
    assert abs(delta) < 1e-3 * abs(f_x - f_baseline)
    assert per_token[0] == 0 and per_token[-1] == 0  # [CLS] and [SEP] are the baseline's too


def test_explain_sums_pieces_into_words_with_offsets(tiny):
    model, tokenizer = tiny
    text = "Unbelievably moving, isn't it?"
    encoding = encode(tokenizer, text)
    explanation = A.explain(model, encoding, (text,), A.class_probability("classification", 0),
                            baseline_token_id=tokenizer.token_to_id("[PAD]"))
    words = [w["word"] for w in explanation.words]
    assert words == ["Unbelievably", "moving", ",", "isn", "'", "t", "it", "?"]
    assert [(w["start"], w["end"]) for w in explanation.words][:3] == [(0, 12), (13, 19), (19, 20)]
    # each word is the sum of its pieces ("unbelievably" is several); the pieces come from the same run
    ids = torch.tensor([encoding.ids])
    baseline = A.baseline_ids(ids, torch.tensor([encoding.special_tokens_mask]), tokenizer.token_to_id("[PAD]"))
    per_token, *_ = A.token_attributions(model, ids, torch.zeros_like(ids), baseline, A.class_probability("classification", 0),
                                         steps=explanation.steps)
    pieces_of_first_word = [i for i, w in enumerate(encoding.word_ids) if w == 0]
    assert len(pieces_of_first_word) > 1
    assert explanation.words[0]["attribution"] == pytest.approx(per_token[pieces_of_first_word].sum(), abs=2e-6)
    assert sum(w["attribution"] for w in explanation.words) == pytest.approx(explanation.score - explanation.baseline_score, rel=0.05)
    assert explanation.complete and explanation.record("x")["completeness"]["within_tolerance"]


def test_pairs_give_offsets_into_their_own_text(tiny):
    model, tokenizer = tiny
    encoding = encode(tokenizer, "A man sleeps.", "Nobody is asleep.")
    explanation = A.explain(model, encoding, ("A man sleeps.", "Nobody is asleep."), A.class_probability("classification", 1),
                            baseline_token_id=tokenizer.token_to_id("[MASK]"))
    second = [w for w in explanation.words if w.get("segment") == 1]
    assert [w["word"] for w in second] == ["Nobody", "is", "asleep", "."]
    assert second[2]["start"] == 10 and second[2]["end"] == 16


def test_too_few_steps_are_raised_until_complete(tiny, caplog):
    model, tokenizer = tiny
    text = "the plot is thin and the jokes are flat"
    encoding = encode(tokenizer, text)
    score = A.class_probability("classification", 1)
    ids = torch.tensor([encoding.ids])
    baseline = A.baseline_ids(ids, torch.tensor([encoding.special_tokens_mask]), tokenizer.token_to_id("[PAD]"))
    one_step, f_x, f_baseline, _ = A.token_attributions(model, ids, torch.zeros_like(ids), baseline, score, steps=1)
    assert not A._within_tolerance(one_step.sum() - (f_x - f_baseline), f_x - f_baseline)  # one step misses here
    with caplog.at_level(logging.WARNING, logger="minibert"):
        explanation = A.explain(model, encoding, (text,), score, baseline_token_id=tokenizer.token_to_id("[PAD]"), steps=1)
    assert explanation.steps > 1 and explanation.complete and "still miss" not in caplog.text


def test_scores_that_are_explained():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    np.testing.assert_allclose(A.class_probability("classification", 0, temperature=2.0)(logits).numpy(),
                               torch.softmax(logits / 2.0, dim=-1)[:, 0].numpy())
    np.testing.assert_allclose(A.class_probability("multilabel", 2, temperature=[1.0, 1.0, 0.5])(logits).numpy(),
                               [1 / (1 + np.exp(2.0)), 1 / (1 + np.exp(-6.0))], rtol=1e-6)
    assert A.class_probability("regression", 0)(logits[:, :1]).tolist() == [2.0, 0.5]
    tokens = torch.tensor([[[3.0, 0.0], [0.0, 1.0], [2.0, 2.0]]])  # (B=1, T=3, L=2)
    p = torch.softmax(tokens[0], dim=-1)
    assert A.entity_probability([1, 2], [1, 0])(tokens).item() == pytest.approx(((p[1, 1] + p[2, 0]) / 2).item())
    with pytest.raises(ValueError, match="at least 1 step"):
        A.explain(None, None, ("",), None, baseline_token_id=0, steps=0)


# ----------------------------------------------------------------------------- a prediction's explanation


def test_explain_sequence_explains_the_prediction_or_a_named_label(tiny):
    model, tokenizer = tiny
    text, pad = "a gripping , tender film", tokenizer.token_to_id("[PAD]")
    labels = ["neg", "neu", "pos"]
    result = {"label": "neu", "score": 0.4, "probabilities": {"neg": 0.3, "neu": 0.4, "pos": 0.3}}
    record = A.explain_sequence(model, encode(tokenizer, text), (text,), "classification", labels, result,
                                baseline_token_id=pad, temperature=1.5)
    direct = A.explain(model, encode(tokenizer, text), (text,), A.class_probability("classification", 1, 1.5),
                       baseline_token_id=pad)
    assert record == direct.record("probability of 'neu'")
    named = A.explain_sequence(model, encode(tokenizer, text), (text,), "classification", labels, result,
                               baseline_token_id=pad, target="pos")
    assert named["explains"] == "probability of 'pos'" and named["attributions"] != record["attributions"]
    with pytest.raises(ValueError, match="'happy' is not a label of the model: choose one of neg, neu, pos"):
        A.explain_sequence(model, encode(tokenizer, text), (text,), "classification", labels, result,
                           baseline_token_id=pad, target="happy")
    multilabel = {"labels": ["neg", "pos"], "probabilities": {"neg": 0.6, "neu": 0.9, "pos": 0.7}}
    assert A.explained_label("multilabel", labels, multilabel) == "pos"  # the most probable of those predicted
    assert A.explained_label("multilabel", labels, {**multilabel, "labels": []}) == "neu"


def test_regression_explains_the_value(tiny_init_dir):
    torch.manual_seed(1)
    model = BertForSequenceClassification.from_pretrained(str(tiny_init_dir), num_labels=1, verbose=False,
                                                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.config.initializer_range = 0.4
    model.init_weights()
    tokenizer = load_tokenizer(tiny_init_dir)
    text = "a gripping , tender film"
    record = A.explain_sequence(model.eval(), encode(tokenizer, text), (text,), "regression", None, {"value": 0.3},
                                baseline_token_id=tokenizer.token_to_id("[PAD]"))
    assert record["explains"].startswith("predicted value")
    with torch.no_grad():
        value = model(torch.tensor([encode(tokenizer, text).ids])).logits[0, 0].item()
    assert record["explained_score"] == pytest.approx(value, abs=1e-5)
    assert record["completeness"]["within_tolerance"]
    with pytest.raises(ValueError, match="regression model has one output"):
        A.explain_sequence(model, encode(tokenizer, text), (text,), "regression", None, {"value": 0.3},
                           baseline_token_id=0, target="pos")


def test_explain_entity_scores_its_words_first_pieces(tiny_init_dir):
    from minibert.model import BertForTokenClassification

    torch.manual_seed(2)
    model = BertForTokenClassification.from_pretrained(str(tiny_init_dir), num_labels=3, verbose=False,
                                                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.config.initializer_range = 0.4
    model.init_weights()
    tokenizer = load_tokenizer(tiny_init_dir)
    text = "Yesterday Mr. Hendrickson flew to Pittsburgh"
    encoding = encode(tokenizer, text)
    entity = {"entity": "PER", "text": "Mr. Hendrickson", "start": 10, "end": 25, "score": 0.5}
    spans = [(10, 12), (12, 13), (14, 25)]  # its words: "Mr", ".", "Hendrickson" (several pieces)
    record = A.explain_entity(model.eval(), encoding, text, entity, spans, [1, 2, 2],
                              baseline_token_id=tokenizer.token_to_id("[PAD]"))
    positions = [i for i, (s, _) in enumerate(encoding.offsets) if s in (10, 12, 14) and encoding.word_ids[i] is not None]
    assert [encoding.tokens[i] for i in positions] == ["mr", ".", "hendricks"]  # "hendrickson" is two pieces
    direct = A.explain(model, encoding, (text,), A.entity_probability(positions, [1, 2, 2]),
                       baseline_token_id=tokenizer.token_to_id("[PAD]"))
    assert record == direct.record("score of PER 'Mr. Hendrickson'")
    assert record["completeness"]["within_tolerance"]
    with pytest.raises(ValueError, match="has 3 word"):
        A.explain_entity(model, encoding, text, entity, spans, [1], baseline_token_id=0)
    with pytest.raises(ValueError, match="does not start a piece"):
        A.explain_entity(model, encoding, text, entity, [(11, 12)], [1], baseline_token_id=0)

POLAR = {"wonderful": "pos", "superb": "pos", "brilliant": "pos", "delightful": "pos", "excellent": "pos",
         "awful": "neg", "terrible": "neg", "dreadful": "neg", "boring": "neg", "horrible": "neg"}
FILLERS = ["the film was {} from start to end", "a {} story about an old town", "we thought the acting {} overall",
           "honestly the {} music stayed with us", "it was a {} evening at the cinema"]


def test_on_a_fine_tuned_sentiment_model_the_polar_word_gets_the_largest_attribution(tiny_init_dir, tmp_path):
    """Train the tiny BERT on sentences whose one polar word decides the label; on held-out sentences (new
    pairings of words and templates) that it gets right (with probability 0.55 or more: the tiny model is
    never very sure), that word should carry the largest
    attribution in most of them."""
    import csv

    import train_finetune

    # every polar word in every template; each word's sentence of one template (a different one per word) held out
    sentences = [(i, j, template.format(word), POLAR[word]) for i, word in enumerate(sorted(POLAR))
                 for j, template in enumerate(FILLERS)]
    rows = [(text, label) for i, j, text, label in sentences if j != i % 5]
    held_out = [(text, label) for i, j, text, label in sentences if j == i % 5]
    with open(tmp_path / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    train_finetune.main(["--init", str(tiny_init_dir), "--train-file", str(tmp_path / "train.csv"), "--validation-file",
                         str(tmp_path / "train.csv"), "--output-dir", str(tmp_path / "out"), "--epochs", "15",
                         "--batch-size", "4", "--lr", "3e-3", "--no-progress", "--seed", "0", "--dropout", "0", "--no-calibrate"])
    model = BertForSequenceClassification.from_pretrained(str(tmp_path / "out"), verbose=False).eval()
    tokenizer = load_tokenizer(tmp_path / "out")
    labels = [model.config.id2label[i] for i in range(2)]
    clear = hits = 0
    for text, gold in held_out:
        encoding = encode(tokenizer, text)
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([encoding.ids])).logits[0], -1)
        if labels[int(probs.argmax())] != gold or probs.max() < 0.55:
            continue
        clear += 1
        result = {"label": gold, "probabilities": dict(zip(labels, probs.tolist()))}
        record = A.explain_sequence(model, encoding, (text,), "classification", labels, result,
                                    baseline_token_id=tokenizer.token_to_id("[PAD]"))
        top = max(record["attributions"], key=lambda w: w["attribution"])
        hits += top["word"] in POLAR
    assert clear >= 7, f"only {clear} of {len(held_out)} held-out sentences are clear cases: the model did not learn"
    assert hits >= 0.8 * clear, f"the polar word has the largest attribution in {hits} of {clear} clear cases"
