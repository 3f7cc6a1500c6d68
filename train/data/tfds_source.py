"""The `tfds` source: `tfds.data_source(data.tfds_name)`, random access over array_record files.

Works without TensorFlow: `tfds.data_source` reads array_record shards directly. Records stay
on disk; the `data.text_key` feature (bytes or str) is tokenized lazily inside the grain map.
The dataset must already be prepared in array_record format (we pass `download=False`: a
training run should not start a multi-GB download on its own). Prepare it with
`tfds build NAME --file_format=array_record [--data_dir DIR]`.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

from train.config import ConfigError, DataConfig
from train.data.documents import DocSplit
from train.data.tokenizer import Tokenizer

__all__ = ["tfds_split", "TfdsText", "record_text"]


def record_text(record, text_key: str) -> str:
    """The text of feature `text_key` of a tfds record (dict of features)."""
    text = record[text_key]
    if isinstance(text, np.ndarray):  # scalar string tensors may come back as 0-d arrays
        text = text.item()
    if isinstance(text, bytes):  # tfds Text features come back as bytes
        text = text.decode("utf-8", errors="replace")
    return text


class TfdsText:
    """record (dict of features) -> int32 [n] tokens of record[text_key]."""

    def __init__(self, text_key: str, tokenizer: Tokenizer):
        self.text_key = text_key
        self.tokenizer = tokenizer

    def __call__(self, record) -> np.ndarray:
        return self.tokenizer.encode(record_text(record, self.text_key))


def tfds_split(cfg: DataConfig, which: Literal["train", "validation"], tokenizer: Tokenizer) -> DocSplit:
    """The `data.train_split` or `data.eval_split` of `data.tfds_name` as a lazy DocSplit."""
    import tensorflow_datasets as tfds

    field = "train_split" if which == "train" else "eval_split"
    split = getattr(cfg, field)
    name = cfg.tfds_name
    try:
        source = tfds.data_source(name, split=split, data_dir=cfg.tfds_data_dir, download=False)
    except tfds.core.DatasetNotFoundError as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"data.tfds_name={name!r}: {first} (see tfds.list_builders())") from None
    except NotImplementedError as e:  # what tfds raises when there is no array_record copy
        raise ConfigError(
            f"data.tfds_name={name!r} is not prepared as array_record in data.tfds_data_dir="
            f"{cfg.tfds_data_dir!r}; run `tfds build {name} --file_format=array_record` "
            f"({str(e).splitlines()[0]})") from None
    except ValueError as e:  # unknown split name or bad split syntax
        raise ConfigError(f"data.{field}={split!r} does not work for tfds dataset {name!r}: {e}") from None
    if len(source):
        features = source[0]
        if not isinstance(features, dict) or cfg.text_key not in features:
            have = sorted(features) if isinstance(features, dict) else type(features).__name__
            raise ConfigError(f"data.text_key={cfg.text_key!r} is not a feature of tfds dataset {name!r}; "
                              f"it has {have}")
    return DocSplit(f"tfds:{name}", split, source, to_tokens=TfdsText(cfg.text_key, tokenizer))
