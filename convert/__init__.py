"""The converter: Apple's PyTorch OpenELM checkpoints to MLX model directories.

Installed as ``openelm_mlx.convert``.
"""
