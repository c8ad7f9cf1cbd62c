"""Errors a person can fix: the CLI prints them as one line and exits with status 2; the app shows them."""


class UserError(Exception):
    """Bad input (unknown model or strategy, out-of-range parameter, empty prompt, ...).

    The message is one line, names what was wrong and, where there is one, the legal range.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when empty), at most `limit` characters: what a
    one-line UserError quotes of a library's multi-line error."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]
