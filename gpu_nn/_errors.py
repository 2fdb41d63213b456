"""Exceptions raised by gpu-nn, and the names torch's messages give dtypes."""

import torch


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


class KernelInputAttributeError(KernelInputTypeError, AttributeError):
    """Bad input where torch raises ``AttributeError``: a functional form or a module of torch's
    that calls a tensor method on its argument ("'list' object has no attribute 'sigmoid'").
    Also a ``KernelInputTypeError`` (a ``TypeError``: what the argument's wrong type is, and what
    torch's functions that parse their arguments raise for it), so either ``except`` catches it."""


def require_attribute(obj, attr: str) -> None:
    """Raise what Python raises for ``obj.attr`` (torch's functions that call the argument's method:
    an AttributeError, in its words) where ``obj``, not a tensor, has no such attribute."""
    if not isinstance(obj, torch.Tensor) and not hasattr(obj, attr):
        raise KernelInputAttributeError(f"'{type_name(obj)}' object has no attribute '{attr}'")


class KernelInputIndexError(KernelInputError, IndexError):
    """Bad input where torch raises ``IndexError`` ("Dimension out of range")."""


class KernelInputNotImplementedError(KernelInputError, NotImplementedError):
    """Bad input where torch raises ``NotImplementedError`` (a kernel torch has no dtype for:
    softmax of an integer tensor)."""


_OVERLAP_MSG = ("unsupported operation: more than one element of the written-to tensor refers to a single "
                "memory location. Please clone() the tensor before performing the operation.")


_INFERENCE_MSG = ("Inplace update to inference tensor outside InferenceMode is not allowed.You can make a clone to "
                  "get a normal tensor before doing inplace update.See https://github.com/pytorch/rfcs/pull/17 for "
                  "more details.")


def refuse_inference_write(t: torch.Tensor) -> None:
    """torch's refusal of an in-place update of an inference tensor (made under
    ``torch.inference_mode``) outside inference mode: an optimizer's parameter or state, a
    gradient clipping scales, all written past the dispatcher (NumPy views, kernels) that would
    otherwise change it where torch refuses to."""
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise KernelInputError(_INFERENCE_MSG)


def refuse_in_place_write(t: torch.Tensor) -> None:
    """Both of torch's refusals of an in-place update, in torch's order, for a tensor our code
    writes past the dispatcher (an optimizer's parameter or state, a clipped gradient):
    :func:`refuse_inference_write`, then :func:`refuse_internal_overlap`."""
    refuse_inference_write(t)
    refuse_internal_overlap(t)


def refuse_internal_overlap(t: torch.Tensor) -> None:
    """torch's ``assert_no_internal_overlap`` for a tensor about to be written in place (an
    optimizer's parameter, a gradient clipping scales): refused where a dim of more than one
    element has stride 0 (an ``expand()``), whose elements share one memory location, so that
    a kernel's writes would race and a host loop's last write win. Like torch, a layout that is
    merely hard to judge (other overlapping ``as_strided`` views) is not refused."""
    if t.is_contiguous():  # (the usual case, one call)
        return
    for n, s in zip(t.shape, t.stride()):
        if s == 0 and n > 1:
            raise KernelInputError(_OVERLAP_MSG)


def type_name(obj) -> str:
    """The name of ``obj``'s type as torch's argument errors print it (CPython's ``tp_name``):
    the bare name for builtins and for classes defined in Python, the dotted name for types
    defined in C elsewhere ("must be Tensor, not numpy.ndarray", "... not torch.Size")."""
    t = type(obj)
    heap, immutable = t.__flags__ & (1 << 9), t.__flags__ & (1 << 8)  # Py_TPFLAGS_HEAPTYPE, _IMMUTABLETYPE
    if t.__module__ == "builtins" or (heap and not immutable):  # a class made in Python: tp_name is its name
        return t.__name__
    return f"{t.__module__}.{t.__qualname__}"  # a C type, static or from a spec (re.Pattern)


# torch's names for dtypes in its messages: c10's ScalarType names ("expected scalar type Float but
# found Double", "mat1 and mat2 must have the same dtype, but got ComplexFloat and Float", "not
# implemented for 'Long'") and the C++ type names of caffe2's TypeMeta ("expected m1 and m2 to have
# the same dtype, but got: c10::complex<float> != float", "Input type (double) and bias type (float)")
SCALAR_TYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
    torch.uint16: "UInt16", torch.uint32: "UInt32", torch.uint64: "UInt64",
}
CPP_TYPE_NAMES = {
    torch.float32: "float", torch.float64: "double", torch.float16: "c10::Half", torch.bfloat16: "c10::BFloat16",
    torch.int64: "long int", torch.int32: "int", torch.int16: "short int", torch.int8: "signed char",
    torch.uint8: "unsigned char", torch.bool: "bool", torch.complex64: "c10::complex<float>",
    torch.complex128: "c10::complex<double>",
}


def scalar_type_name(dtype: torch.dtype) -> str:
    """c10's ScalarType name of ``dtype`` ("Float"); another dtype by its torch name."""
    return SCALAR_TYPE_NAMES.get(dtype) or str(dtype).replace("torch.", "")


def cpp_type_name(dtype: torch.dtype) -> str:
    """The C++ type name torch's TypeMeta prints for ``dtype`` ("float", "c10::Half"); another
    dtype by its torch name."""
    return CPP_TYPE_NAMES.get(dtype) or str(dtype).replace("torch.", "")
