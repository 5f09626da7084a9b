"""Accounts, API tokens and project members (the admin's side of roles; labeling.access enforces them).

Every function refuses what would lock the team out (an admin demoting or deactivating themselves, removing
the last site admin) with a TeamError saying what to do instead. Tokens are DRF tokens (one per account, the
recognition API's credential): creating one replaces the old one, revoking deletes it; either takes effect at
once in this process and within LOUPE_TOKEN_CACHE_TTL seconds in the others (webapp.authentication)."""

from __future__ import annotations

import logging

from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import transaction
from rest_framework.authtoken.models import Token

from .models import Project, ProjectMember

log = logging.getLogger("loupe.team")
User = get_user_model()


class TeamError(ValueError):
    pass


def user_by_name(username: str):
    user = User.objects.filter(username=(username or "").strip()).first()
    if user is None:
        raise TeamError(f"No account named {username!r}; a site admin creates it on the Team page.")
    return user


def user_create(*, username: str, password: str, email: str = "", is_admin: bool = False, by=None):
    username = (username or "").strip()
    if not username:
        raise TeamError("The account needs a user name.")
    if User.objects.filter(username__iexact=username).exists():
        raise TeamError(f"There is already an account named {username!r}.")
    candidate = User(username=username, email=(email or "").strip())
    try:
        validate_password(password or "", candidate)
    except ValidationError as exc:
        raise TeamError("Password: " + " ".join(exc.messages)) from None
    with transaction.atomic():
        user = User.objects.create_user(username, email=candidate.email, password=password, is_staff=bool(is_admin))
    log.info("%s created account %s (admin=%s)", by, username, bool(is_admin))
    return user


def _other_active_admins(user) -> int:
    return User.objects.filter(is_staff=True, is_active=True).exclude(pk=user.pk).count()


def user_set_admin(*, user, is_admin: bool, by):
    if not is_admin and user.pk == getattr(by, "pk", None):
        raise TeamError("You cannot take away your own admin role; ask another site admin.")
    if not is_admin and user.is_staff and _other_active_admins(user) == 0:
        raise TeamError("This is the last site admin; make someone else an admin first.")
    user.is_staff = bool(is_admin)
    user.save(update_fields=["is_staff"])
    log.info("%s set admin=%s for %s", by, bool(is_admin), user)
    return user


def user_set_active(*, user, active: bool, by):
    if not active and user.pk == getattr(by, "pk", None):
        raise TeamError("You cannot deactivate your own account.")
    if not active and user.is_staff and _other_active_admins(user) == 0:
        raise TeamError("This is the last active site admin; make someone else an admin first.")
    with transaction.atomic():
        user.is_active = bool(active)
        user.save(update_fields=["is_active"])
        if not active:
            Token.objects.filter(user=user).delete()  # a deactivated account keeps no API access
    log.info("%s set active=%s for %s", by, bool(active), user)
    return user


def token_create(*, user, by) -> str:
    """A new API token for `user` (replacing any old one); returns the key, shown once."""
    if not user.is_active:
        raise TeamError(f"{user.username} is deactivated; reactivate the account first.")
    with transaction.atomic():
        Token.objects.filter(user=user).delete()
        key = Token.objects.create(user=user).key
    log.info("%s created an API token for %s", by, user)
    return key


def token_revoke(*, user, by) -> bool:
    deleted, _ = Token.objects.filter(user=user).delete()
    log.info("%s revoked the API token of %s", by, user)
    return bool(deleted)


def member_set(*, project: Project, user, role: str, by) -> ProjectMember:
    """Add `user` to the project with `role`, or change their role."""
    if role not in ProjectMember.Role.values:
        raise TeamError(f"Role must be one of {', '.join(ProjectMember.Role.values)} (got {role!r}).")
    if not user.is_active:
        raise TeamError(f"{user.username} is deactivated; a site admin can reactivate the account.")
    if user.pk == getattr(by, "pk", None) and role != ProjectMember.Role.ADMIN and not by.is_staff:
        raise TeamError("You cannot take away your own admin role in this project; ask another admin.")
    member, _created = ProjectMember.objects.update_or_create(
        project=project, user=user, defaults={"role": role, "added_by": by}
    )
    log.info("%s set %s as %s of %s", by, user, role, project.slug)
    return member


def member_remove(*, project: Project, user, by) -> None:
    if user.pk == getattr(by, "pk", None) and not by.is_staff:
        raise TeamError("You cannot remove yourself from the project; ask another admin.")
    deleted, _ = ProjectMember.objects.filter(project=project, user=user).delete()
    if not deleted:
        raise TeamError(f"{user.username} is not a member of {project.name}.")
    log.info("%s removed %s from %s", by, user, project.slug)


def project_set_members_only(*, project: Project, members_only: bool, by) -> Project:
    project.members_only = bool(members_only)
    project.save(update_fields=["members_only"])
    log.info("%s set members_only=%s on %s", by, project.members_only, project.slug)
    return project


def team_rows():
    """Every account with its token state, for the Team page (two queries)."""
    tokens = {t.user_id: t for t in Token.objects.all()}
    rows = []
    for user in User.objects.order_by("username"):
        token = tokens.get(user.pk)
        rows.append(
            {
                "user": user,
                "token_created": token.created if token else None,
                "token_hint": (token.key[:4] + "…") if token else None,
            }
        )
    return rows
