"""TokenLayout on hand-computed indices, and the masks the encoder refuses (in both layouts, every model)."""

import pytest
import torch

import minibert
from minibert.padding import TokenLayout


def test_packed_layout_on_hand_computed_indices():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])
    layout = TokenLayout.from_mask(mask, 3, 4, pack=True)
    assert layout.packed
    assert layout.indices.tolist() == [0, 1, 2, 4, 5, 8]
    assert layout.cu_seqlens.tolist() == [0, 3, 5, 6]
    assert layout.max_seqlen == 3
    x = torch.arange(12.0).reshape(3, 4)
    assert layout.pack(x).tolist() == [0, 1, 2, 4, 5, 8]
    assert layout.unpack(layout.pack(x)).tolist() == [[0, 1, 2, 0], [4, 5, 0, 0], [8, 0, 0, 0]]
    assert layout.first_tokens(layout.pack(x)).tolist() == [0, 4, 8]
    hidden = torch.arange(24.0).reshape(3, 4, 2)  # features of their own: (batch, seqlen, C) <-> (total_tokens, C)
    assert layout.pack(hidden).tolist() == [[0, 1], [2, 3], [4, 5], [8, 9], [10, 11], [16, 17]]
    assert torch.equal(layout.unpack(layout.pack(hidden)), hidden * mask[..., None])
    labels = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4], [9, 9, 9, 9]])
    assert layout.flat_labels(labels).tolist() == [5, 6, 7, 1, 2, 9]
    padded = TokenLayout.from_mask(mask, 3, 4, pack=False)
    assert not padded.packed
    assert padded.flat_labels(labels).tolist() == [5, 6, 7, -100, 1, 2, -100, -100, 9, -100, -100, -100]
    assert padded.first_tokens(x[..., None]).flatten().tolist() == [0, 4, 8]
    # Nothing padded: no mask to apply, whatever was asked.
    assert TokenLayout.from_mask(torch.ones(2, 3), 2, 3, pack=True).attention_mask is None


NOT_RIGHT_PADDED = ("attention_mask row {} is not right-padded (a 0 before a 1): pad on the right, as BERT tokenizers do "
                    "(padding_side='right'), with the real tokens first and [CLS] at position 0")
EMPTY = ("attention_mask row {} has no tokens (all zeros): every sequence needs at least its [CLS] token; leave empty "
         "rows out of the batch")
BAD_MASKS = {  # the whole message: what is wrong, and the fix
    "left-padded": ([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], NOT_RIGHT_PADDED.format(1)),
    "hole": ([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]], NOT_RIGHT_PADDED.format(0)),
    "empty first row": ([[0, 0, 0, 0, 0], [1, 1, 1, 0, 0]], EMPTY.format(0)),
    "empty last row": ([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], EMPTY.format(1)),
}

MODELS = [minibert.BertModel, minibert.BertForPreTraining, minibert.BertForSequenceClassification,
          minibert.BertForTokenClassification]


@pytest.mark.parametrize("case", BAD_MASKS)
@pytest.mark.parametrize("unpad", [True, False])
def test_masks_the_encoder_cannot_handle_are_refused_in_both_layouts(case, unpad):
    """Left padding or a hole once gave different numbers packed and padded, and an empty row another
    row's logits (or an IndexError): now one error, the same in both layouts and for every model."""
    cfg = minibert.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                              intermediate_size=37, max_position_embeddings=16, unpad=unpad)
    mask, message = BAD_MASKS[case]
    mask = torch.tensor(mask)
    ids = torch.randint(5, 99, mask.shape)
    for cls in MODELS:
        with pytest.raises(ValueError) as err:
            cls(cfg).eval()(ids, attention_mask=mask)
        assert str(err.value) == message

