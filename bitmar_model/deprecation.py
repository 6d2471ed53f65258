"""Old names kept for one release after a rename, with a warning that names the new one.

`DeprecatedNameWarning` is a FutureWarning, not a DeprecationWarning, so users see it by
default (Python hides DeprecationWarning outside `__main__`). The pipeline's config loader
warns with the same class for its renamed YAML keys.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["DeprecatedNameWarning", "accepts_renamed_keywords"]

T = TypeVar("T", bound=type)


class DeprecatedNameWarning(FutureWarning):
    """A renamed setting was used by its old name; FutureWarning so users see it (DeprecationWarning is hidden)."""


def accepts_renamed_keywords(renamed: Mapping[str, str]) -> Callable[[T], T]:
    """Class decorator: the class's constructor also takes each old keyword of `renamed`
    (old name -> new name), warns with DeprecatedNameWarning and passes it on under the new
    name; giving both names is a TypeError."""

    def decorate(cls: T) -> T:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            for old, new in renamed.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(f"{cls.__name__}: {old} was renamed to {new}; pass only {new}")
                warnings.warn(
                    f"{cls.__name__}({old}=...) is deprecated; use {new}", DeprecatedNameWarning, stacklevel=2
                )
                kwargs[new] = kwargs.pop(old)
            init(self, *args, **kwargs)

        cls.__init__ = __init__  # type: ignore[misc]
        return cls

    return decorate
