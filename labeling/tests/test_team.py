"""Roles: site admins, project members (reviewer / admin), members-only projects, the Team and Members pages,
API tokens."""

import base64

import pytest
from django.urls import reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from conftest import make_photo
from labeling import team
from labeling.models import ProjectMember
from labeling.services import project_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def project():
    return project_create(name="Cars", preset="car")


@pytest.fixture
def other(django_user_model):
    return django_user_model.objects.create_user("other", password="other-pass-123")


def api(user=None, key=None):
    c = APIClient()
    if key or user:
        c.credentials(HTTP_AUTHORIZATION=f"Token {key or Token.objects.get_or_create(user=user)[0].key}")
    return c


def test_open_project_every_account_reviews_admin_pages_are_403(client, reviewer, project):
    client.force_login(reviewer)
    assert client.get(reverse("labeling:image-grid", args=[project.slug])).status_code == 200
    assert project.name in client.get(reverse("labeling:project-list")).content.decode()
    for name in ("labeling:health", "labeling:import", "labeling:members", "training:run-list"):
        assert client.get(reverse(name, args=[project.slug])).status_code == 403, name
    assert client.get(reverse("labeling:team")).status_code == 403
    assert api(reviewer).get(f"/api/v1/projects/{project.slug}/models/").status_code == 403


def test_members_only_project_is_invisible_to_non_members(client, reviewer, other, admin_user, project):
    team.project_set_members_only(project=project, members_only=True, by=admin_user)
    team.member_set(project=project, user=reviewer, role="reviewer", by=admin_user)
    grid = reverse("labeling:image-grid", args=[project.slug])
    client.force_login(other)
    assert client.get(grid).status_code == 404  # its existence is not revealed
    assert client.get(reverse("review:queue", args=[project.slug, "mislabel"])).status_code == 404
    assert project.name not in client.get(reverse("labeling:project-list")).content.decode()
    assert client.get(reverse("labeling:image-grid", args=["no-such-project"])).status_code == 404
    # API: the recognition endpoint and the admin API both answer 404 to a non-member's token
    r = api(other).post(f"/api/v1/projects/{project.slug}/recognize", {"images": []}, format="json")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert api(other).get(f"/api/v1/projects/{project.slug}/models/").status_code == 404
    # the member reviews it; the recognition endpoint gets past the access check (no model yet: 409)
    client.force_login(reviewer)
    assert client.get(grid).status_code == 200
    assert project.name in client.get(reverse("labeling:project-list")).content.decode()
    body = {
        "images": [{"data": base64.b64encode(make_photo("red", seed=1, size=64)).decode(), "media_type": "image/jpeg"}]
    }
    r = api(reviewer).post(f"/api/v1/projects/{project.slug}/recognize", body, format="json")
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_active_model"
    # site admins see everything
    client.force_login(admin_user)
    assert client.get(grid).status_code == 200


def test_project_admin_member_administers_that_project_only(client, reviewer, admin_user, project):
    second = project_create(name="Lego", preset="lego")
    team.member_set(project=project, user=reviewer, role="admin", by=admin_user)
    client.force_login(reviewer)
    for name in ("labeling:health", "labeling:import", "labeling:members", "training:run-list"):
        assert client.get(reverse(name, args=[project.slug])).status_code == 200, name
    assert "(project admin)" in client.get(reverse("labeling:image-grid", args=[project.slug])).content.decode()
    assert client.get(reverse("labeling:health", args=[second.slug])).status_code == 403
    assert client.get(reverse("labeling:team")).status_code == 403  # the Team page is the site admins'
    assert api(reviewer).get(f"/api/v1/projects/{project.slug}/models/").status_code == 200
    assert api(reviewer).get(f"/api/v1/projects/{second.slug}/models/").status_code == 403


def test_members_page_adds_changes_removes_and_guards_self(client, reviewer, other, admin_user, project):
    team.member_set(project=project, user=reviewer, role="admin", by=admin_user)
    client.force_login(reviewer)
    url = reverse("labeling:members", args=[project.slug])
    client.post(url, {"action": "set", "username": "other", "role": "reviewer"})
    assert ProjectMember.objects.get(project=project, user=other).role == "reviewer"
    client.post(url, {"action": "set", "username": "other", "role": "admin"})
    assert ProjectMember.objects.get(project=project, user=other).role == "admin"
    r = client.post(url, {"action": "set", "username": "nobody", "role": "admin"}, follow=True)
    assert "No account named" in r.content.decode()
    r = client.post(url, {"action": "set", "username": "other", "role": "owner"}, follow=True)
    assert "Role must be one of" in r.content.decode()
    r = client.post(url, {"action": "remove", "username": "reviewer"}, follow=True)
    assert "cannot remove yourself" in r.content.decode()
    r = client.post(url, {"action": "set", "username": "reviewer", "role": "reviewer"}, follow=True)
    assert "cannot take away your own admin role" in r.content.decode()
    client.post(url, {"action": "remove", "username": "other"})
    assert not ProjectMember.objects.filter(project=project, user=other).exists()
    client.post(url, {"action": "members_only", "value": "1"})
    project.refresh_from_db()
    assert project.members_only
    page = client.get(url).content.decode()
    assert "Members only" in page and 'data-user="reviewer"' in page


def test_team_page_accounts_roles_and_tokens(client, admin_user, reviewer):
    client.force_login(admin_user)
    url = reverse("labeling:team")
    r = client.post(url, {"action": "create", "username": "carol", "password": "123"}, follow=True)
    assert "Password:" in r.content.decode()  # Django's validators, in words
    r = client.post(url, {"action": "create", "username": "carol", "password": "a-long-pass-phrase-9"}, follow=True)
    assert "Account carol created" in r.content.decode()
    r = client.post(url, {"action": "create", "username": "Carol", "password": "a-long-pass-phrase-9"}, follow=True)
    assert "already an account" in r.content.decode()
    # a token is shown once, works on the API, and is gone after revoking
    r = client.post(url, {"action": "token_create", "username": "reviewer"})
    key = r.context["new_token"]["key"]
    assert key in r.content.decode() and Token.objects.get(user=reviewer).key == key
    assert key not in client.get(url).content.decode()  # never shown again
    assert api(key=key).get("/api/v1/projects/nope/models/").status_code in (403, 404)
    client.post(url, {"action": "token_revoke", "username": "reviewer"})
    assert api(key=key).get("/api/v1/projects/nope/models/").status_code == 401
    # roles, with the lock-out guards
    client.post(url, {"action": "set_admin", "username": "reviewer", "value": "1"})
    reviewer.refresh_from_db()
    assert reviewer.is_staff
    r = client.post(url, {"action": "set_admin", "username": "admin", "value": "0"}, follow=True)
    assert "cannot take away your own admin role" in r.content.decode()
    r = client.post(url, {"action": "set_active", "username": "admin", "value": "0"}, follow=True)
    assert "cannot deactivate your own account" in r.content.decode()
    # deactivating revokes the account's token
    key = team.token_create(user=reviewer, by=admin_user)
    client.post(url, {"action": "set_active", "username": "reviewer", "value": "0"})
    reviewer.refresh_from_db()
    assert not reviewer.is_active and not Token.objects.filter(user=reviewer).exists()
    assert api(key=key).get("/api/v1/projects/nope/models/").status_code == 401


def test_the_last_site_admin_cannot_be_demoted(admin_user, reviewer):
    team.user_set_admin(user=reviewer, is_admin=True, by=admin_user)
    team.user_set_admin(user=reviewer, is_admin=False, by=admin_user)
    with pytest.raises(team.TeamError, match="last site admin"):
        team.user_set_admin(user=admin_user, is_admin=False, by=reviewer)
    with pytest.raises(team.TeamError, match="last active site admin"):
        team.user_set_active(user=admin_user, active=False, by=reviewer)
