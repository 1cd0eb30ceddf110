"""LeffaDataModule with Lightning: Trainer.fit/validate/test/predict, LightningCLI schema, config errors."""

import lightning as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from data_prep.synthetic_shards import synthetic_shards
from leffa.data import LeffaDataModule


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    synthetic_shards(root, 8, 40, 30, split="train", shard_size=4)
    synthetic_shards(root, 6, 40, 30, split="test", shard_size=2)
    return str(root)


class DummyModel(L.LightningModule):
    """Consumes the batch contract with a 1x1 convolution."""

    def __init__(self, height: int = 16, width: int = 12):
        super().__init__()
        self.height, self.width = height, width
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.seen = {"train": 0, "val": 0, "test": 0}

    def _loss(self, batch, stage):
        # on_after_batch_transfer has made the float contract out of the uint8 wire batch
        assert batch["tgt"].shape[1:] == (3, self.height, self.width) and batch["tgt"].dtype == torch.float32
        assert batch["mask"].shape[1:] == (1, self.height, self.width) and batch["mask"].dtype == torch.float32
        assert batch["flow"].shape[1:] == (self.height, self.width, 2) and batch["flow"].dtype == torch.float32
        self.seen[stage] += len(batch["key"])
        out = self.conv(batch["ref"])
        loss = ((out - batch["tgt"]) ** 2 * batch["mask"]).mean()
        self.log(f"{stage}/loss", loss, batch_size=len(batch["key"]))
        self.log(f"{stage}/skipped", batch["skipped"].float(), batch_size=len(batch["key"]), reduce_fx="sum")
        return loss

    def training_step(self, batch, batch_idx):
        return self._loss(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._loss(batch, "val")

    def test_step(self, batch, batch_idx):
        self._loss(batch, "test")

    def predict_step(self, batch, batch_idx):
        return batch["key"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(**kw):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **kw})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fit_with_max_steps_and_validation(shards, num_workers):
    dm = LeffaDataModule(
        train_shards=shards,
        val_shards=shards,
        height=16,
        width=12,
        batch_size=2,
        val_batch_size=4,
        num_workers=num_workers,
        shuffle_buffer=4,
    )
    model = DummyModel()
    trainer = _trainer(max_steps=3, val_check_interval=2, check_val_every_n_epoch=None)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 3
    assert model.seen["train"] == 6
    assert model.seen["val"] == 6 + 6  # sanity check (2 batches = all 6 here), then one pass after step 2


def test_fit_without_validation(shards):
    dm = LeffaDataModule(train_shards=shards, height=16, width=12, batch_size=2, num_workers=0)
    trainer = _trainer(max_steps=2, num_sanity_val_steps=0)
    trainer.fit(DummyModel(), datamodule=dm)
    assert trainer.global_step == 2


def test_test_and_predict_read_every_sample_once(shards):
    dm = LeffaDataModule(
        test_shards=shards, predict_shards=shards + "@test", height=16, width=12, batch_size=4, num_workers=0
    )
    model = DummyModel()
    _trainer().test(model, datamodule=dm)
    assert model.seen["test"] == 6
    keys = [k for batch in _trainer().predict(model, datamodule=dm) for k in batch]
    assert keys == [f"synthetic_test_paired_{i:06d}" for i in range(6)]


def test_lightning_cli_builds_the_datamodule_from_config(shards, monkeypatch):
    monkeypatch.setattr("sys.argv", ["leffa"])
    config = {
        "data": {
            "train_shards": [shards, shards],
            "train_weights": [2.0, 1.0],
            "height": 16,
            "width": 12,
            "hflip": True,
        },
    }
    cli = LightningCLI(DummyModel, LeffaDataModule, run=False, args=config, save_config_callback=None)
    assert isinstance(cli.datamodule, LeffaDataModule)
    assert cli.datamodule.hparams.train_weights == [2.0, 1.0]
    assert cli.datamodule.hparams.batch_size == 4 and cli.datamodule.hparams.hflip is True


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"train_shards": ["a", "b"], "train_weights": [1.0]}, "1 entries but train_shards has 2"),
        ({"train_shards": ["a", "b"], "train_weights": [1.0, -1.0]}, ">= 0"),
        ({"train_shards": ["a", "b"], "train_weights": [0.0, 0.0]}, "positive sum"),
        ({"height": 0}, "must be >= 1"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_bad_config_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LeffaDataModule(**kwargs)


def test_setup_errors(tmp_path):
    with pytest.raises(ValueError, match="needs data.train_shards"):
        LeffaDataModule().setup("fit")
    with pytest.raises(ValueError, match="unknown stage 'tune'"):
        LeffaDataModule().setup("tune")
    with pytest.raises(FileNotFoundError, match=r"train-\*\.tar"):
        LeffaDataModule(train_shards=str(tmp_path / "train-*.tar")).setup("fit")


class KeyRecorder(DummyModel):
    """Writes the validation keys each rank saw to ``<out>/val-rank<r>.txt``."""

    def __init__(self, out: str):
        super().__init__()
        self.out = out
        self.val_keys = []

    def validation_step(self, batch, batch_idx):
        self.val_keys += batch["key"]
        self._loss(batch, "val")

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            with open(f"{self.out}/val-rank{self.global_rank}.txt", "a") as f:
                f.write("\n".join(self.val_keys) + "\n")
        self.val_keys = []


@pytest.mark.distributed
def test_ddp_two_ranks_validate_every_sample_once(shards, tmp_path):
    """Real torch.distributed (gloo, 2 CPU processes): ranks come from the process group."""
    dm = LeffaDataModule(
        train_shards=shards, val_shards=shards, height=16, width=12, batch_size=2, num_workers=1, shuffle_buffer=0
    )
    trainer = _trainer(strategy="ddp_fork", devices=2, max_steps=2, val_check_interval=2, check_val_every_n_epoch=None)
    trainer.fit(KeyRecorder(str(tmp_path)), datamodule=dm)
    per_rank = [(tmp_path / f"val-rank{r}.txt").read_text().split() for r in (0, 1)]
    assert all(per_rank)
    everything = per_rank[0] + per_rank[1]
    assert sorted(everything) == [f"synthetic_test_paired_{i:06d}" for i in range(6)]
