"""To-batch stage, and the step from the DataLoader's batch to the model's batch.

The DataLoader yields a compact *wire* batch (what ``Collate`` builds in the worker):

- ``tgt``, ``ref``, ``densepose``: uint8 (B, H, W, 3)
- ``mask``: uint8 (B, H, W) in {0, 1}
- ``flow``: float16 (B, H, W, 2), as stored in the shards
- ``moments``: with cached latents (``data.latents``), ``{image: (mean, std)}`` float32 (B, C, h, w)

``to_model_batch`` turns it into the batch contract (docs/design.md, "Batch contract"), B samples at the
stage's (H, W); ``LeffaDataModule.on_after_batch_transfer`` applies it on the device, so the
model always receives:

- ``tgt``, ``ref``, ``densepose``: float32 (B, 3, H, W) in [-1, 1]
- ``mask``: float32 (B, 1, H, W) in {0, 1}, 1 = generate
- ``flow``: float32 (B, H, W, 2), NaN outside the mask; present only when *every* sample of
  the batch has a flow (a mixed batch has none, rather than a padded one)
- ``moments``: as above (cached VAE posterior moments, ``leffa.data.latents``), when every sample
  has them; the module then skips the VAE for those images
- ``key``: list[str] of length B
- ``skipped``: int64 scalar, corrupt samples this batch's worker skipped since its previous
  batch (sum it over batches for a total)

Code that iterates a dataloader outside a Trainer calls ``to_model_batch`` itself.
"""

import torch

from leffa.data.skips import SkipCounter
from leffa.data.transforms import IMAGE_KEYS


class Collate:
    """Collation function for ``webdataset.batched``; reads and resets the worker's skip count."""

    def __init__(self, counter: SkipCounter):
        self.counter = counter

    def __call__(self, samples: list[dict]) -> dict:
        """Args: samples: outputs of ``transforms.resize_sample`` (and ``hflip_sample``)."""
        batch = {key: torch.stack([s[key] for s in samples]) for key in (*IMAGE_KEYS, "mask")}
        batch["key"] = [s["key"] for s in samples]
        if all("flow" in s for s in samples):
            batch["flow"] = torch.stack([s["flow"] for s in samples])
        if samples and all("moments" in s for s in samples):
            batch["moments"] = {image: tuple(torch.stack([s["moments"][image][i] for s in samples]) for i in range(2))
                                for image in samples[0]["moments"]}
        batch["skipped"] = torch.tensor(self.counter.take(), dtype=torch.long)
        return batch


def to_model_batch(batch: dict) -> dict:
    """Wire batch -> batch contract (see module docstring); a contract batch passes unchanged."""
    out = dict(batch)
    for key in IMAGE_KEYS:
        if batch[key].dtype == torch.uint8:
            # (B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]
            out[key] = batch[key].permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()
    if batch["mask"].dtype == torch.uint8:
        out["mask"] = batch["mask"][:, None].float()  # (B, H, W) -> (B, 1, H, W)
    if "flow" in batch:
        out["flow"] = batch["flow"].float()
    return out
