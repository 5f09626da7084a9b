"""Who may see and administer a project.

Roles: a site admin (``is_staff``) is an admin of every project. Other accounts are reviewers of every project
that is not ``members_only``, and have the role of their ProjectMember row where there is one (a project admin
imports, scans, freezes datasets, retrains, promotes and manages the members of that project only). A
``members_only`` project is invisible (404, its existence is not revealed) to accounts that are not members.

HTML views get this from ProjectAccessMiddleware (one query on /p/<slug>/... pages: the project and the user's
membership together), which sets ``request.project_role``; ``labeling.views.staff_required`` and the
``can_admin`` template variable read it. The admin API uses IsProjectAdmin; the recognition endpoint checks
members-only projects itself (inference.apis)."""

from __future__ import annotations

from django.db.models import Exists, OuterRef, Q, Subquery
from django.http import Http404
from django.shortcuts import get_object_or_404
from rest_framework.exceptions import NotFound
from rest_framework.permissions import BasePermission

from .models import Project, ProjectMember

ADMIN, REVIEWER = ProjectMember.Role.ADMIN.value, ProjectMember.Role.REVIEWER.value


def role_in(user, project: Project, member_role: str | None = None, *, lookup: bool = True) -> str | None:
    """The user's role in the project ("admin" / "reviewer"), None when they may not see it.
    `member_role`: the user's ProjectMember role when the caller already has it (lookup=False)."""
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return None
    if user.is_staff:
        return ADMIN
    if lookup:
        member_role = ProjectMember.objects.filter(project=project, user=user).values_list("role", flat=True).first()
    if member_role is not None:
        return member_role
    return None if project.members_only else REVIEWER


def visible_projects(user):
    """The projects this user sees (site admins: all)."""
    qs = Project.objects.all()
    if user.is_staff:
        return qs
    member = ProjectMember.objects.filter(project=OuterRef("pk"), user_id=user.pk)
    return qs.filter(Q(members_only=False) | Q(Exists(member)))


def project_for(user, slug: str) -> tuple[Project, str]:
    """(project, role) in one query; Http404 for an unknown slug or a project the user may not see."""
    member = ProjectMember.objects.filter(project=OuterRef("pk"), user_id=getattr(user, "pk", None))
    project = Project.objects.filter(slug=slug).annotate(_role=Subquery(member.values("role")[:1])).first()
    if project is None:
        raise Http404("No such project.")
    role = role_in(user, project, project._role, lookup=False)
    if role is None:
        raise Http404("No such project.")
    return project, role


class ProjectAccessMiddleware:
    """On views with a `slug` URL argument (the /p/<slug>/ pages), 404 for projects the logged-in user may not
    see, and request.project_role = "admin" | "reviewer" for the others. API paths are left to the DRF
    permissions (a token is only authenticated inside the view)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_view(self, request, _view_func, _args, kwargs):
        slug = kwargs.get("slug")
        if slug is None or request.path.startswith("/api/") or not request.user.is_authenticated:
            return None
        try:
            _project, role = project_for(request.user, slug)
        except Http404:
            if Project.objects.filter(slug=slug).exists():
                raise
            return None  # unknown slug: the view answers its own 404
        request.project, request.project_role = _project, role
        return None


def current_project(request, slug: str) -> Project:
    """The project of a /p/<slug>/ page: the one ProjectAccessMiddleware already loaded (no second query), else
    looked up (404 when unknown)."""
    project = getattr(request, "project", None)
    if project is not None and project.slug == slug:
        return project
    return get_object_or_404(Project, slug=slug)


def context(request) -> dict:
    """Template variable `can_admin`: the user administers the current project (or the site, off-project)."""
    user = getattr(request, "user", None)
    role = getattr(request, "project_role", None)
    is_staff = bool(user is not None and user.is_authenticated and user.is_staff)
    return {"can_admin": is_staff or role == ADMIN, "project_role": role}


def _api_project(request, view) -> tuple[Project, str] | None:
    slug = view.kwargs.get("slug")
    if slug is None:
        return None
    try:
        return project_for(request.user, slug)
    except Http404:
        raise NotFound("No such project.") from None


class IsProjectAdmin(BasePermission):
    """A site admin, or an admin member of the project in the URL (404 when they may not even see it)."""

    message = "Only admins of this project can do this."

    def has_permission(self, request, view) -> bool:
        if not (request.user and request.user.is_authenticated):
            return False
        found = _api_project(request, view)
        if found is None:
            return bool(request.user.is_staff)
        return found[1] == ADMIN


class IsProjectMember(BasePermission):
    """Anyone who sees the project in the URL (reviewers and admins; 404 when they may not see it) may read and
    label; changes to the project itself are IsProjectAdmin's."""

    message = "You are not a member of this project."

    def has_permission(self, request, view) -> bool:
        if not (request.user and request.user.is_authenticated):
            return False
        if view.kwargs.get("slug") is None:  # a list across projects: each answer shows only what the user sees
            return True
        return _api_project(request, view) is not None  # 404 (NotFound) when the user may not see it


def api_role(request, view) -> str | None:
    """The user's role on the project in the URL ("admin" for site admins)."""
    found = _api_project(request, view)
    if found is None:
        return None
    return ADMIN if request.user.is_staff else found[1]
