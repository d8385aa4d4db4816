"""Every hyperparameter and format constant of the FlashMemory retriever, in one place.

Values follow ``docs/design.md`` §2, §4 and §8 (the upstream release). Nothing else in the
package may restate these numbers; import them from here.
"""

import math

# --- model (design §2) --------------------------------------------------------------------------
HIDDEN_SIZE = 4096
Q_LORA_RANK = 2048
HEAD_DIM = 128  # D; the number of heads is derived from wq_b.shape[0] // HEAD_DIM
ROPE_DIM = 64  # rotary dims: the LAST 64 of each head, interleaved (GPT-J) pairs
RMS_NORM_EPS = 1e-6
DEFAULT_N_HEADS = 128  # only for building synthetic checkpoints; loaders derive H

# YaRN RoPE (design §3)
ROPE_THETA = 160000.0
ROPE_FACTOR = 16.0
ROPE_ORIGINAL_SEQ_LEN = 65536
ROPE_BETA_FAST = 32
ROPE_BETA_SLOW = 1

MAX_POSITION_RELEASE = 524288  # RoPE table rows in the standalone release
MAX_POSITION_SERVING = 1048576  # RoPE table rows in serving

LAYER_NAMES = ("l10", "l12", "l20")  # release scorer layers, in checkpoint order
JOINT_PREFIX = "retrievers."  # joint checkpoint key prefix: retrievers.<layer>.<param>

# Per-layer parameter names and shapes as functions of (hidden, rank, heads, head_dim).
PARAM_NAMES = ("wq_a.weight", "wq_b.weight", "q_norm_weight", "weights_proj.weight")


def weight_scale(n_heads: int, head_dim: int = HEAD_DIM) -> float:
    """``D**-0.5 * H**-0.5`` (design §2): 1/128 for the released H = D = 128."""
    return head_dim ** -0.5 * n_heads ** -0.5


# --- key formats (design §4) --------------------------------------------------------------------
FP8_BYTES = HEAD_DIM  # e4m3fn key bytes per chunk
SCALE_BYTES = 4  # one little-endian float32 scale per chunk
CHUNK_BYTES = FP8_BYTES + SCALE_BYTES  # 132: one compressed chunk in the row format
TOKENS_PER_CHUNK = 4

PAGE_CHUNKS = 64  # chunks per page in the paged split format
PAGE_BYTES = PAGE_CHUNKS * CHUNK_BYTES  # 8448 = [64*128 fp8][64*4 f32 scales]

ATTN_KV_BYTES = 584  # one chunk of a layer's attention KV (what the offload engine moves)

FP8_E4M3_MAX = 448.0  # largest finite e4m3fn value
# Largest float32 chunk scale s with fl32(448 * s) finite: beyond it a key's dequantized value
# can overflow float32, so such a chunk is treated as non-finite (docs/validation.md).
MAX_KEY_SCALE = float.fromhex("0x1.249248p+119")  # about 7.6e35
FP8_QUANT_MIN_AMAX = 1e-4  # per-head q quantization scale = max(amax, 1e-4) / 448 (design §5)

# --- selection (design §6) ----------------------------------------------------------------------
RETRIEVAL_INTERVAL = 64  # decode steps between retriever calls
DEFAULT_THRESHOLD = 0.5  # hit = score > threshold (strict)
DEFAULT_RECENT_CHUNKS = 2048  # recent tail, in CHUNKS (8192 tokens)
DEFAULT_SINK_CHUNKS = 0
DEFAULT_MAX_PAGES = 96  # at 256K tokens of context (about 10% of history)


def default_max_pages(context_tokens: int) -> int:
    """Deployed page budget: 96 pages at 256K tokens, 192 at 512K, 384 at 1M (~10%)."""
    return max(1, int(math.ceil(DEFAULT_MAX_PAGES * context_tokens / 262144)))


# --- cost model (design §5) ---------------------------------------------------------------------
def flops_per_chunk_per_layer(n_heads: int, head_dim: int = HEAD_DIM) -> int:
    """``2 * H * D`` multiply-adds counted as two FLOPs each (32768 for the release)."""
    return 2 * n_heads * head_dim
