"""quantool: will it fit, how do I shrink it, and what did shrinking cost?"""

__version__ = "0.1.0"


def load(path, device="cpu", dtype=None):
    """Load any checkpoint quantool writes (GPTQ, AWQ, bitsandbytes int8/NF4, fp16) for evaluation."""
    from quantool.formats.loading import load_model

    return load_model(path, device=device, dtype=dtype)
