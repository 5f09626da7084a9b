from django import template

register = template.Library()


@register.filter
def dict_get(mapping, key):
    """`{{ mapping|dict_get:key }}`: a dict lookup by a variable key (JSON keys are strings, so try both)."""
    if not isinstance(mapping, dict):
        return None
    if key in mapping:
        return mapping[key]
    return mapping.get(str(key))
