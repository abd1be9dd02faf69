"""minibert.dropout: the same Bernoulli(1 - p) keep-and-scale as torch's dropout, with a faster CPU mask.

The statistical checks use n = 10**6 draws and 6-sigma bounds, so a correct mask fails them with
probability ~1e-9, and the seed is fixed, so they never flake."""

import math

import pytest
import torch

from minibert import BertConfig
from minibert.dropout import Dropout, dropout, keep_mask
from minibert.model import BertForSequenceClassification

N = 10**6


def six_sigma(p: float, n: int) -> float:
    return 6 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_each_entry_is_kept_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    keep = keep_mask(torch.Size([N + 1]), p).float()  # odd: the last int64 is cut in half
    assert keep.shape == (N + 1,)
    assert abs(keep.mean().item() - (1 - p)) < six_sigma(1 - p, N)
    # each int64 gives two entries: both of its 32-bit halves must be uniform on their own
    for half in (keep[0::2], keep[1::2]):
        assert abs(half.mean().item() - (1 - p)) < six_sigma(1 - p, len(half))


def test_neighbouring_entries_are_independent():
    torch.manual_seed(1)
    p = 0.3
    keep = keep_mask(torch.Size([N]), p)
    both = (keep[:-1] & keep[1:]).float().mean().item()  # the two halves of one int64, and across int64s
    assert abs(both - (1 - p) ** 2) < six_sigma((1 - p) ** 2, N)
    rows = keep_mask(torch.Size([1000, 1000]), p).float()
    assert abs(torch.corrcoef(rows[:, :2].T)[0, 1].item()) < 6 / math.sqrt(1000)


def test_kept_entries_are_scaled_and_the_gradient_flows_through_them_only():
    torch.manual_seed(2)
    p = 0.25
    x = torch.randn(64, 48, dtype=torch.float64, requires_grad=True)
    y = dropout(x, p)
    kept = y != 0
    assert 0.6 < kept.double().mean().item() < 0.9
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))  # 1 / 0.75, not 0.75 or 1
    upstream = torch.randn_like(x)
    (y * upstream).sum().backward()
    torch.testing.assert_close(x.grad, torch.where(kept, upstream / (1 - p), 0.0))


def test_the_same_seed_gives_the_same_mask_and_another_seed_another():
    x = torch.ones(4096)
    torch.manual_seed(5)
    a = dropout(x, 0.5)
    torch.manual_seed(5)
    b = dropout(x, 0.5)
    torch.manual_seed(6)
    c = dropout(x, 0.5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_eval_mode_zero_and_one_and_dtypes():
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    layer = Dropout(0.5).eval()
    assert layer(x) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    assert dropout(x, 0.5).dtype == torch.bfloat16
    assert repr(Dropout(0.2)) == "Dropout(p=0.2)"
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\], got 1.5"):
        Dropout(1.5)


def test_eager_and_sdpa_draw_the_same_dropout_on_the_cpu():
    """With dropout on, torch's CPU sdpa is eager's math; minibert routes it there with the same mask,
    so the two backends give the same training outputs and gradients for the same seed, padded or not."""
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    eager = BertForSequenceClassification(config.replace(attn_impl="eager"))
    sdpa = BertForSequenceClassification(config.replace(attn_impl="sdpa"))
    sdpa.load_state_dict(eager.state_dict())
    ids = torch.randint(1, 50, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = torch.tensor([0, 1, 1])
    results = []
    for model in (eager, sdpa):
        model.train()
        torch.manual_seed(7)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        results.append((out.logits, model.bert.layers[0].attention.query.weight.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)
    torch.manual_seed(8)  # and the dropout is on: another seed, other logits
    assert not torch.allclose(sdpa(input_ids=ids, attention_mask=mask).logits, results[1][0])


def test_attention_dropout_is_applied_in_training_only():
    """Attention dropout on its own (hidden dropout 0): training outputs differ from eval's, in both
    backends; at p = 0 they are eval's."""
    for attn_impl in ("eager", "sdpa"):
        outputs = {}
        for p in (0.0, 0.3):
            config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=p, attn_impl=attn_impl)
            torch.manual_seed(0)
            model = BertForSequenceClassification(config)
            ids = torch.randint(1, 50, (2, 10))
            evaluated = model.eval().bert(ids).last_hidden_state
            torch.manual_seed(1)
            outputs[p] = (evaluated, model.train().bert(ids).last_hidden_state)
        torch.testing.assert_close(outputs[0.0][1], outputs[0.0][0])
        assert (outputs[0.3][1] - outputs[0.3][0]).abs().max() > 1e-3, attn_impl  # rounding would be ~1e-7


@pytest.mark.parametrize("head", ["sequence", "token"])
def test_classifier_dropout_overrides_the_hidden_dropout_in_the_head(head):
    """classifier_dropout (transformers' field) is the head's dropout when set; None takes hidden_dropout_prob.
    Everything else without dropout: training logits differ from eval's exactly when the head's p > 0."""
    from minibert.model import BertForTokenClassification

    cls = BertForSequenceClassification if head == "sequence" else BertForTokenClassification
    ids = torch.randint(1, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    moved = {}
    for name, classifier_dropout, hidden in (("classifier 0.5", 0.5, 0.0), ("classifier 0", 0.0, 0.5), ("none", None, 0.0)):
        config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=16, hidden_dropout_prob=hidden, attention_probs_dropout_prob=0.0,
                            classifier_dropout=classifier_dropout, num_labels=3)
        torch.manual_seed(0)
        model = cls(config)
        if hidden:  # the encoder's dropout off, so that only the head's could move the logits
            for module in model.bert.modules():
                if isinstance(module, Dropout):
                    module.p = 0.0
        evaluated = model.eval()(input_ids=ids).logits
        moved[name] = (model.train()(input_ids=ids).logits - evaluated).abs().max().item()
    assert moved["classifier 0.5"] > 1e-3 and moved["classifier 0"] == 0.0 and moved["none"] == 0.0
    if head == "token":
        assert model(input_ids=ids).loss is None
