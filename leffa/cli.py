"""The ``leffa`` command.

``leffa fit|validate|test|predict --config ...`` is Lightning's CLI over :class:`LeffaModule` and
:class:`LeffaDataModule`; ``leffa eval ...`` computes the paper's metrics on image folders.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

EXTRA_COMMANDS = {
    "eval": "leffa.evaluate:eval_main",
}


class LeffaCLI(LightningCLI):
    """LightningCLI with the project's model and data module; the resolved config is saved per run."""


def _run_extra(command: str, argv: list[str]) -> None:
    module_name, func_name = EXTRA_COMMANDS[command].split(":")
    module = __import__(module_name, fromlist=[func_name])
    getattr(module, func_name)(argv)


def cli_main(args: list[str] | None = None) -> None:
    """Entry point of the ``leffa`` console script; ``args`` defaults to ``sys.argv[1:]``.

    Returns nothing: the console script exits 0 on success and non-zero on an exception.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in EXTRA_COMMANDS:
        _run_extra(argv[0], argv[1:])
        return
    from leffa.data import LeffaDataModule
    from leffa.module import LeffaModule

    LeffaCLI(
        LeffaModule,
        LeffaDataModule,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"fit": {"default_env": False}},
        args=argv,
    )


if __name__ == "__main__":
    cli_main()
