"""Label-schema presets: the heads a new project gets. See DESIGN.md, "Label schemas"."""

PRESETS: dict[str, list[dict]] = {
    # model is a child head of make: a model class belongs to one make.
    "car": [{"name": "make"}, {"name": "model", "parent": "make"}],
    # colour is optional: unknown colour (9999) is unlabeled for that head, never a class.
    "lego": [{"name": "part"}, {"name": "color", "optional": True}],
    "sku": [{"name": "sku"}],
    "retrieval": [{"name": "class"}],
    # shelf photos: boxes around every container (a detection head); the project's sku_project names each box's SKU.
    "shelf": [
        {"name": "container", "kind": "detection", "classes": ["bottle", "can", "glass", "unknown_container"]},
    ],
}

PRESET_CHOICES = [(name, name) for name in PRESETS]
