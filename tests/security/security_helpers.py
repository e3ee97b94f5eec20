"""Validity windows for certificates that are already expired or not yet valid."""

from __future__ import annotations

import datetime as dt

NOW = dt.datetime.now(dt.timezone.utc)
PAST = {"not_before": NOW - dt.timedelta(days=30), "not_after": NOW - dt.timedelta(days=1)}
FUTURE = {"not_before": NOW + dt.timedelta(days=1), "not_after": NOW + dt.timedelta(days=30)}
