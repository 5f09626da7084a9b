"""Apply the retention limit to stored production photos (run daily, e.g. from cron or Celery beat)."""

from django.core.management.base import BaseCommand

from inference import services
from labeling.models import Project


class Command(BaseCommand):
    help = (
        "Delete production photos (kept from low-confidence recognitions) older than each project's "
        "production_retention_days that nobody has labeled; labeled ones stay as training data."
    )

    def add_arguments(self, parser):
        parser.add_argument("project", nargs="*", help="project slugs (default: all)")

    def handle(self, *args, **opts):
        projects = Project.objects.all()
        if opts["project"]:
            projects = projects.filter(slug__in=opts["project"])
        for project in projects:
            n = services.production_purge(project=project)
            self.stdout.write(f"{project.slug}: {n} production photo(s) deleted")
