"""The one exception type that reaches the user as a one-line message."""


class UserError(Exception):
    """Bad input: the CLI prints ``error: <message>`` on one line and exits with status 2.

    The message names the bad value and, where there is a closed set, the valid choices.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def choices(valid) -> str:
    return ", ".join(str(v) for v in valid)


def one_line(error: BaseException, limit: int = 500) -> str:
    """An exception's message on one line (whitespace collapsed), at most ``limit`` characters: how a
    failed trial's reason is recorded."""
    return " ".join(str(error).split())[:limit]


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (compiler errors run to pages)."""
    return str(error).splitlines()[0] if str(error) else ""
