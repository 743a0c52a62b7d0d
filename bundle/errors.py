"""The project's one refusal type."""


class InputRefused(ValueError):
    """The project's one refusal: an input, option, weights file or output path that cannot be
    used, found before any work starts. The message says why; the CLI prints it on one line and
    exits with code 2."""
