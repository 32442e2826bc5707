"""Errors of the shared agreement: one line naming the key or file, the problem and the fix."""


class ScenarioError(ValueError):
    """A scenario file or override that cannot be used."""
