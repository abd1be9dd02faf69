"""Tag schemes, constrained Viterbi decoding and the CRF, against brute-force enumeration of every tag
sequence on tiny inputs, and hand-written rules of what a valid BIO/BIOES sequence is."""

import itertools

import numpy as np
import pytest
import torch

from minibert.tagging import CRFWeights, allowed_transitions, decode_tags, detect_scheme, log_softmax, tag_scheme, viterbi

BIO = ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]
BIOES = ["B-LOC", "B-PER", "E-LOC", "E-PER", "I-LOC", "I-PER", "O", "S-LOC", "S-PER"]


def valid_by_hand(tags: list[str], scheme: str) -> bool:
    """The schemes' rules, written out tag by tag (independent of allowed_transitions' matrices)."""
    previous = "O"
    for tag in [*tags, "END"]:
        prev_prefix, prev_type = (previous[0], previous[2:]) if previous != "O" else ("O", None)
        if tag == "END":
            return scheme == "bio" or prev_prefix in ("O", "E", "S")
        prefix, entity = (tag[0], tag[2:]) if tag != "O" else ("O", None)
        inside = prev_prefix in ("B", "I")
        if prefix in ("I", "E") and not (inside and prev_type == entity):
            return False
        if scheme == "bioes" and inside and prefix not in ("I", "E"):
            return False
        previous = tag
    raise AssertionError("unreachable")


def brute_force_best(scores, labels, scheme, crf=None):
    """Score every tag sequence, keep the best valid one (ties: the lexicographically smallest ids)."""
    W, L = scores.shape
    best, best_path = -np.inf, None
    for path in itertools.product(range(L), repeat=W):
        if scheme is not None and not valid_by_hand([labels[i] for i in path], scheme):
            continue
        total = sum(scores[t, y] for t, y in enumerate(path))
        if crf is not None:
            total += crf.start[path[0]] + crf.end[path[-1]] + sum(crf.transitions[a, b] for a, b in zip(path, path[1:]))
        if total > best + 1e-12:
            best, best_path = total, list(path)
    return best_path


def test_tag_scheme_from_the_label_set():
    assert tag_scheme(BIO) == "bio"
    assert tag_scheme(BIOES) == "bioes"
    assert tag_scheme(["O", "S-PER"]) == "bioes"
    assert tag_scheme(["PER", "LOC", "O"]) is None  # plain tags
    assert tag_scheme(["O"]) is None
    assert tag_scheme(["B-PER", "I-PER", "O", "MISC"]) is None  # a mixture


def test_allowed_transitions_match_the_rules_for_every_pair():
    for labels, scheme in ((BIO, "bio"), (BIOES, "bioes")):
        start, transitions, end = allowed_transitions(labels, scheme)
        for i, a in enumerate(labels):
            assert start[i] == valid_by_hand([a], scheme) or (scheme == "bioes" and a[0] == "B"), a
            assert end[i] == (scheme == "bio" or a[0] in "OES"), a
            for j, b in enumerate(labels):
                # a pair is allowed when some valid sentence holds it: prefix it with B-X when it needs an opener
                opener = [f"B-{a[2:]}"] if a[0] in "IE" else []
                closer = {"B": [f"E-{b[2:]}"], "I": [f"E-{b[2:]}"]}.get(b[0], []) if scheme == "bioes" else []
                assert transitions[i, j] == valid_by_hand([*opener, a, b, *closer], scheme), (a, b)
    assert not allowed_transitions(BIO, "bio")[1][BIO.index("O"), BIO.index("I-PER")]  # O -> I-PER
    assert not allowed_transitions(BIO, "bio")[1][BIO.index("B-LOC"), BIO.index("I-PER")]  # type change


@pytest.mark.parametrize("labels, scheme", [(BIO, "bio"), (BIOES[::2] + ["O"], None), (["B-X", "E-X", "I-X", "O", "S-X"], "bioes")])
def test_constrained_viterbi_equals_brute_force(labels, scheme):
    rng = np.random.default_rng(0)
    for trial in range(30):
        W = int(rng.integers(1, 5))
        scores = log_softmax(rng.normal(0, 2, (W, len(labels))))
        assert decode_tags(scores, labels, scheme) == brute_force_best(scores, labels, scheme), trial


def test_viterbi_with_crf_weights_equals_brute_force():
    rng = np.random.default_rng(1)
    labels = ["B-X", "I-X", "O"]
    for trial in range(30):
        W = int(rng.integers(1, 6))
        scores = rng.normal(0, 1, (W, 3))
        crf = CRFWeights(rng.normal(0, 1, (3, 3)), rng.normal(0, 1, 3), rng.normal(0, 1, 3))
        assert decode_tags(scores, labels, None, crf=crf) == brute_force_best(scores, labels, None, crf), trial
        assert decode_tags(scores, labels, "bio", crf=crf) == brute_force_best(scores, labels, "bio", crf), trial


def test_decoding_repairs_an_entity_started_by_I():
    labels = ["B-PER", "I-PER", "O"]
    # Per word: I-PER (0.6 vs B-PER 0.3), I-PER: the argmax reads O-less "I-PER I-PER", which starts with I-.
    probs = np.array([[0.3, 0.6, 0.1], [0.1, 0.8, 0.1]])
    assert decode_tags(np.log(probs), labels, None) == [1, 1]
    # Valid paths: B I (0.3*0.8), O O (0.1*0.1), B B, B O, O B, ...: B-PER I-PER is the most probable.
    assert decode_tags(np.log(probs), labels, "bio") == [0, 1]
    assert decode_tags(np.zeros((0, 3)), labels, "bio") == []


def test_every_decoded_sequence_is_valid():
    rng = np.random.default_rng(2)
    for labels, scheme in ((BIO, "bio"), (BIOES, "bioes")):
        for _ in range(200):
            scores = log_softmax(rng.normal(0, 3, (int(rng.integers(1, 12)), len(labels))))
            assert valid_by_hand([labels[i] for i in decode_tags(scores, labels, scheme)], scheme)


def test_detect_scheme_tells_iob1_data_from_bio():
    assert detect_scheme([["B-PER", "I-PER", "O"], ["O", "B-LOC"]], ["B-LOC", "B-PER", "I-PER", "O"]) == "bio"
    # CoNLL-2003's original IOB1: I- opens an entity, B- only between two adjacent ones.
    assert detect_scheme([["I-PER", "I-PER", "O", "I-LOC"]], ["I-LOC", "I-PER", "O"]) is None
    assert detect_scheme([["S-PER", "O", "B-LOC", "E-LOC"]], ["B-LOC", "E-LOC", "O", "S-PER"]) == "bioes"
    assert detect_scheme([["B-LOC", "O"]], ["B-LOC", "E-LOC", "O", "S-PER"]) is None  # BIOES tags, BIO writing


def test_viterbi_hand_computed():
    # Two tags, two words: paths 00: 1+0+0.5 = 1.5; 01: 1+2+1 = 4 (best); 10: 0+0+0 = 0; 11: 0+2+0.2 = 2.2
    emissions = np.array([[1.0, 0.0], [0.0, 2.0]])
    transitions = np.array([[0.5, 1.0], [0.0, 0.2]])
    assert viterbi(emissions, transitions, np.zeros(2), np.zeros(2)) == [0, 1]
    assert viterbi(emissions, transitions, np.zeros(2), np.array([0.0, -3.0])) == [0, 0]  # 1.5 vs 4 - 3 = 1


# ----------------------------------------------------------------------------- the CRF


def brute_force_log_likelihood(crf, emissions, tags, length):
    """log p(tags | emissions) of one sequence, with the partition function summed over every path."""
    e, start, end, trans = emissions[:length], crf.start_transitions, crf.end_transitions, crf.transitions

    def score(path):
        return start[path[0]] + end[path[-1]] + sum(e[t, y] for t, y in enumerate(path)) + sum(
            trans[a, b] for a, b in zip(path, path[1:]))

    paths = itertools.product(range(e.shape[1]), repeat=length)
    log_z = torch.logsumexp(torch.stack([score(p) for p in paths]), dim=0)
    return score(tags[:length].tolist()) - log_z


def test_crf_loss_is_the_brute_force_negative_log_likelihood_per_word():
    from minibert.crf import first_pieces

    from torchcrf import CRF

    torch.manual_seed(0)
    L = 3
    crf = CRF(L, batch_first=True)
    with torch.no_grad():
        for p in crf.parameters():
            p.normal_()
    logits = torch.randn(3, 6, L, dtype=torch.float64)
    crf = crf.double()
    # Row 0: pieces 1, 2, 4 are first pieces; row 1: 1, 3; row 2 has none (a sentence cut away entirely).
    labels = torch.full((3, 6), -100)
    labels[0, [1, 2, 4]] = torch.tensor([2, 0, 1])
    labels[1, [1, 3]] = torch.tensor([1, 1])
    emissions, tags, mask = first_pieces(logits, labels)
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    assert torch.equal(emissions[0], logits[0, [1, 2, 4]]) and torch.equal(emissions[1, :2], logits[1, [1, 3]])
    loss = -crf(emissions, tags, mask, reduction="token_mean")
    expected = -(brute_force_log_likelihood(crf, emissions[0], tags[0], 3)
                 + brute_force_log_likelihood(crf, emissions[1], tags[1], 2)) / 5
    torch.testing.assert_close(loss, expected)


def test_crf_model_trains_saves_and_loads(tiny_init_dir, tmp_path):
    import transformers
    from safetensors.torch import load_file

    from minibert.crf import CRF_FILE, BertCRFForTokenClassification
    from minibert.tagging import decode_tags

    labels = {0: "B-X", 1: "I-X", 2: "O"}
    model = BertCRFForTokenClassification.from_pretrained(str(tiny_init_dir), num_labels=3, id2label=labels, verbose=False)
    assert {"crf.transitions", "crf.start_transitions", "crf.end_transitions"} <= set(model.new_keys)
    input_ids = torch.randint(1000, 2000, (2, 7))
    tags = torch.tensor([[-100, 2, 0, 1, -100, 2, -100], [-100, 0, -100, 1, 1, -100, -100]])
    out = model(input_ids, torch.ones_like(input_ids), labels=tags)
    out.loss.backward()
    assert model.crf.transitions.grad.abs().sum() > 0 and model.classifier.weight.grad.abs().sum() > 0
    groups = model.parameter_groups(0.01)
    crf_group = [g for g in groups if any(p is model.crf.transitions for p in g["params"])]
    assert len(crf_group) == 1 and crf_group[0]["lr_scale"] == 100.0 and crf_group[0]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # each parameter once

    with torch.no_grad():
        model.crf.transitions.copy_(torch.arange(9.0).view(3, 3))
    model.save_pretrained(tmp_path / "m")
    assert torch.equal(load_file(str(tmp_path / "m" / CRF_FILE))["transitions"], torch.arange(9.0).view(3, 3))
    again = BertCRFForTokenClassification.from_pretrained(str(tmp_path / "m"), verbose=False)
    assert again.new_keys == [] and torch.equal(again.crf.transitions, model.crf.transitions)
    model.eval(), again.eval()
    torch.testing.assert_close(again(input_ids).logits, model(input_ids).logits)
    # transformers loads the rest, as a plain token classifier with the same logits
    hf = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(hf(input_ids).logits, model(input_ids).logits, atol=1e-5, rtol=1e-4)
    weights = again.crf_weights()
    scores = model(input_ids).logits[0, 1:6].detach().numpy()
    assert decode_tags(scores, list(labels.values()), None, crf=weights) == brute_force_best(
        scores.astype(np.float64), list(labels.values()), None, weights)


def test_a_crf_file_of_another_model_is_a_one_line_error(tiny_init_dir, tmp_path):
    from minibert.crf import BertCRFForTokenClassification

    from safetensors.torch import save_file
    from torchcrf import CRF

    model = BertCRFForTokenClassification.from_pretrained(str(tiny_init_dir), num_labels=3, verbose=False)
    model.save_pretrained(tmp_path / "m")
    save_file(CRF(5).state_dict(), str(tmp_path / "m" / "crf.safetensors"))  # copied from a 5-tag model
    with pytest.raises(ValueError, match="crf.safetensors holds .* a CRF over 3 tags needs .*delete it"):
        BertCRFForTokenClassification.from_pretrained(str(tmp_path / "m"), verbose=False)
