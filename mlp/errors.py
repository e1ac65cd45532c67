"""Errors the user can fix: the scripts print their message and exit, with no traceback."""


class UserError(Exception):
    """Bad input (a flag, a path, a file); the message says what was wrong and how to fix it."""


def check(condition: bool, message: str) -> None:
    """Raise UserError(message) unless condition holds."""
    if not condition:
        raise UserError(message)
