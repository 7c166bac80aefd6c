"""Property-based checks: whatever the input, the outcome is a valid result or a named error."""

from __future__ import annotations

import itertools
import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from peftreg import AdapterFileError, ConfigError, PeftregError, TargetNotFoundError
from peftreg.io.validate import DTYPE_SIZES, parse_header, read_safetensors
from peftreg.reference_model import ReferenceConfig, ReferenceTransformer
from peftreg.targets import select_targets
from peftreg_plugins.lora import LoraConfig

JSON_SCALARS = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(
    allow_nan=True) | st.text(max_size=12)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
LORA_FIELDS = ["r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights",
               "target_modules", "exclude_modules", "layers_to_transform", "rank_pattern",
               "modules_to_save", "adapter_dtype", "bogus"]


@settings(max_examples=80, deadline=None)
@given(st.dictionaries(st.sampled_from(LORA_FIELDS), JSON_VALUES, max_size=6))
def test_any_json_config_is_valid_or_a_config_error(data):
    try:
        config = LoraConfig.from_dict({"method": "lora", **data})
    except ConfigError:
        return
    assert LoraConfig.from_json(config.to_json()) == config
    assert config.r > 0 and 0 <= config.lora_dropout < 1


@settings(max_examples=100, deadline=None)
@given(r=st.integers(1, 512), alpha=st.floats(1e-3, 1e3), dropout=st.floats(0, 0.99),
       targets=st.lists(st.sampled_from(["q_proj", "v_proj", "k_proj", "o_proj"]), min_size=1,
                        unique=True),
       rslora=st.booleans())
def test_valid_configs_round_trip_exactly(r, alpha, dropout, targets, rslora):
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        use_rslora=rslora)
    assert LoraConfig.from_json(config.to_json()) == config


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_never_crash_the_header_parser(blob):
    try:
        entries, metadata = parse_header(blob, "fuzz.safetensors")
    except AdapterFileError as exc:
        assert "fuzz.safetensors" in str(exc)
        return
    _assert_a_valid_header(blob, entries, metadata)


def _assert_a_valid_header(blob, entries, metadata):
    """What an accepted header must be, checked independently of the parser: every entry a
    known dtype with a shape whose byte count fills its offsets inside the data, no overlaps,
    string metadata; and safetensors' own reader agrees that the file is readable."""
    body = len(blob) - 8 - struct.unpack("<Q", blob[:8])[0]
    spans = []
    for name, entry in entries.items():
        assert entry["dtype"] in DTYPE_SIZES, name
        begin, end = entry["data_offsets"]
        count = 1
        for dim in entry["shape"]:
            assert isinstance(dim, int) and dim >= 0
            count *= dim
        assert 0 <= begin <= end <= body and end - begin == count * DTYPE_SIZES[entry["dtype"]]
        spans.append((begin, end))
    spans.sort()
    assert all(a_end <= b_begin for (_, a_end), (b_begin, _) in itertools.pairwise(spans))
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    st_load(bytes(blob))  # raises if safetensors disagrees


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(position=st.integers(0, 10**6), value=st.integers(0, 255), cut=st.integers(0, 10**6))
def test_damaged_safetensors_are_rejected_by_name(tmp_path_factory, position, value, cut):
    blob = bytearray(st_save({"a": torch.arange(6, dtype=torch.float32).view(2, 3),
                              "b": torch.ones(4)}))
    blob[position % len(blob)] = value
    damaged = bytes(blob[: max(1, cut % (len(blob) + 1))])
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    try:
        tensors, _ = read_safetensors(path, damaged)
    except AdapterFileError as exc:
        assert str(path) in str(exc)
        return
    for tensor in tensors.values():
        assert tensor.is_floating_point() and torch.isfinite(tensor).all()


@settings(max_examples=100, deadline=None)
@given(header=st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=4))
def test_hostile_headers_are_refused(header):
    # Random headers are almost never valid: each one is refused with a message naming the
    # file, or, if accepted, must pass the independent check of a valid header.
    text = json.dumps(header).encode()
    blob = struct.pack("<Q", len(text)) + text + bytes(16)
    try:
        entries, metadata = parse_header(blob, "h.safetensors")
    except AdapterFileError as exc:
        assert "h.safetensors" in str(exc)
        return
    _assert_a_valid_header(blob, entries, metadata)


@pytest.mark.parametrize(("header", "accepted"), [
    ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, True),
    ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, False),  # short
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}, False),   # overlap
    ({"a": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}, False),     # unknown dtype
    ({"__metadata__": {"format": 1}}, False),                                   # non-string
], ids=["valid", "short", "overlap", "dtype", "metadata"])
def test_header_checks_can_fail_and_pass(header, accepted):
    # The twin of the property tests above: known-good is accepted, known-bad refused.
    text = json.dumps(header).encode()
    blob = struct.pack("<Q", len(text)) + text + bytes(16)
    if accepted:
        _assert_a_valid_header(blob, *parse_header(blob, "h.safetensors"))
    else:
        with pytest.raises(AdapterFileError, match=r"h\.safetensors"):
            parse_header(blob, "h.safetensors")


MODEL = ReferenceTransformer(ReferenceConfig(hidden_size=16, num_heads=2, num_kv_heads=1,
                                             intermediate_size=24, num_layers=3))
NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "mlp",
         "lm_head", "embed_tokens", "norm", "nothing", "layers.1.mlp.up_proj", "self_attn"]


@settings(max_examples=80, deadline=None)
@given(targets=st.one_of(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4),
                         st.sampled_from(["all-linear", r".*proj", r"layers\.[0-1]\..*", "(",
                                          r".*"])),
       exclude=st.none() | st.lists(st.sampled_from(NAMES), min_size=1, max_size=2),
       layers=st.none() | st.lists(st.integers(0, 5), min_size=1, max_size=3))
def test_target_selection_returns_linear_layers_or_a_named_error(targets, exclude, layers):
    try:
        config = LoraConfig(target_modules=targets, exclude_modules=exclude,
                            layers_to_transform=layers)
        paths = select_targets(MODEL, config, (torch.nn.Linear,))
    except (ConfigError, TargetNotFoundError):
        return
    assert paths and len(set(paths)) == len(paths)
    for path in paths:
        assert isinstance(MODEL.get_submodule(path), torch.nn.Linear)
        if layers is not None:
            assert int(path.split(".")[1]) in layers


def test_peftreg_errors_share_one_base():
    for error in (ConfigError, TargetNotFoundError, AdapterFileError):
        assert issubclass(error, PeftregError)
    with pytest.raises(PeftregError):
        LoraConfig(r=-1)
