"""Checkpoint loading: formats, layouts, layer subsets, placement, the hub, and every bad input.

No test touches the network: hub tests run against a cache directory built here in the real
``huggingface_hub`` layout, with offline mode on and sockets refusing to connect.
"""

from __future__ import annotations

import os
import socket
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flashmemory_triton import FlashMemoryRetriever
from flashmemory_triton import checkpoint as checkpoint_module
from flashmemory_triton import constants as C
from flashmemory_triton import reference as ref
from flashmemory_triton.checkpoint import (
    CHECKPOINT_CANDIDATES,
    DEFAULT_REPO_ID,
    CheckpointError,
    check_layer_states,
    find_checkpoint_in_dir,
    load_layer_states,
    resolve_pretrained,
)
from flashmemory_triton.synthetic import (
    make_layer_states,
    mock_compressed_k,
    mock_hidden,
    write_checkpoint,
)

# Small but structurally complete: H = 256 / 128 = 2 heads, hidden 32, rank 16.
SMALL = dict(hidden=32, rank=16, n_heads=2)
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def states():
    return make_layer_states(**SMALL)


def joint(states, prefix=C.JOINT_PREFIX) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((f"{prefix}{layer}.{p}", t) for layer, params in states.items()
                       for p, t in params.items())


def assert_same_states(got, want):
    assert list(got) == list(want)
    for layer in want:
        assert set(got[layer]) == set(C.PARAM_NAMES)
        for p in C.PARAM_NAMES:
            assert torch.equal(got[layer][p], want[layer][p]), (layer, p)


@pytest.fixture
def no_network(monkeypatch):
    """Offline mode on, and any socket connection fails loudly instead of reaching out."""
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def make_hub_cache(cache_dir: Path, files: dict, repo_id: str = DEFAULT_REPO_ID,
                   commit: str = FAKE_COMMIT, ref_name: str = "main") -> Path:
    """Lay out ``files`` ({repo path: source file}) like huggingface_hub's cache does."""
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    for rel, src in files.items():
        dst = repo_dir / "snapshots" / commit / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(Path(src).read_bytes())
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref_name).write_text(commit)
    return repo_dir


# --- formats and layouts ----------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
def test_joint_roundtrip(tmp_path, states, suffix):
    path = write_checkpoint(tmp_path / f"joint{suffix}", states)
    assert_same_states(load_layer_states(path), states)


def test_pt_freqs_cis_is_ignored(tmp_path, states):
    # The release's .pt stores a RoPE table per layer; it must be ignored, never loaded.
    path = write_checkpoint(tmp_path / "release.pt", states, freqs_cis_max_position=64)
    assert any(k.endswith(".freqs_cis") for k in torch.load(path, weights_only=True))
    loaded = load_layer_states(path)
    assert_same_states(loaded, states)
    assert all("freqs_cis" not in params for params in loaded.values())


def test_extra_keys_are_ignored(tmp_path, states):
    state = joint(states)
    state["retrievers.l10.some_buffer"] = torch.zeros(3)
    state["step_counter"] = torch.tensor(7.0)
    torch.save(state, tmp_path / "extra.pt")
    assert_same_states(load_layer_states(tmp_path / "extra.pt"), states)


def test_legacy_torch_save_format(tmp_path, states):
    # Not a zip archive, so it cannot be memory-mapped: the loader falls back to a plain load.
    torch.save(joint(states), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert_same_states(load_layer_states(tmp_path / "legacy.pt"), states)


def test_pt_keeps_key_order(tmp_path, states):
    order = ["l20", "l10", "l12"]
    torch.save(joint(OrderedDict((n, states[n]) for n in order)), tmp_path / "o.pt")
    assert list(load_layer_states(tmp_path / "o.pt")) == order


def test_safetensors_natural_layer_order(tmp_path):
    # safetensors does not keep insertion order: layers come back in natural name order.
    names = ("l10", "l2", "l1")
    states = make_layer_states(**SMALL, layers=names)
    save_file(dict(joint(states)), str(tmp_path / "n.safetensors"))
    assert list(load_layer_states(tmp_path / "n.safetensors")) == ["l1", "l2", "l10"]


@pytest.mark.parametrize("stem,layers,expected", [
    pytest.param("l12", None, "l12", id="stem-is-layer"),
    pytest.param("retriever_l20_step900", None, "l20", id="layer-token-in-stem"),
    pytest.param("best", None, "best", id="plain-stem"),
    pytest.param("best", ["l10"], "l10", id="named-by-layers-arg"),
])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_per_layer_checkpoint(tmp_path, states, stem, layers, expected, suffix):
    params = states["l12"]
    path = tmp_path / f"{stem}{suffix}"
    if suffix == ".pt":
        torch.save(dict(params), path)
    else:
        save_file(dict(params), str(path))
    loaded = load_layer_states(path, layers=layers)
    assert list(loaded) == [expected]
    assert_same_states(loaded, {expected: params})


def test_per_layer_checkpoint_rejects_several_layers(tmp_path, states):
    save_file(dict(states["l10"]), str(tmp_path / "l10.safetensors"))
    with pytest.raises(CheckpointError, match=r"l10\.safetensors.*holds one layer"):
        load_layer_states(tmp_path / "l10.safetensors", layers=["l10", "l12"])


@pytest.mark.parametrize("layers", [
    pytest.param(["l20"], id="one"),
    pytest.param(["l20", "l10"], id="two-reordered"),
    pytest.param("l12", id="bare-string"),
])
def test_layer_subset(tmp_path, states, layers):
    path = write_checkpoint(tmp_path / "j.safetensors", states)
    loaded = load_layer_states(path, layers=layers)
    names = [layers] if isinstance(layers, str) else layers
    assert_same_states(loaded, OrderedDict((n, states[n]) for n in names))


def test_directory_path(tmp_path, states):
    write_checkpoint(tmp_path / CHECKPOINT_CANDIDATES[0], states)
    assert_same_states(load_layer_states(tmp_path), states)


# --- bad inputs: every error names the file and the key -----------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_layer_states(tmp_path / "nope.safetensors")


def test_path_type():
    with pytest.raises(TypeError, match="path must be a str"):
        load_layer_states(123)


def test_missing_layer(tmp_path, states):
    path = write_checkpoint(tmp_path / "j.safetensors", states)
    with pytest.raises(CheckpointError,
                       match=r"j\.safetensors: layer 'l11' not found.*'l10', 'l12', 'l20'"):
        load_layer_states(path, layers=["l10", "l11"])


@pytest.mark.parametrize("param", C.PARAM_NAMES)
def test_missing_key_joint(tmp_path, states, param):
    state = joint(states)
    del state[f"retrievers.l12.{param}"]
    torch.save(state, tmp_path / "j.pt")
    with pytest.raises(CheckpointError, match=rf"j\.pt: missing key 'retrievers\.l12\.{param}'"):
        load_layer_states(tmp_path / "j.pt")


def test_missing_key_per_layer(tmp_path, states):
    params = dict(states["l10"])
    del params["q_norm_weight"]
    save_file(params, str(tmp_path / "l10.safetensors"))
    with pytest.raises(CheckpointError, match=r"l10\.safetensors: missing key 'q_norm_weight'"):
        load_layer_states(tmp_path / "l10.safetensors")


def test_not_a_retriever_checkpoint(tmp_path):
    save_file({"model.embed.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError,
                       match=r"other\.safetensors: not a FlashMemory "
                             r"checkpoint.*model\.embed\.weight"):
        load_layer_states(tmp_path / "other.safetensors")


R, HID, H = SMALL["rank"], SMALL["hidden"], SMALL["n_heads"]


@pytest.mark.parametrize("param,bad_shape", [
    pytest.param("wq_a.weight", (R, HID, 1), id="wq_a-3d"),
    pytest.param("wq_a.weight", (0, HID), id="wq_a-empty"),
    pytest.param("wq_b.weight", (H * C.HEAD_DIM, R + 1), id="wq_b-rank-mismatch"),
    pytest.param("wq_b.weight", (H * C.HEAD_DIM + 1, R), id="wq_b-rows-not-multiple-of-head-dim"),
    pytest.param("q_norm_weight", (R + 1,), id="q_norm-wrong-length"),
    pytest.param("q_norm_weight", (1, R), id="q_norm-2d"),
    pytest.param("weights_proj.weight", (H + 1, HID), id="weights_proj-wrong-heads"),
    pytest.param("weights_proj.weight", (H, HID + 1), id="weights_proj-wrong-hidden"),
])
def test_wrong_shape(tmp_path, states, param, bad_shape):
    state = joint(states)
    state[f"retrievers.l20.{param}"] = torch.zeros(bad_shape)
    save_file(dict(state), str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError,
                       match=rf"bad\.safetensors: 'retrievers\.l20\.{param}' has shape"):
        load_layer_states(tmp_path / "bad.safetensors")


def test_layers_disagree(tmp_path, states):
    other = make_layer_states(hidden=HID, rank=R + 8, n_heads=H, layers=["l12"])
    state = joint(OrderedDict([("l10", states["l10"]), ("l12", other["l12"])]))
    torch.save(state, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match=r"mixed\.pt: layer 'l12' has .*layer 'l10' has"):
        load_layer_states(tmp_path / "mixed.pt")


@pytest.mark.parametrize("dtype", [
    pytest.param(torch.int64, id="int64"),
    pytest.param(torch.float64, id="float64"),
    pytest.param(torch.uint8, id="uint8"),
    pytest.param(torch.complex64, id="complex64"),
])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_wrong_dtype(tmp_path, states, dtype, suffix):
    state = joint(states)
    key = "retrievers.l12.wq_b.weight"
    state[key] = state[key].to(dtype)
    path = tmp_path / f"bad{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(dict(state), str(path))
    with pytest.raises(TypeError, match=rf"bad{suffix}: '{key}' has dtype {dtype}"):
        load_layer_states(path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_checkpoint_loads(tmp_path, states, dtype):
    half = OrderedDict((n, {p: t.to(dtype) for p, t in ps.items()}) for n, ps in states.items())
    loaded = load_layer_states(write_checkpoint(tmp_path / "h.safetensors", half))
    assert_same_states(loaded, half)


def test_non_finite_weights(tmp_path, states):
    state = joint(states)
    state["retrievers.l10.q_norm_weight"] = state["retrievers.l10.q_norm_weight"].clone()
    state["retrievers.l10.q_norm_weight"][3] = float("nan")
    save_file(dict(state), str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError,
                       match=r"nan\.safetensors: 'retrievers\.l10\.q_norm_weight' holds 1 "
                             r"non-finite"):
        load_layer_states(tmp_path / "nan.safetensors")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_truncated_or_corrupt_file(tmp_path, states, suffix, damage):
    good = write_checkpoint(tmp_path / f"good{suffix}", states)
    data = good.read_bytes()
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes({"truncated": data[: len(data) // 2],
                     "garbage": bytes(range(256)) * 4,
                     "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=rf"bad{suffix}: .*(corrupt|truncated)"):
        load_layer_states(bad)


def test_safetensors_file_named_pt(tmp_path, states):
    path = tmp_path / "renamed.pt"
    path.write_bytes(write_checkpoint(tmp_path / "a.safetensors", states).read_bytes())
    with pytest.raises(CheckpointError, match=r"renamed\.pt: .*looks like a safetensors file"):
        load_layer_states(path)


@pytest.mark.parametrize("name", ["model.bin", "model.npz", "model", "model.safetensor"])
def test_unknown_extension(tmp_path, states, name):
    path = tmp_path / name
    path.write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=rf"{name}: unknown checkpoint extension"):
        load_layer_states(path)


class NotATensor:  # pickled by reference: weights_only=True must refuse it
    pass


@pytest.mark.parametrize("payload,err,pattern", [
    pytest.param(lambda s: {**joint(s), "epoch": 3}, TypeError, r"key 'epoch' holds a int",
                 id="int-value"),
    pytest.param(lambda s: {"state_dict": joint(s)}, TypeError,
                 r"key 'state_dict' holds a .*nested dict", id="nested-dict"),
    pytest.param(lambda s: list(joint(s).values()), TypeError, r"holds a list", id="list"),
    pytest.param(lambda s: torch.zeros(3), TypeError, r"holds a Tensor", id="bare-tensor"),
    pytest.param(lambda s: {"x": NotATensor()}, CheckpointError,
                 r"weights_only=True\) refused it \(Unsupported global", id="python-object"),
    pytest.param(lambda s: {0: torch.zeros(2)}, TypeError, r"keys must be strings", id="int-key"),
])
def test_pt_holding_non_tensors(tmp_path, states, payload, err, pattern):
    torch.save(payload(states), tmp_path / "odd.pt")
    with pytest.raises(err, match=rf"odd\.pt: .*{pattern}"):
        load_layer_states(tmp_path / "odd.pt")


@pytest.mark.parametrize("layers,err", [
    pytest.param([], ValueError, id="empty"),
    pytest.param(["l10", "l10"], ValueError, id="duplicates"),
    pytest.param(5, TypeError, id="not-a-sequence"),
])
def test_bad_layers_argument(tmp_path, states, layers, err):
    path = write_checkpoint(tmp_path / "j.safetensors", states)
    with pytest.raises(err, match="layers"):
        load_layer_states(path, layers=layers)


def test_check_layer_states_in_memory(states):
    assert_same_states(check_layer_states(states), states)
    with pytest.raises(CheckpointError, match="layer 'l10' is missing 'wq_b.weight'"):
        check_layer_states({"l10": {k: v for k, v in states["l10"].items() if k != "wq_b.weight"}})


# --- the retriever on top: dtype, device, subset ----------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_from_checkpoint_placement_and_scores(tmp_path, states, device, dtype):
    path = write_checkpoint(tmp_path / "j.pt", states)
    model = FlashMemoryRetriever.from_checkpoint(path, device=device, layers=["l12", "l10"],
                                                 dtype=dtype, backend="torch", max_position=4096)
    assert model.layer_names == ["l12", "l10"]
    assert model.dtype == dtype and model.device.type == torch.device(device).type
    assert (model.hidden_size, model.q_lora_rank, model.n_heads) == (HID, R, H)
    assert model.max_position == 4096
    g = torch.Generator().manual_seed(0)
    keys = mock_compressed_k(2, 16, generator=g, device=device)
    hidden = mock_hidden(2, HID, generator=g, device=device)
    positions = torch.tensor([63, 4095], device=device)
    with torch.inference_mode():
        got = model(hidden, keys, positions, apply_sigmoid=False)["l10"]
    # Oracle: the reference on the checkpoint's weights rounded to the storage dtype. Same
    # weights and op order, so only the backend's summation order differs (fp32 rounding).
    w = {p: t.to(dtype).to(device) for p, t in states["l10"].items()}
    want = ref.layer_logits(hidden, keys, positions, w, 4096)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


# --- local directories and the hub ------------------------------------------------------------
def test_find_checkpoint_in_dir(tmp_path, states):
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        find_checkpoint_in_dir(tmp_path)
    single = write_checkpoint(tmp_path / "mine.pt", states)
    assert find_checkpoint_in_dir(tmp_path) == single
    write_checkpoint(tmp_path / "other.safetensors", states)
    with pytest.raises(FileNotFoundError, match="several checkpoints"):
        find_checkpoint_in_dir(tmp_path)
    # The release's names win over anything else, safetensors before the .pt.
    pt = write_checkpoint(tmp_path / CHECKPOINT_CANDIDATES[1], states)
    assert find_checkpoint_in_dir(tmp_path) == pt
    st = write_checkpoint(tmp_path / CHECKPOINT_CANDIDATES[0], states)
    assert find_checkpoint_in_dir(tmp_path) == st
    assert find_checkpoint_in_dir(tmp_path, "mine.pt") == single
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        find_checkpoint_in_dir(tmp_path, "absent.pt")


def test_resolve_local_paths(tmp_path, states, no_network):
    path = write_checkpoint(tmp_path / "repo" / CHECKPOINT_CANDIDATES[1], states)
    assert resolve_pretrained(str(tmp_path / "repo")) == path
    assert resolve_pretrained(path) == path
    with pytest.raises(FileNotFoundError, match="looks like a local path"):
        resolve_pretrained(str(tmp_path / "missing-dir"))


@pytest.mark.parametrize("available,expected", [
    pytest.param([0, 1], 0, id="both-prefers-safetensors"),
    pytest.param([1], 1, id="falls-back-to-pt"),
])
def test_resolve_from_hub_cache(tmp_path, states, no_network, available, expected):
    src = {0: write_checkpoint(tmp_path / "src.safetensors", states),
           1: write_checkpoint(tmp_path / "src.pt", states)}
    make_hub_cache(tmp_path / "hub", {CHECKPOINT_CANDIDATES[i]: src[i] for i in available})
    for local_only in (True, False):  # offline mode makes the hub use its cache either way
        path = resolve_pretrained(DEFAULT_REPO_ID, cache_dir=tmp_path / "hub",
                                  local_files_only=local_only)
        want = f"snapshots/{FAKE_COMMIT}/{CHECKPOINT_CANDIDATES[expected]}"
        assert path.as_posix().endswith(want)
    assert_same_states(load_layer_states(path), states)


def test_resolve_hub_filename_and_revision(tmp_path, states, no_network):
    src = write_checkpoint(tmp_path / "src.safetensors", states)
    make_hub_cache(tmp_path / "hub", {"custom/w.safetensors": src}, ref_name="v1")
    kw = dict(cache_dir=tmp_path / "hub", local_files_only=True)
    assert resolve_pretrained(DEFAULT_REPO_ID, filename="custom/w.safetensors", revision="v1",
                              **kw).is_file()
    assert resolve_pretrained(DEFAULT_REPO_ID, filename="custom/w.safetensors",
                              revision=FAKE_COMMIT, **kw).is_file()
    with pytest.raises(FileNotFoundError, match=r"revision main.*custom/w\.safetensors"):
        resolve_pretrained(DEFAULT_REPO_ID, filename="custom/w.safetensors", **kw)


def test_resolve_hub_nothing_cached(tmp_path, no_network):
    with pytest.raises(FileNotFoundError) as info:
        resolve_pretrained("someone/absent-repo", cache_dir=tmp_path, local_files_only=True)
    message = str(info.value)
    assert "someone/absent-repo" in message
    assert all(c in message for c in CHECKPOINT_CANDIDATES)


def test_resolve_hub_fallbacks_without_cache(monkeypatch, tmp_path, no_network):
    """Candidate order, a file the repo lacks, and an unreachable hub (simulated: no network)."""
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # The endpoint answers the probe (the hub itself is simulated below).
    monkeypatch.setattr(checkpoint_module, "_hub_reachable", lambda *a, **k: True)
    calls = []

    def missing_then_found(repo_id, filename, **kw):
        calls.append((filename, kw["local_files_only"]))
        if filename == CHECKPOINT_CANDIDATES[0]:
            raise EntryNotFoundError("404: no such file in the repo")
        return str(tmp_path / "found.pt")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing_then_found)
    assert resolve_pretrained("a/b") == tmp_path / "found.pt"
    assert calls == [(CHECKPOINT_CANDIDATES[0], False), (CHECKPOINT_CANDIDATES[1], False)]

    calls.clear()

    def unreachable(repo_id, filename, **kw):
        calls.append((filename, kw["local_files_only"]))
        raise LocalEntryNotFoundError("connection error and not in the cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(FileNotFoundError, match="'a/b' .*the hub was unreachable"):
        resolve_pretrained("a/b")
    # After one unreachable try the rest is looked up in the cache only (no second retry loop).
    assert calls == [(CHECKPOINT_CANDIDATES[0], False), (CHECKPOINT_CANDIDATES[1], True)]


def test_resolve_invalid_repo_id(tmp_path, no_network):
    with pytest.raises(ValueError, match="neither an existing local directory nor a valid"):
        resolve_pretrained("bad repo id!", cache_dir=tmp_path, local_files_only=True)


def test_from_pretrained_offline(tmp_path, states, no_network, device):
    src = write_checkpoint(tmp_path / "src.safetensors", states)
    make_hub_cache(tmp_path / "hub", {CHECKPOINT_CANDIDATES[0]: src})
    model = FlashMemoryRetriever.from_pretrained(cache_dir=tmp_path / "hub", local_files_only=True,
                                                 device=device, layers=["l20"], backend="torch")
    assert model.layer_names == ["l20"]
    for p in C.PARAM_NAMES:
        assert torch.equal(model.layer_weights("l20")[p].cpu(), states["l20"][p])
    # The same through a plain local directory in place of the repo id.
    local = FlashMemoryRetriever.from_pretrained(str(tmp_path / "hub" / (
        "models--" + DEFAULT_REPO_ID.replace("/", "--")) / "snapshots" / FAKE_COMMIT),
        backend="torch")
    assert local.layer_names == list(C.LAYER_NAMES)


def test_no_network_guard_works(no_network):
    # The guard itself must fail loudly, or the offline tests above prove nothing.
    with pytest.raises(AssertionError, match="network"):
        socket.create_connection(("192.0.2.1", 443), timeout=0.01)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_from_checkpoint_custom_head_dim(tmp_path):
    # H is wq_b rows / head_dim: the loader must use the caller's head_dim, not the default.
    states = make_layer_states(hidden=16, rank=8, n_heads=4, head_dim=64, layers=["l10"])
    path = write_checkpoint(tmp_path / "d64.safetensors", states, head_dim=64)
    model = FlashMemoryRetriever.from_checkpoint(path, head_dim=64, backend="torch")
    assert (model.n_heads, model.head_dim) == (4, 64)
    with pytest.raises(CheckpointError,
                       match=r"weights_proj\.weight' has shape \(4, 16\), expected \[2, 16\]"):
        load_layer_states(path)  # read with head_dim 128: 256 rows -> 2 heads
