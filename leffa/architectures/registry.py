"""``model.architecture``: from what a config, a checkpoint or Python code gives to the one record the
module keeps (``{"class_path": ..., "init_args": {...}}``, every own argument with its value), and
from the record to the denoiser.

A short name (``dual_unet``, ``concat_unet``) stands for the project's architectures; any other
is a ``class_path`` (a :class:`~leffa.architectures.base.ReferenceDenoiser` subclass anywhere
importable) with its own ``init_args``. Checkpoints written before the architectures took their own
arguments kept the dual UNet's three at the top level (:data:`OLD_DUAL_UNET_ARGS`):
:func:`upgrade_settings` moves them where they are now.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Literal

from leffa.architectures.base import DenoiserSettings, ReferenceDenoiser
from leffa.errors import UserError

__all__ = ["SHORT_NAMES", "ArchitectureName", "OLD_DUAL_UNET_ARGS", "architecture_class", "architecture_record",
           "build_denoiser", "upgrade_settings", "comparable_record"]

#: the project's architectures by short name
SHORT_NAMES = {
    "dual_unet": "leffa.architectures.dual_unet.DualUNet",
    "concat_unet": "leffa.architectures.concat_unet.ConcatUNet",
}
ArchitectureName = Literal["dual_unet", "concat_unet"]
#: ``LeffaModule`` settings of older checkpoints that are now ``DualUNet``'s own arguments
OLD_DUAL_UNET_ARGS = ("num_registers", "freeze_reference_unet", "reference_pretrained_model")


def architecture_class(name: str) -> type[ReferenceDenoiser]:
    """The class of a short name or ``class_path``; one error line for anything else (an unknown
    name, a path that does not import, a class that is not a ``ReferenceDenoiser``). Nothing is
    instantiated before that check, also for a class path read from a checkpoint."""
    path = SHORT_NAMES.get(name, name) if isinstance(name, str) else ""
    module_name, _, attribute = path.rpartition(".")
    if not module_name:
        raise UserError(f"model.architecture: unknown {name!r}; valid: {', '.join(SHORT_NAMES)}, or a class_path")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise UserError(f"model.architecture: cannot import {path} ({error})") from error
    if not (isinstance(found, type) and issubclass(found, ReferenceDenoiser)):
        raise UserError(f"model.architecture: {path} is not a leffa.architectures.ReferenceDenoiser subclass")
    return found


def _class_and_args(spec) -> tuple[type[ReferenceDenoiser], dict]:
    if isinstance(spec, str):
        return architecture_class(spec), {}
    if isinstance(spec, dict):
        extra = set(spec) - {"class_path", "init_args"}
        if "class_path" not in spec or extra:
            raise UserError("model.architecture: give a name or a mapping of class_path and init_args"
                            + (f" (not {', '.join(sorted(map(str, extra)))})" if extra else ""))
        init_args = spec.get("init_args") or {}
        if not isinstance(init_args, dict):
            raise UserError("model.architecture.init_args must be a mapping")
        return architecture_class(spec["class_path"]), dict(init_args)
    if isinstance(spec, functools.partial) and isinstance(spec.func, type) and not spec.args:
        return architecture_class(f"{spec.func.__module__}.{spec.func.__qualname__}"), dict(spec.keywords)
    if isinstance(spec, type):
        return architecture_class(f"{spec.__module__}.{spec.__qualname__}"), {}
    raise UserError("model.architecture: give a name (dual_unet, concat_unet), a mapping of class_path and "
                    "init_args, a ReferenceDenoiser subclass or a functools.partial of one")


def architecture_record(spec) -> dict:
    """``spec`` (a short name, a ``class_path``/``init_args`` mapping, a class or a
    ``functools.partial`` of one) as the record a module and its checkpoints keep: the full class
    path and every own argument (given, else its default). An argument the class does not take,
    or a required one not given, is one error line."""
    cls, given = _class_and_args(spec)
    own = list(inspect.signature(cls).parameters.values())[1:]  # after the DenoiserSettings
    names = [p.name for p in own if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(given) - set(names))
    if unknown:
        takes = ", ".join(names) or "no arguments"
        raise UserError(f"model.architecture.init_args: {cls.__name__} does not take {', '.join(unknown)} "
                        f"(it takes {takes})")
    missing = [p.name for p in own if p.name in names and p.name not in given and p.default is p.empty]
    if missing:
        raise UserError(f"model.architecture.init_args: {cls.__name__} needs {', '.join(missing)}")
    init_args = {p.name: given.get(p.name, p.default) for p in own if p.name in names}
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def build_denoiser(record: dict, settings: DenoiserSettings) -> ReferenceDenoiser:
    """The denoiser of an :func:`architecture_record` with the shared ``settings``."""
    return architecture_class(record["class_path"])(settings, **record["init_args"])


def upgrade_settings(settings: dict) -> dict:
    """A checkpoint's settings as this version reads them (a new dict): the dual UNet's arguments
    that older checkpoints kept at the top level go into ``architecture``'s ``init_args`` (a
    ``concat_unet`` checkpoint held them at their defaults: dropped)."""
    settings = dict(settings)
    old = {k: settings.pop(k) for k in OLD_DUAL_UNET_ARGS if k in settings}
    architecture = settings.get("architecture", "dual_unet")
    if old and architecture == "dual_unet":
        settings["architecture"] = {"class_path": "dual_unet", "init_args": old}
    return settings


def comparable_record(spec, fitting: bool):
    """The part of ``model.architecture`` that two runs must agree on, as a record: for a resume
    (``fitting``) every own argument but the class's ``local_args``, otherwise its ``weight_args``.
    A value that names no importable architecture is compared as it is."""
    try:
        record = architecture_record(spec)
    except UserError:
        return spec
    cls = architecture_class(record["class_path"])
    keep = (lambda k: k not in cls.local_args) if fitting else (lambda k: k in cls.weight_args)
    return {"class_path": record["class_path"], "init_args": {k: v for k, v in record["init_args"].items() if keep(k)}}
