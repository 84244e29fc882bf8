"""The one exception type for bad user input.

Raised with a message that says what is wrong and how to fix it; the command-line interface prints
the message alone (no traceback) and exits with status 2.
"""


class UserInputError(Exception):
    """Bad input from the user: a wrong path, a missing file, an inconsistent dataset."""


class StepFailed(Exception):
    """A step run as a separate command (nnU-Net training, prediction) failed; the message says where
    its full log is."""
