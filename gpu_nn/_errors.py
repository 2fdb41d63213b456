"""Exceptions raised by gpu-nn."""


class KernelInputError(ValueError, RuntimeError):
    """Bad input to a gpu-nn op, raised before any kernel runs.

    A subclass of both ValueError and RuntimeError, so code written against torch's
    errors (which raises either, depending on the op) keeps working. Messages follow
    torch's wording where torch has one.
    """


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the op here; the message says why."""


class KernelInputTypeError(KernelInputError, TypeError):
    """Bad input where torch raises ``TypeError`` (an argument of the wrong type: a float
    stride, a string kernel size, a list as a bias). Also a ``KernelInputError``, so
    ``except KernelInputError`` still catches every bad input."""


class KernelInputIndexError(KernelInputError, IndexError):
    """Bad input where torch raises ``IndexError`` ("Dimension out of range")."""


class KernelInputNotImplementedError(KernelInputError, NotImplementedError):
    """Bad input where torch raises ``NotImplementedError`` (a kernel torch has no dtype for:
    softmax of an integer tensor)."""


def type_name(obj) -> str:
    """The name of ``obj``'s type as torch's argument errors print it (CPython's ``tp_name``):
    the bare name for builtins and for classes defined in Python, the dotted name for types
    defined in C elsewhere ("must be Tensor, not numpy.ndarray", "... not torch.Size")."""
    t = type(obj)
    heap, immutable = t.__flags__ & (1 << 9), t.__flags__ & (1 << 8)  # Py_TPFLAGS_HEAPTYPE, _IMMUTABLETYPE
    if t.__module__ == "builtins" or (heap and not immutable):  # a class made in Python: tp_name is its name
        return t.__name__
    return f"{t.__module__}.{t.__qualname__}"  # a C type, static or from a spec (re.Pattern)
