"""Errors a user can act on: the CLI prints them as one line and exits with status 2."""


class InputError(ValueError):
    """Bad input data or configuration (names the file or setting and the failed check)."""
