"""The project's one refusal type, and how a bundle run reports one."""

import os
import sys


class InputRefused(ValueError):
    """The project's one refusal: an input, option, weights file or output path that cannot be
    used, found before any work starts. The message says why; the CLI prints it on one line and
    exits with code 2."""


def _refusal_in(error):
    """The InputRefused that caused ``error`` (MONAI's config parser wraps what components raise)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, InputRefused):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def exit_on_refusal():
    """For bundle runs (``python -m monai.bundle run``): a refusal ends the process as in the CLI,
    with one line on stderr and exit code 2, instead of a page of traceback; other errors keep
    their traceback. Installed by the configs' ``initialize``."""
    previous = sys.excepthook

    def report(kind, error, traceback):
        refusal = _refusal_in(error)
        if refusal is None:
            return previous(kind, error, traceback)
        sys.stdout.flush()
        print(f"calid: error: {refusal}", file=sys.stderr, flush=True)
        os._exit(2)  # an exception hook cannot set the exit code otherwise

    sys.excepthook = report
    return True
