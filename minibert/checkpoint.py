"""Hugging Face checkpoints in and out: reading them, the table of weight names, and saving.

HF's key names are the interchange format for BERT weights, so minibert reads and writes them exactly:
every BERT on the hub loads, and whatever minibert trains loads in transformers. Loading accounts for
every key: each checkpoint key is used or explicitly dropped, each model weight is filled or explicitly
new (a fresh classifier), and every shape is checked. Finding a checkpoint (a directory or a hub id)
is hub.py's; this module builds on model.py and fills its from_pretrained / save_pretrained.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import Tensor

from minibert.atomic_write import atomic_write
from minibert.config import BertConfig
from minibert.hub import WEIGHT_FILES, resolve_model_dir
from minibert.model import CHECKPOINT_IO
from minibert.tokenizer import save_tokenizer

logger = logging.getLogger("minibert")

# ----------------------------------------------------------------------------- the key table
#
# HF module name -> minibert module name. "{}" is the layer index. Each entry maps the module's
# parameters (.weight and, where it has one, .bias) under the same suffix. None: HF stores it, minibert
# does not need it. Encoder keys sit under "bert." in HF's task models and at the top level in BertModel.

ENCODER_MODULES = {
    "embeddings.word_embeddings": "embeddings.word",
    "embeddings.position_embeddings": "embeddings.position",
    "embeddings.token_type_embeddings": "embeddings.token_type",
    "embeddings.LayerNorm": "embeddings.norm",
    "embeddings.position_ids": None,  # a buffer older checkpoints saved: minibert computes arange(T)
    "encoder.layer.{}.attention.self.query": "layers.{}.attention.query",
    "encoder.layer.{}.attention.self.key": "layers.{}.attention.key",
    "encoder.layer.{}.attention.self.value": "layers.{}.attention.value",
    "encoder.layer.{}.attention.output.dense": "layers.{}.attention.output",
    "encoder.layer.{}.attention.output.LayerNorm": "layers.{}.attention_norm",
    "encoder.layer.{}.intermediate.dense": "layers.{}.feed_forward.up",
    "encoder.layer.{}.output.dense": "layers.{}.feed_forward.down",
    "encoder.layer.{}.output.LayerNorm": "layers.{}.feed_forward_norm",
    "pooler.dense": "pooler.dense",
}

HEAD_MODULES = {
    "cls.predictions.transform.dense": "mlm_head.dense",
    "cls.predictions.transform.LayerNorm": "mlm_head.norm",
    "cls.predictions": "mlm_head",  # cls.predictions.bias, the decoder's own bias
    "cls.predictions.decoder": None,  # weight tied to the word embeddings, bias the same tensor as cls.predictions.bias
    "cls.seq_relationship": "nsp_head",
    "classifier": "classifier",
}

# minibert weights that are another weight under a second name: the MLM decoder is the embedding matrix,
# bert.embeddings.word.weight. They are neither loaded nor saved; the weight they share is.
TIED_KEYS = ("mlm_head.word_embeddings.weight",)

# Weights a task model may create when its checkpoint lacks them: a new head, or the pooler of a
# checkpoint saved without one. Anything else missing means the checkpoint is not what it claims to be.
NEW_ALLOWED = ("classifier.", "mlm_head.", "nsp_head.", "bert.pooler.", "pooler.")
REINIT_ALLOWED = ("classifier.",)
# Weights a model keeps in a file of its own beside model.safetensors, because transformers has no place for
# them: the CRF's transition scores (crf.safetensors, minibert/crf.py). This table neither saves nor loads them.
SAVED_APART = ("crf.",)

LEGACY_SUFFIXES = {"gamma": "weight", "beta": "bias"}  # TF-era LayerNorm names in old pytorch_model.bin files


def _compile(table: dict[str, str | None]) -> list[tuple[re.Pattern, str | None]]:
    # A dropped entry (None) may name a whole tensor (embeddings.position_ids), so its suffix is optional.
    suffix = {True: r"(?:\.(\w+))?", False: r"\.(\w+)"}
    return [(re.compile(re.escape(hf).replace(r"\{\}", r"(\d+)") + suffix[mb is None]), mb) for hf, mb in table.items()]


_ENCODER = _compile(ENCODER_MODULES)
_HEADS = _compile(HEAD_MODULES)
_NOT_MAPPED = object()


def _lookup(patterns, key: str):
    for pattern, target in patterns:
        m = pattern.fullmatch(key)
        if m:
            *layer, suffix = m.groups()
            suffix = LEGACY_SUFFIXES.get(suffix, suffix)
            return None if target is None else f"{target.replace('{}', layer[0]) if layer else target}.{suffix}"
    return _NOT_MAPPED


def hf_to_minibert_key(hf_key: str, encoder_prefix: str):
    """HF key -> minibert key (None: dropped on purpose; _NOT_MAPPED: unknown). encoder_prefix is
    "bert." for task models, "" for BertModel."""
    body = hf_key[len("bert."):] if hf_key.startswith("bert.") else hf_key
    target = _lookup(_ENCODER, body)
    if target is not _NOT_MAPPED:
        return None if target is None else encoder_prefix + target
    return _lookup(_HEADS, hf_key)


def minibert_to_hf_key(key: str, encoder_prefix: str) -> str | None:
    """The inverse, for saving: minibert key -> HF key, None for tied duplicates."""
    if key in TIED_KEYS:
        return None
    module, suffix = key.rsplit(".", 1)
    if module.startswith(encoder_prefix) and not module.startswith(("mlm_head", "nsp_head", "classifier")):
        body = module[len(encoder_prefix):]
        for hf, mb in ENCODER_MODULES.items():
            if mb is None:
                continue
            m = re.fullmatch(re.escape(mb).replace(r"\{\}", r"(\d+)"), body)
            if m:
                return ("bert." if encoder_prefix else "") + hf.replace("{}", m.group(1) if m.groups() else "") + "." + suffix
    for hf, mb in HEAD_MODULES.items():
        if mb == module:
            return f"{hf}.{suffix}"
    raise KeyError(f"minibert weight {key!r} has no Hugging Face name: add it to the table in checkpoint.py")


# ----------------------------------------------------------------------------- reading weights


def _load_file(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} lacks {path.name}, a part of its sharded weights: download or copy every "
                                "file the index (*.index.json) names")
    with open(path, "rb") as f:
        if f.read(40).startswith(b"version https://git-lfs"):
            raise ValueError(f"{path} is a Git LFS pointer, not the weights: fetch them (`git lfs pull` in that clone)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        # weights_only: a checkpoint is data; never run the code a pickle may carry.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"cannot read weights from {path} ({reason}): the file is damaged or truncated "
            "(an interrupted download or save?), or not a plain tensor file; download or save it again"
        ) from None


def read_state_dict(directory: Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory: safetensors (single or sharded) first, then pytorch_model.bin."""
    for filename in WEIGHT_FILES:
        path = directory / filename
        if not path.is_file():
            continue
        if filename.endswith(".index.json"):
            state = {}
            for shard in sorted(set(json.loads(path.read_text())["weight_map"].values())):
                state.update(_load_file(directory / shard))
            return state
        return _load_file(path)
    raise FileNotFoundError(f"{directory} holds no weights: expected one of {', '.join(WEIGHT_FILES)}")


def weight_names(directory: Path) -> set[str]:
    """The tensor names of a checkpoint, read without loading the tensors where the format allows it
    (empty when the weights cannot be read: loading them says why)."""
    for filename in WEIGHT_FILES:
        path = directory / filename
        if not path.is_file():
            continue
        try:
            if filename.endswith(".index.json"):
                return set(json.loads(path.read_text())["weight_map"])
            if filename.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(str(path), "pt") as f:
                    return set(f.keys())
            return set(read_state_dict(directory))
        except Exception:
            return set()
    return set()


# ----------------------------------------------------------------------------- loading into a model


def _short(keys) -> str:
    """A one-line summary: every key when there are few, else each module once with its count."""
    keys = sorted(keys)
    if len(keys) <= 6:
        return ", ".join(keys)
    modules: dict[str, int] = {}
    for key in keys:
        module = re.sub(r"\.\d+\.", ".*.", key.rsplit(".", 1)[0])
        modules[module] = modules.get(module, 0) + 1
    return ", ".join(f"{m}.* ({n})" for m, n in modules.items())


def load_pretrained(cls, name_or_path, *, reinit_head: bool = False, verbose: bool = True, **config_overrides):
    directory = resolve_model_dir(name_or_path)
    config = BertConfig.from_json_file(directory / "config.json", **config_overrides)
    source = read_state_dict(directory)
    model = cls(config)
    encoder_prefix = "bert." if hasattr(model, "bert") else ""  # task models hold the encoder as .bert
    target = {k: v for k, v in model.state_dict().items() if k not in TIED_KEYS and not k.startswith(SAVED_APART)}

    loaded, dropped, unknown, reinitialised, encoder_misfits = {}, [], [], [], []
    for hf_key, tensor in source.items():
        key = hf_to_minibert_key(hf_key, encoder_prefix)
        if key is _NOT_MAPPED:
            unknown.append(hf_key)
        elif key is not None and key not in target and not key.startswith(NEW_ALLOWED):
            if "num_hidden_layers" in config_overrides and re.search(r"(^|\.)layers\.\d+\.", key):
                dropped.append(hf_key)  # the layers above a model asked to keep fewer of them
            else:
                encoder_misfits.append(hf_key)  # an encoder weight this model has no place for
        elif key is None or key not in target:
            dropped.append(hf_key)  # tied or buffer keys, or another model's head (cls.* in a classifier)
        elif reinit_head and key.startswith(REINIT_ALLOWED):
            reinitialised.append(key)  # whatever its shape: the same number of labels may mean other labels
        elif tensor.shape != target[key].shape:
            if key.startswith("classifier."):
                old = int(tensor.shape[0])
                raise ValueError(
                    f"the checkpoint's classifier has {old} outputs but the model asks for {config.num_labels}: "
                    "re-initialise the head (reinit_head=True, --reinit-head) to train a new one, or keep its labels"
                )
            else:
                raise ValueError(
                    f"weight {hf_key} has shape {tuple(tensor.shape)} in the checkpoint but {tuple(target[key].shape)} "
                    "in the model: the config does not match the weights (do not override sizes of a pretrained model)"
                )
        else:
            loaded[key] = tensor
    decoder = source.get("cls.predictions.decoder.weight")
    words = next((t for k, t in source.items() if k.endswith("embeddings.word_embeddings.weight")), None)
    if "mlm_head.dense.weight" in target and decoder is not None and words is not None and not torch.equal(decoder, words):
        raise ValueError(
            f"{directory} has an MLM decoder of its own (tie_word_embeddings false), but minibert's MLM head reuses "
            "the word embeddings, as BERT does: pretrain from its encoder with a new head (copy the checkpoint without "
            "its cls.* weights), or fine-tune it, which does not use the decoder"
        )
    if encoder_misfits:
        raise ValueError(
            f"{directory} has encoder weights the model built from its config.json has no place for "
            f"({_short(encoder_misfits)}): the config does not describe these weights (do not override sizes)"
        )
    if unknown:
        raise ValueError(
            f"{directory} has weights minibert does not know ({_short(unknown)}): it is not a plain BERT "
            "checkpoint, or it uses a variant minibert does not implement"
        )
    missing = set(target) - set(loaded)
    not_allowed = sorted(k for k in missing if not k.startswith(NEW_ALLOWED))
    if not_allowed:
        raise ValueError(f"{directory} lacks weights the model needs ({_short(not_allowed)}): the checkpoint is incomplete")
    model.load_state_dict(loaded, strict=False)  # the missing ones keep their fresh BERT initialisation
    if verbose:
        if missing:
            logger.warning("minibert: newly initialised (train them before use): %s", _short(missing))
        real_drops = [k for k in dropped if not k.endswith(("position_ids", "decoder.weight", "decoder.bias"))]
        if real_drops:
            logger.warning("minibert: checkpoint weights not used by %s: %s", cls.__name__, _short(real_drops))
    model.new_keys = sorted(missing)  # for callers (and tests) that want to know what was created
    return model


# ----------------------------------------------------------------------------- saving


def save_pretrained(model, directory, tokenizer=None) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    encoder_prefix = "bert." if hasattr(model, "bert") else ""
    tensors = {}
    for key, tensor in model.state_dict().items():
        if key.startswith(SAVED_APART):
            continue
        hf_key = minibert_to_hf_key(key, encoder_prefix)
        if hf_key is not None:
            tensors[hf_key] = tensor.detach().to("cpu").contiguous()
    config = model.config
    more = {"architectures": [type(model).__name__]}
    # A config read from a float16 checkpoint says so; these weights are what the model holds now (fp32 after
    # training), and transformers loads a model in the dtype its config names.
    saved_dtype = str(next(t for t in tensors.values() if t.is_floating_point()).dtype).removeprefix("torch.")
    more.update({key: saved_dtype for key in ("torch_dtype", "dtype") if key in config.extra})
    if hasattr(model, "classifier") and config.id2label is None:
        config = config.replace(id2label={i: f"LABEL_{i}" for i in range(config.num_labels)})
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory, model_max_length=config.max_position_embeddings)
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(directory / "config.json", lambda tmp: config.to_json_file(tmp, **more))


# BertModel.from_pretrained / .save_pretrained call these (model.py explains why through this table).
CHECKPOINT_IO.update(load=load_pretrained, save=save_pretrained)
