"""The one error type the CLI turns into a single clear line and exit status 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input that the user can fix. The message names the problem and the fix, in one line."""

    exit_code = 2
