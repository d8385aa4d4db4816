"""Deterministic synthetic FlashMemory checkpoints and the release demo's mock inputs.

The real weights (``libertywing/FlashMemory-Deepseek-V4``) cannot always be downloaded, so the
demo, the tests and the benchmarks fall back on a synthetic joint checkpoint in the exact
release format (design §8): keys ``retrievers.<layer>.<param>``, fp32, 510 MB at full size.

How the weights are built (and why)
-----------------------------------
A layer's logit is ``sum_h relu(k . q_h) * w_h`` with ``w = (x @ weights_proj.T) / sqrt(H*D)``
(design §5). ``q`` and ``w`` are both odd in ``x``, so for a hidden state distribution symmetric
around 0 the mean logit over chunks is as often positive as negative: half of the rows would
keep most chunks and half almost none, whatever the weights. Real residual streams are not
symmetric: every token shares a strong common component (the anisotropy / "massive
activation" directions of LLM hidden states). :func:`mock_hidden` therefore draws
``x = z + m`` with ``z ~ N(0, I)`` and a fixed ``+-1`` vector ``m``
(:func:`shared_hidden_component`), and ``weights_proj`` reads that component with a small
negative mean over heads:

* ``x . weights_proj[h] = S * (beta_h + g * zeta_h)`` where ``beta_h`` is a per-head constant
  with mean exactly ``-KAPPA / sqrt(H)`` and spread 1 (stratified over heads, so the mean is
  exact, not a sample mean), and ``zeta_h ~ N(0, 1)`` varies with ``z`` (the query-dependent
  part, ``g = ROW_NOISE``). Most heads' weights are of either sign; their sum is negative.
* Chunks then score ``Z_n = sum_h w_h relu(a_hn)`` with near-independent ``a_hn = k_n . q_h``:
  a sum of H terms whose mean over chunks is about ``-KAPPA * 0.68`` standard deviations below
  zero (0.68 = E[relu] / std[relu] of a normal). The ``1 / sqrt(H)`` in the mean cancels the
  ``sqrt(H)`` growth of the spread, so the keep fraction does not depend on H, and every matrix
  is scaled by ``1 / sqrt(fan_in)`` (``q_lora`` is RMS-normed anyway), so it does not depend on
  the hidden size or rank either.
* A chunk's logit is its positive key scale (0.05 .. 0.2) times ``Z_n``; ``S = LOGIT_GAIN``
  puts the per-layer logit spread at about 2.7 so sigmoid scores spread over (0.001, 0.95).

Result, measured with :func:`mock_hidden` / :func:`mock_compressed_k`: each layer keeps about
4-8% of the chunks at threshold 0.5 and the 3-layer ``max`` ensemble 10-20% (row to row it
varies between about 8% and 30%, like queries do), at full size and at small test sizes.

Determinism: weights are drawn only from ``torch.rand`` on a seeded CPU ``torch.Generator``
followed by exactly rounded elementwise arithmetic (no transcendental functions, no
reductions), so a seed gives bitwise the same tensors on any machine. Each layer has its own
generator seeded from ``(seed, layer name)``, so a layer's tensors do not depend on which other
layers are generated. Changing anything here changes the weights: bump ``SYNTHETIC_VERSION``
(it names the cached default file) and the golden hash in ``tests/test_synthetic.py``.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from . import _validate as V
from . import constants as C

__all__ = [
    "SYNTHETIC_VERSION",
    "DEFAULT_SHAPE",
    "make_layer_states",
    "shared_hidden_component",
    "mock_hidden",
    "mock_compressed_k",
    "write_checkpoint",
    "cache_dir",
    "default_checkpoint_path",
    "ensure_default_checkpoint",
]

SYNTHETIC_VERSION = 1  # bump whenever the generated tensors change

# Full size of the embedded default checkpoint (the release's shapes, design §2).
DEFAULT_SHAPE = {"hidden": C.HIDDEN_SIZE, "rank": C.Q_LORA_RANK,
                 "n_heads": C.DEFAULT_N_HEADS, "head_dim": C.HEAD_DIM}
DEFAULT_SEED = 0

# Weight-distribution knobs (see the module docstring for the derivation).
KAPPA = 2.5  # head-weight mean = -KAPPA / sqrt(H) head-weight spreads: ~5% kept per layer
ROW_NOISE = 0.3  # query-dependent share of the head weights (row-to-row keep variation)
LOGIT_GAIN = 56.0  # S: per-layer logit std ~2.7 at the mock key scales
Q_NORM_RANGE = (0.75, 1.25)  # q_norm_weight gains, uniform and positive like trained RMSNorm
_SHARED_COMPONENT_SEED = 0x5EED_F1A5  # fixed: the shared hidden component never varies

# The release demo's mock keys (design §9): fp8 = e4m3(randn * 0.5), scales uniform [0.05, 0.2].
MOCK_KEY_STD = 0.5
MOCK_SCALE_RANGE = (0.05, 0.2)

_ALLOWED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SQRT3 = math.sqrt(3.0)


# --- weights ----------------------------------------------------------------------------------
def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _layer_names(layers) -> tuple[str, ...]:
    if isinstance(layers, str):
        layers = (layers,)
    try:
        names = tuple(layers)
    except TypeError:
        raise TypeError("layers must be a sequence of layer names, "
                        f"got {type(layers).__name__}") from None
    if not names:
        raise ValueError("layers must name at least one layer, got an empty sequence")
    for name in names:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"layers: names must be non-empty strings without '.', got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"layers has duplicates: {list(names)}")
    return names


def _layer_generator(seed: int, layer: str) -> torch.Generator:
    # sha256, not hash(): stable across processes and Python versions.
    digest = hashlib.sha256(f"flashmemory-synthetic:{seed}:{layer}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _centered_uniform(shape, generator: torch.Generator, std: float) -> torch.Tensor:
    """Uniform on ``[-std*sqrt(3), std*sqrt(3))`` (variance ``std**2``), exactly reproducible.

    ``torch.rand`` yields multiples of 2**-24; ``*2 - 1`` is exact and the final scale is one
    correctly rounded multiply, so the result is bitwise the same on every platform.
    """
    t = torch.rand(shape, generator=generator, dtype=torch.float32)
    return t.mul_(2.0).sub_(1.0).mul_(std * _SQRT3)


def shared_hidden_component(hidden: int = C.HIDDEN_SIZE) -> torch.Tensor:
    """The fixed ``+-1`` vector every :func:`mock_hidden` row shares, float32 ``[hidden]``.

    Its second half repeats its first half (and an odd last element is +1); the synthetic
    ``weights_proj`` noise is antisymmetric across the halves, so it is exactly orthogonal to
    this vector without computing a (platform-dependent) dot product.
    """
    hidden = _positive_int("hidden", hidden)
    g = torch.Generator(device="cpu").manual_seed(_SHARED_COMPONENT_SEED)
    half = torch.rand(hidden // 2, generator=g).lt(0.5).to(torch.float32).mul_(2.0).sub_(1.0)
    return torch.cat([half, half, torch.ones(hidden % 2)])


def _head_offsets(n_heads: int, generator: torch.Generator) -> torch.Tensor:
    """Per-head constants with mean exactly ``-KAPPA/sqrt(H)`` and unit spread ``[H, 1]``.

    Stratified (evenly spaced, then shuffled) rather than sampled, so their mean carries no
    sampling noise: a sample mean's noise is as large as the ``1/sqrt(H)`` signal.
    """
    strata = torch.arange(n_heads, dtype=torch.float32).mul_(2.0).add_(1.0).div_(n_heads)
    strata = strata.sub_(1.0).mul_(_SQRT3)  # uniform grid on (-sqrt3, sqrt3): variance ~1
    strata = strata[torch.randperm(n_heads, generator=generator)]
    return strata.add_(-KAPPA / math.sqrt(n_heads)).unsqueeze(1)


def _make_layer(hidden: int, rank: int, n_heads: int, head_dim: int,
                generator: torch.Generator) -> dict[str, torch.Tensor]:
    # Draw order is part of the format: wq_a, q_norm_weight, wq_b, head offsets, head noise.
    wq_a = _centered_uniform((rank, hidden), generator, hidden ** -0.5)
    lo, hi = Q_NORM_RANGE
    q_norm = torch.rand(rank, generator=generator).mul_(hi - lo).add_(lo)
    wq_b = _centered_uniform((n_heads * head_dim, rank), generator, rank ** -0.5)
    beta = _head_offsets(n_heads, generator)
    # x . wp[h] = S * beta_h (from the shared component m: m . m = hidden)
    #           + S * ROW_NOISE * N(0, 1) (from z; the noise is antisymmetric across halves,
    #             so its dot product with m is exactly 0 and the mean over heads stays exact).
    noise_std = LOGIT_GAIN * ROW_NOISE / math.sqrt(2 * (hidden // 2)) if hidden > 1 else 0.0
    noise = _centered_uniform((n_heads, hidden // 2), generator, noise_std)
    shared = shared_hidden_component(hidden).mul_(LOGIT_GAIN / hidden)
    weights_proj = beta * shared
    weights_proj += torch.cat([noise, -noise, torch.zeros(n_heads, hidden % 2)], dim=1)
    return {"wq_a.weight": wq_a, "wq_b.weight": wq_b, "q_norm_weight": q_norm,
            "weights_proj.weight": weights_proj}


def make_layer_states(hidden: int = C.HIDDEN_SIZE, rank: int = C.Q_LORA_RANK,
                      n_heads: int = C.DEFAULT_N_HEADS, head_dim: int = C.HEAD_DIM,
                      layers: Sequence[str] = C.LAYER_NAMES, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> OrderedDict[str, dict]:
    """Synthetic ``{layer: {param: tensor}}`` with the release's keys, deterministic in ``seed``.

    Shapes: ``wq_a [rank, hidden]``, ``wq_b [n_heads*head_dim, rank]``, ``q_norm_weight
    [rank]``, ``weights_proj [n_heads, hidden]``. Generated in float32 and rounded to ``dtype``.
    """
    for name, value in (("hidden", hidden), ("rank", rank), ("n_heads", n_heads),
                        ("head_dim", head_dim)):
        _positive_int(name, value)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if dtype not in _ALLOWED_DTYPES:
        raise TypeError(f"dtype must be one of {[str(d) for d in _ALLOWED_DTYPES]}, got {dtype}")
    sizes = dict(hidden=hidden, rank=rank, n_heads=n_heads, head_dim=head_dim)
    for what, shape in (("wq_a", (rank, hidden)), ("wq_b", (n_heads * head_dim, rank)),
                        ("weights_proj", (n_heads, hidden))):  # float32 while drawn
        V.addressable(what, shape, 4, **sizes)
    states: OrderedDict[str, dict] = OrderedDict()
    for layer in _layer_names(layers):
        params = _make_layer(hidden, rank, n_heads, head_dim, _layer_generator(seed, layer))
        states[layer] = {k: v.to(dtype) for k, v in params.items()}
    return states


# --- mock inputs ------------------------------------------------------------------------------
def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def mock_hidden(batch: int, hidden: int = C.HIDDEN_SIZE, generator: torch.Generator | None = None,
                device="cpu") -> torch.Tensor:
    """Mock decode-token hidden states, float32 ``[batch, hidden]``.

    ``x = z + m``: ``z ~ N(0, 1)`` per element (fresh per row) plus the fixed ``+-1`` vector
    ``m = shared_hidden_component(hidden)`` shared by every row. Elements are O(1) (RMS
    ``sqrt(2)``) like normed DeepSeek hidden states, and rows share a common direction (cosine
    about 0.5) like real residual streams do; the synthetic weights rely on that (module doc).
    """
    batch = _positive_int("batch", batch)
    hidden = _positive_int("hidden", hidden)
    V.addressable("the hidden states", (batch, hidden), 4, batch=batch, hidden=hidden)
    z = torch.randn(batch, hidden, generator=generator, device=_generator_device(generator))
    return (z + shared_hidden_component(hidden).to(z.device)).to(device)


def mock_compressed_k(batch: int, n_chunks: int, generator: torch.Generator | None = None,
                      device="cpu", head_dim: int = C.HEAD_DIM) -> torch.Tensor:
    """Mock compressed keys exactly as the release demo builds them, ``uint8 [B, N, head_dim+4]``.

    ``head_dim`` e4m3fn bytes of ``randn * 0.5`` then a little-endian float32 scale uniform in
    ``[0.05, 0.2]``, both drawn from ``generator`` in that order (design §4 and 9).
    """
    batch = _positive_int("batch", batch)
    if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 0:
        raise ValueError(f"n_chunks must be a non-negative int, got {n_chunks!r}")
    head_dim = _positive_int("head_dim", head_dim)
    V.addressable("the float32 draws", (batch, n_chunks, head_dim), 4, batch=batch,
                  n_chunks=n_chunks, head_dim=head_dim)
    gen_device = _generator_device(generator)
    values = torch.randn(batch, n_chunks, head_dim, generator=generator, device=gen_device)
    fp8 = (values * MOCK_KEY_STD).to(torch.float8_e4m3fn).view(torch.uint8)
    lo, hi = MOCK_SCALE_RANGE
    scale = lo + (hi - lo) * torch.rand(batch, n_chunks, 1, generator=generator, device=gen_device)
    scale_bytes = scale.to(torch.float32).view(torch.uint8)
    if sys.byteorder != "little":  # the format is little-endian whatever the host
        scale_bytes = scale_bytes.flip(-1)
    return torch.cat([fp8, scale_bytes], dim=-1).contiguous().to(device)


# --- writing ----------------------------------------------------------------------------------
_TORCH_SUFFIXES = (".pt", ".pth")


def write_checkpoint(path, states: Mapping | None = None, *, head_dim: int = C.HEAD_DIM,
                     metadata: Mapping[str, str] | None = None, freqs_cis_max_position: int = 0,
                     **make_kwargs) -> Path:
    """Write a joint checkpoint with the release's key names; the format follows the suffix.

    ``states`` is ``{layer: {param: tensor}}`` (checked like a loaded checkpoint, with
    ``head_dim``); without it the weights come from :func:`make_layer_states`
    ``(head_dim=head_dim, **make_kwargs)``. ``.safetensors`` holds
    the four tensors per layer; ``.pt``/``.pth`` is a ``torch.save`` state dict and, with
    ``freqs_cis_max_position > 0``, also holds a ``retrievers.<layer>.freqs_cis`` table of that
    many rows like the release's ``.pt`` (loaders must ignore it). The write is atomic (a
    temporary file renamed into place), so an interrupted run never leaves a partial file.
    """
    from .checkpoint import check_layer_states  # lazy: checkpoint imports nothing from here

    path = Path(os.fspath(path))
    suffix = path.suffix.lower()
    if suffix != ".safetensors" and suffix not in _TORCH_SUFFIXES:
        raise ValueError(f"cannot infer the checkpoint format of {str(path)!r}: expected a "
                         f".safetensors, .pt or .pth suffix, got {suffix or 'none'!r}")
    if states is None:
        seed = make_kwargs.get("seed", 0)
        states = make_layer_states(head_dim=head_dim, **make_kwargs)
        metadata = {"generator": "flashmemory_triton.synthetic",
                    "synthetic_version": str(SYNTHETIC_VERSION), "seed": str(seed),
                    **(metadata or {})}
    elif make_kwargs:
        raise TypeError("write_checkpoint got both states and generator options "
                        f"{sorted(make_kwargs)}")
    states = check_layer_states(states, source="states", head_dim=head_dim)
    flat: OrderedDict[str, torch.Tensor] = OrderedDict()
    for layer, params in states.items():
        for param in C.PARAM_NAMES:
            flat[f"{C.JOINT_PREFIX}{layer}.{param}"] = params[param].detach().cpu().contiguous()
        if freqs_cis_max_position and suffix in _TORCH_SUFFIXES:
            from .reference import precompute_freqs_cis
            flat[f"{C.JOINT_PREFIX}{layer}.freqs_cis"] = precompute_freqs_cis(
                max_position=freqs_cis_max_position)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
    try:
        if suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(dict(flat), tmp_name, metadata=dict(metadata) if metadata else None)
        else:
            torch.save(flat, tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


# --- the embedded default -----------------------------------------------------------------------
def cache_dir() -> Path:
    """``$FLASHMEMORY_CACHE``, else ``$XDG_CACHE_HOME/flashmemory_triton``, else
    ``~/.cache/...``."""
    env = os.environ.get("FLASHMEMORY_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "flashmemory_triton"


def default_checkpoint_path() -> Path:
    """Where the full-size synthetic default lives (the name carries seed and generator version)."""
    return cache_dir() / f"synthetic_ds_v4_seed{DEFAULT_SEED}_v{SYNTHETIC_VERSION}.safetensors"


def _is_readable_safetensors(path: Path) -> bool:
    from safetensors import safe_open
    try:  # parses the header and checks the file covers every tensor (truncation)
        with safe_open(str(path), framework="pt") as f:
            return len(f.keys()) > 0
    except Exception:
        return False


def ensure_default_checkpoint(progress: Callable[[str], None] | None = print) -> Path:
    """Path of the full-size synthetic default checkpoint, generating it on first use.

    Generation (about 510 MB, seconds) reports through ``progress`` (``None``: silent). The
    file is written atomically; a cached file that no longer parses is regenerated.
    """
    path = default_checkpoint_path()
    say = progress or (lambda _msg: None)
    if path.is_file():
        if _is_readable_safetensors(path):
            return path
        say(f"[flashmemory] cached synthetic checkpoint {path} is unreadable; regenerating it")
    shape = DEFAULT_SHAPE
    n_bytes = 4 * len(C.LAYER_NAMES) * (
        shape["rank"] * shape["hidden"] + shape["n_heads"] * shape["head_dim"] * shape["rank"]
        + shape["rank"] + shape["n_heads"] * shape["hidden"])
    say(f"[flashmemory] generating the synthetic default checkpoint ({n_bytes / 1e6:.0f} MB, "
        f"seed {DEFAULT_SEED}, real weights: --ckpt or --hub) -> {path}")
    start = time.perf_counter()
    write_checkpoint(path, seed=DEFAULT_SEED, **shape)
    say(f"[flashmemory] wrote {path} in {time.perf_counter() - start:.1f} s (cached for next time)")
    return path
