"""Triton kernels over the packed arena (one file each) and their pure-PyTorch references.

``append`` (quantize-and-append with the progressive ERS shrink, plus ``requantize_body_launch``),
``decode_attention``, ``prefill_attention``; ``reference`` holds references with identical signatures;
``layout`` the arena geometry and device state. Import the kernel modules only where Triton may compile
(or with ``TRITON_INTERPRET=1`` set first): :mod:`pmkvq_compile.ops` imports them lazily.
"""
