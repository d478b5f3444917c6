"""The CPU runtime: a static-cache decoder on torch's weight-only int4 / int8 kernels.

``weights`` maps the packaged GGUF's quantized blocks (or dense weights) onto those kernels,
``model`` is the one decoder definition for the llama and qwen2 families, ``runtime`` puts it
behind the decode loop's narrow interface.
"""
