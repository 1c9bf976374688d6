"""Errors a user can cause and fix; the CLI prints them as one line without a traceback."""


class UserError(Exception):
    """A mistake in the command, data or environment, with a message that says how to fix it."""
