"""Project settings in the app (issue 17.2): a Settings page per project whose saves are undoable actions, and
projects created with their own heads and classes, not only the presets'."""

import pytest
from django.urls import reverse

from labeling import health, services
from labeling.models import DatasetAction, Head, LabelClass, Project

pytestmark = pytest.mark.django_db


def test_heads_and_classes_are_parsed_with_every_bad_line_named():
    heads = services.parse_heads("make\nmodel < make   # a model belongs to one make\ncolor?\n")
    assert heads == [
        {"name": "make", "parent": None, "optional": False},
        {"name": "model", "parent": "make", "optional": False},
        {"name": "color", "parent": None, "optional": True},
    ]
    with pytest.raises(services.LabelingError) as err:
        services.parse_heads("Make Model\nmodel < brand\nmodel")
    text = str(err.value)
    assert "line 1: 'make model' is not a head name" in text and "line 2: parent 'brand'" in text
    assert "head 'model' is given twice" in text
    with pytest.raises(services.LabelingError, match="at least one head"):
        services.parse_heads("  \n# nothing\n")
    classes = services.parse_classes("make: Toyota\nmodel: Corolla < Toyota\n\ncolor: red", heads)
    assert classes == [("make", "Toyota", None), ("model", "Corolla", "Toyota"), ("color", "red", None)]
    with pytest.raises(services.LabelingError) as err:
        services.parse_classes("Toyota\nmodel: Yaris\nmake: Honda < Japan\nsize: big\nmake:", heads)
    text = str(err.value)
    assert "line 1: start with one of the heads" in text and "line 2: model is under make" in text
    assert "line 3: make has no parent head" in text and "line 4" in text and "line 5: no class name" in text


def test_a_project_with_its_own_heads_and_classes_from_the_project_list(client, admin_user):
    client.force_login(admin_user)
    response = client.post(
        reverse("labeling:project-list"),
        {
            "name": "Guitars",
            "preset": "sku",
            "heads": "brand\nmodel < brand\nfinish?",
            "classes": "brand: Fender\nmodel: Stratocaster < Fender\nfinish: sunburst",
        },
    )
    assert response.status_code == 302
    project = Project.objects.get(slug="guitars")
    heads = {h.name: h for h in project.heads.all()}
    assert list(heads) == ["brand", "model", "finish"] and heads["model"].parent == heads["brand"]
    assert heads["finish"].optional and project.preset == "sku"  # the preset keeps choosing the recipe
    strat = LabelClass.objects.get(head=heads["model"], name="Stratocaster")
    assert strat.parent.name == "Fender" and LabelClass.objects.filter(head=heads["finish"], name="sunburst").exists()
    # A bad heads text creates nothing and says which line.
    bad = client.post(reverse("labeling:project-list"), {"name": "Bad", "preset": "sku", "heads": "a\nb < c"})
    assert bad.status_code == 200 and "line 2: parent" in bad.content.decode()
    assert not Project.objects.filter(slug="bad").exists()
    # Without own heads the preset's are used, and classes name them.
    client.post(reverse("labeling:project-list"), {"name": "Cars2", "preset": "car", "classes": "make: Audi"})
    assert LabelClass.objects.filter(head__project__slug="cars2", head__name="make", name="Audi").exists()


def test_the_settings_page_saves_an_undoable_action_and_refuses_bad_values_whole(
    client, admin_user, reviewer, car_project
):
    project = car_project(groups=0)
    url = reverse("labeling:settings", args=[project.slug])
    client.force_login(reviewer)
    assert client.get(url).status_code == 403  # reviewers poking admin URLs
    assert client.post(url, {"min_image_side": "1"}).status_code == 403
    client.force_login(admin_user)
    page = client.get(url).content.decode()
    assert 'name="min_image_side" value="32"' in page and 'data-head="model"' in page
    make, model = project.heads.get(name="make"), project.heads.get(name="model")
    form = {
        "name": "Cars (EU)",
        "description": "",
        "min_image_side": "48",
        "min_samples_per_class": "10",
        "near_duplicate_distance": "10",
        "production_retention_days": "30",
        "uncertainty_strategy": "entropy",
        "random_control_share": "0.1",
        "double_review_share": "0.2",
        "keep_low_confidence_photos": "1",
        f"head-{make.id}-threshold": "0.6",
        f"head-{model.id}-threshold": "0.75",
    }
    response = client.post(url, form, follow=True)
    shown = [str(m) for m in response.context["messages"]]
    assert response.redirect_chain == [(url, 302)] and "min_image_side 32 → 48" in shown[0]
    project.refresh_from_db()
    model.refresh_from_db()
    assert (project.name, project.min_image_side, project.uncertainty_strategy) == ("Cars (EU)", 48, "entropy")
    assert project.keep_low_confidence_photos and project.double_review_share == 0.2 and model.threshold == 0.75
    action = DatasetAction.objects.get(project=project, kind="project_settings")
    assert action.user == admin_user and "model threshold 0.6 → 0.75" in action.summary
    # Bad values: nothing saved, every problem named.
    bad = client.post(
        url, {**form, "min_image_side": "0", "double_review_share": "2", f"head-{make.id}-threshold": "x"}, follow=True
    ).content.decode()
    assert "Nothing was saved" in bad and "make threshold: &#x27;x&#x27; is not a number" in bad
    bad = client.post(url, {**form, "min_image_side": "0", "double_review_share": "2"}, follow=True).content.decode()
    assert "min_image_side must be a whole number of pixels from 1 to 100,000" in bad
    assert "double_review_share must be a share from 0 to 1" in bad
    project.refresh_from_db()
    assert project.min_image_side == 48 and project.double_review_share == 0.2
    # Saving again unchanged records nothing.
    client.post(url, form)
    assert DatasetAction.objects.filter(project=project, kind="project_settings").count() == 1
    # Undo puts everything back, except a value changed again since.
    services.project_settings_update(project=project, values={"near_duplicate_distance": 12})
    Project.objects.filter(pk=project.pk).update(min_image_side=64)  # changed again since
    out = health.action_undo(action=action, user=admin_user)
    project.refresh_from_db()
    model.refresh_from_db()
    assert (
        project.name == "Cars" and project.uncertainty_strategy == "margin" and not project.keep_low_confidence_photos
    )
    assert model.threshold == 0.6 and project.min_image_side == 64 and out["skipped"] == 1


def test_settings_service_refuses_unknown_fields_and_heads(car_project):
    project = car_project(groups=0)
    with pytest.raises(services.LabelingError) as err:
        services.project_settings_update(
            project=project, values={"slug": "x", "min_image_side": True}, heads={"trim": {"threshold": 0.5}}
        )
    text = str(err.value)
    assert "unknown setting 'slug'" in text and "min_image_side must be" in text and "no head 'trim'" in text
    with pytest.raises(services.LabelingError, match="head make: unknown setting 'name'"):
        services.project_settings_update(project=project, values={}, heads={"make": {"name": "brand"}})
    assert Head.objects.get(project=project, name="make").threshold == 0.6
    action = services.project_settings_update(project=project, values={}, heads={"make": {"optional": True}})
    assert Head.objects.get(project=project, name="make").optional and "make optional False → True" in action.summary


def test_a_head_is_added_to_a_project_with_photos_and_undone_while_unlabeled(client, admin_user, car_project):
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    project = car_project(groups=1, per_group=2)  # 6 photos
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=admin_user).key}")
    made = api.post(f"/api/v1/projects/{project.slug}/heads/", {"name": "trim", "parent": "model"}, format="json")
    assert made.status_code == 201, made.json()
    assert made.json() == {
        "name": "trim",
        "kind": "class",
        "parent": "model",
        "optional": False,
        "threshold": 0.6,
        "classes": 0,
    }
    trim = project.heads.get(name="trim")
    assert trim.labels.count() == 6 and not trim.labels.filter(label_class__isnull=False).exists()
    names = [h["name"] for h in api.get(f"/api/v1/projects/{project.slug}/heads/").json()]
    assert names == ["make", "model", "trim"]
    dup = api.post(f"/api/v1/projects/{project.slug}/heads/", {"name": "trim"}, format="json")
    assert dup.status_code == 400 and "given twice" in dup.json()["error"]["message"]
    bad = api.post(f"/api/v1/projects/{project.slug}/heads/", {"name": "x y", "parent": "nope"}, format="json")
    assert bad.status_code == 400
    # The Settings page's form adds one too; undo removes a head nobody labeled for.
    client.force_login(admin_user)
    client.post(
        reverse("labeling:settings", args=[project.slug]),
        {"action": "add_head", "head_name": "finish", "head_optional": "1"},
    )
    finish = project.heads.get(name="finish")
    assert finish.optional and finish.labels.count() == 6
    action = DatasetAction.objects.filter(project=project, summary__startswith="new head finish").get()
    health.action_undo(action=action, user=admin_user)
    assert not project.heads.filter(name="finish").exists()
    # A head someone labeled for stays.
    cls, _ = services.label_class_get_or_create(head=trim, raw_name="GT", parent=None)
    trim.labels.filter(pk=trim.labels.first().pk).update(label_class=cls)
    trim_action = DatasetAction.objects.get(project=project, summary__startswith="new head trim")
    assert health.action_undo(action=trim_action, user=admin_user)["skipped"] == 1
    assert project.heads.filter(name="trim").exists()
