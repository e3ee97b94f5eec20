"""The allowlist: which children may join this master.

Any child certificate signed by the CA passes the TLS handshake. One CA often serves several
federations (or a test and a production master), so the allowlist narrows a master to the children
it expects. The file holds one child name per line; ``#`` starts a comment.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from fedenc.security.errors import PemError
from fedenc.security.naming import validate_child_name


def parse_allowlist(text: str, source: str = "allowlist") -> frozenset[str]:
    """Child names in ``text`` (one per line, ``#`` comments, blank lines ignored)."""
    names: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        try:
            names.add(validate_child_name(name))
        except ValueError as err:
            raise PemError(f"{source}:{number}: {err}") from None
    return frozenset(names)


def load_allowlist(path: Path) -> frozenset[str]:
    """Child names of the allowlist file at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PemError(f"allowlist not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PemError(f"cannot read allowlist {path}: {err}") from None
    return parse_allowlist(text, str(path))


def allowlist_of(names: Iterable[str]) -> frozenset[str]:
    """A fixed allowlist from names (e.g. repeated ``--allow NAME`` options)."""
    return frozenset(validate_child_name(n) for n in names)
