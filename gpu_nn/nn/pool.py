"""pool modules."""

__all__: list[str] = []
