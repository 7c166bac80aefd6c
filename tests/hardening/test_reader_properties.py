"""The adapter-directory reader under structure-aware random damage (hypothesis).

A real saved adapter gets random edits: any value anywhere in ``adapter.json`` replaced, keys
dropped or added, tensors replaced by others of random shape and dtype, dropped or added; the
checksum is kept valid so the edit reaches the deeper checks. Loading must then either succeed
(and give finite outputs) or raise a :class:`peftreg.PeftregError` with the model untouched.
Nothing else, ever: no other exception type, no half-added adapter.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

import peftreg
from peftreg import AdaptedModel, PeftregError
from peftreg.io.adapter_dir import CONFIG_FILE, read_adapter_dir
from peftreg.plugin import AdapterHost
from peftreg_plugins.lora import LoraConfig

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=6)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8]


def _paths(node, prefix=()):
    """Every (path) to a value inside a JSON document."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


def _set(doc, path, value):
    if not path:
        return value
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return doc


def _drop(doc, path):
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    del parent[path[-1]]
    return doc


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    from peftreg.reference_model import ReferenceConfig, ReferenceTransformer

    config = ReferenceConfig(vocab_size=31, hidden_size=16, num_layers=2, num_heads=2,
                             num_kv_heads=1, intermediate_size=16, max_positions=16)
    torch.manual_seed(0)
    state = ReferenceTransformer(config).state_dict()

    def make():
        model = ReferenceTransformer(config)
        model.load_state_dict(state)
        return model

    model = peftreg.adapt(make(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                             modules_to_save=["lm_head"]))
    directory = model.save_adapter(tmp_path_factory.mktemp("orig") / "adapter")
    saved = read_adapter_dir(directory)
    return directory, saved.meta, dict(saved.tensors), make


@st.composite
def damage(draw, meta, tensors):
    meta = copy.deepcopy(meta)
    tensors = dict(tensors)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["replace", "drop", "add", "tensor", "drop-tensor",
                                     "add-tensor"]))
        if kind in ("replace", "drop", "add"):
            paths = [p for p in _paths(meta) if p]
            path = draw(st.sampled_from(paths))
            if kind == "replace":
                meta = _set(meta, path, draw(JSON))
            elif kind == "drop" and isinstance(_parent(meta, path), dict):
                meta = _drop(meta, path)
            elif kind == "add" and isinstance(_parent(meta, path), dict):
                _parent(meta, path)[draw(st.text(max_size=6))] = draw(JSON)
        elif tensors:
            key = draw(st.sampled_from(sorted(tensors)))
            if kind == "drop-tensor":
                tensors.pop(key)
                continue
            shape = draw(st.lists(st.integers(0, 5), max_size=3))
            dtype = draw(st.sampled_from(DTYPES))
            fill = draw(st.sampled_from([0.0, 1.0, float("nan"), float("inf"), 1e38]))
            value = torch.full(shape, fill).to(dtype)
            tensors[key if kind == "tensor" else draw(st.text(min_size=1, max_size=8))] = value
    return meta, tensors


def _parent(doc, path):
    node = doc
    for step in path[:-1]:
        node = node[step]
    return node


@settings(max_examples=70, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_damaged_adapter_loads_or_fails_cleanly(original, tmp_path, data):
    directory, meta, tensors, make = original
    new_meta, new_tensors = data.draw(damage(meta, tensors))
    target = tmp_path / "case"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(directory, target)
    blob = st_save(new_tensors)
    if isinstance(new_meta, dict) and isinstance(new_meta.get("tensors"), dict):
        name = new_meta["tensors"].get("file")
        if isinstance(name, str) and name == meta["tensors"]["file"]:
            new_meta["tensors"]["sha256"] = hashlib.sha256(blob).hexdigest()
    (target / meta["tensors"]["file"]).write_bytes(blob)
    (target / CONFIG_FILE).write_text(json.dumps(new_meta))
    model = AdaptedModel(make())
    ids = torch.arange(6).view(1, 6)
    try:
        model.load_adapter(target)
    except PeftregError as exc:
        # --hypothesis-show-statistics lists which checks the damage reached.
        event(f"{type(exc).__name__}: {re.sub(r'^.*?: ', '', str(exc))[:40]}")
        assert model.adapters == {}
        assert not any(isinstance(m, AdapterHost) for m in model.modules())
        return
    event("loaded")
    with torch.no_grad():
        assert torch.isfinite(model(ids)["logits"]).all()
