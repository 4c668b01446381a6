"""Typed options: jsonargparse parsers built from signatures and dataclasses, and their errors in one line.

A subcommand's parser (:func:`command_parser`) takes ``--config FILE.yaml`` and ``--print_config``,
the command function's own parameters and the fields of its settings dataclasses
(:class:`Fields`), with the types, defaults and docstrings written there, once. Booleans are flags
(``--quiet``, ``--no_quiet``); the lists of :data:`COMMA_LISTS` also take one comma-separated
string. A bad command line is one line on stderr that names the option as typed
(:func:`plain_error`) and exit code 2.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, fields
from typing import get_type_hints

import docstring_parser
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace

from vtrans.errors import ConfigError

COMMA_LISTS: dict[str, type] = {"estimators": str, "seeds": int}
"""List fields that also take one comma-separated string: ``--estimators msp,entropy``, ``--seeds 0,1,2``."""


def comma_list(name: str, value: list | str | int | None, item: type = str) -> list | None:
    """A list option's value as a list: ``"msp,entropy"`` -> ``["msp", "entropy"]``, ``0`` -> ``[0]``
    (``None``, the default of some, stays ``None``)."""
    if value is None or isinstance(value, list):
        return value
    if not isinstance(value, str):
        return [value]
    parts = [part.strip() for part in value.split(",") if part.strip()]
    try:
        return [item(part) for part in parts]
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated {item.__name__} values, got {value!r}") from None


def described(obj: Callable | type, name: str) -> str:
    """A parameter's or field's description in the docstring of ``obj`` (a function, or a
    dataclass and its parents: their ``Attributes:``)."""
    for source in getattr(obj, "__mro__", (obj,)):
        for param in docstring_parser.parse(source.__doc__ or "").params:
            if param.arg_name == name:
                return param.description or ""
    return ""


def field_default(cls: type, name: str):
    """The default a dataclass gives one of its fields."""
    field = next(f for f in fields(cls) if f.name == name)
    return field.default_factory() if field.default is MISSING else field.default


def add_flag(target, name: str, default: bool, help: str) -> None:
    """A boolean option as a flag: ``--quiet`` alone is true (and never takes the prompt after it as
    its value), ``--no_quiet`` false; a config file says ``quiet: true``."""
    target.add_argument(f"--{name}", action=ActionYesNo, default=default, help=help)


@dataclass(frozen=True)
class Fields:
    """The fields of a settings dataclass that a command takes as top-level options.

    The dataclass is named by its import path and imported when a parser is built or read: a
    subcommand imports only its own settings' module (``vtrans score`` does not import
    ``vtrans.evaluation.crossval``, and so not Lightning).
    """

    path: str
    title: str
    skip: frozenset[str] = frozenset()

    @property
    def cls(self) -> type:
        module, name = self.path.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)

    @property
    def names(self) -> list[str]:
        return [f.name for f in fields(self.cls) if f.name not in self.skip]

    def add_to(self, parser: ArgumentParser) -> None:
        """jsonargparse adds each field with its type, default and docstring; booleans become flags
        and the lists of :data:`COMMA_LISTS` also take a comma-separated string."""
        hints = get_type_hints(self.cls)
        special = [name for name in self.names if hints[name] is bool or name in COMMA_LISTS]
        parser.add_class_arguments(self.cls, skip=set(self.skip) | set(special), help=f"{self.title} ({self.path})")
        group = parser.groups.get(self.cls.__name__, parser)
        for name in special:
            default, help = field_default(self.cls, name), described(self.cls, name)
            if hints[name] is bool:
                add_flag(group, name, default, help)
                continue
            item = COMMA_LISTS[name]
            group.add_argument(
                f"--{name}",
                type=list[item] | item | str,
                default=default,
                help=f"{help.rstrip('.')}; a list, or one comma-separated string.",
            )

    def values(self, args: Namespace) -> dict:
        """The parsed values of these fields, lists as lists."""
        values = {name: args[name] for name in self.names}
        for name, item in COMMA_LISTS.items():
            if name in values:
                values[name] = comma_list(name, values[name], item)
        return values

    def build(self, args: Namespace, **more):
        """The settings dataclass from the parsed values (and ``more`` fields)."""
        return self.cls(**self.values(args), **more)


class Parser(ArgumentParser):
    """jsonargparse's parser, whose errors are one line (:func:`plain_error`) and a pointer to
    ``--help``, not the whole usage. ``subcommands``: the names of the subcommands of the top
    parser (``vtrans``), whose missing options it reports."""

    def __init__(self, *args, subcommands: Iterable[str] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.subcommands = frozenset(subcommands)

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            super().error(message, ex)  # raises, for the parser of a subcommand
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sub = re.search(r"required: (\w+)\.", message)  # a subcommand's missing option is reported by the top parser
        if sub and sub.group(1) in self.subcommands and not prog.endswith(sub.group(1)):
            prog = f"{prog} {sub.group(1)}"
        print(f"error: {plain_error(message)} (see: {prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _option(key: str) -> str:
    """A parser key as the user types it: ``evaluate.out`` -> ``--out``."""
    return "--" + key.strip().split(".")[-1]


def _type_name(text: str) -> str:
    """``<class 'int'>`` -> ``int``, ``<class 'NoneType'>`` -> ``null``, ``typing.Literal['a', 'b']`` -> ``one of a, b``."""
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", text.strip())
    if literal:
        return "one of " + ", ".join(v.strip().strip("'\"") for v in literal.group(1).split(","))
    name = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text.strip())
    return "null" if name == "NoneType" else name


def plain_error(message: str) -> str:
    """jsonargparse's message for a bad command line, as one line that names the option as typed.

    ``the following arguments are required: evaluate.out`` -> ``--out is required``;
    ``Parser key "split": Expected a typing.Literal[...]. Got value: bogus`` ->
    ``--split: expected one of train, val, test, all; got 'bogus'``.
    """
    message = message.strip()
    required = re.match(r"the following arguments are required: (.*)", message)
    if required:
        names = [_option(k) for k in required.group(1).split(",")]
        return f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} required"
    keyed = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
    if not keyed:
        return " ".join(message.split())
    option, detail = _option(keyed.group(1)), keyed.group(2)
    expected = re.match(r"Expected a (.*?)\. Got value: (.*)", detail)
    if expected:
        return f"{option}: expected {_type_name(expected.group(1))}, got {expected.group(2).strip()!r}"
    union = re.search(r"Subtypes: \[(.*?)\].*Given value: (.*)", detail, re.S)
    if union:
        types = " or ".join(_type_name(t) for t in re.findall(r"<class '[\w.]+'>|typing\.Literal\[[^\]]*\]", union.group(1)))
        return f"{option}: expected {types}, got {union.group(2).strip()!r}"
    return f"{option}: {' '.join(detail.split())}"


def command_parser(command: Callable, *settings: Fields, skip: set[str] = frozenset()) -> Parser:
    """A subcommand's parser: ``--config``/``--print_config``, the command's own options, then its settings'."""
    doc = docstring_parser.parse(command.__doc__ or "")
    parser = Parser(description="\n\n".join(filter(None, [doc.short_description, doc.long_description])))
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options (--print_config writes one)")
    settings_classes = {group.cls.__name__: group.cls for group in settings}  # imported on demand, not globals here
    flags = [name for name, hint in get_type_hints(command, localns=settings_classes).items() if hint is bool]
    parser.add_function_arguments(command, as_group=False, skip={"settings", *skip, *flags})
    for name in flags:
        add_flag(parser, name, inspect.signature(command).parameters[name].default, described(command, name))
    for group in settings:
        group.add_to(parser)
    return parser
