FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
RUN DEBUG=0 SECRET_KEY=collectstatic-only python manage.py collectstatic --noinput
RUN useradd --create-home loupe && mkdir -p /data && chown loupe /data
USER loupe
EXPOSE 8000
CMD ["gunicorn", "webapp.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "3", "--timeout", "120"]

# The GPU worker's image (docker-compose gpu-worker: `target: gpu`): ONNX Runtime's CUDA provider instead of the
# CPU wheel, so a served or evaluated model runs on the GPU (LOUPE_SERVING_DEVICE=cuda); torch is a CUDA build already.
FROM base AS gpu
USER root
COPY requirements-gpu.txt .
RUN pip uninstall -y onnxruntime && pip install --no-cache-dir -r requirements-gpu.txt
USER loupe

# The default image (web, CPU worker): the last stage. The CPU worker runs the mobile (TFLite) export on queue
# default, in its own environment on top of the image's packages (requirements-mobile.txt says why).
FROM base AS cpu
USER root
COPY requirements-mobile.txt .
RUN python -m venv /opt/mobile \
    && python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
       > "$(/opt/mobile/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/loupe-base.pth" \
    && /opt/mobile/bin/pip install --no-cache-dir -r requirements-mobile.txt
ENV LOUPE_MOBILE_PYTHON=/opt/mobile/bin/python
USER loupe
