"""l2d-jax: L2D (Large Language Models to Diffusion Finetuning) in JAX/Flax.

Public API (imported lazily so that `import l2d_jax` stays fast and needs no
TensorFlow / torch / datasets):

- ``load(path) -> (model, tokenizer)``: an HF directory, a GGUF file or a
  converted l2d-jax checkpoint directory.
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(path, **kwargs):
    """Loads a model and its tokenizer from an HF dir, a GGUF file or a converted dir."""
    from l2d_jax.convert.loading import load as _load

    return _load(path, **kwargs)
