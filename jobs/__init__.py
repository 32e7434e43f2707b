"""Ray job entry points (``python -m jobs.<stage>``): each takes the options of its ``oclear``
command, declared once, in the command (``add_options``)."""

from __future__ import annotations

import argparse
import inspect
import types
import typing
from typing import NamedTuple

#: command options no job takes: a job runs on the Ray that ``ray job submit`` gives it and
#: records no MLflow run
NOT_FOR_JOBS = ("address", "tracking_uri")


def parser(command: str, doc: str) -> argparse.ArgumentParser:
    """A job's parser: described by the first line of ``doc``, with the options of ``oclear
    COMMAND`` but those in ``NOT_FOR_JOBS``."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_options(p, command, leave_out=NOT_FOR_JOBS)
    return p


def add_options(p: argparse.ArgumentParser, command: str, only=None, leave_out=()) -> None:
    """Give ``p`` the parameters of ``oclear COMMAND`` (those in ``only``, if given), each as
    the command declares it: its flags, help and default, and its type (a bool is a flag, a
    list is repeatable). Each lands under the command's parameter name (``args.set_``)."""
    for name, param in _declared(command).items():
        if name in leave_out or (only is not None and name not in only):
            continue
        if not param.flags:
            p.add_argument(name, type=param.type, help=param.help)
            continue
        args = dict(dest=name, help=param.help, default=param.default)
        on, _, off = param.flags[0].partition("/")
        if param.type is bool:
            p.add_argument(on, *param.flags[1:], action="store_true", **args)
            if off:
                p.add_argument(off, dest=name, action="store_false", help=f"not {on}")
        elif typing.get_origin(param.type) is list:
            [item] = typing.get_args(param.type)
            p.add_argument(*param.flags, action="append", type=item, metavar=param.metavar, **args)
        else:
            p.add_argument(
                *param.flags,
                type=param.type,
                required=param.required,
                metavar=param.metavar,
                **args,
            )


class _Param(NamedTuple):
    """A command parameter as argparse wants it: no flags for a positional."""

    type: type
    flags: tuple[str, ...]
    help: str
    default: object
    required: bool
    metavar: str | None


def _declared(command: str) -> dict[str, _Param]:
    """The parameters of ``oclear COMMAND``, read from its function's signature (typer's
    ``Option`` / ``Argument`` defaults, or ``Annotated`` aliases of them)."""
    import typer

    from oclear_ray.cli import app

    [callback] = [
        c.callback for c in app.registered_commands if (c.name or c.callback.__name__) == command
    ]
    out = {}
    for name, param in inspect.signature(callback, eval_str=True).parameters.items():
        kind, default = param.annotation, param.default
        if kind is typer.Context:
            continue
        if typing.get_origin(kind) is typing.Annotated:  # Annotated[type, Option(*flags)] = default
            kind, info = typing.get_args(kind)[:2]
            named = () if info.default is ... else (info.default,)
            default = ... if default is param.empty else default
        else:  # name: type = Option(default, *flags)
            info, named, default = default, (), default.default
        flags = (*named, *(info.param_decls or ())) or (f"--{name.replace('_', '-')}",)
        positional = isinstance(info, typer.models.ArgumentInfo)
        out[name] = _Param(
            type=_without_none(kind),
            flags=() if positional else flags,
            help=(info.help or "").replace("%", "%%"),  # argparse formats help with %
            default=None if default is ... else default,
            required=default is ...,
            metavar=None if positional else info.metavar,
        )
    return out


def _without_none(kind):
    """``kind`` less its ``| None``."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(kind) if a is not type(None))
    return kind
