"""Plugins of other packages, found through entry points (encoders, fusion rules, stop rules).

One rule for all three: a built-in name wins over a plugin of the same name, and a plugin that
fails to import is logged and skipped, so that a broken package cannot break fedenc's own.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import Any

log = logging.getLogger(__name__)

# (group, name) -> why its entry point failed to load: an "unknown" error for that name says it,
# instead of leaving the cause in a warning printed long before.
_FAILED: dict[tuple[str, str], str] = {}


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"did you mean 'srgnn'? "`` for the closest of ``known``, else ``""``: the head of an
    unknown-name error's list."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def load_failure_note(group: str, name: str) -> str:
    """``" (plugin 'x' from pkg.mod:X failed to load: ...)"`` when ``name`` is an entry point
    of ``group`` that failed to load, else ``""``: the tail of an unknown-name error."""
    why = _FAILED.get((group, name))
    return f" (plugin {name!r} {why})" if why else ""


def load_entry_points(
    group: str, kind: str, holder: Callable[[str], Any], register: Callable[[str, Any], None]
) -> None:
    """Register every entry point of ``group`` whose name ``holder`` finds free (``None``; else
    it returns what holds the name). A ``kind`` such as "encoder" names it in the log."""
    for ep in entry_points(group=group):
        held = holder(ep.name)
        if held is not None:
            # Already registered by the plugin's own decorator (importing the module of an
            # earlier entry point ran it): the same object, nothing shadowed.
            try:
                same = ep.load() is held
            except Exception:  # a broken plugin shadowing a name: the warning says enough
                same = False
            if not same:
                log.warning(
                    "%s plugin %r (%s) shadows a registered one; ignored", kind, ep.name, ep.value
                )
            continue
        try:
            register(ep.name, ep.load())
        except Exception as err:  # a broken plugin must not break the built-in ones
            log.warning("%s plugin %r (%s) failed to load: %s", kind, ep.name, ep.value, err)
            _FAILED[(group, ep.name)] = f"from {ep.value} failed to load: {err}"
