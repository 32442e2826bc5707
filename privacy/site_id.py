"""Site names, validated once for every place that turns one into a path or a record key.

A site name ends up in file paths (``fedgen certs OUT_DIR --rotate-site SITE`` writes
``OUT_DIR/sites/SITE/``) and in ledgers, so it must be a plain name: no separators, no
``..``, nothing that could point outside the folder it is joined to (docs/deploy.md §6).
``client`` and ``server`` may import this module (``privacy`` depends on neither).
"""

from __future__ import annotations

import re

from .errors import SiteIdError

SITE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_valid_site_id(site: str) -> bool:
    """A letter or digit, then up to 63 letters, digits, ``.``, ``_`` or ``-``; never ``..``."""
    return isinstance(site, str) and SITE_ID_PATTERN.fullmatch(site) is not None and ".." not in site


def check_site_id(site: str) -> str:
    """Return ``site`` unchanged, or raise :class:`SiteIdError` with a one-line message."""
    if not is_valid_site_id(site):
        raise SiteIdError(f"site name {str(site)[:80]!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit and without '..' (e.g. hospital-a)")
    return site
