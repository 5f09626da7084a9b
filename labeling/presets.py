"""Label-schema presets: the heads a new project gets. See DESIGN.md, "Label schemas"."""

PRESETS: dict[str, list[dict]] = {
    # model is a child head of make: a model class belongs to one make.
    "car": [{"name": "make"}, {"name": "model", "parent": "make"}],
    # colour is optional: unknown colour (9999) is unlabeled for that head, never a class.
    "lego": [{"name": "part"}, {"name": "color", "optional": True}],
    "sku": [{"name": "sku"}],
    "retrieval": [{"name": "class"}],
}

PRESET_CHOICES = [(name, name) for name in PRESETS]
