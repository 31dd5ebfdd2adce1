"""lcl-megatron: Latent Compression Learning at scale on megatron-core and DeepSpeed."""

__version__ = "0.1.0"
