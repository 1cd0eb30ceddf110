"""The ``leffa`` command.

``leffa fit|validate|test|predict --config ...`` is Lightning's CLI over :class:`LeffaModule` and
:class:`LeffaDataModule`; ``leffa eval ...`` computes the paper's metrics on image folders; ``leffa visualize ...`` draws
attention-flow pictures of a checkpoint; ``leffa export ...`` writes a checkpoint as a
diffusers-style folder.

Configs are read in jsonargparse's ``omegaconf`` mode, so a value can name an environment variable
(``${oc.env:LEFFA_RUNS,runs}``: with a default; ``${oc.env:LEFFA_SD15}``: required). A config file
may list the files it extends under ``base:``; they are applied first, in order, and the file's
own values win. Relative paths resolve against the file that holds them.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import yaml
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from leffa.atomic_write import write_atomically
from leffa.callbacks import ImageWriter
from leffa.checkpoints import check_checkpoint
from leffa.errors import UserError, user_errors_as_one_line

DESCRIPTION = (
    "leffa: training, sampling and evaluation for Leffa (learning flow fields in attention) person image "
    "generation. fit, validate, test and predict are Lightning's, with the project's model and data; "
    "also: `leffa eval` (FID, KID, SSIM, LPIPS on image folders), `leffa export` (a checkpoint as a "
    "diffusers-style folder or in the released .pth layout) and `leffa visualize` (attention-flow "
    "pictures of a checkpoint). `leffa <command> --help` for each."
)
EXTRA_COMMANDS = {
    "eval": "leffa.evaluate:eval_main",
    "visualize": "leffa.visualize:visualize_main",
    "export": "leffa.export:export_main",
}


class RunConfigSaver(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml`` in the run's own folder, never over a file.

    The run's folder: for predict, each ``ImageWriter``'s output folder (beside the images); for
    fit, validate and test, the logger's folder (``version_N``), or for fit without a logger its
    ``default_root_dir``. Validate and test without a logger save nothing (they have no folder of
    their own). If that folder already holds a ``config.yaml`` (an earlier run's, or the user's),
    the run stops with one line before it writes anything.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        for folder in self.run_folders(trainer, stage):
            path = folder / self.config_filename
            exists = trainer.strategy.broadcast(path.exists() if trainer.is_global_zero else False)
            if exists:
                raise UserError(f"{path} already exists (an earlier run's or yours) and is not overwritten;"
                                f" choose another folder for this run's outputs or move that file away")
            if trainer.is_global_zero:
                folder.mkdir(parents=True, exist_ok=True)
                text = self.parser.dump(self.config, skip_none=False).encode()
                write_atomically(path, lambda f: f.write(text))
        self.already_saved = True

    @staticmethod
    def run_folders(trainer, stage: str) -> list[Path]:
        """The folders this run owns and saves its config in (see the class docstring)."""
        if stage == "predict":
            return [Path(c.output_dir) for c in trainer.callbacks if isinstance(c, ImageWriter)]
        if trainer.logger is None and stage != "fit":
            return []
        return [Path(trainer.log_dir)]  # trainer.log_dir broadcasts rank 0's folder


class LeffaCLI(LightningCLI):
    """LightningCLI with the project's model and data module; the resolved config is saved per run."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--base", type=list[str] | str | None, default=None,
                            help="config files this config extends (applied before it, in order)")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads a ckpt_path's hyper-parameters right after parsing: check the checkpoint first
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path"):
            check_checkpoint(self.config[subcommand].ckpt_path)


def expand_bases(argv: list[str]) -> list[str]:
    """Replace every ``--config FILE`` whose YAML has a ``base:`` key by its bases, then itself."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            out += [f"--config={p}" for p in _config_chain(Path(argv[i + 1]), ())]
            i += 2
            continue
        if arg.startswith("--config="):
            out += [f"--config={p}" for p in _config_chain(Path(arg.split("=", 1)[1]), ())]
        else:
            out.append(arg)
        i += 1
    return out


def _config_chain(path: Path, seen: tuple[Path, ...]) -> list[Path]:
    if not path.is_file():  # leave the error to the parser (it names the file)
        return [path]
    resolved = path.resolve()
    if resolved in seen:
        raise UserError(f"config base cycle: {' -> '.join(map(str, seen + (resolved,)))}")
    content = yaml.safe_load(path.read_text()) or {}
    bases = content.get("base") if isinstance(content, dict) else None
    chain = []
    for base in [bases] if isinstance(bases, str) else bases or []:
        chain += _config_chain(path.parent / base, seen + (resolved,))
    return chain + [path]


def _run_extra(command: str, argv: list[str]) -> None:
    module_name, func_name = EXTRA_COMMANDS[command].split(":")
    module = __import__(module_name, fromlist=[func_name])
    getattr(module, func_name)(argv)


def cli_main(args: list[str] | None = None) -> None:
    """Entry point of the ``leffa`` console script; ``args`` defaults to ``sys.argv[1:]``.

    Returns nothing: the console script exits 0 on success, 2 with one line on a user error
    (:class:`leffa.errors.UserError`; ``LEFFA_DEBUG=1`` shows its traceback) and non-zero on a bug.
    """
    user_errors_as_one_line(lambda: _main(args), extra=(FileNotFoundError,))


def _main(args: list[str] | None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in EXTRA_COMMANDS:
        _run_extra(argv[0], argv[1:])
        return
    from omegaconf.errors import InterpolationResolutionError

    from leffa.data import LeffaDataModule
    from leffa.module import LeffaModule

    # the parsed arguments are sys.argv's with config bases expanded, not a second set of arguments
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        LeffaCLI(
            LeffaModule,
            LeffaDataModule,
            save_config_callback=RunConfigSaver,
            # one place for the optimizer and schedule: model.optimizer and model.lr_schedule
            auto_configure_optimizers=False,
            parser_kwargs={"parser_mode": "omegaconf+", "description": DESCRIPTION},
            args=expand_bases(argv),
        )
    except InterpolationResolutionError as error:
        # e.g. a required environment variable of the config is not set: one line, not a traceback
        message = str(error).splitlines()[0]
        raise SystemExit(f"error: {message} (config key {getattr(error, 'full_key', '?')})") from None


if __name__ == "__main__":
    cli_main()
