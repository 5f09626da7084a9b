# Loupe. `make demo` runs the app on one machine with no services; `make test` runs the suite against
# PostgreSQL and Redis (started here if they are installed but down).
SHELL := /bin/bash
PY := .venv/bin/python
PIP := .venv/bin/pip
HOST ?= 127.0.0.1
PORT ?= 8000
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/loupe
TEST_BROKER_URL ?= redis://127.0.0.1:6379/0
# A fresh test database every `make test` (a kept one may hold another checkout's schema); PYTEST_ARGS= to reuse.
PYTEST_ARGS ?= --create-db

.PHONY: demo test lint fmt worker web migrate bench bench-import bench-rest bench-demo bench-health bench-train bench-accuracy bench-serving bench-s3 bench-shelf bench-faiss bench-load bench-mislabel bench-review-ui services browser nginx clean

.venv/.runtime: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	touch $@

.venv/.dev: requirements-dev.txt .venv/.runtime
	$(PIP) install -q -r requirements-dev.txt
	touch $@

# The mobile (TFLite) exporter in its own environment on top of .venv's packages (requirements-mobile.txt says
# why): training.engine.mobile runs it as a subprocess. The demo and the tests have it; without it the model page
# says how to get it.
.venv-mobile/.ok: requirements-mobile.txt .venv/.runtime
	test -x .venv-mobile/bin/python || python3 -m venv .venv-mobile
	$(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$$(.venv-mobile/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/loupe-venv.pth"
	.venv-mobile/bin/pip install -q -r requirements-mobile.txt
	touch $@

migrate: .venv/.runtime
	DEBUG=1 $(PY) manage.py migrate --noinput

# One machine, no services: SQLite + kombu's filesystem broker under var/. Generates and imports the demo
# project, starts two Celery workers as docker-compose does (queue default: index builds, scans, the reconciler's
# beat; queue gpu: training and out-of-fold jobs), so a promote's index build never waits behind a long job;
# trains and promotes a first model through them, then serves on $(PORT). `make demo SHELF=1` adds the shelf demo
# (generated shelf photos with boxes + their SKU crops; its detector trains for up to 10 more minutes).
demo: .venv/.runtime .venv-mobile/.ok
	@export DEBUG=1; set -e; \
	$(PY) manage.py migrate --noinput; \
	$(PY) manage.py demo $(if $(SHELF),--shelf); \
	mkdir -p var/log; \
	.venv/bin/celery -A webapp worker -B -s var/celerybeat-schedule -Q default -c 1 -n default@%h -l info > var/log/worker.log 2>&1 & \
	worker=$$!; \
	.venv/bin/celery -A webapp worker -Q gpu -c 1 -n gpu@%h -l info > var/log/gpu-worker.log 2>&1 & \
	gpuworker=$$!; trap "kill $$worker $$gpuworker 2>/dev/null; wait $$worker $$gpuworker 2>/dev/null" EXIT INT TERM; \
	$(PY) manage.py demo --train $(if $(SHELF),--shelf); \
	echo; echo "Loupe is at http://$(HOST):$(PORT)/  (login: see above or var/demo-admin.txt; worker logs var/log/worker.log, var/log/gpu-worker.log)"; \
	$(PY) manage.py runserver $(HOST):$(PORT) --noreload

worker: .venv/.runtime
	DEBUG=1 .venv/bin/celery -A webapp worker -B -s var/celerybeat-schedule -Q default,gpu -c 1 -l info

web: .venv/.runtime
	DEBUG=1 $(PY) manage.py runserver $(HOST):$(PORT)

services:
	@pg_isready -q -h 127.0.0.1 -p 5432 || pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start
	@redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 || redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
	@for i in $$(seq 1 30); do pg_isready -q -h 127.0.0.1 && redis-cli ping >/dev/null 2>&1 && break; sleep 1; done
	@pg_isready -q -h 127.0.0.1 && redis-cli ping >/dev/null 2>&1 || (echo "PostgreSQL or Redis did not start"; exit 1)
	@psql -h 127.0.0.1 -U postgres -lqt | cut -d'|' -f1 | grep -qw loupe || createdb -h 127.0.0.1 -U postgres loupe

browser:
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >/dev/null)

# nginx (Debian package) for tests/test_deployment.py and bench-load: deploy/nginx.conf in front of gunicorn.
nginx:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null)

test: .venv/.dev .venv-mobile/.ok services browser nginx
	DEBUG=1 DATABASE_URL=$(TEST_DATABASE_URL) CELERY_BROKER_URL=$(TEST_BROKER_URL) LOUPE_VAR_DIR=$(CURDIR)/var/test \
	  $(PY) manage.py makemigrations --check --dry-run
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	.venv/bin/lint-imports
	DEBUG=1 HF_HUB_OFFLINE=1 DATABASE_URL=$(TEST_DATABASE_URL) CELERY_BROKER_URL=$(TEST_BROKER_URL) LOUPE_VAR_DIR=$(CURDIR)/var/test \
	  $(PY) -m pytest $(PYTEST_ARGS)

lint: .venv/.dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	.venv/bin/lint-imports

fmt: .venv/.dev
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: bench-demo bench-accuracy bench-quick bench-leakage bench-import bench-rest bench-s3 bench-shelf bench-health bench-serving bench-faiss bench-load bench-train bench-mislabel bench-review-ui

# Seconds from a fresh var/ to a served demo model (vs the engine alone), then to a filled mislabel queue, and that
# queue's precision at N / recall against the demo's planted part-label flips (var/demo/planted.json).
bench-demo: .venv/.dev
	$(PY) bench/demo_time.py

# Dataset health scan on the real grocery-store photos (read in place from ../shared/datasets/grocery-store).
bench-health: .venv/.dev
	$(PY) -m bench.health

# Training throughput (engine vs a bare timm loop) on a seeded subset of the grocery-store photos (read in place).
# Real-data accuracy (grocery-store fine + coarse, clothing-small; read in place), same CPU budget per arm
# (LOUPE_BENCH_BUDGET_S, default 600; ~50 min in all): from scratch vs linear probe on frozen pretrained features vs
# quick retrain vs full fine-tune (sku preset). LOUPE_BENCH_LIMIT=N: a smoke run on N items per split, writes nothing.
# Imports of any size: 57,000 generated photos as an import job vs the in-request import (photos/s, peak RSS).
bench-import: .venv/.dev
	$(PY) -m bench.import_scale

# REST round trips (label set, queue next + resolve) under 10 concurrent clients on gunicorn + PostgreSQL.
bench-rest: .venv/.dev
	$(PY) -m bench.rest_roundtrip

bench-accuracy: .venv/.dev
	$(PY) -m bench.train_accuracy

# Quick retrain (heads on cached features) on grocery train with a warm feature cache; run on an idle machine.
bench-quick: .venv/.dev
	$(PY) -m bench.quick_retrain

# Leakage by similarity: grocery train frozen by photo vs with the health scan's similar pairs merged; Loupe's test
# figure against grocery val (other sessions). Reads the photos in place; ~3 min with a cold feature cache.
bench-leakage: .venv/.dev
	$(PY) -m bench.leakage

# Serving latency: the recognise endpoint vs raw onnxruntime and torch eager; the car endpoint with 10 photos.
bench-serving: .venv/.dev
	$(PY) -m bench.serving

# Recognition with the model in an S3-compatible store (moto on loopback) vs the local disk.
bench-s3: .venv/.dev
	$(PY) -m bench.s3_serving

# Shelf photos: detector + SKU classifier vs a one-class-per-SKU detector on generated shelves (ac79db8's run on its
# 2-core machine: detectors 2,870 s + 2,734 s, SKU retrain 1,254 s - about 2 h; slower machines take longer).
bench-shelf: .venv/.dev
	$(PY) -m bench.shelf

bench-faiss: .venv/.dev
	$(PY) -m bench.faiss_index

# gunicorn under 50 concurrent clients, then with a promote every 10 s; then /healthz behind nginx while 20 slow
# clients hold connections (vs gunicorn alone); needs the local PostgreSQL. LOAD_PHASES=slow_clients: that one only.
bench-load: .venv/.dev nginx
	$(PY) -m bench.load

bench-train: .venv/.dev
	$(PY) -m bench.train_throughput
# Mislabel queue on grocery train with 10 % of fine labels flipped: out-of-fold heads on cached frozen features
# (sku recipe) -> review.core.rank_label_issues vs cleanlab on a logistic-regression probe of the same features.
# LOUPE_BENCH_LIMIT=n: a smoke run on n photos (nothing written).
bench-mislabel: .venv/.dev
	$(PY) -m bench.mislabel
bench-review-ui: .venv/.dev browser
	$(PY) -m bench.review_ui

clean:
	rm -rf var/test var/media var/artifacts var/broker var/demo var/loupe.sqlite3
