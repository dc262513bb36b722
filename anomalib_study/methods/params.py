"""The one declaration of an estimator's parameters.

An estimator declares each parameter once, as a :class:`Param` in its class body;
:class:`BaseDetector` (the estimators' base class) turns the declarations into the
``__init__`` (keyword arguments stored under the same names, scikit-learn style),
``get_params`` / ``set_params``, the checks ``_validate_params`` runs, the parameter list
of the class docstring, and :meth:`Param.method_param`, how ``evaluate``, ``detect`` and
the command line offer a parameter (:class:`MethodParam`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from anomalib_study.errors import ParameterError

__all__ = ["PARAM_KINDS", "Param", "MethodParam", "BaseDetector"]

PARAM_KINDS = ("model", "input", "run")


@dataclass(frozen=True)
class Param:
    """The one declaration of an estimator parameter, written in the class body::

        class KNNDetector(BaseDetector):
            k = Param(100, "neighbours averaged", cli=positive_int, check=lambda name, v: check_int(name, v, minimum=1))

    From it come the estimator's ``__init__`` (keyword arguments in declaration order,
    stored under the same names), ``get_params`` / ``set_params``, the check run by
    ``_validate_params``, the command-line flag of ``evaluate`` / ``detect`` / ``cluster``
    (:class:`MethodParam`), the parameter list of a report's ``describe()`` and the
    docstring's parameter list.

    ``default``: the value when none is given; ``help``: one line; ``cli``: how the
    command line reads it (``int``, ``float``, ``str``, ``bool``, a checked reader such as
    :func:`~anomalib_study.checks.positive_int`; None keeps it off the command line);
    ``choices``: the values allowed (checked too); ``check``: ``check(name, value)`` raising
    ParameterError for an impossible value; ``kind``: ``"model"`` (a parameter of the
    fitted model: on the command line and in every report), ``"input"`` (how images become
    features: the backbone, its weights, input size and resize mode, given by ``evaluate``
    / ``detect`` through their own options) or ``"run"`` (where and how fast it runs:
    device, batch size, workers, progress; never stored with a model); ``flag``: another
    command-line flag than ``--<name-with-dashes>``; ``offered=False``: a model parameter
    that ``evaluate`` and the command line do not offer, as the method's evaluation sets it
    itself (anomaly clustering's ``mode``: one per variant compared); ``metavar``: the word
    ``--help`` shows for the value (default: ``N`` for a whole number, else the flag's last
    word, e.g. ``--tau TAU``; a parameter with ``choices`` shows them instead).
    """

    default: Any
    help: str
    cli: Callable[[str], Any] | None = None
    choices: tuple | None = None
    check: Callable[[str, Any], None] | None = None
    kind: str = "model"
    flag: str | None = None
    offered: bool = True
    metavar: str | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in PARAM_KINDS:
            raise ValueError(f"Param kind must be one of {', '.join(PARAM_KINDS)}, got {self.kind!r}")

    def __set_name__(self, owner: type, name: str) -> None:
        object.__setattr__(self, "name", name)

    def validate(self, value: Any) -> None:
        """ParameterError naming the parameter when ``value`` is impossible."""
        if self.choices is not None and value not in self.choices:
            raise ParameterError(f"{self.name} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        if self.check is not None:
            self.check(self.name, value)

    def method_param(self) -> "MethodParam":
        """How ``evaluate``, ``detect`` and the command line offer it."""
        return MethodParam(self.name, self.default, self.help, self.cli, self.choices, self.flag, self.metavar)


def _init_from_declarations(cls: type, declared: dict[str, Param]) -> None:
    """Give ``cls`` an ``__init__`` that stores every declared parameter (keywords, or
    positional in declaration order), with the matching signature."""
    names = list(declared)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(names):
            raise TypeError(f"{cls.__name__}() takes at most {len(names)} positional arguments ({len(args)} given)")
        given = dict(zip(names, args))
        for name, value in kwargs.items():
            if name not in declared:
                raise TypeError(
                    f"{cls.__name__}() got an unexpected keyword argument {name!r}; its parameters: {', '.join(names)}"
                )
            if name in given:
                raise TypeError(f"{cls.__name__}() got multiple values for argument {name!r}")
            given[name] = value
        for name, param in declared.items():
            setattr(self, name, given.get(name, param.default))

    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    parameters += [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=param.default)
        for name, param in declared.items()
    ]
    __init__.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__doc__ = f"Store the declared parameters of {cls.__name__} (see the class docstring)."
    cls.__init__ = __init__  # type: ignore[method-assign]


def _declarations_doc(declared: dict[str, Param]) -> str:
    lines = ["", "    Parameters (declared once, in the class body; ``declared_params()``):"]
    for kind in PARAM_KINDS:
        for name, param in declared.items():
            if param.kind == kind:
                lines.append(f"        {name} ({kind}, default {param.default!r}): {param.help}")
    return "\n".join(lines) + "\n"


class BaseDetector:
    """Shared plumbing: ``__init__``, ``get_params``/``set_params``, parameter checks and
    ``repr`` from the :class:`Param` declarations of the class body (a subclass without
    declarations keeps its own ``__init__``: the parameters are its arguments)."""

    _declared: dict[str, Param] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared: dict[str, Param] = {}
        for klass in reversed(cls.__mro__):
            for name, value in vars(klass).items():
                if isinstance(value, Param):
                    declared.pop(name, None)
                    declared[name] = value
        cls._declared = declared
        if declared:
            if "__init__" in vars(cls):
                raise TypeError(
                    f"{cls.__name__} declares Params and its own __init__: the declarations make the "
                    "__init__; remove it"
                )
            _init_from_declarations(cls, declared)
            cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n" + _declarations_doc(declared)

    @classmethod
    def declared_params(cls, kind: str | None = None) -> dict[str, Param]:
        """name -> :class:`Param`, in declaration order (``kind``: only those of that kind)."""
        return {name: p for name, p in cls._declared.items() if kind is None or p.kind == kind}

    @classmethod
    def _param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return [p.name for p in signature.parameters.values() if p.name != "self" and p.kind != p.VAR_KEYWORD]

    def get_params(self) -> dict[str, Any]:
        """The ``__init__`` arguments, by name (scikit-learn style)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> "BaseDetector":
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                raise ParameterError(f"{type(self).__name__} has no parameter {name!r}; valid: {valid}")
            setattr(self, name, value)
        return self

    def model_params(self) -> dict[str, Any]:
        """The values of the declared model parameters (what a report's ``describe`` lists)."""
        return {name: getattr(self, name) for name in self.declared_params("model")}

    def _check_declared(self) -> None:
        """Each declared parameter's own check (its choices and ``check``); a method's
        ``_validate_params`` calls it first, then checks what involves several parameters."""
        for name, param in self._declared.items():
            param.validate(getattr(self, name))

    def _validate_params(self) -> None:
        self._check_declared()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


@dataclass(frozen=True)
class MethodParam:
    """One parameter of a method, as ``evaluate``, ``detect`` and the command line offer it.

    ``type`` (``int``, ``float``, ``str``, ``bool``) is how the command line reads it
    (``bool``: ``--name`` / ``--no-name``); ``None`` keeps it off the command line (lists,
    objects). ``flag`` overrides the command-line flag (default ``--<name-with-dashes>``);
    ``metavar`` the word ``--help`` shows for its value (None: the command line derives one).
    The estimator validates the value, so a bad one gets the estimator's own message.
    """

    name: str
    default: Any
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple | None = None
    flag: str | None = None
    metavar: str | None = None

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")
