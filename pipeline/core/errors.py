"""The one exception type users see.

A :class:`PipelineError` carries a one-line message that says what is wrong *and what to do about it*; the CLI
prints it without a traceback and exits non-zero. Anything else escaping is a bug.
"""


class PipelineError(Exception):
    """A problem with the user's input or environment, explained in one line."""
