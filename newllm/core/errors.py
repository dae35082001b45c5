"""The one exception type for bad input: the CLI prints its message as one line and exits 2."""


class NewllmError(Exception):
    """A user-facing error: a bad file, a bad parameter, an unknown model.

    The message is one sentence naming the file or key and what was expected.
    """
