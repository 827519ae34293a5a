# Production image: slim, non-root, no build tools in the final layer.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 gateway
COPY --from=build /install /usr/local
WORKDIR /srv
COPY config ./config
COPY alembic.ini ./
RUN mkdir -p /srv/data && chown gateway:gateway /srv/data
USER gateway
ENV PYTHONUNBUFFERED=1
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz')"
# The gateway listens on loopback unless told otherwise; a container must listen on every
# interface to be reachable, so the image says so explicitly.
CMD ["python", "-m", "app", "serve", "--host", "0.0.0.0", "--port", "8080"]
