"""Errors a user can cause. The command line turns them into one line on stderr and exit code 2."""


class UserError(Exception):
    """A problem with the user's input, configuration or files; the message says how to fix it."""


class ConfigError(UserError, ValueError):
    """A setting out of range or inconsistent with another."""
