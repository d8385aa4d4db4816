"""Triton kernels (installed as ``flashmemory_triton.kernels``).

Precision modes of the scoring dot product (``PRECISIONS``):

* ``"bf16"``: q rounded to bf16, keys decoded exactly to bf16 (e4m3 fits), fp32 accumulate.
* ``"tf32"``: q in tf32 (10-bit mantissa), keys exact, fp32 accumulate.
* ``"fp8"``: q quantized per head to e4m3 (scale folded into the head weights, as the
  serving stack does), fp8 x fp8 tensor-core dot, fp32 accumulate.
* ``"fp32"``: exact fp32 dot without tensor cores, for debugging.
"""

PRECISIONS = ("bf16", "tf32", "fp8", "fp32")
DEFAULT_PRECISION = "bf16"
