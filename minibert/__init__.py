"""minibert: a compact BERT encoder in PyTorch, with Hugging Face weights in and out.

    from minibert import BertModel, load_tokenizer, pipeline
    model = BertModel.from_pretrained("bert-base-uncased")
    classify = pipeline("runs/finetune")               # a fine-tuned model, ready to label texts
    classify("A gripping, beautifully acted film.")    # {"label": "positive", "score": 0.97, ...}
"""

# checkpoint fills the model classes' from_pretrained / save_pretrained (see CHECKPOINT_IO in model.py).
from minibert import checkpoint  # noqa: F401
from minibert.config import BertConfig
from minibert.model import (
    ATTENTION_BACKENDS,
    BertForPreTraining,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)
from minibert.inference import Pipeline, pipeline
from minibert.tokenizer import load_tokenizer

__all__ = [
    "ATTENTION_BACKENDS",
    "BertConfig",
    "BertForPreTraining",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "Pipeline",
    "load_tokenizer",
    "pipeline",
]
