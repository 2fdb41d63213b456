"""rnn family: launchers, checks and custom-op registration."""

__all__: list[str] = []
