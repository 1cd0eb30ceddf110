"""`leffa fit` arguments for short runs of the tiny config (configs/tiny_synthetic.yaml) in tests."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_synthetic.yaml"


def fit_args(shards, root, steps=4):
    return [
        "fit", "--config", str(CONFIG),
        f"--trainer.max_steps={steps}", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
        f"--data.train_shards={shards}", f"--data.val_shards={shards}",
        "--data.height=64", "--data.width=48", "--data.batch_size=2", "--data.num_workers=0",
    ]
