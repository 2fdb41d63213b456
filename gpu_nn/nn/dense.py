"""dense modules."""

__all__: list[str] = []
