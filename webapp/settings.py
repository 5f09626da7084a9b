"""Loupe settings. Everything comes from the environment (django-environ); the defaults make a bare
checkout work on one machine with no services: SQLite and kombu's filesystem broker under var/."""

from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(environ.Env().str("LOUPE_VAR_DIR", default=str(BASE_DIR / "var")))

env = environ.Env(
    DEBUG=(bool, False),
    ALLOWED_HOSTS=(list, ["127.0.0.1", "localhost"]),
    CSRF_TRUSTED_ORIGINS=(list, []),
)
environ.Env.read_env(BASE_DIR / ".env", overwrite=False) if (BASE_DIR / ".env").exists() else None

DEBUG = env("DEBUG")
# A development key only when DEBUG is on; production must set SECRET_KEY.
SECRET_KEY = env.str("SECRET_KEY", default="dev-insecure-key-change-me" if DEBUG else None)
if not SECRET_KEY:
    raise environ.ImproperlyConfigured("Set the SECRET_KEY environment variable (or DEBUG=1 for development).")
ALLOWED_HOSTS = env("ALLOWED_HOSTS")
CSRF_TRUSTED_ORIGINS = env("CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_filters",
    "labeling",
    "training",
    "inference",
    "review",
    "pipeline",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "labeling.access.ProjectAccessMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "webapp.middleware.BrokerUnavailableMiddleware",
]

ROOT_URLCONF = "webapp.urls"
WSGI_APPLICATION = "webapp.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "labeling.access.context",
            ],
        },
    },
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'loupe.sqlite3'}")}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # Web and worker share the file: wait for locks instead of failing, take the write lock up front.
    DATABASES["default"].setdefault("OPTIONS", {}).update({"timeout": 30, "transaction_mode": "IMMEDIATE"})
if "postgresql" in DATABASES["default"]["ENGINE"]:
    # JIT compiling pays off for long analytic queries, not for these short ones: it added ~120 ms to a grid page
    # at 100,000 images (bench/review_ui.py)
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("options", "-c jit=off")
DATABASES["default"]["ATOMIC_REQUESTS"] = False
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "labeling:project-list"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(env.str("STATIC_ROOT", default=str(VAR_DIR / "staticfiles")))


def _default_storage(url: str) -> dict:
    """Where images, thumbnails, staged uploads and published model artifacts live. Unset (or file://): the local
    disk under MEDIA_ROOT. s3://bucket[/prefix]: any S3-compatible object store through django-storages, with the
    usual AWS_* variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_S3_ENDPOINT_URL for MinIO/Ceph/moto,
    AWS_S3_REGION_NAME). Then no process assumes a shared disk: workers read photos through a read-through cache
    (LOUPE_CACHE_DIR) and every process fetches a model version's artifacts from the store when it loads it."""
    if not url or url.startswith("file://"):
        return {"BACKEND": "django.core.files.storage.FileSystemStorage"}
    if not url.startswith("s3://"):
        raise environ.ImproperlyConfigured(f"STORAGE_URL must be s3://bucket[/prefix] or file://, not {url!r}.")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise environ.ImproperlyConfigured("STORAGE_URL=s3://bucket[/prefix]: the bucket name is missing.")
    options = {
        "bucket_name": bucket,
        "location": prefix.strip("/"),
        # Content-addressed names: a second write of a name writes the same bytes, so overwrite (no renames).
        "file_overwrite": True,
        "default_acl": None,
        "querystring_auth": True,
        "endpoint_url": env.str("AWS_S3_ENDPOINT_URL", default="") or None,
        "region_name": env.str("AWS_S3_REGION_NAME", default="") or None,
        "access_key": env.str("AWS_ACCESS_KEY_ID", default="") or None,
        "secret_key": env.str("AWS_SECRET_ACCESS_KEY", default="") or None,
        "addressing_style": env.str("AWS_S3_ADDRESSING_STYLE", default="") or None,
        "signature_version": "s3v4",
    }
    return {"BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": options}


STORAGE_URL = env.str("STORAGE_URL", default="")
STORAGES = {
    "default": _default_storage(STORAGE_URL),
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = DEBUG
STATIC_ROOT.mkdir(parents=True, exist_ok=True)

# Files. Images are content-addressed under MEDIA_ROOT and served only through login-checked views.
MEDIA_ROOT = Path(env.str("MEDIA_ROOT", default=str(VAR_DIR / "media")))
MEDIA_URL = "/media/"
ARTIFACT_ROOT = Path(env.str("ARTIFACT_ROOT", default=str(VAR_DIR / "artifacts")))
# This process's copies of files that live in a remote STORAGE_URL: photos read by workers (keyed by sha256) and the
# artifacts of the model versions it loads. Safe to delete; refilled on demand.
LOUPE_CACHE_DIR = Path(env.str("LOUPE_CACHE_DIR", default=str(VAR_DIR / "cache")))
# How often a process re-lists a model version's artifacts in a remote store (an index rebuilt after new labels).
LOUPE_ARTIFACT_SYNC_SECONDS = env.float("LOUPE_ARTIFACT_SYNC_SECONDS", default=10.0)
# Frozen-backbone features per (image sha256, backbone weights, preprocessing): quick retrains, quick out-of-fold
LOUPE_FEATURE_CACHE = Path(env.str("LOUPE_FEATURE_CACHE", default=str(VAR_DIR / "feature-cache")))
# The health scan's similarity pass (labeling/similarity.py: photos of one class too alike to cross splits) embeds
# the photos with this pretrained backbone through the feature cache (the presets' default: the caches are shared).
LOUPE_SCAN_SIMILARITY = env.bool("LOUPE_SCAN_SIMILARITY", default=True)
# The function that embeds photos for the similarity pass (the engine's, reached by name: labeling sits below it).
LOUPE_SIMILARITY_EMBEDDER = env.str("LOUPE_SIMILARITY_EMBEDDER", default="pipeline.similarity.embed")
LOUPE_SIMILARITY_BACKBONE = env.str("LOUPE_SIMILARITY_BACKBONE", default="tf_efficientnet_lite0")
LOUPE_SIMILARITY_IMAGE_SIZE = env.int("LOUPE_SIMILARITY_IMAGE_SIZE", default=224)
# Folders the admin import page may read from (the CLI takes any folder it is given).
IMPORT_ROOTS = [Path(p) for p in env.list("IMPORT_ROOTS", default=[str(VAR_DIR / "import")])]
# Photos an import job reads and writes per transaction: its memory holds one batch, whatever the import's size.
LOUPE_IMPORT_BATCH = env.int("LOUPE_IMPORT_BATCH", default=200)
# The Import page's drop zone (labeling/import_uploads.py): the largest upload request (the browser sends batches of
# at most 20 photos / 20 MiB well inside it), and when a staged upload nobody started is deleted by the reconciler.
LOUPE_UPLOAD_REQUEST_MAX_BYTES = env.int("LOUPE_UPLOAD_REQUEST_MAX_BYTES", default=64 * 1024 * 1024)
LOUPE_UPLOAD_ABANDONED_SECONDS = env.float("LOUPE_UPLOAD_ABANDONED_SECONDS", default=24 * 3600)
LOUPE_EXPORT_ROOT = Path(env.str("LOUPE_EXPORT_ROOT", default=str(VAR_DIR / "exports")))

# Upload limits for the recognition endpoint (decompression bombs are refused by pixel count).
LOUPE_MAX_IMAGES_PER_REQUEST = env.int("LOUPE_MAX_IMAGES_PER_REQUEST", default=10)
# The car seed's endpoint (POST /api/ai/detect-car-vision): the project it serves, its photo count and threshold.
LOUPE_CAR_PROJECT = env.str("LOUPE_CAR_PROJECT", default="cars")
# How the photos of one object combine per head: "mean" (probability averaging), "vote" or "geometric".
LOUPE_COMBINE_VIEWS = env.str("LOUPE_COMBINE_VIEWS", default="mean")
# Where a server process runs the served model: "cpu" (default), "cuda" or "auto"; on CUDA, ONNX Runtime's CUDA
# provider when installed (requirements-gpu.txt, the Dockerfile's gpu target), else torch's CUDA path.
LOUPE_SERVING_DEVICE = env.str("LOUPE_SERVING_DEVICE", default="cpu")
# "softmax" (classifier), "retrieval" (Faiss neighbour vote with calibrated rejection) or "fusion".
LOUPE_RECOGNITION_MODE = env.str("LOUPE_RECOGNITION_MODE", default="softmax")
# Faiss gallery per model version: exact below LOUPE_INDEX_FLAT_MAX vectors, IVF (nprobe tuned to recall@20 >= 0.95)
# above; "flat"/"hnsw"/"ivf" force one.
LOUPE_INDEX_KIND = env.str("LOUPE_INDEX_KIND", default="auto")
LOUPE_INDEX_FLAT_MAX = env.int("LOUPE_INDEX_FLAT_MAX", default=50_000)
LOUPE_CAR_MIN_IMAGES = env.int("LOUPE_CAR_MIN_IMAGES", default=4)
LOUPE_CAR_THRESHOLD = env.float("LOUPE_CAR_THRESHOLD", default=0.6)
# Serve the car endpoint without a token (the seed's "frontend needs no changes"), each client IP throttled to
# LOUPE_CAR_PUBLIC_RATE; off by default. Behind a proxy set LOUPE_NUM_PROXIES so the IP is the client's.
LOUPE_CAR_ENDPOINT_PUBLIC = env.bool("LOUPE_CAR_ENDPOINT_PUBLIC", default=False)
LOUPE_CAR_PUBLIC_RATE = env.str("LOUPE_CAR_PUBLIC_RATE", default="30/min")
LOUPE_MAX_IMAGE_BYTES = env.int("LOUPE_MAX_IMAGE_BYTES", default=15 * 1024 * 1024)
LOUPE_MAX_IMAGE_PIXELS = env.int("LOUPE_MAX_IMAGE_PIXELS", default=40_000_000)
# Pixels decoded per recognition request, summed over its photos and read from their headers before decoding
# (JPEGs count at the reduced size they are decoded at): bounds a worker's memory and CPU per request.
LOUPE_MAX_REQUEST_PIXELS = env.int("LOUPE_MAX_REQUEST_PIXELS", default=120_000_000)
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("DATA_UPLOAD_MAX_MEMORY_SIZE", default=200 * 1024 * 1024)
FILE_UPLOAD_MAX_MEMORY_SIZE = 20 * 1024 * 1024
DATA_UPLOAD_MAX_NUMBER_FILES = 50
# How often a server process re-reads which model version is active (seconds).
LOUPE_ACTIVE_MODEL_TTL = env.float("LOUPE_ACTIVE_MODEL_TTL", default=2.0)
# After every training run on a worker, queue out-of-fold predictions + the mislabel queue refresh (gpu queue).
# The mislabel queue is rebuilt from the active model on every promote and rollback (LOUPE_MISLABEL_AFTER_TRAINING
# is its former name, still read).
LOUPE_MISLABEL_AFTER_PROMOTE = env.bool(
    "LOUPE_MISLABEL_AFTER_PROMOTE", default=env.bool("LOUPE_MISLABEL_AFTER_TRAINING", default=True)
)
# Promote gate (DESIGN step 4): "gate" = a new version becomes active by itself when it is no worse than the active
# one (mean top-1 on the same frozen test split, within LOUPE_PROMOTE_TOLERANCE); "first" = only a project's first
# model does, later ones wait for an admin.
LOUPE_AUTO_PROMOTE = env.str("LOUPE_AUTO_PROMOTE", default="gate")
if LOUPE_AUTO_PROMOTE not in ("gate", "first"):
    raise environ.ImproperlyConfigured(f"LOUPE_AUTO_PROMOTE must be 'gate' or 'first', not {LOUPE_AUTO_PROMOTE!r}.")
LOUPE_PROMOTE_TOLERANCE = env.float("LOUPE_PROMOTE_TOLERANCE", default=0.0)
# After every promote, re-rank the low-confidence queue with the new model (gpu queue); its batch size.
LOUPE_UNCERTAIN_AFTER_PROMOTE = env.bool("LOUPE_UNCERTAIN_AFTER_PROMOTE", default=True)
LOUPE_UNCERTAIN_BATCH = env.int("LOUPE_UNCERTAIN_BATCH", default=500)
# Seconds a review item stays with the reviewer who opened it; after that it goes back to the queue.
LOUPE_REVIEW_LEASE_SECONDS = env.int("LOUPE_REVIEW_LEASE_SECONDS", default=600)
# Seconds a verified API token is remembered per server process (0 = ask the database on every request).
LOUPE_TOKEN_CACHE_TTL = env.float("LOUPE_TOKEN_CACHE_TTL", default=5.0)
# Training config overrides applied to every run (JSON), e.g. '{"epochs": 2}' for a quick demo.
LOUPE_TRAIN_OVERRIDES = env.json("LOUPE_TRAIN_OVERRIDES", default={})

# Background jobs. Hard time limits per task (seconds; the soft limit, one minute earlier, lets the task record
# why it stopped); the broker's visibility timeout is derived from the longest.
LOUPE_TASK_TIME_LIMITS = {
    "training.tasks.train_run": env.int("LOUPE_TRAIN_TIME_LIMIT", default=12 * 3600),
    "training.tasks.oof_predict": env.int("LOUPE_OOF_TIME_LIMIT", default=12 * 3600),
    "review.tasks.mislabel_refresh": env.int("LOUPE_OOF_TIME_LIMIT", default=12 * 3600),
    "review.tasks.uncertain_refresh": 2 * 3600,
    "training.tasks.index_build": 2 * 3600,
    "labeling.tasks.health_scan": 4 * 3600,
    "labeling.tasks.import_run": env.int("LOUPE_IMPORT_TIME_LIMIT", default=12 * 3600),
    "training.tasks.jobs_reconcile": 300,
    "pipeline.job.index_build": 2 * 3600,
    "pipeline.job.oof": env.int("LOUPE_OOF_TIME_LIMIT", default=12 * 3600),
    "pipeline.job.mislabel_refresh": env.int("LOUPE_OOF_TIME_LIMIT", default=12 * 3600),
    "pipeline.job.uncertain_refresh": 2 * 3600,
    "pipeline.job.mobile_export": 3600,
}
LOUPE_VISIBILITY_TIMEOUT = max(LOUPE_TASK_TIME_LIMITS.values()) + 3600
# A running job whose heartbeat (written every LOUPE_HEARTBEAT_SECONDS by a side thread) is older than this lost
# its worker: it is requeued (training resumes from its checkpoint), and failed after LOUPE_JOB_MAX_ATTEMPTS.
LOUPE_HEARTBEAT_SECONDS = env.float("LOUPE_HEARTBEAT_SECONDS", default=30.0)
LOUPE_JOB_LOST_AFTER_SECONDS = env.float("LOUPE_JOB_LOST_AFTER_SECONDS", default=300.0)
LOUPE_JOB_MAX_ATTEMPTS = env.int("LOUPE_JOB_MAX_ATTEMPTS", default=3)
# How often Celery beat runs the reconciler (re-sends jobs a restarted broker lost, requeues lost ones).
LOUPE_RECONCILE_EVERY_SECONDS = env.float("LOUPE_RECONCILE_EVERY_SECONDS", default=60.0)
CELERY_BEAT_SCHEDULE = {
    "reconcile-jobs": {"task": "training.tasks.jobs_reconcile", "schedule": LOUPE_RECONCILE_EVERY_SECONDS},
}

# Celery. The embedded default is kombu's filesystem transport: no broker server needed.
BROKER_DIR = VAR_DIR / "broker"
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="filesystem://")
if CELERY_BROKER_URL.startswith("filesystem"):
    for _sub in ("queue", "processed", "control"):
        (BROKER_DIR / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "processed_folder": str(BROKER_DIR / "processed"),
        "control_folder": str(BROKER_DIR / "control"),
        "store_processed": False,
    }
else:
    # Longer than every task's time limit, so an unacked long task is never redelivered mid-run (a lost one is
    # found by its heartbeat instead: training.reconcile).
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": LOUPE_VISIBILITY_TIMEOUT}
CELERY_TASK_IGNORE_RESULT = True  # job state lives in the database rows, not the result backend
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_ROUTES = {
    "training.tasks.train_run": {"queue": "gpu"},
    "training.tasks.oof_predict": {"queue": "gpu"},
    "review.tasks.mislabel_refresh": {"queue": "gpu"},
    "review.tasks.uncertain_refresh": {"queue": "default"},
    # Long steps (training, out-of-fold predictions) on "gpu"; short ones (index builds, scans, the low-confidence
    # re-rank, the reconciler) on "default", which has its own worker: a long job never holds up a short one.
    "pipeline.job.oof": {"queue": "gpu"},
    "pipeline.job.mislabel_refresh": {"queue": "gpu"},
    "pipeline.job.index_build": {"queue": "default"},
    "pipeline.job.uncertain_refresh": {"queue": "default"},
    "pipeline.job.mobile_export": {"queue": "default"},  # a minute or two of CPU (the converter in a subprocess)
    "labeling.tasks.*": {"queue": "default"},
    "training.tasks.jobs_reconcile": {"queue": "default"},
}
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "webapp.authentication.CachedTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "webapp.errors.exception_handler",
    "DEFAULT_PARSER_CLASSES": [  # webapp.errors.JSONParser: too deeply nested JSON is a 400, not a 500
        "webapp.errors.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_THROTTLE_CLASSES": ["webapp.throttling.TokenRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {"token": env.str("LOUPE_API_RATE", default="600/min")},
    # Proxies in front of the app that set X-Forwarded-For (docker-compose: nginx = 1); 0 = the socket's address.
    "NUM_PROXIES": env.int("LOUPE_NUM_PROXIES", default=0),
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Loupe API",
    "DESCRIPTION": "Fine-grained image recognition: send 1..10 photos of one object, get labels per head.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Several models have a "status": each choice set gets its own name in the schema.
    "ENUM_NAME_OVERRIDES": {
        "JobStatusEnum": "webapp.jobs.JobStatus",
        "ImageStatusEnum": "labeling.models.Image.Status",
        "ReviewItemStatusEnum": "review.models.ReviewItem.Status",
        "ImportModeEnum": "labeling.models.ImportRun.Mode",
    },
    # Swagger UI / Redoc from drf-spectacular-sidecar's static files, not a CDN (self-hosted, maybe offline).
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
if env.str("CACHE_URL", default=""):
    CACHES = {"default": env.cache("CACHE_URL")}

# Security: strict when DEBUG is off (manage.py check --deploy).
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
if not DEBUG:
    SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
    SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=True)
    CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=True)
    SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=3600)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_CONTENT_TYPE_NOSNIFF = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}, "faiss.loader": {"level": "WARNING"}},
}
