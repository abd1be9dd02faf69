"""int8 prediction on the CPU: the model exported with torch.onnx and quantized by ONNX Runtime.

    net = int8_model(classifier)            # exported and quantized once per model, kept in the cache
    logits = net(input_ids, attention_mask, token_type_ids).logits   # as the torch model is called

`minibert.pipeline(dir, precision="int8")` uses it (minibert/inference.py). ONNX Runtime, not torch, for int8:
its dynamic quantization (int8 weights, activations quantized per batch) is maintained and fast, while
torch.ao.quantization is deprecated and torchao's int8 path needs torch.compile (20-50 s per input shape on a
2-core CPU) to beat fp32. The exported graph keeps the padded layout: it cannot branch on the mask, so int8
does not skip padding as the torch model does. Needs the `int8` extra (onnxruntime, onnx, onnxscript).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch

from minibert import assets
from minibert.model import ClassifierOutput

logger = logging.getLogger("minibert")


class OnnxRuntimeClassifier:
    """A classifier exported to ONNX and quantized to int8 by ONNX Runtime, called like the torch model
    (predict_logits cannot tell them apart). ONNX Runtime, not torch, for int8 on the CPU: its dynamic
    quantization is maintained and fast, while torch.ao.quantization is deprecated and torchao's int8
    path needs torch.compile (20-50 s per input shape here) to beat fp32."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def eval(self) -> OnnxRuntimeClassifier:
        return self

    def __call__(self, input_ids, attention_mask, token_type_ids) -> ClassifierOutput:
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy(),
                 "token_type_ids": token_type_ids.numpy()}
        return ClassifierOutput(None, torch.from_numpy(self.session.run(["logits"], feeds)[0]))


@contextlib.contextmanager
def _quiet():
    """The exporter and the quantizer report every step (hundreds of lines, on the root logger and as
    warnings); a user sees minibert's one line instead."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids, attention_mask, token_type_ids).logits


def int8_model(model) -> OnnxRuntimeClassifier:
    """`model` quantized to int8: exported with torch.onnx.export, then ONNX Runtime's dynamic quantization
    (int8 weights, activations quantized per batch) of every MatMul. The quantized file is kept in the
    cache, named by the model's config and weights, so the export (a minute) happens once per model."""
    try:
        import onnx  # noqa: F401 (torch.onnx.export needs onnx and onnxscript)
        import onnxscript  # noqa: F401
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise ValueError("precision int8 runs the model in ONNX Runtime, which is not installed: "
                         "pip install onnxruntime onnx onnxscript (or minibert[int8]); or use fp32/bf16") from None
    digest = hashlib.sha256(json.dumps(model.config.to_hf_dict(), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    folder = assets.cache_dir() / "int8" / digest.hexdigest()[:20]
    target = folder / "model.int8.onnx"
    if not target.is_file():
        logger.info("minibert: exporting the model to ONNX and quantizing it to int8 (once; kept in %s)", folder)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as work, _quiet():
            fp32 = Path(work) / "model.onnx"
            ids = torch.tensor([[2, 5, 6, 7, 8, 3], [2, 9, 10, 3, 0, 0]])  # a padded row: the export keeps the mask path
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=model.config.max_position_embeddings)
            torch.onnx.export(_Logits(model.cpu().eval()), (ids, (ids != 0).long(), torch.zeros_like(ids)), fp32,
                              input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["logits"],
                              dynamo=True, dynamic_shapes=({0: batch, 1: seq},) * 3, external_data=False, verbose=False)
            quantize_dynamic(fp32, Path(work) / "model.int8.onnx", op_types_to_quantize=["MatMul"],
                             weight_type=QuantType.QInt8)
            os.replace(Path(work) / "model.int8.onnx", target)
    return OnnxRuntimeClassifier(target, torch.get_num_threads())
