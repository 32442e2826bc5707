"""The site's train/evaluate reply on the wire (docs/architecture.md §4): a ``metrics``
MetricRecord and a ``site`` ConfigRecord (id, ledger JSON, one-line message), plus the
update's ``arrays`` when the site trained.

What leaves the site is the update, its ledger, scalar metrics, and one-line messages
that never carry data values: an error is logged at the site in full and answered with
its kind only (docs/deploy.md, "Threat model").
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedgen.privacy.ledger import SiteLedger

log = logging.getLogger(__name__)

SITE_ERROR_CODE = 1  # Flower error code of a reply whose training failed at the site


def site_reply(msg: Message, site: str, metrics: dict[str, Any], *, ledger: SiteLedger | None = None,
               message: str = "", arrays: ArrayRecord | None = None) -> Message:
    """A train reply to ``msg`` from ``site``."""
    site_rec = ConfigRecord({"id": site, "ledger": ledger.to_json() if ledger else "", "message": message})
    content = RecordDict({"metrics": MetricRecord(metrics), "site": site_rec})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


def error_reply(msg: Message, site: str, err: Exception) -> Message:
    """An error reply naming the kind of failure only: exception messages may quote the
    site's data (a cell value, a value range), so the full text is logged here, at the site."""
    log.exception("site %s: training failed", site)
    reason = (f"site {site}: {type(err).__name__} at the site; the details are in the site's log "
              "(no data values leave the site)")
    return Message(Error(code=SITE_ERROR_CODE, reason=reason), reply_to=msg)
