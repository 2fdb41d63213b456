"""rnn modules."""

__all__: list[str] = []
