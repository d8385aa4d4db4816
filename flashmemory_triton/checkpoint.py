"""Loading FlashMemory checkpoints: files on disk and the Hugging Face hub (design §8).

Formats
-------
* ``.safetensors`` (the release's ``flashmemory_ds_v4.safetensors``) and ``.pt``/``.pth``
  (``torch.save`` state dicts such as ``checkpoints/top3_R930_joint.pt``, read only with
  ``torch.load(weights_only=True)``, memory-mapped when the file allows it).
* **Joint** checkpoints: keys ``retrievers.<layer>.<param>``. ``retrievers.<layer>.freqs_cis``
  is ignored (the RoPE table is recomputed), as are other ``retrievers.<layer>.*`` extras and
  keys outside ``retrievers.``.
* **Per-layer** checkpoints: the four keys without a prefix. The layer is named by
  ``layers=[name]`` if given, else by an ``l<digits>`` token in the file stem
  (``retriever_l12.pt`` -> ``l12``), else by the whole stem.

Layer order: ``layers`` if given; else the file's key order for ``.pt``, and natural name
order (``l2`` < ``l10`` < ``l12``) for ``.safetensors``, which does not keep insertion order.

Every tensor must be float32, bfloat16 or float16 (the retriever's ``dtype`` then decides
storage) and finite; shapes must agree within and across layers. Every error names the file
and the key. Structural problems raise :class:`CheckpointError` (a ``ValueError``), wrong
dtypes or non-tensor values ``TypeError``, a missing file ``FileNotFoundError``.
"""

from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from . import constants as C

__all__ = [
    "CheckpointError",
    "DEFAULT_REPO_ID",
    "CHECKPOINT_CANDIDATES",
    "load_layer_states",
    "check_layer_states",
    "find_checkpoint_in_dir",
    "resolve_pretrained",
]

DEFAULT_REPO_ID = "libertywing/FlashMemory-Deepseek-V4"
# Files the release publishes, in order of preference (slim safetensors first).
CHECKPOINT_CANDIDATES = ("flashmemory_ds_v4.safetensors", "checkpoints/top3_R930_joint.pt")

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth")
ALLOWED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_IGNORED_PARAMS = ("freqs_cis",)
_LAYER_TOKEN = re.compile(r"(?:^|[^A-Za-z0-9])(l\d+)(?![0-9])")


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or does not hold a FlashMemory retriever."""


# --- reading raw tensors ----------------------------------------------------------------------
def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


class _SafetensorsFile:
    """Lazy access: the header is parsed up front, tensors are read only when asked for."""

    natural_order = True

    def __init__(self, path: Path):
        from safetensors import safe_open
        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
            self.keys = list(self._handle.keys())
        except Exception as exc:  # SafetensorError has no importable base across versions
            raise CheckpointError(f"{path}: not a readable .safetensors file (truncated or "
                                  f"corrupt?): {exc}") from None
        self._path = path

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{self._path}: cannot read tensor {key!r} (truncated or "
                                  f"corrupt file?): {exc}") from None


class _TorchFile:
    natural_order = False

    def __init__(self, path: Path):
        state = _torch_load(path)
        if not isinstance(state, Mapping):
            raise TypeError(f"{path}: holds a {type(state).__name__}, expected a state dict "
                            "{name: tensor}")
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                hint = (" (a nested dict: save the inner state dict itself)"
                        if isinstance(value, Mapping) else "")
                raise TypeError(f"{path}: key {key!r} holds a {type(value).__name__}, but a "
                                f"checkpoint may hold only tensors{hint}")
        bad_keys = [k for k in state if not isinstance(k, str)]
        if bad_keys:
            raise TypeError(f"{path}: state dict keys must be strings, got {bad_keys[0]!r}")
        self._state = state
        self.keys = list(state.keys())

    def get(self, key: str) -> torch.Tensor:
        return self._state[key]


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with its little-endian u64 header length, then ``{``."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        return (len(head) == 9 and head[8:9] == b"{"
                and int.from_bytes(head[:8], "little") < path.stat().st_size)
    except OSError:
        return False


def _torch_load(path: Path):
    def load(mmap: bool):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    def unreadable(reason: str) -> CheckpointError:
        hint = ("; it looks like a safetensors file: give it a .safetensors suffix"
                if _looks_like_safetensors(path) else "")
        return CheckpointError(f"{path}: {reason}{hint}")

    try:
        try:
            # mmap: tensors the retriever does not need (freqs_cis, ~134 MB a layer) are never read.
            return load(mmap=True)
        except (RuntimeError, OSError) as exc:
            if isinstance(exc, (FileNotFoundError, PermissionError)):
                raise
            # Legacy (non-zip) torch.save files cannot be mapped; a damaged file gets a second
            # chance too, so the error reported is the plain loader's.
            return load(mmap=False)
    except pickle.UnpicklingError as exc:
        # Keep torch's reason, not its advice on allow-listing globals (we never do that).
        found = re.search(r"Unsupported[^\n]*?(?=\. |\n|$)", str(exc))
        reason = found.group(0) if found else "not a weights-only pickle"
        raise unreadable(f"torch.load(weights_only=True) refused it ({reason}): the file is "
                         "corrupt or holds Python objects besides tensors (it is never loaded "
                         "with weights_only=False)") from None
    except FileNotFoundError:
        raise
    except PermissionError as exc:
        raise CheckpointError(f"{path}: cannot read it: {exc}") from None
    except Exception as exc:  # RuntimeError (zip reader), EOFError, ... from a damaged file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise unreadable(
            f"not a readable torch.save file (truncated or corrupt?): {first}") from None


def _open(path: Path):
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _SafetensorsFile(path)
    if suffix in TORCH_SUFFIXES:
        return _TorchFile(path)
    raise CheckpointError(f"{path}: unknown checkpoint extension {suffix or '(none)'!r}; expected "
                          f"one of {list(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}")


# --- layout -----------------------------------------------------------------------------------
def _layer_list(layers) -> list[str] | None:
    if layers is None:
        return None
    if isinstance(layers, str):
        layers = [layers]
    try:
        names = list(layers)
    except TypeError:
        raise TypeError("layers must be a sequence of layer names, "
                        f"got {type(layers).__name__}") from None
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"layers must be a non-empty sequence of layer names, got {layers!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"layers has duplicates: {names}")
    return names


def _joint_layout(path: Path, keys: list[str], natural_order: bool) -> OrderedDict[str, dict]:
    """``{layer: {param: key}}`` for every ``retrievers.<layer>.<param>`` key."""
    layout: OrderedDict[str, dict] = OrderedDict()
    for key in keys:
        if not key.startswith(C.JOINT_PREFIX):
            continue
        layer, _, param = key[len(C.JOINT_PREFIX):].partition(".")
        if not layer or not param:
            raise CheckpointError(f"{path}: key {key!r} is not of the form "
                                  f"'{C.JOINT_PREFIX}<layer>.<param>'")
        layout.setdefault(layer, {})[param] = key
    if natural_order:
        layout = OrderedDict(sorted(layout.items(), key=lambda kv: _natural_key(kv[0])))
    return layout


def _per_layer_name(path: Path, layers: list[str] | None) -> str:
    if layers is not None:
        if len(layers) != 1:
            raise CheckpointError(f"{path}: a per-layer checkpoint (keys without "
                                  f"'{C.JOINT_PREFIX}') holds one layer, but layers={layers} "
                                  "asks for several")
        return layers[0]
    match = _LAYER_TOKEN.search(path.stem)
    return match.group(1) if match else path.stem


def _select(path: Path, keys: list[str], layers: list[str] | None,
            natural_order: bool) -> OrderedDict[str, dict]:
    """Pick ``{layer: {param: key}}`` for the requested layers, checking presence only."""
    layout = _joint_layout(path, keys, natural_order)
    joint = bool(layout)
    if not joint:
        present = [p for p in C.PARAM_NAMES if p in keys]
        if not present:
            sample = keys[:6] + (["..."] if len(keys) > 6 else [])
            raise CheckpointError(
                f"{path}: not a FlashMemory checkpoint: no '{C.JOINT_PREFIX}<layer>.<param>' keys "
                f"and no per-layer keys {list(C.PARAM_NAMES)}; found {sample or 'no tensors'}")
        name = _per_layer_name(path, layers)
        layout = OrderedDict([(name, {p: p for p in C.PARAM_NAMES if p in keys})])
    elif layers is not None:
        missing = [n for n in layers if n not in layout]
        if missing:
            raise CheckpointError(f"{path}: layer {missing[0]!r} not found; the checkpoint has "
                                  f"layers {list(layout)}")
        layout = OrderedDict((n, layout[n]) for n in layers)
    for name, params in layout.items():
        for param in C.PARAM_NAMES:
            if param not in params:
                key = f"{C.JOINT_PREFIX}{name}.{param}" if joint else param
                raise CheckpointError(f"{path}: missing key {key!r} (layer {name!r} has "
                                      f"{sorted(params)})")
    return layout


# --- validation -------------------------------------------------------------------------------
def _check_tensor(source: str, key: str, t, check_finite: bool) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{source}: {key!r} must be a tensor, got {type(t).__name__}")
    if t.dtype not in ALLOWED_DTYPES:
        raise TypeError(f"{source}: {key!r} has dtype {t.dtype}, expected one of "
                        f"{[str(d) for d in ALLOWED_DTYPES]}")
    if check_finite and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{source}: {key!r} holds {bad} non-finite (NaN/inf) values")
    return t


def _layer_dims(source: str, keys: Mapping[str, str], p: Mapping[str, torch.Tensor],
                head_dim: int) -> tuple[int, int, int]:
    """``(hidden, rank, heads)`` of one layer; H from wq_b rows, hidden and rank from wq_a."""
    def shape_error(param, expected):
        return CheckpointError(f"{source}: {keys[param]!r} has shape {tuple(p[param].shape)}, "
                               f"expected {expected}")

    wq_a, wq_b = p["wq_a.weight"], p["wq_b.weight"]
    if wq_a.dim() != 2 or 0 in wq_a.shape:
        raise shape_error("wq_a.weight", "a non-empty 2-D [q_lora_rank, hidden]")
    rank, hidden = wq_a.shape
    if wq_b.dim() != 2 or wq_b.shape[1] != rank or wq_b.shape[0] == 0 or wq_b.shape[0] % head_dim:
        raise shape_error("wq_b.weight", f"[n_heads*{head_dim}, {rank}] (rank {rank} from "
                                         f"{keys['wq_a.weight']!r} {tuple(wq_a.shape)})")
    n_heads = wq_b.shape[0] // head_dim
    if tuple(p["q_norm_weight"].shape) != (rank,):
        raise shape_error("q_norm_weight", f"[{rank}] (rank from {keys['wq_a.weight']!r})")
    if tuple(p["weights_proj.weight"].shape) != (n_heads, hidden):
        raise shape_error("weights_proj.weight",
                          f"[{n_heads}, {hidden}] (n_heads = {keys['wq_b.weight']!r} rows "
                          f"{wq_b.shape[0]} / head_dim {head_dim}, hidden from "
                          f"{keys['wq_a.weight']!r})")
    return hidden, rank, n_heads


def _check_layers(source: str, layout: Mapping[str, Mapping[str, str]],
                  states: Mapping[str, Mapping[str, torch.Tensor]], head_dim: int,
                  check_finite: bool) -> OrderedDict[str, dict]:
    out: OrderedDict[str, dict] = OrderedDict()
    first = None
    for name, keys in layout.items():
        params = {param: _check_tensor(source, keys[param], states[name][param], check_finite)
                  for param in C.PARAM_NAMES}
        dims = _layer_dims(source, keys, params, head_dim)
        if first is None:
            first = (name, dims)
        elif dims != first[1]:
            raise CheckpointError(
                f"{source}: layer {name!r} has (hidden, q_lora_rank, n_heads) {dims} but layer "
                f"{first[0]!r} has {first[1]} (see {keys['wq_a.weight']!r}, "
                f"{keys['wq_b.weight']!r})")
        out[name] = params
    return out


def check_layer_states(states: Mapping, source: str = "layer_states", head_dim: int = C.HEAD_DIM,
                       check_finite: bool = True) -> OrderedDict[str, dict]:
    """Validate an in-memory ``{layer: {param: tensor}}`` like a loaded checkpoint."""
    if not isinstance(states, Mapping) or not states:
        raise TypeError(f"{source} must be a non-empty mapping {{layer: {{param: tensor}}}}, "
                        f"got {type(states).__name__}")
    layout = OrderedDict()
    for name, params in states.items():
        if not isinstance(params, Mapping):
            raise TypeError(f"{source}[{name!r}] must be a mapping of tensors, got "
                            f"{type(params).__name__}")
        missing = [p for p in C.PARAM_NAMES if p not in params]
        if missing:
            raise CheckpointError(f"{source}: layer {name!r} is missing {missing[0]!r} "
                                  f"(has {sorted(params)})")
        layout[name] = {p: f"{name}.{p}" for p in C.PARAM_NAMES}
    return _check_layers(source, layout, states, head_dim, check_finite)


# --- public loaders ---------------------------------------------------------------------------
def load_layer_states(path, layers: Sequence[str] | None = None, *, head_dim: int = C.HEAD_DIM,
                      check_finite: bool = True) -> OrderedDict[str, dict]:
    """Read a joint or per-layer checkpoint into ``{layer: {param: tensor}}`` (CPU tensors).

    ``path`` may also be a directory, searched like :func:`find_checkpoint_in_dir`. ``layers``
    picks a subset (in that order). See the module docstring for formats and errors.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path).expanduser()
    if path.is_dir():
        path = find_checkpoint_in_dir(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    wanted = _layer_list(layers)
    reader = _open(path)
    layout = _select(path, reader.keys, wanted, reader.natural_order)
    raw = {name: {param: reader.get(key) for param, key in keys.items()
                  if param in C.PARAM_NAMES} for name, keys in layout.items()}
    return _check_layers(str(path), layout, raw, head_dim, check_finite)


def find_checkpoint_in_dir(directory, filename: str | None = None) -> Path:
    """The checkpoint inside a local directory (a local copy of the hub repo, or any folder).

    ``filename`` if given; else the release's files in :data:`CHECKPOINT_CANDIDATES` order;
    else the directory's only ``.safetensors``/``.pt``/``.pth`` file.
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"not a directory: {directory}")
    if filename is not None:
        path = directory / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (filename {filename!r} in {directory})")
        return path
    for candidate in CHECKPOINT_CANDIDATES:
        if (directory / candidate).is_file():
            return directory / candidate
    found = sorted(p for p in directory.iterdir()
                   if p.is_file() and p.suffix.lower() in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)
    if len(found) == 1:
        return found[0]
    if found:
        raise FileNotFoundError(f"{directory} holds several checkpoints {[p.name for p in found]}; "
                                "pass filename= (--hub-filename) to pick one")
    raise FileNotFoundError(f"no checkpoint in {directory}: looked for "
                            f"{list(CHECKPOINT_CANDIDATES)} and any .safetensors/.pt/.pth file")


def _looks_like_path(repo_id: str) -> bool:
    return (repo_id.startswith((".", "/", "~", "\\")) or os.path.isabs(repo_id)
            or repo_id.count("/") > 1)


def _hub_offline() -> bool:
    from huggingface_hub import constants
    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if callable(check) else getattr(constants, "HF_HUB_OFFLINE", False))


HUB_PROBE_TIMEOUT_S = 3.0  # one TCP connect to the hub; the hub client's own retries take ~25 s
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Can a TCP connection to the hub endpoint be opened? One connect, ``timeout`` seconds.

    Offline, ``huggingface_hub`` retries a failed request five times with backoff (about 25 s)
    before it falls back to the cache; this probe lets :func:`resolve_pretrained` go to the
    cache at once. Behind a proxy a direct connect proves nothing, so it answers True there
    and leaves the decision to the hub client."""
    import socket
    from urllib.parse import urlparse
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    from huggingface_hub import constants
    url = urlparse(getattr(constants, "ENDPOINT", None) or "https://huggingface.co")
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:  # no DNS, refused, unreachable, timed out
        return False


def resolve_pretrained(repo_id: str = DEFAULT_REPO_ID, filename: str | None = None,
                       revision: str | None = None, cache_dir=None,
                       local_files_only: bool = False) -> Path:
    """Local path of a pretrained checkpoint: a local directory/file, or via ``huggingface_hub``.

    An existing directory is searched with :func:`find_checkpoint_in_dir`; an existing file is
    returned as is. Otherwise ``huggingface_hub.hf_hub_download`` fetches ``filename``, or the
    first of :data:`CHECKPOINT_CANDIDATES` the repo (or, offline, the cache) has. The hub's own
    cache, ``HF_HUB_OFFLINE`` and ``local_files_only`` apply as usual; when the hub endpoint
    cannot be reached (one short TCP connect, :func:`_hub_reachable`), only the cache is read,
    so an offline call fails (or uses the cache) in seconds, not after the hub's retries.
    """
    if not isinstance(repo_id, (str, os.PathLike)):
        raise TypeError(f"repo_id must be a str (hub repo id or local directory), got "
                        f"{type(repo_id).__name__}")
    local = Path(repo_id).expanduser()
    if local.is_dir():
        return find_checkpoint_in_dir(local, filename)
    if local.is_file() and filename is None:
        return local
    repo_id = os.fspath(repo_id)
    if _looks_like_path(repo_id):
        raise FileNotFoundError(f"{repo_id!r} looks like a local path but no such directory exists")

    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    candidates = (filename,) if filename is not None else CHECKPOINT_CANDIDATES
    where = f"{repo_id!r} (revision {revision or 'main'})"
    cache_only = bool(local_files_only) or _hub_offline()
    # Offline: look in the cache at once instead of waiting out the hub client's retries.
    unreachable = not cache_only and not _hub_reachable()
    cache_only = cache_only or unreachable
    for candidate in candidates:
        try:
            return Path(hf_hub_download(repo_id, candidate, revision=revision,
                                        cache_dir=cache_dir, local_files_only=cache_only))
        except LocalEntryNotFoundError:
            # Not cached and (offline, or the hub unreachable). After one unreachable try, the
            # other candidates are looked up in the cache only: the hub's retries take ~20 s.
            unreachable = unreachable or not cache_only
            cache_only = True
        except EntryNotFoundError:  # the repo exists but does not have this file
            continue
        except HFValidationError as exc:
            raise ValueError(f"repo_id {repo_id!r} is neither an existing local directory nor a "
                             f"valid Hugging Face repo id: {exc}") from None
        except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
            raise FileNotFoundError(
                f"Hugging Face repo {where}: {str(exc).splitlines()[0]}") from None
        except HfHubHTTPError as exc:
            raise FileNotFoundError(f"Hugging Face repo {where}: download failed: "
                                    f"{str(exc).splitlines()[0]}") from None
    if unreachable:
        why = "the hub was unreachable and the local cache holds none of"
    elif cache_only:
        why = "local_files_only (or HF_HUB_OFFLINE) is set and the local cache holds none of"
    else:
        why = "the repo has none of"
    raise FileNotFoundError(f"no FlashMemory checkpoint found for {where}: {why} "
                            f"{list(candidates)}")
