"""User-facing errors of the harness and CLI: one line naming the key/file, the problem and the fix."""

from fedgen.contract.errors import ScenarioError  # noqa: F401 -- re-exported: the CLI catches it with the others


class PartitionError(ValueError):
    """Data that cannot be split as asked (e.g. fewer examples than sites)."""


class AuditError(ValueError):
    """Inputs that ``fedgen audit`` cannot audit: mismatched shapes, too few held-out
    records, an unreadable checkpoint, a folder that is not a run directory."""


class DeployConfigError(ValueError):
    """A deployment command's option cannot be used (e.g. ``fedgen superlink --control-address``)."""


class SimulationRunError(RuntimeError):
    """A simulated run did not complete, on either engine; the message says why."""
