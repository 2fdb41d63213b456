"""Per-family launchers: input checks, backend dispatch and ``torch.library`` registration."""
