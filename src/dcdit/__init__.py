"""dcdit: Dynamic Chunking Diffusion Transformers (DC-DiT) and DiT in PyTorch."""

__version__ = "0.1.0"
