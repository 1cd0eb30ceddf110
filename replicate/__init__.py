"""The Leffa claim at CPU scale on the synthetic set (`make replicate`, `python replicate/run.py`)."""
