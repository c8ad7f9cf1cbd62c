"""Errors a person can fix: the CLI prints them as one line and exits with status 2; the app shows them."""


class UserError(Exception):
    """Bad input (unknown model or strategy, out-of-range parameter, empty prompt, ...).

    The message is one line, names what was wrong and, where there is one, the legal range.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
