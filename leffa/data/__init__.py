"""Streaming data pipeline: WebDataset shards -> decoded, resized, batched tensors."""

from leffa.data.batch import to_model_batch
from leffa.data.datamodule import LeffaDataModule

__all__ = ["LeffaDataModule", "to_model_batch"]
