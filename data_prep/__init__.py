"""Dataset converters: raw VITON-HD, DressCode, DeepFashion or a synthetic set -> WebDataset shards.

Every converter writes the one sample schema of DESIGN.md ("Sample schema") through
`data_prep.shard_writer`; run them with `python -m data_prep <dataset> --src DIR --out DIR`.
"""
