"""Bound this machine's read-through cache of photos from a remote store (LOUPE_CACHE_DIR/blobs)."""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from labeling import storage


class Command(BaseCommand):
    help = (
        "Delete the oldest cached copies of photos (LOUPE_CACHE_DIR/blobs: a remote STORAGE_URL's read-through cache) "
        "until the cache holds at most --max-gb. Safe at any time: a deleted copy is fetched again when needed. "
        "Run it from cron on machines with a small disk."
    )

    def add_arguments(self, parser):
        parser.add_argument("--max-gb", type=float, required=True, help="size to keep, in GiB (0 empties it)")

    def handle(self, *args, **opts):
        if opts["max_gb"] < 0:
            raise CommandError("--max-gb must be 0 or more.")
        out = storage.cache_prune(max_bytes=int(opts["max_gb"] * 2**30))
        self.stdout.write(
            f"{settings.LOUPE_CACHE_DIR}: {out['deleted']} cached photo(s) deleted ({out['freed'] / 2**20:.1f} MiB), "
            f"{out['kept']} kept ({out['kept_bytes'] / 2**20:.1f} MiB)."
        )
