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


@register.inclusion_tag("_job_status.html", takes_context=True)
def job_status(context, row, note: str = ""):
    """`{% job_status row "what it feeds" %}`: where a background job stands (queue, jobs ahead, step, progress,
    ETA, error), with a cancel button for admins. `row` is any job row (TrainingRun, HealthReport, Job) or None."""
    from webapp.jobs import describe

    request = context.get("request")
    return {
        "job": describe(row) if row is not None else None,
        "note": note,
        "project": context.get("project"),
        "request": request,
        "csrf_token": context.get("csrf_token"),
        "can_cancel": bool(context.get("can_admin")),
    }


@register.filter
def job_info(row):
    """`{{ run|job_info }}`: webapp.jobs.describe(row) (queue, jobs ahead, ETA) for a table cell."""
    from webapp.jobs import describe

    return describe(row) if row is not None else {}
