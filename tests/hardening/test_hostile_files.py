"""Promise 1: loading never executes code, and a file that is not what it claims is refused
with an error naming the file, the tensor and the problem, before any model weight is touched.

Every case here keeps the adapter's checksum valid (as a hostile author would), so the deeper
checks are the ones that must catch it. After each refusal the model must be exactly as before:
no adapter, no wrapped module, the same weights.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

import peftreg
from peftreg import AdaptedModel, AdapterFileError, UnknownMethodError
from peftreg.io.adapter_dir import CONFIG_FILE, read_adapter_dir
from peftreg.plugin import AdapterHost
from peftreg_plugins.lora import LoraConfig

KEY = "layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture
def saved(make_tiny, tmp_path):
    model = peftreg.adapt(make_tiny(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in model.adapter_parameters("default"):
            p.add_(torch.randn_like(p) * 0.05)
    return model.save_adapter(tmp_path / "adapter")


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    """Any use of pickle or torch.load while these tests run is a failure: the reader must
    only ever parse safetensors and JSON."""
    def refuse(*args, **kwargs):
        raise AssertionError("a loader tried to unpickle data")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def _meta(directory: Path) -> dict:
    return json.loads((directory / CONFIG_FILE).read_text())


def _install(directory: Path, blob: bytes, meta_changes: dict | None = None) -> Path:
    """Put ``blob`` in place as the tensor file, with a checksum that matches it."""
    meta = _meta(directory)
    (directory / meta["tensors"]["file"]).write_bytes(blob)
    meta["tensors"]["sha256"] = hashlib.sha256(blob).hexdigest()
    for key, value in (meta_changes or {}).items():
        meta["config"][key] = value
    (directory / CONFIG_FILE).write_text(json.dumps(meta))
    return directory / meta["tensors"]["file"]


def _raw(header_text: str, data: bytes = b"") -> bytes:
    encoded = header_text.encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def _valid_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return dict(read_adapter_dir(directory).tensors)


def _with(directory: Path, edit) -> bytes:
    tensors = _valid_tensors(directory)
    edit(tensors)
    return st_save(tensors)


F32_2 = '{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'

# (id, builds the tensor-file bytes from the saved directory, config changes, expected words)
CASES = [
    ("empty", lambda d: b"", None, ["too short"]),
    ("truncated-length", lambda d: b"\x05\x00\x00", None, ["too short"]),
    ("truncated-half", lambda d: st_save(_valid_tensors(d))[:200], None,
     ["truncated|outside"]),
    ("truncated-data", lambda d: st_save(_valid_tensors(d))[:-4], None, ["outside"]),
    ("header-longer-than-file", lambda d: struct.pack("<Q", 10**6) + b"{}", None,
     ["header claims 1000000 bytes"]),
    ("header-length-2^63", lambda d: struct.pack("<Q", 2**63) + b"{}", None, ["header claims"]),
    ("header-not-json", lambda d: _raw("{not json"), None, ["header is not valid JSON"]),
    ("header-not-utf8", lambda d: struct.pack("<Q", 2) + b"\xff\xfe", None,
     ["header is not valid JSON"]),
    ("header-deeply-nested", lambda d: _raw("[" * 100_000 + "]" * 100_000), None,
     ["header is not valid JSON"]),
    ("header-array", lambda d: _raw("[]"), None, ["header is not a JSON object"]),
    ("bad-metadata", lambda d: _raw('{"__metadata__": {"a": 1}}'), None,
     ["__metadata__ must map strings"]),
    ("entry-not-object", lambda d: _raw(f'{{"{KEY}": 3}}'), None,
     [KEY, "header entry is not an object"]),
    ("unknown-dtype", lambda d: _raw(f'{{"{KEY}":{{"dtype":"F128","shape":[1],'
                                     '"data_offsets":[0,16]}}', bytes(16)), None,
     [KEY, "unknown dtype 'F128'"]),
    ("negative-shape", lambda d: _raw(f'{{"{KEY}":{{"dtype":"F32","shape":[-1],'
                                      '"data_offsets":[0,0]}}'), None, [KEY, "shape"]),
    ("offsets-out-of-range", lambda d: _raw(f'{{"{KEY}":{F32_2.replace("0,8", "8,16")}}}',
                                            bytes(8)), None, [KEY, "outside"]),
    ("offsets-reversed", lambda d: _raw(f'{{"{KEY}":{F32_2.replace("0,8", "8,0")}}}',
                                        bytes(8)), None, [KEY, "outside"]),
    ("offsets-not-ints", lambda d: _raw(f'{{"{KEY}":{F32_2.replace("0,8", "0.0,8")}}}',
                                        bytes(8)), None, [KEY, "two integers"]),
    ("bytes-do-not-fit-shape", lambda d: _raw(f'{{"{KEY}":{F32_2.replace("[2]", "[3]")}}}',
                                              bytes(8)), None, [KEY, "needs 12"]),
    ("10^13-elements", lambda d: _raw(f'{{"{KEY}":{{"dtype":"F32","shape":[10000000000000],'
                                      '"data_offsets":[0,40000000000000]}}', bytes(8)), None,
     [KEY, "outside"]),
    ("duplicate-tensor", lambda d: _raw(f'{{"{KEY}":{F32_2},"{KEY}":{F32_2}}}', bytes(8)),
     None, [KEY, "more than once"]),
    ("overlapping", lambda d: _raw(f'{{"a":{F32_2},"b":{F32_2.replace("0,8", "4,12")}}}',
                                   bytes(12)), None, ["'a' and 'b' overlap"]),
    ("int-dtype", lambda d: _with(d, lambda t: t.__setitem__(KEY, t[KEY].to(torch.int32))),
     None, [KEY, "must be floating point"]),
    ("bool-dtype", lambda d: _with(d, lambda t: t.__setitem__(KEY, t[KEY] > 0)), None,
     [KEY, "must be floating point"]),
    ("nan", lambda d: _with(d, lambda t: t[KEY].view(-1).__setitem__(3, float("nan"))), None,
     [KEY, "1 NaN or infinite"]),
    ("inf", lambda d: _with(d, lambda t: t[KEY].view(-1)[:2].fill_(float("-inf"))), None,
     [KEY, "2 NaN or infinite"]),
    ("float8-nan", lambda d: _with(d, lambda t: t.__setitem__(
        KEY, torch.full_like(t[KEY], float("nan")).to(torch.float8_e4m3fn))), None,
     [KEY, "128 NaN or infinite"]),
    ("float8-fine-but-shape", lambda d: _with(d, lambda t: t.__setitem__(
        KEY, torch.zeros(3).to(torch.float8_e5m2))), None, [KEY, r"has shape \(3,\)"]),
    ("wrong-shape", lambda d: _with(d, lambda t: t.__setitem__(KEY, torch.zeros(4, 7))), None,
     [KEY, r"has shape \(4, 7\), the model expects \(4, 32\)"]),
    ("missing-key", lambda d: _with(d, lambda t: t.pop(KEY)), None,
     [KEY, "missing tensor"]),
    ("extra-key", lambda d: _with(d, lambda t: t.__setitem__("layers.9.evil", torch.zeros(1))),
     None, ["layers.9.evil", "unexpected tensor"]),
    ("pickle-in-safetensors-name", lambda d: pickle.dumps({"x": 1}, protocol=2), None,
     ["header claims|too short|not valid JSON"]),
    # Sizes that would exhaust memory: the config's rank is not bounded by the file, so it
    # must be refused from the config and the header before add_adapter allocates anything.
    ("rank-10^9", lambda d: st_save(_valid_tensors(d)), {"r": 10**9},
     # 2 layers x (q: 32 + 32, v: 32 + 16) x rank; the file holds rank 4.
     ["asks for 224000000000 lora parameters", "holds only 896", "refused before allocating"]),
    ("rank-pattern-10^12", lambda d: st_save(_valid_tensors(d)),
     {"rank_pattern": {"q_proj": 10**12}}, ["asks for", "refused before allocating"]),
]


@pytest.mark.parametrize(("make", "config", "words"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_hostile_tensor_file_is_refused_and_the_model_untouched(saved, make_tiny, token_batch,
                                                                 make, config, words):
    tensor_path = _install(saved, make(saved), config)
    model = AdaptedModel(make_tiny())
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    with pytest.raises(AdapterFileError) as info:
        model.load_adapter(saved)
    message = str(info.value)
    # The file is named: the tensor file for tensor problems, the directory for config ones.
    assert str(tensor_path) in message or str(saved) in message, message
    for word in words:
        assert any(re.search(w, message) for w in word.split("|")), (word, message)
    assert model.adapters == {}
    assert not any(isinstance(m, AdapterHost) for m in model.modules())
    after = model.model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_untouched_twin_loads(saved, make_tiny, token_batch):
    """The fixture itself is loadable: the refusals above are caused by the damage alone."""
    _install(saved, st_save(_valid_tensors(saved)))
    model = AdaptedModel(make_tiny())
    model.load_adapter(saved)
    assert list(model.adapters) == ["default"]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"format": "peftreg-adapter", "format": "x"}', ["key 'format' appears twice"]),
        ("[" * 50_000, ["not valid JSON"]),
        (b"\xff\xfe\x00", ["not valid JSON"]),
    ],
    ids=["duplicate-key", "deep-nesting", "not-utf8"],
)
def test_hostile_adapter_json_is_refused(saved, make_tiny, text, words):
    path = saved / CONFIG_FILE
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(AdapterFileError) as info:
        peftreg.load(make_tiny(), saved)
    assert str(path) in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_unknown_method_names_the_file(saved, make_tiny):
    meta = _meta(saved)
    meta["method"] = "frobnicate"
    (saved / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(UnknownMethodError,
                       match="no installed method is called 'frobnicate'") as info:
        peftreg.load(make_tiny(), saved)
    assert str(saved / CONFIG_FILE) in str(info.value)


def test_a_pickle_checkpoint_is_never_loaded(tmp_path, make_tiny):
    """A PEFT directory holding only ``adapter_model.bin`` (a pickle) is refused with a hint
    instead of being unpickled."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(AdapterFileError, match=r"adapter_model.bin is a pickle"):
        peftreg.load(make_tiny(), tmp_path)


def test_a_file_larger_than_memory_is_refused_before_reading(saved, monkeypatch):
    from peftreg.io import validate

    monkeypatch.setattr(validate, "memory_limit", lambda: 100)
    path = next(saved.glob("adapter.*.safetensors"))
    with pytest.raises(AdapterFileError, match="more than this machine's 100 bytes"):
        validate.read_safetensors(path)


def test_nf4_state_with_an_absurd_shape_is_refused_without_allocating():
    from peftreg.quant.nf4_tensor import NF4FormatError, NF4Tensor

    state = NF4Tensor.quantize(torch.randn(8, 64)).to_state_dict("w")
    meta_key = next(k for k in state if k.endswith("quant_state.bitsandbytes__nf4"))
    meta = json.loads(bytes(state[meta_key].tolist()))
    meta["shape"] = [10**7, 10**6]
    state[meta_key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(NF4FormatError, match="code bytes but shape"):
        NF4Tensor.from_state_dict(state, "w")


@pytest.fixture
def peft_saved(make_tiny, tmp_path):
    model = peftreg.adapt(make_tiny(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return model.save_adapter(tmp_path / "peft", format="peft")


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda doc: doc.update(r=10**9), ["asks for 224000000000", "refused before allocating"]),
        (lambda doc: doc.update(rank_pattern={"q_proj": 10**12}),
         ["asks for 128000000000384", "refused before allocating"]),
    ],
    ids=["rank-10^9", "rank-pattern-10^12"],
)
def test_peft_config_with_absurd_rank_is_refused_unallocated(peft_saved, make_tiny, edit, words):
    path = peft_saved / "adapter_config.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    model = AdaptedModel(make_tiny())
    with pytest.raises(AdapterFileError) as info:
        model.load_adapter(peft_saved)
    assert str(peft_saved) in str(info.value)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert model.adapters == {}


def test_peft_config_with_a_duplicate_key_is_refused(peft_saved, make_tiny):
    path = peft_saved / "adapter_config.json"
    path.write_text(path.read_text().replace('"r": 4', '"r": 4, "r": 400'))
    with pytest.raises(AdapterFileError, match="key 'r' appears twice") as info:
        peftreg.load(make_tiny(), peft_saved)
    assert str(path) in str(info.value)
