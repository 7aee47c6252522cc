"""docs/CONFIG.md is generated from the config dataclasses and must stay in sync."""

import dataclasses

from olmo.config_reference import SECTIONS, field_docs, render

from .helpers import REPO


def test_config_reference_is_up_to_date():
    committed = (REPO / "docs" / "CONFIG.md").read_text()
    assert committed == render(), "run: python -m olmo.config_reference > docs/CONFIG.md"


def test_every_config_field_has_a_docstring():
    for _, cls in SECTIONS:
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls)
                   if not f.name.startswith("_") and not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
