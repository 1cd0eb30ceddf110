"""Lightning's CLI as the ``leffa fit|validate|test|predict`` commands use it: the argument parser
(one error line instead of the usage, the nearest option named), :class:`LeffaCLI` (the config as
given on resume, SIGTERM as exit status 143, the checkpoint checked before the Trainer reads it),
the run's config saved beside its logs, and configs that extend others (``base:``).

``leffa.cli`` dispatches to it; ``leffa.cache_latents`` reuses its parser for a stage's config.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import warnings
from pathlib import Path

import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from leffa.atomic_write import write_atomically
from leffa.callbacks import ImageWriter
from leffa.checkpoints import check_checkpoint
from leffa.errors import DEBUG_ENV, UserError

__all__ = ["LeffaCLI", "LeffaArgumentParser", "RunConfigSaver", "build_cli", "expand_bases", "sigterm_report",
           "SIGTERM_STATUS"]

#: the exit status of a stage stopped by SIGTERM: a process killed by it (128 + 15)
SIGTERM_STATUS = 143


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


class LeffaArgumentParser(LightningArgumentParser):
    """A parsing error is one line, ``error: <message>`` (with the nearest option for a mistyped
    one), exit status 2; the usage is under ``--help`` (``LEFFA_DEBUG=1``: jsonargparse's own report)."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        words = parser.prog.replace(" [options]", "").split()
        command = f"leffa {words[-1]}" if len(words) > 1 else "leffa"
        line = _plain_union_error(" ".join(str(message).split()))
        near = _nearest_options(parser, line)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        sys.stderr.write(f"error: {line}{hint}; `{command} --help` lists the options\n")
        self.exit(2)


def _plain_union_error(line: str) -> str:
    """jsonargparse's report for a ``class_path`` whose ``init_args`` do not parse, through a union of
    types (``model.architecture``: a short name or a class path), in a few words, e.g.
    ``model.architecture: leffa.architectures.ConcatUNet does not take num_registers``."""
    found = re.search(r"Parser key \"([^\"]+)\": Does not validate against any of the Union subtypes.*"
                      r"expects a function or a callable class: (.*?) Got value: Namespace\(class_path='([^']+)'", line)
    if not found:
        return line
    key, reason, class_path = found.groups()
    option = re.fullmatch(r"Option '([^']+)' is not accepted\.", reason)
    if option:
        return f"{key}: {class_path} does not take {option.group(1)}"
    value = re.fullmatch(r"Parser key \"([^\"]+)\": (.*?)\.? Got value: (.*?)\.?", reason)
    if value:
        return f"{key}.init_args.{value.group(1)} of {class_path}: {value.group(2)}, got {value.group(3)}"
    return f"{key}: {class_path}: {reason}"


def _nearest_options(parser, message: str) -> list[str]:
    """For an unrecognized ``--option``, the parser's option spelt most like it."""
    if "unrecognized arguments" not in message and "does not accept option" not in message:
        return []
    options = [o for o in getattr(parser, "_option_string_actions", {}) if o.startswith("--")]
    given = [w.strip("'\",") for w in message.split()]
    given = ["--" + w.lstrip("-").split("=", 1)[0] for w in given if w.startswith("--") or w.startswith("model.")
             or w.startswith("data.") or w.startswith("trainer.")]
    return [m for w in given for m in difflib.get_close_matches(w, options, n=1, cutoff=0.8) if m != w]


class LeffaCLI(LightningCLI):
    """LightningCLI with the project's model and data module; the resolved config is saved per run.

    Two departures from LightningCLI: a ``--ckpt_path`` never replaces the config's model settings
    by the checkpoint's (LightningCLI's ``_parse_ckpt_path`` does, which silently dropped settings
    given on the command line); the module compares them when the checkpoint is loaded and refuses
    differences in one line (``LeffaModule.check_resume_settings``). And a stage stopped by SIGTERM
    exits with status 143 and a line saying where it stopped, not 0.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--base", type=list[str] | str | None, default=None,
                            help="config files this config extends (applied before it, in order)")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # check the checkpoint before anything reads it
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path"):
            check_checkpoint(self.config[subcommand].ckpt_path)

    def _parse_ckpt_path(self) -> None:
        """Leave the config as given: the checkpoint's settings are compared, not merged (class docstring)."""

    def before_instantiate_classes(self) -> None:
        """Check the data the stage reads before the model is built (``LeffaDataModule.check_stage``)."""
        from leffa.data import LeffaDataModule

        if self.subcommand:
            data = self.config[self.subcommand].get("data")
            if data is not None:
                LeffaDataModule.check_stage(self.subcommand, data.as_dict() if hasattr(data, "as_dict") else data)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:
            if self.trainer.is_global_zero:
                print(f"error: {sigterm_report(self.trainer, subcommand)}", file=sys.stderr, flush=True)
            raise SystemExit(SIGTERM_STATUS) from None


def sigterm_report(trainer, subcommand: str) -> str:
    """Where a stage stopped by SIGTERM stopped, and, for fit, the checkpoint to resume from."""
    if subcommand != "fit":
        return f"stopped by SIGTERM during {subcommand}; its outputs are incomplete"
    saved = [(c._last_global_step_saved, c.last_model_path or c._last_checkpoint_saved)
             for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    saved = [(step, path) for step, path in saved if path and os.path.exists(path)]
    where = f"stopped by SIGTERM at global step {trainer.global_step}"
    if not saved:
        return f"{where}; no checkpoint was saved by this run, so the next one starts from the beginning"
    step, path = max(saved, key=lambda s: s[0])
    return f"{where}; resume from step {step} with --ckpt_path {path}"


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


def build_cli(args: list[str], cli_class: type[LeffaCLI] = LeffaCLI, parser_kwargs: dict | None = None,
              **kwargs) -> LeffaCLI:
    """``cli_class`` over :class:`leffa.module.LeffaModule` and :class:`leffa.data.LeffaDataModule` as every
    command of the project parses a config: omegaconf interpolation, ``base:`` chains expanded,
    :class:`LeffaArgumentParser`, the optimizer and schedule only where the model names them
    (``model.optimizer``, ``model.lr_schedule``). A config value that does not resolve (an unset
    ``${oc.env:VAR}``) is one line naming its key. ``kwargs`` go to ``cli_class``."""
    from omegaconf.errors import InterpolationResolutionError

    from leffa.data import LeffaDataModule
    from leffa.module import LeffaModule

    # the parsed arguments are these (config bases expanded), not a second set of arguments
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        return cli_class(LeffaModule, LeffaDataModule, auto_configure_optimizers=False,
                         parser_kwargs={"parser_mode": "omegaconf+", **(parser_kwargs or {})},
                         parser_class=LeffaArgumentParser, args=expand_bases(args), **kwargs)
    except InterpolationResolutionError as error:
        message = str(error).splitlines()[0]
        key = str(getattr(error, "full_key", "?"))
        key = key.split(".", 1)[1] if key.split(".", 1)[0] in ("fit", "validate", "test", "predict") else key
        raise UserError(f"{message} (config key {key})") from None
