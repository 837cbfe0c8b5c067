"""Replacing a library function so that nobody can tell, by calling it or by looking at it.

Libraries read their own functions. SQLAlchemy's ``create_engine`` decides which keyword
arguments belong to the engine by reading the parameter names of ``Engine.__init__``'s code
object; a ``(*args, **kwargs)`` wrapper there turns ``create_engine(url, echo=True)`` into a
``TypeError``. So a hook poolwatch puts in place of a library function takes exactly the
parameters the original takes — the same names, kinds, defaults and annotations, the same
code-object parameters, sync or async alike — and carries the original's name, qualified
name, module, docstring and attributes, with ``__wrapped__`` pointing at the original.

Two ways to get there:

* :func:`disguise` — for a hook written by hand with the original's parameters spelled out
  (the hot path: one frame, no generated layer). The parameters are checked against the
  original's when the hook is installed; a mismatch (a library release that renamed one)
  raises :class:`SignatureMismatch` and the library is not hooked, rather than hooked with
  a function that behaves differently.
* :func:`around` — for constructors and other functions with long, version-dependent
  parameter lists: a function is generated with the original's parameter list that passes
  every argument on, by position or by keyword exactly as its kind allows, to a hook that
  takes ``(*args, **kwargs)``. Inside such a hook, ``sys._getframe(CALLER)`` is the frame
  that called the patched function.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import CodeType, FunctionType
from typing import Any, NamedTuple, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

CALLER = 2
"""In a hook called by a function :func:`around` made: the depth of the frame that called
the patched function (the hook is depth 0, the generated function depth 1)."""

_ATTRIBUTES = ("__module__", "__name__", "__qualname__", "__doc__")


class SignatureMismatch(TypeError):
    """A hand-written hook does not take exactly the parameters of the function it replaces."""


class Parameters(NamedTuple):
    """What a code object says about its parameters: what introspection and callers see."""

    positional_only: int
    positional: int
    keyword_only: int
    names: tuple[str, ...]
    varargs: bool
    varkeywords: bool
    coroutine: bool

    @classmethod
    def of(cls, function: Callable[..., Any]) -> Parameters:
        code: CodeType = function.__code__
        flags = code.co_flags
        varargs = bool(flags & inspect.CO_VARARGS)
        varkeywords = bool(flags & inspect.CO_VARKEYWORDS)
        count = code.co_argcount + code.co_kwonlyargcount + varargs + varkeywords
        return cls(
            code.co_posonlyargcount,
            code.co_argcount,
            code.co_kwonlyargcount,
            code.co_varnames[:count],
            varargs,
            varkeywords,
            bool(flags & inspect.CO_COROUTINE),
        )


def function_of(attribute: Any) -> FunctionType:
    """The plain function behind a class attribute (a function, classmethod or staticmethod)."""
    if isinstance(attribute, (classmethod, staticmethod)):
        attribute = attribute.__func__
    if not isinstance(attribute, FunctionType):
        raise TypeError(f"poolwatch can only hook Python functions, not {attribute!r}")
    return attribute


def _dress(replacement: FunctionType, original: FunctionType) -> None:
    """Give ``replacement`` what introspection reads of ``original`` besides its code."""
    for name in _ATTRIBUTES:
        setattr(replacement, name, getattr(original, name))
    replacement.__dict__.update(original.__dict__)
    replacement.__defaults__ = original.__defaults__
    replacement.__kwdefaults__ = original.__kwdefaults__
    replacement.__annotations__ = dict(original.__annotations__)
    if hasattr(original, "__type_params__"):  # Python 3.12+
        setattr(replacement, "__type_params__", original.__type_params__)  # noqa: B010
    replacement.__wrapped__ = original  # type: ignore[attr-defined]


def disguise(hook: F, original: Callable[..., Any]) -> F:
    """Make the hand-written ``hook`` look like ``original``; its parameters must match."""
    function, source = function_of(hook), function_of(original)
    mine, theirs = Parameters.of(function), Parameters.of(source)
    if mine != theirs:
        raise SignatureMismatch(
            f"poolwatch's hook for {source.__module__}.{source.__qualname__} takes {mine}, "
            f"the library's function {theirs}: this release of the library is not supported"
        )
    _dress(function, source)
    return hook


def around(original: Callable[..., Any], hook: Callable[..., Any]) -> FunctionType:
    """A function with ``original``'s exact parameters that returns ``hook(...)`` called
    with every argument it received (positional parameters by position, keyword-only ones by
    name, ``*args`` and ``**kwargs`` spread); awaited when ``original`` is a coroutine
    function."""
    source = function_of(original)
    spec = Parameters.of(source)
    names = spec.names
    taken = set(names)
    hook_name = "_poolwatch_hook"
    while hook_name in taken:
        hook_name += "_"
    positional = list(names[: spec.positional])
    keyword_only = list(names[spec.positional : spec.positional + spec.keyword_only])
    rest = names[spec.positional + spec.keyword_only :]
    star = rest[0] if spec.varargs else None
    starstar = rest[-1] if spec.varkeywords else None

    declared = list(positional)
    if spec.positional_only:
        declared.insert(spec.positional_only, "/")
    if star is not None:
        declared.append(f"*{star}")
    elif keyword_only:
        declared.append("*")
    declared.extend(keyword_only)
    if starstar is not None:
        declared.append(f"**{starstar}")

    passed = list(positional)
    if star is not None:
        passed.append(f"*{star}")
    passed.extend(f"{name}={name}" for name in keyword_only)
    if starstar is not None:
        passed.append(f"**{starstar}")

    asynchronous = "async " if spec.coroutine else ""
    awaiting = "await " if spec.coroutine else ""
    # A lambda's name is not an identifier; the name shown is the original's either way.
    name = source.__name__ if source.__name__.isidentifier() else "_poolwatch_function"
    source_text = (
        f"{asynchronous}def {name}({', '.join(declared)}):\n"
        f"    return {awaiting}{hook_name}({', '.join(passed)})\n"
    )
    namespace: dict[str, Any] = {hook_name: hook}
    code = compile(source_text, f"<poolwatch hook of {source.__qualname__}>", "exec")
    exec(code, namespace)  # the text is built above from the original's parameter names only
    generated: FunctionType = namespace[name]
    if Parameters.of(generated) != spec:  # cannot happen: the same list, declared again
        raise SignatureMismatch(f"poolwatch could not mirror {source.__qualname__}'s parameters")
    _dress(generated, source)
    return generated


def rewrap(attribute: Any, function: FunctionType) -> Any:
    """``function`` in the same kind of descriptor as the class attribute it replaces."""
    if isinstance(attribute, classmethod):
        return classmethod(function)
    if isinstance(attribute, staticmethod):
        return staticmethod(function)
    return function
