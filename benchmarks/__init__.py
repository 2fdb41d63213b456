"""gpu-nn benchmarks: one shared harness, one ``bench_<family>.py`` per family.

Installed as ``gpu_nn.benchmarks``; ``gpu-nn bench`` runs them.
"""
