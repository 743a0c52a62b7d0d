"""Options as users give them: from Python, the command line or a bundle override."""

from __future__ import annotations

from .errors import InputRefused

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def as_flag(value, name) -> bool:
    """A yes/no option from Python, the command line or a bundle override (which arrive as
    strings, where "false" would be truthy): true/false, 1/0, yes/no, on/off in any case."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise InputRefused(f"{name} must be true or false (or 1/0, yes/no), got {value!r}")
