"""Exceptions raised by gpu-nn."""


class KernelInputError(ValueError, RuntimeError):
    """Bad input to a gpu-nn op, raised before any kernel runs.

    A subclass of both ValueError and RuntimeError, so code written against torch's
    errors (which raises either, depending on the op) keeps working. Messages follow
    torch's wording where torch has one.
    """


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the op here; the message says why."""
