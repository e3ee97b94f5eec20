"""Validity windows of the certificates fedenc issues, and the checks made on load."""

from __future__ import annotations

import datetime as dt

from cryptography import x509

from fedenc.security.errors import PemError

# Issued certificates start a little in the past so that a peer whose clock lags ours does not
# refuse a brand-new certificate as "not yet valid".
CLOCK_SKEW = dt.timedelta(minutes=5)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def validity_window(
    days: int, not_before: dt.datetime | None = None, not_after: dt.datetime | None = None
) -> tuple[dt.datetime, dt.datetime]:
    """``(not_before, not_after)``: ``days`` from now unless given explicitly (tests issue
    certificates that are already expired or not yet valid this way)."""
    if days < 1 and not_after is None:
        raise ValueError(f"validity must be at least 1 day, got {days}")
    start = not_before if not_before is not None else utcnow() - CLOCK_SKEW
    end = not_after if not_after is not None else start + CLOCK_SKEW + dt.timedelta(days=days)
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("not_before / not_after must be timezone-aware datetimes")
    if end <= start:
        raise ValueError(
            f"not_after ({end:%Y-%m-%d %H:%M}) must be after not_before ({start:%Y-%m-%d %H:%M})"
        )
    return start, end


def validity_problem(cert: x509.Certificate, now: dt.datetime | None = None) -> str | None:
    """None when ``cert`` is valid at ``now``, else "expired on ..." / "not valid before ..."."""
    now = now or utcnow()
    if now > cert.not_valid_after_utc:
        return f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if now < cert.not_valid_before_utc:
        return f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    return None


def require_valid(cert: x509.Certificate, what: str, hint: str = "") -> None:
    """Raise :class:`PemError` when ``cert`` (named ``what`` in the message) is not valid now."""
    problem = validity_problem(cert)
    if problem is not None:
        raise PemError(f"{what} {problem}{hint}")
