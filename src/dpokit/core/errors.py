"""User-facing errors: one line that says what is wrong, where, and how to fix it.

The CLI turns a `UserError` into that line on stderr and exit code 2; `--debug` shows the traceback.
"""


class UserError(Exception):
    """Bad input from the user (config, data, paths). The message is shown as is, on one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split("\n")))
