import pytest

from labeling.models import Head, LabelEvent
from labeling.presets import PRESETS
from labeling.services import LabelConflict, LabelingError, label_class_get_or_create, label_set, project_create
from labeling.tests.factories import ImageFactory, LabelFactory

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_create_their_heads(preset):
    project = project_create(name=f"P {preset}", preset=preset)
    assert [h.name for h in project.heads.order_by("order")] == [h["name"] for h in PRESETS[preset]]


def test_car_model_head_is_child_of_make():
    project = project_create(name="Cars", preset="car")
    assert Head.objects.get(project=project, name="model").parent.name == "make"


def test_unknown_preset_and_duplicate_slug_refused():
    with pytest.raises(LabelingError, match="Unknown preset"):
        project_create(name="X", preset="boats")
    project_create(name="Same", preset="sku")
    with pytest.raises(LabelingError, match="already exists"):
        project_create(name="Same", preset="sku")


def _image_with_label(project):
    head = project.heads.get(name="sku")
    return head, LabelFactory(image=ImageFactory(project=project), head=head)


def test_label_set_versions_history_and_conflict(admin_user, reviewer):
    project = project_create(name="Shop", preset="sku")
    head, label = _image_with_label(project)
    a, _ = label_class_get_or_create(head=head, raw_name="Cola 0.5l")
    b, _ = label_class_get_or_create(head=head, raw_name="Cola 1l")
    first = label_set(label_id=label.id, class_id=a.id, expected_version=1, user=admin_user)
    assert first.changed and first.label.version == 2
    # A second editor who loaded version 1 is refused, and the current value is reported.
    with pytest.raises(LabelConflict) as exc:
        label_set(label_id=label.id, class_id=b.id, expected_version=1, user=reviewer)
    assert exc.value.current.label_class_id == a.id and exc.value.current.version == 2
    label.refresh_from_db()
    assert label.label_class_id == a.id
    label_set(label_id=label.id, class_id=None, expected_version=2, user=reviewer)
    events = list(LabelEvent.objects.order_by("id").values_list("old_class_id", "new_class_id", "user__username"))
    assert events == [(None, a.id, "admin"), (a.id, None, "reviewer")]


def test_label_set_rejects_class_of_another_head():
    project = project_create(name="Lego", preset="lego")
    part, color = project.heads.get(name="part"), project.heads.get(name="color")
    label = LabelFactory(image=ImageFactory(project=project), head=part)
    red, _ = label_class_get_or_create(head=color, raw_name="red")
    with pytest.raises(LabelingError, match="does not belong"):
        label_set(label_id=label.id, class_id=red.id, expected_version=1)


def test_label_events_are_append_only():
    project = project_create(name="Shop", preset="sku")
    head, label = _image_with_label(project)
    event = LabelEvent.objects.create(image=label.image, head=head, reason="x")
    event.reason = "changed"
    with pytest.raises(Exception, match="append-only"):
        event.save()
