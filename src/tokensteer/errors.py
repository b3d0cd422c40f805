"""The one exception type that means "the user asked for something impossible"; the CLI prints it."""


class UserError(ValueError):
    """A mistake in the user's input: shown as one line, exit code 2, never a traceback."""
