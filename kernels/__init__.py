"""gpu-nn's GPU code: ``triton/<family>.py`` and ``cuda/<family>.cu``.

Installed as ``gpu_nn.kernels``. Kernels never import the rest of ``gpu_nn``; launchers in
``gpu_nn.ops`` own every check and allocation.
"""
