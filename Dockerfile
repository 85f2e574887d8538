# One image for the services of compose.yaml: the internal broker (Mosquitto),
# kpm33b_proxy.py, config_sender.py and a local central broker for trying it
# out; the command picks the role (container/entrypoint.sh).
#
#   docker build -t kpm33b-proxy .
#
# BASE_IMAGE: a Debian 12 (bookworm) image with python3 (3.11) and its venv
# module. The default is the official Python image; `make test-container`
# passes one built locally with mmdebstrap (container/build-base-image.sh),
# for machines that reach no container registry.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# Mosquitto from Debian, as on a host installation; the two system users of
# the systemd units: kpm33b runs the daemons, kpm33b-broker the broker.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mosquitto \
 && rm -rf /var/lib/apt/lists/* \
 && for user in kpm33b kpm33b-broker; do \
      useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$user"; \
    done

WORKDIR /opt/kpm33b-proxy
# The pinned requirements first: this layer is reused while only the code changes.
COPY requirements.txt ./
RUN python3 -m venv venv \
 && venv/bin/python -m pip install --no-cache-dir --disable-pip-version-check -q -r requirements.txt

COPY *.py config.yaml ./
COPY mosquitto/ mosquitto/
COPY doc/ doc/
COPY scripts/meter-account.sh container/entrypoint.sh scripts/
COPY container/meter-account /usr/local/bin/meter-account
# Byte code now: the daemons run as kpm33b, who cannot write here.
RUN venv/bin/python -m compileall -q -l . \
 && install -d -o kpm33b -g kpm33b -m 0700 /var/lib/kpm33b-proxy \
 && install -d -o kpm33b-broker -g kpm33b-broker -m 0700 /var/lib/kpm33b/mosquitto \
 && install -d -m 0755 /var/lib/kpm33b/accounts /var/lib/kpm33b/daemon-accounts /etc/kpm33b

# KPM33B_CONFIG: the daemons' --config; STATE_DIRECTORY: the proxy's state, as
# systemd's StateDirectory= sets it; KPM33B_BROKER_PID_FILE: the broker that
# meter-account reloads; KPM33B_CONTAINER: meter-account prints no addresses
# of the container as the one to enter on a meter.
ENV KPM33B_CONFIG=/etc/kpm33b/config.yaml \
    STATE_DIRECTORY=/var/lib/kpm33b-proxy \
    KPM33B_BROKER_PID_FILE=/run/kpm33b-broker/mosquitto.pid \
    KPM33B_CONTAINER=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

ENTRYPOINT ["/opt/kpm33b-proxy/scripts/entrypoint.sh"]
CMD ["proxy"]
