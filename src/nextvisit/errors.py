"""The one exception type a user can cause. The command line prints its message on one line, without a
traceback; everything else is a bug and keeps its traceback."""


class UserError(Exception):
    """Bad input or a bad request: the message names the file, column, subject or row, and the fix."""
