"""The typed records every stage agrees on (see records.py), validated on load."""

from .base import ConfigError, Record, apply_overrides, build
from .records import *  # noqa: F403
from .records import __all__ as _records

__all__ = ["ConfigError", "Record", "apply_overrides", "build", *_records]
