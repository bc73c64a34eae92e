"""The one exception type for mistakes a user can make.

The CLI prints a FeditError as a single message (no traceback) and exits 2.
Everything else is a bug and keeps its traceback.
"""


class FeditError(Exception):
    """A problem with the user's input: the message names the input and the fix."""
