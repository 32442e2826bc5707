"""Errors raised for site data. The message names the file and the problem."""


class DataError(ValueError):
    """Site data that cannot be used: unreadable, malformed, empty or out of range."""
