# One image for every process of the stack: worker pools, beat, api and flower run the
# same `orchestrator ...` commands as anywhere else (see docker-compose.yml, deploy/).
# Your own tasks: build FROM this image, COPY your modules in and set
# ORCHESTRATOR_TASK_MODULES; `orchestrator worker --pool NAME` reads workers/pools.yaml
# from the working directory, /app.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator
COPY workers ./workers
COPY flows ./flows
RUN pip install . \
 && useradd --create-home --uid 10001 orchestrator

USER 10001
EXPOSE 8000 5555
CMD ["orchestrator", "--help"]
