# desktop-gateway as a container. Configure it with DESKTOP_GATEWAY_* variables; keep /data on a volume
# when you use the embedded SQLite database (it also holds the generated secret key).
FROM python:3.11-slim

RUN useradd --system --home-dir /data --create-home gateway
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY alembic ./alembic
COPY src ./src
RUN pip install --no-cache-dir . && rm -rf /root/.cache

USER gateway
WORKDIR /data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["desktop-gateway", "serve", "--host", "0.0.0.0", "--port", "8000"]
