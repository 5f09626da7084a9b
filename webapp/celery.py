"""The Celery app. Broker comes from CELERY_BROKER_URL (see settings): Redis in production and CI,
kombu's filesystem transport (no server) in the embedded default."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")

app = Celery("loupe")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
