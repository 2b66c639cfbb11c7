"""Every packaged YAML config parses strictly: no key given twice (YAML keeps the last one silently)."""

from __future__ import annotations

import pytest
import yaml

from needlework.configs import list_configs, resolve_config


class StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses a mapping with a repeated key."""


def _no_duplicates(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def test_strict_loader_refuses_a_repeated_key():
    with pytest.raises(yaml.constructor.ConstructorError, match="'a' given twice"):
        yaml.load("a: 1\nb: 2\na: 3\n", Loader=StrictLoader)


@pytest.mark.parametrize("name", list_configs())
def test_packaged_config_has_no_repeated_key(name):
    text = resolve_config(name).read_text()
    assert isinstance(yaml.load(text, Loader=StrictLoader), dict)
