"""Triton kernels, each next to its plain-torch reference. Pure tensor functions, no model knowledge.

Note: Hugging Face also publishes a package importable as `kernels`, which transformers
probes for. Ours has no `__version__` and ships in a distribution whose version is far
below the range transformers accepts, so `transformers.utils.is_kernels_available()`
stays False with ours installed (tests/test_kernels_name.py proves it).
"""
