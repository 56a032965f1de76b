"""The one error type the pipeline raises for bad input: its message is a single line saying what is wrong and
what to do; the CLI prints it without a traceback."""


class ConvertError(Exception):
    pass


class ValidationFailed(ConvertError):
    """The gate rejected an output (kept aside as `<path>.rejected`)."""
