"""The ``leffa`` command.

``leffa fit|validate|test|predict --config ...`` is Lightning's CLI over :class:`LeffaModule` and
:class:`LeffaDataModule`; ``leffa eval ...`` computes the paper's metrics on image folders; ``leffa visualize ...`` draws
attention-flow pictures of a checkpoint; ``leffa export ...`` writes a checkpoint as a
diffusers-style folder; ``leffa cache-latents ...`` runs a stage's frozen VAE once over its shards
(``leffa.cache_latents``).

Configs are read in jsonargparse's ``omegaconf`` mode, so a value can name an environment variable
(``${oc.env:LEFFA_RUNS,runs}``: with a default; ``${oc.env:LEFFA_SD15}``: required). A config file
may list the files it extends under ``base:``; they are applied first, in order, and the file's
own values win. Relative paths resolve against the file that holds them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from leffa.errors import user_errors_as_one_line
from leffa.lightning_cli import RunConfigSaver, build_cli

DESCRIPTION = (
    "leffa: training, sampling and evaluation for Leffa (learning flow fields in attention) person image "
    "generation. fit, validate, test and predict are Lightning's, with the project's model and data; "
    "also: `leffa eval` (FID, KID, SSIM, LPIPS on image folders), `leffa export` (a checkpoint as a "
    "diffusers-style folder or in the released .pth layout), `leffa visualize` (attention-flow "
    "pictures of a checkpoint) and `leffa cache-latents` (a stage's VAE latents computed once, for training "
    "with data.latents). `leffa <command> --help` for each."
)


# The commands that are not Lightning's. Each module is imported only when its command runs, so that
# `leffa --help` and the Lightning stages do not pay for it; only this module imports them.
def _eval(argv: list[str]) -> None:
    from leffa.evaluate import eval_main

    eval_main(argv)


def _visualize(argv: list[str]) -> None:
    from leffa.visualize import visualize_main

    visualize_main(argv)


def _export(argv: list[str]) -> None:
    from leffa.export import export_main

    export_main(argv)


def _cache_latents(argv: list[str]) -> None:
    from leffa.cache_latents import cache_latents_main

    cache_latents_main(argv)


EXTRA_COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "eval": _eval,
    "visualize": _visualize,
    "export": _export,
    "cache-latents": _cache_latents,
}
def cli_main(args: list[str] | None = None) -> None:
    """Entry point of the ``leffa`` console script; ``args`` defaults to ``sys.argv[1:]``.

    Returns nothing: the console script exits 0 on success, 2 with one line on a user error
    (:class:`leffa.errors.UserError`; ``LEFFA_DEBUG=1`` shows its traceback) and non-zero on a bug.
    """
    user_errors_as_one_line(lambda: _main(args), extra=(FileNotFoundError,))


def _main(args: list[str] | None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in EXTRA_COMMANDS:
        EXTRA_COMMANDS[argv[0]](argv[1:])
        return
    build_cli(argv, save_config_callback=RunConfigSaver, parser_kwargs={"description": DESCRIPTION})


if __name__ == "__main__":
    cli_main()
