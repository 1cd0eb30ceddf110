"""Dataset converters: raw VITON-HD, DressCode, DeepFashion or a synthetic set -> WebDataset shards.

Every converter writes the one sample schema of `leffa.schema` (docs/design.md, "Shard schema") through
`leffa.shard_writer`; run them with `python -m data_prep <dataset> --src DIR --out DIR`.
"""
