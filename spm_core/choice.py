"""Settings a user picks by name (a combo box in ComfyUI), refused with the list when unknown."""

from __future__ import annotations

import enum
import re

from .errors import SPMError


class Choice(enum.Enum):
    """An enum whose values are the names users pick; `named` turns a name into a member. A member
    may be written `NAME = "value", "what it does"`: that description, written once beside the
    member, is what tooltips and help pages show (`described`)."""

    def __new__(cls, value: str, description: str = ""):
        member = object.__new__(cls)
        member._value_ = value
        member.description = description
        return member

    @classmethod
    def described(cls) -> str:
        """`value: description` for every member, as one line of a tooltip."""
        return "; ".join(f"{member.value}: {member.description}" for member in cls)

    @classmethod
    def named(cls, name: str):
        try:
            return cls(name)
        except ValueError:
            what = re.sub(r"(?<!^)(?=[A-Z])", " ", cls.__name__).lower()  # TransportMode -> "transport mode"
            raise SPMError(f"unknown {what} {name!r}; choose one of {', '.join(repr(m.value) for m in cls)}") from None
