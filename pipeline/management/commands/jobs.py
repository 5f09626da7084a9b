"""List a project's background jobs (every kind: training runs, health scans, index builds, out-of-fold
predictions, queue refreshes) with where each stands, or cancel one:

    manage.py jobs cars                        # queued and running first, then the latest ended
    manage.py jobs cars --cancel job/12        # a queued one at once, a running one at its next progress report
    manage.py jobs cars --run job/12           # run a queued (or lost) job row in this process
"""

from django.core.management.base import BaseCommand, CommandError

from labeling.models import Project
from pipeline import chain
from pipeline import jobs as pipeline_jobs
from training.jobs import JobError
from training.models import Job


def _ref(value: str) -> tuple[str, int]:
    type_, _, pk = value.partition("/")
    if not pk.isdigit():
        raise CommandError(f"{value!r}: give a job as TYPE/ID, e.g. job/12 or trainingrun/3 (see the list).")
    return type_, int(pk)


class Command(BaseCommand):
    help = "List, cancel or run a project's background jobs."

    def add_arguments(self, parser):
        parser.add_argument("project", help="project slug")
        parser.add_argument(
            "--cancel", metavar="TYPE/ID", help="cancel this job (types: trainingrun, healthreport, job)"
        )
        parser.add_argument("--run", metavar="job/ID", help="run this job row here (queued, or lost by its worker)")
        parser.add_argument("--limit", type=int, default=30)

    def handle(self, *args, **opts):
        project = Project.objects.filter(slug=opts["project"]).first()
        if project is None:
            raise CommandError(f"No project {opts['project']!r}.")
        if opts["cancel"]:
            type_, pk = _ref(opts["cancel"])
            try:
                row = pipeline_jobs.job_cancel_any(project=project, type_=type_, pk=pk)
            except (pipeline_jobs.JobNotFound, JobError) as exc:
                raise CommandError(str(exc)) from None
            self.stdout.write(f"{row.what} {row.pk}: {'cancelled' if row.status == 'cancelled' else 'stopping'}")
            return
        if opts["run"]:
            type_, pk = _ref(opts["run"])
            if type_ != "job" or not Job.objects.filter(project=project, pk=pk).exists():
                raise CommandError(
                    f"{opts['run']!r}: not a job row of {project.slug} (training runs: manage.py train)."
                )
            job = chain.job_execute(job_id=pk)
            self.stdout.write(f"{job.what} {job.pk}: {job.status}{f' ({job.error})' if job.error else ''}")
            return
        for j in pipeline_jobs.project_jobs(project=project, limit=opts["limit"]):
            where = f" [{j['queue']}]"
            if j["status"] == "queued":
                where += f", {j['ahead']} ahead"
            if j["status"] == "running":
                pct = f" {j['progress'] * 100:.0f} %" if j["progress"] is not None else ""
                eta = f", ~{j['eta_s']:.0f} s left" if j["eta_s"] is not None else ""
                where += f": {j['step']}{pct}{eta}"
            self.stdout.write(f"{j['type']}/{j['id']:<6} {j['what']:<30} {j['status']:<10}{where}")
            if j["error"] and j["status"] in ("failed", "cancelled"):
                self.stdout.write(f"    {j['error'].splitlines()[0][:200]}")
