"""``gpu_nn.nn.utils``: gradient clipping (mirrors ``torch.nn.utils``)."""

__all__: list[str] = []
