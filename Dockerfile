# consul-sidecar with the example app (examples/app/app.py), for docker-compose.yml.
#
#   docker build -t consul-sidecar-example .
#   docker run --rm consul-sidecar-example check-config -c /etc/consul-sidecar/web.toml
#
# Offline builds (no package index reachable from the build):
#   pip wheel -w wheelhouse .          # on a machine with the index, into the build context
#   docker build --build-arg WHEELHOUSE=wheelhouse -t consul-sidecar-example .
# or point pip at a local index: --build-arg PIP_INDEX=http://host:port/simple/
# BASE_IMAGE: any Debian-like image with Python >= 3.11 and pip (scripts/compose-demo
# passes its stand-in when no registry answers; see docs/compose.md).
#
# ENTRYPOINT is the sidecar; the default CMD runs the example app in wrapper mode with
# config/compose-web.toml (a Consul agent reachable as "consul", or CONSUL_HTTP_ADDR).
# The same image serves alongside mode (CMD: run -c FILE, no command) and the bare app
# (entrypoint python /app/examples/app/app.py).

ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The build context is an allow-list (.dockerignore): the package, README.md, the example
# app, the default config and, when there is one, the wheelhouse.
ARG WHEELHOUSE=
ARG PIP_INDEX=
COPY . /src/
# With a wheelhouse (`pip wheel -w wheelhouse .`: the project's own wheel and its
# dependencies) nothing is built and no index is asked; without one, pip builds /src.
RUN set -eu; \
    if [ -n "$WHEELHOUSE" ]; then pip install --no-index --find-links "/src/$WHEELHOUSE" consul-sidecar; \
    elif [ -n "$PIP_INDEX" ]; then pip install --index-url "$PIP_INDEX" /src; \
    else pip install /src; fi \
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
# Its worst case (`consul-sidecar check-config`: deregister_timeout + propagation_delay +
# app_timeout + 1s) is 29s for config/compose-web.toml, so give the container more than
# that to stop: stop_grace_period: 35s in docker-compose.yml, `docker run --stop-timeout 35`
# or `docker stop -t 35` by hand (an image cannot carry a stop timeout; docker's default
# is 10s, which would SIGKILL a draining sidecar). tests/test_compose_static.py checks both.
STOPSIGNAL SIGTERM
# The sidecar's readiness endpoint ([status] listen in the config: 127.0.0.1:9501 in both
# compose configs): healthy means registered in Consul with its check passing; starting,
# draining, in maintenance or cut off from the agent it answers 503, and so does a sidecar
# that is gone or stuck. (/healthz, liveness alone, answers 200 whenever the sidecar runs.)
# Python, not curl: the slim base has no curl.
ENV SIDECAR_HEALTH_URL=http://127.0.0.1:9501/ready
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['SIDECAR_HEALTH_URL'], timeout=2)"]
ENTRYPOINT ["consul-sidecar"]
CMD ["run", "-c", "/etc/consul-sidecar/web.toml", "--", \
     "sh", "-c", "exec python /app/examples/app/app.py --host 0.0.0.0 --port 8080 --instance \"$HOSTNAME\" --version \"${APP_VERSION:-v1}\""]
