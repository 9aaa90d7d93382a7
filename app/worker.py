"""The worker `faust -A app worker` runs: Faust's, which first checks what it needs.

It is the app's `Worker` setting (app/main.py), so only the `worker` command uses it.
"""

from __future__ import annotations

import warnings
from typing import Any

import faust
from faust.exceptions import AlreadyConfiguredWarning

from app.checks import worker_preflight
from app.main import broker_credentials, settings


class Worker(faust.Worker):
    """Before Faust prints its banner and starts anything: a broker that cannot be reached, a
    database these settings can never use, or COINGECKO_BASE_URL=offline outside `up` is one
    line naming the setting and a non-zero exit, instead of tracebacks (app/checks.py)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # `faust worker` sets web_enabled from its --with-web flag (on by default):
        # WEB_ENABLED=false wins, so Faust's banner does not show a web URL that nothing serves.
        # (The app reads it when it starts, after this: the warning does not apply.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AlreadyConfiguredWarning)
            self.app.conf.web_enabled = self.app.conf.web_enabled and settings.web_enabled
        status = self.loop.run_until_complete(
            worker_preflight(settings, broker_credentials(settings))
        )
        if status:
            raise SystemExit(status)
