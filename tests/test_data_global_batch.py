"""The paper's global batch split over devices and gradient accumulation."""

import lightning as L
import pytest
import torch

from data_prep.__main__ import main as data_prep_main
from leffa.data import LeffaDataModule
from leffa.data.global_batch import split_global_batch


@pytest.mark.parametrize("global_batch,world,max_per_device,expected", [
    (256, 32, 8, (8, 1)),     # the paper's stage 1 on 4 nodes x 8 GPUs
    (256, 8, 8, (8, 4)),      # one node: accumulate 4
    (64, 32, 1, (1, 2)),      # stage 2 at 1024 with one sample per GPU
    (256, 8, 6, (4, 8)),      # 6 does not divide 32: fewest steps with a batch that fits
])
def test_split_global_batch(global_batch, world, max_per_device, expected):
    per_device, accumulation = split_global_batch(global_batch, world, max_per_device)
    assert (per_device, accumulation) == expected
    assert per_device * accumulation * world == global_batch


def test_split_global_batch_shows_the_arithmetic():
    with pytest.raises(ValueError, match=r"256 / 24 = 10.67"):
        split_global_batch(256, 24, 8)


class CountingModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.batch_sizes = []

    def training_step(self, batch, batch_idx):
        self.batch_sizes.append(batch["tgt"].shape[0])
        return (self.weight - batch["tgt"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_gets_the_derived_accumulation(tmp_path):
    data_prep_main(["synthetic", "--out", str(tmp_path / "shards"), "--count", "8", "--split", "train",
                    "--height", "32", "--width", "24"])
    data = LeffaDataModule(train_shards=str(tmp_path / "shards"), height=32, width=24, batch_size=3,
                           global_batch_size=4, num_workers=0)
    module = CountingModule()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    # 4 = 2 per device x 2 accumulation steps x 1 device: 2 optimizer steps take 4 batches of 2
    assert trainer.accumulate_grad_batches == 2
    assert module.batch_sizes == [2, 2, 2, 2]
