# consul-sidecar with the example app (examples/app/app.py), for docker-compose.yml.
#
#   docker build -t consul-sidecar-example .
#   docker run --rm consul-sidecar-example check-config -c /etc/consul-sidecar/web.toml
#
# ENTRYPOINT is the sidecar; the default CMD runs the example app in wrapper mode with
# config/compose-web.toml (a Consul agent reachable as "consul", or CONSUL_HTTP_ADDR).
# The same image serves alongside mode (CMD: run -c FILE, no command) and the bare app
# (entrypoint python /app/examples/app/app.py).

FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The project: only what the package build needs (README.md is optional: the glob lets
# the build go on without it). The build tree is removed in the same layer.
WORKDIR /src
COPY pyproject.toml README.md* ./
COPY sidecar/ ./sidecar/
RUN pip install . \
    && rm -rf /src

# The example app and the default sidecar configuration (docker-compose.yml mounts its
# own copies over /etc/consul-sidecar/, so editing them needs no rebuild).
COPY examples/app/app.py /app/examples/app/app.py
COPY config/compose-web.toml /etc/consul-sidecar/web.toml

# Non-root. A fixed uid: docker-compose.yml gives the shared PID-file volume to 10001, and
# the alongside sidecar may only signal the app because both run as this same user.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app
USER 10001:10001
WORKDIR /app

EXPOSE 8080
# The sidecar is PID 1 and handles SIGTERM itself: deregister, wait, then stop the app.
STOPSIGNAL SIGTERM
ENTRYPOINT ["consul-sidecar"]
CMD ["run", "-c", "/etc/consul-sidecar/web.toml", "--", \
     "sh", "-c", "exec python /app/examples/app/app.py --host 0.0.0.0 --port 8080 --instance \"$HOSTNAME\" --version \"${APP_VERSION:-v1}\""]
