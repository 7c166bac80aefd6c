"""The parameter-matched budget picks, for every installed method with a size field, the size
whose closed-form count is nearest the target."""

from __future__ import annotations

import pytest

import peftreg
from peftreg.compare.budget import match_parameters

REGISTRY = peftreg.default_registry()
SIZED = [n for n in REGISTRY.names() if REGISTRY.get(n).size_field is not None]


@pytest.mark.parametrize("name", SIZED)
def test_the_nearest_size_is_chosen(name, make_tiny):
    method = REGISTRY.get(name)
    model = make_tiny()
    family = REGISTRY.describe_model(model)
    config = method.config_cls()
    field = method.size_field
    target = 3 * (method.parameter_count(model, config.replace(**{field: 2}), family) or 0) + 7
    matched, note = match_parameters(method, config, model, family, target)
    value = getattr(matched, field)
    count = method.parameter_count(model, matched, family)
    assert f"{field}={value}" in note and f"{count:,} params" in note
    for neighbour in (value - 1, value + 1):
        if neighbour >= 1:
            other = method.parameter_count(model, config.replace(**{field: neighbour}), family)
            assert abs(count - target) <= abs(other - target)


def test_a_method_without_a_size_field_is_left_at_its_default(make_tiny):
    method = REGISTRY.get("ia3")
    config = method.config_cls()
    matched, note = match_parameters(method, config, make_tiny(), None, 1000)
    assert matched == config and "not size-matched" in note
