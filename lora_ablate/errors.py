"""The one exception type that reaches the user as a one-line message."""


class UserError(Exception):
    """Bad input: the CLI prints ``error: <message>`` on one line and exits with status 2.

    The message names the bad value and, where there is a closed set, the valid choices.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def choices(valid) -> str:
    return ", ".join(str(v) for v in valid)
