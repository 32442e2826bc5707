"""What a simulation adds to a federated run, behind one object (docs/architecture.md §1).

:class:`FederatedRun` calls these hooks at fixed points of every round and never asks
whether it runs in a simulation. The default, :class:`RunHooks`, is a deployment's: it adds
nothing. The harness's implementation is ``simulations/hooks.py``; ``server/app.py``, the
composition root, picks one.
"""

from __future__ import annotations

from fedgen.privacy.ledger import PrivacyLedger, SiteLedger

from .record import RoundRecord
from .updates import RoundReplies


class RunHooks:
    """A deployment: sites are real, keep their own ledgers and are bounded by the default
    count; noise comes from the OS's entropy, whatever the scenario asks."""

    allows_seeded_noise: bool = False  # seeded DP noise is a simulation's reproducibility switch
    #: A run that did not complete cleanly (``summary.json``'s ``status`` other than
    #: ``completed``) ends the ServerApp with :class:`~fedgen.server.summary.RunFailedError`,
    #: so Flower shows it as failed; a simulation reads the summary itself instead.
    fails_unclean_runs: bool = True

    def site_examples(self) -> dict[str, int] | None:
        """Each site's largest honest ``num-examples``; ``None``: the default bound for all."""
        return None

    def unreported_ledgers(self) -> list[SiteLedger]:
        """Site ledgers whose spend may not have reached the server in a reply (a site that
        crashed or replied late); the run folds the longer ones into ``privacy.json``."""
        return []

    def restore_site_ledgers(self, ledger: PrivacyLedger) -> None:
        """On resume from a checkpoint whose ledger is ``ledger``. Raises
        :class:`~fedgen.server.updates.ReplyError` for a site id that is no safe name."""

    def annotate(self, record: RoundRecord, replies: RoundReplies) -> None:
        """Add the round's harness entries to ``record``."""
