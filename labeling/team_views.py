"""The Team page (site admins: accounts, roles, API tokens) and a project's Members page (its admins)."""

from django.contrib import messages
from django.shortcuts import redirect, render

from . import team
from .access import current_project
from .models import ProjectMember
from .views import staff_required


@staff_required
def team_page(request):
    """Site admins: create accounts, make admins, deactivate, create/revoke API tokens (a new key is shown once)."""
    new_token = None
    if request.method == "POST":
        action = request.POST.get("action", "")
        try:
            if action == "create":
                user = team.user_create(
                    username=request.POST.get("username", ""),
                    password=request.POST.get("password", ""),
                    email=request.POST.get("email", ""),
                    is_admin=request.POST.get("is_admin") == "1",
                    by=request.user,
                )
                messages.success(request, f"Account {user.username} created.")
            else:
                user = team.user_by_name(request.POST.get("username", ""))
                if action == "set_admin":
                    team.user_set_admin(user=user, is_admin=request.POST.get("value") == "1", by=request.user)
                    role = "an admin" if user.is_staff else "a reviewer"
                    messages.success(request, f"{user.username} is now {role}.")
                elif action == "set_active":
                    team.user_set_active(user=user, active=request.POST.get("value") == "1", by=request.user)
                    messages.success(request, f"{user.username} {'reactivated' if user.is_active else 'deactivated'}.")
                elif action == "token_create":
                    new_token = {"user": user.username, "key": team.token_create(user=user, by=request.user)}
                elif action == "token_revoke":
                    revoked = team.token_revoke(user=user, by=request.user)
                    messages.success(
                        request, f"API token of {user.username} revoked." if revoked else "There was no token."
                    )
                else:
                    raise team.TeamError(f"Unknown action {action!r}.")
        except team.TeamError as exc:
            messages.error(request, str(exc))
        if new_token is None:
            return redirect("labeling:team")
    return render(request, "labeling/team.html", {"rows": team.team_rows(), "new_token": new_token})


@staff_required
def members_page(request, slug):
    """A project's admins: who may work on it and in which role, and whether it is open to every account."""
    project = current_project(request, slug)
    if request.method == "POST":
        action = request.POST.get("action", "")
        try:
            if action == "members_only":
                team.project_set_members_only(
                    project=project, members_only=request.POST.get("value") == "1", by=request.user
                )
                messages.success(
                    request, "Only members see this project now." if project.members_only else "Every account sees it."
                )
            else:
                user = team.user_by_name(request.POST.get("username", ""))
                if action == "set":
                    member = team.member_set(
                        project=project, user=user, role=request.POST.get("role", ""), by=request.user
                    )
                    messages.success(request, f"{user.username} is now {member.role} of {project.name}.")
                elif action == "remove":
                    team.member_remove(project=project, user=user, by=request.user)
                    messages.success(request, f"{user.username} removed from {project.name}.")
                else:
                    raise team.TeamError(f"Unknown action {action!r}.")
        except team.TeamError as exc:
            messages.error(request, str(exc))
        return redirect("labeling:members", slug=project.slug)
    members = ProjectMember.objects.filter(project=project).select_related("user", "added_by")
    return render(
        request,
        "labeling/members.html",
        {"project": project, "members": members, "roles": ProjectMember.Role.values},
    )
