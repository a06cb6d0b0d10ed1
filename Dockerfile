# desktop-gateway as a container:  docker build -t desktop-gateway .
# Configure it with DESKTOP_GATEWAY_* variables (see the README, "Run it in a container"). /data is its
# working directory and volume: the embedded SQLite database and the generated secret key live there.
# No secret is built into the image.

# Any Debian-like image with Python 3.11 or newer and its venv module; scripts/build-image passes one
# it builds from Debian packages, for machines that cannot reach Docker Hub.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
LABEL desktop-gateway.stage=build
# Where pip gets the packages from. "pypi" (the default): downloads them (and builds the package, whose
# build copies the viewer's noVNC from npm: npm is installed in this stage only). "wheels": installs only the
# wheels in wheels/ of the build context, without network (scripts/build-image makes them with
# `pip wheel`, for a build that cannot reach PyPI).
ARG PACKAGES=pypi
RUN python3 -m venv /opt/desktop-gateway
COPY . /src
RUN set -eu; \
    case "$PACKAGES" in \
        pypi) command -v npm >/dev/null || { apt-get update -q && apt-get install -y -q --no-install-recommends npm >/dev/null; }; \
              /opt/desktop-gateway/bin/pip install --no-cache-dir /src ;; \
        wheels) /opt/desktop-gateway/bin/pip install --no-cache-dir --no-index --find-links /src/wheels desktop-gateway ;; \
        *) echo "PACKAGES must be pypi or wheels, not '$PACKAGES'" >&2; exit 1 ;; \
    esac; \
    /opt/desktop-gateway/bin/pip uninstall --yes --quiet pip setuptools; \
    /opt/desktop-gateway/bin/desktop-gateway --version

FROM ${BASE_IMAGE}
RUN groupadd --gid 10001 gateway \
    && useradd --uid 10001 --gid 10001 --no-log-init --home-dir /data --create-home --shell /usr/sbin/nologin gateway
COPY --from=build /opt/desktop-gateway /opt/desktop-gateway
ENV PATH=/opt/desktop-gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DESKTOP_GATEWAY_HOST=0.0.0.0 \
    DESKTOP_GATEWAY_PORT=8000
USER 10001:10001
WORKDIR /data
VOLUME /data
EXPOSE 8000
# /healthz where `serve` listens (DESKTOP_GATEWAY_HOST and _PORT; a wildcard address is asked on loopback).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["python3", "-c", "import os, urllib.request; host = os.environ.get('DESKTOP_GATEWAY_HOST', '127.0.0.1'); host = '127.0.0.1' if host in ('', '0.0.0.0', '::') else host; urllib.request.urlopen(f\"http://{host}:{os.environ.get('DESKTOP_GATEWAY_PORT', '8000')}/healthz\", timeout=4)"]
CMD ["desktop-gateway", "serve"]
