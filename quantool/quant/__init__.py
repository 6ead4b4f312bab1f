"""Pure quantization math: tensors in, tensors out. Nothing here knows about models or files."""
