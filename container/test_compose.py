"""`make test-container`: the container deployment (Dockerfile, compose.yaml) built and run for real.

On podman, with Debian's podman, runc, netavark and podman-compose
(container/install-tools.sh installs them), the test
- builds a base image with mmdebstrap (container/build-base-image.sh): no
  container registry is needed, and the image build installs the Python
  requirements from PyPI;
- builds the image through compose.yaml and starts the stack on free host
  ports: the internal broker, the proxy, the config sender and the local
  central broker of the "local-central" profile;
- adds a meter account with `meter-account add` in the broker's container,
  which reloads the broker itself;
- as a simulated meter on the published meter port: publishes a raw
  MQTT_RT_DATA reading and sees the clean kpm33b/<id>/seconds message on the
  central broker; receives the config sender's interval commands and
  acknowledges them, and sees the config sender count the acknowledgements;
- takes everything down with `podman-compose down -v`, removes the network and
  the images, and checks that nothing of the project is left.

Podman runs with a configuration and a storage of the test's own
(CONTAINERS_CONF, CONTAINERS_STORAGE_CONF in a temporary directory, nothing
under /etc or /var/lib/containers): the cgroupfs cgroup manager (systemd does
not run here), runc, netavark, and nofile/nproc limits no higher than this
machine grants (podman's defaults are higher, and raising a limit needs a
capability that a sandboxed root may lack). At the end the whole storage is
deleted, and the firewall chains netavark created are removed again when they
did not exist before. The test skips only when this machine cannot run a
container at all (no namespaces), and says why.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from broker import free_port, wait_for
from meter_simulator import COMMAND_CONFIG, COMMAND_TIME, command_reply, rt_data_payload
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
METER_ID = "33B1225950027"
ACCOUNT = METER_ID[-8:]
METER_PASSWORD = "meter-secret-0027"
PROFILE = "local-central"
# What podman 4.3 keeps outside the storage it is given, whatever its
# configuration says: the blob info cache of image copies, netavark's run
# files, runc's state, the mount point of the network namespaces. Those the
# test brings into being are removed again.
PODMAN_SYSTEM_PATHS = [Path("/var/lib/containers"), Path("/run/containers"), Path("/run/libpod"),
                       Path("/etc/containers/networks"), Path("/run/runc"), Path("/run/netns")]
# Builds download Debian packages and PyPI wheels: generous, but finite.
BUILD_TIMEOUT = 900


def run(command: list[str], env: Mapping[str, str], timeout: float = 300,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command from the project's root; on failure, an error with everything it printed."""
    result = subprocess.run(command, capture_output=True, text=True, env=dict(env), timeout=timeout, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"{shlex.join(command)} exited with {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def why_no_container_can_run() -> str | None:
    """What stops this machine from running any container (the namespaces a container is made of), or None."""
    try:
        probe = subprocess.run(["unshare", "--mount", "--pid", "--net", "--uts", "--ipc", "--fork", "true"],
                               capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "unshare (util-linux) is not installed, so namespaces cannot even be tried"
    if probe.returncode != 0:
        return f"the kernel or the sandbox refuses new namespaces: unshare says {probe.stderr.strip()!r}"
    return None


def hard_limit(kind: int, ceiling: int) -> int:
    """This process's hard limit of ``kind``, or ``ceiling`` when it has none."""
    hard = resource.getrlimit(kind)[1]
    return ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)


class Podman:
    """podman and podman-compose with a configuration and a storage of their own, in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        for name in ("root", "runroot", "tmp", "networks"):
            (workdir / name).mkdir()
        # runc cannot raise a limit above its own without CAP_SYS_RESOURCE, and
        # podman starts it with at most kernel.pid_max processes (measured on a
        # Debian 12 VM: 32768 while the shell allowed 96367).
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
        nofile = hard_limit(resource.RLIMIT_NOFILE, 1 << 20)
        nproc = hard_limit(resource.RLIMIT_NPROC, pid_max)
        (workdir / "containers.conf").write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
            'log_driver = "k8s-file"\n'
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{workdir}/events.log"\n'
            'runtime = "runc"\n'
            f'tmp_dir = "{workdir}/tmp"\n'
            "[network]\n"
            'network_backend = "netavark"\n'
            f'network_config_dir = "{workdir}/networks"\n'
        )
        (workdir / "storage.conf").write_text(
            '[storage]\ndriver = "overlay"\n'
            f'graphroot = "{workdir}/root"\nrunroot = "{workdir}/runroot"\n'
        )
        self.env = {**os.environ, "CONTAINERS_CONF": str(workdir / "containers.conf"),
                    "CONTAINERS_STORAGE_CONF": str(workdir / "storage.conf")}

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["podman", *args], self.env, timeout=timeout, check=check)

    def lines(self, *args: str) -> list[str]:
        """The non-empty lines a podman command prints."""
        return [line for line in self(*args).stdout.splitlines() if line.strip()]

    def reset(self) -> None:
        """Everything podman holds in this storage: gone."""
        self("system", "reset", "--force", timeout=300, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def netavark_chains() -> set[tuple[str, str, str]]:
    """(tool, table, chain) of every firewall chain netavark made."""
    chains = set()
    for tool in ("iptables", "ip6tables"):
        if shutil.which(tool) is None:
            continue
        for table in ("filter", "nat"):
            listing = subprocess.run([tool, "-t", table, "-S"], capture_output=True, text=True, timeout=30)
            for line in listing.stdout.splitlines():
                if line.startswith("-N NETAVARK"):
                    chains.add((tool, table, line.split()[1]))
    return chains


def remove_chains(chains: set[tuple[str, str, str]]) -> None:
    """Delete these chains and the rules that jump to them (netavark leaves them when its last network goes)."""
    for tool, table in {(tool, table) for tool, table, _ in chains}:
        names = {chain for t, tb, chain in chains if (t, tb) == (tool, table)}
        listing = subprocess.run([tool, "-t", table, "-S"], capture_output=True, text=True, timeout=30)
        for rule in listing.stdout.splitlines():
            words = shlex.split(rule)
            if words[:1] == ["-A"] and words[1] not in names and "-j" in words \
                    and words[words.index("-j") + 1] in names:
                subprocess.run([tool, "-t", table, "-D", *words[1:]], capture_output=True, timeout=30)
        for chain in names:
            subprocess.run([tool, "-t", table, "-F", chain], capture_output=True, timeout=30)
        for chain in names:
            subprocess.run([tool, "-t", table, "-X", chain], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    """A podman of the test's own; afterwards no image, container, volume, network or chain of it is left."""
    reason = why_no_container_can_run()
    if reason is not None:
        pytest.skip(f"this machine cannot run a container: {reason}")
    if os.geteuid() != 0:
        pytest.fail("the container test runs podman as root: run it with `make test-container`, which uses sudo")
    for tool in ("podman", "runc", "netavark", "podman-compose", "mmdebstrap", "iptables"):
        if shutil.which(tool) is None and not Path(f"/usr/lib/podman/{tool}").exists():
            pytest.fail(f"{tool} is not installed: `make test-container` installs it (container/install-tools.sh)")
    chains_before = netavark_chains()
    forwarding = Path("/proc/sys/net/ipv4/ip_forward")
    forwarding_before = forwarding.read_text()
    paths_before = {path for path in PODMAN_SYSTEM_PATHS if path.exists()}
    engine = Podman(tmp_path_factory.mktemp("podman", numbered=True))
    try:
        yield engine
    finally:
        engine.reset()
        remove_chains(netavark_chains() - chains_before)
        if forwarding.read_text() != forwarding_before:  # netavark turns it on for its networks
            forwarding.write_text(forwarding_before)
        for path in PODMAN_SYSTEM_PATHS:
            if path in paths_before or not path.exists():
                continue
            # Podman bind-mounts /run/netns onto itself; for the others this fails, harmlessly.
            subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
            if path in (Path("/run/runc"), Path("/run/netns")):
                path.rmdir()  # only when empty: what is in there belongs to someone else
            else:
                shutil.rmtree(path)


class SimulatedMeter:
    """One KPM33B on the internal broker: its account, its command topics, its replies.

    Replies go out from paho's network thread at once, which is all a meter
    does; the test only waits for what came of them.
    """

    def __init__(self, port: int) -> None:
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.replies: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.connack: Any = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"meter-{ACCOUNT}",
                                  protocol=mqtt.MQTTv311)
        self.client.username_pw_set(ACCOUNT, METER_PASSWORD)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason_code: Any,
                    _properties: Any) -> None:
        self.connack = reason_code
        if reason_code.is_failure:
            client.disconnect()
            return
        client.subscribe([(f"MQTT_COMMOD_SET_{ACCOUNT}", 1), (f"MQTT_SETTIME_{ACCOUNT}", 1)])

    def _on_message(self, client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        kind = COMMAND_CONFIG if message.topic.startswith("MQTT_COMMOD_SET_") else COMMAND_TIME
        reply = command_reply(kind, message.payload, METER_ID)
        with self._lock:
            self.commands.append((message.topic, json.loads(message.payload)))
            if reply is not None:
                self.replies.append(reply)
        if reply is not None:
            topic = "MQTT_COMMOD_SET_REP" if kind == COMMAND_CONFIG else "MQTT_METER_TIME_REP"
            client.publish(topic, json.dumps(reply), qos=1)

    @property
    def ready(self) -> bool:
        return self.connack is not None and not self.connack.is_failure and self._subscribed.is_set()

    def received(self, command: str, value: str | None = None) -> bool:
        """Whether an interval command with this ``Cmd`` ("0000" seconds, "0001" minutes), and value, arrived."""
        with self._lock:
            return any(payload.get("Cmd") == command and value in (None, payload.get("value"))
                       for _, payload in self.commands)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Subscriber:
    """Everything published under ``kpm33b/#`` on the central broker, latest payload per topic."""

    def __init__(self, port: int) -> None:
        self.latest: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda client, *_: client.subscribe("kpm33b/#", qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.latest[message.topic] = message.payload

    def json(self, topic: str) -> dict[str, Any] | None:
        with self._lock:
            payload = self.latest.get(topic)
        return None if payload is None else json.loads(payload)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def accepting(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def site_config(directory: Path) -> None:
    """The shipped config.yaml as an operator adapts it for compose.yaml and its local central broker."""
    document = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    document["internal_broker"]["host"] = "broker"
    document["central_broker"].update(host="central", port=1883)
    document["health"]["stats_interval_seconds"] = 1
    (directory / "config.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    (directory / "secrets.env").write_text("# The local central broker has no accounts.\n")


def project_leftovers(podman: Podman, project: str, images: list[str]) -> list[str]:
    """What podman still holds of the compose project and its images."""
    label = f"label=io.podman.compose.project={project}"
    left = [f"container {name}" for name in podman.lines("ps", "--all", "--filter", label, "--format", "{{.Names}}")]
    left += [f"volume {name}" for name in podman.lines("volume", "ls", "--filter", label, "--format", "{{.Name}}")]
    left += [f"network {name}" for name in podman.lines("network", "ls", "--filter", label, "--format", "{{.Name}}")]
    left += [f"image {image}" for image in images if podman("image", "exists", image, check=False).returncode == 0]
    return left


def test_compose_stack_forwards_a_meter_reading_and_configures_the_meter(podman: Podman, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:10]
    project = f"kpm33b-test-{tag}"
    base_image = f"localhost/kpm33b-test-base:{tag}"
    image = f"localhost/kpm33b-test:{tag}"
    site = tmp_path / "site"
    site.mkdir()
    site_config(site)
    meter_port, central_port = free_port(), free_port()
    env = {**podman.env, "KPM33B_SITE": str(site), "KPM33B_METER_PORT": str(meter_port),
           "KPM33B_CENTRAL_PORT": str(central_port), "KPM33B_BASE_IMAGE": base_image, "KPM33B_IMAGE": image}
    compose = ["podman-compose", "--project-name", project, "--file", str(COMPOSE_FILE)]
    # Debian 12's podman-compose (1.0.3) knows no profiles and starts every
    # service; later ones need the profile named.
    if "--profile" in run(["podman-compose", "--help"], env).stdout:
        compose += ["--profile", PROFILE]
    timings: dict[str, float] = {}

    def timed(phase: str, command: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        result = run(command, env, timeout=timeout)
        timings[phase] = time.monotonic() - started
        return result

    meter: SimulatedMeter | None = None
    central: Subscriber | None = None
    try:
        timed("base image (mmdebstrap, import)", ["bash", "container/build-base-image.sh", base_image],
              timeout=BUILD_TIMEOUT)
        timed("image build", [*compose, "build", "broker"], timeout=BUILD_TIMEOUT)
        timed("compose up", [*compose, "up", "-d"])
        started = time.monotonic()
        wait_for(lambda: accepting(meter_port) and accepting(central_port), timeout=60, interval=0.2)
        containers = {service: container_of(podman, project, service)
                      for service in ("broker", "proxy", "config-sender", "central")}

        # In any letter case, and the running broker takes it at once.
        added = podman("exec", containers["broker"], "meter-account", "add", METER_ID.lower(), METER_PASSWORD)
        assert f"Meter {METER_ID}: account {ACCOUNT} added" in added.stdout
        assert "server address: the LAN address of the machine that runs the containers" in added.stdout
        assert f"  port: {meter_port}\n" in added.stdout
        assert "kpm33b-broker has reloaded its accounts" in added.stdout, added.stdout

        central = Subscriber(central_port)
        meter = SimulatedMeter(meter_port)
        wait_for(lambda: meter.ready, timeout=10)
        reading = rt_data_payload(METER_ID, datetime.now().replace(microsecond=0), random.Random(27))
        meter.client.publish("MQTT_RT_DATA", json.dumps(reading), qos=1).wait_for_publish(10)

        seconds_topic = f"kpm33b/{METER_ID}/seconds"
        wait_for(lambda: central.json(seconds_topic) is not None, timeout=60, interval=0.2)
        clean = central.json(seconds_topic)
        assert clean is not None
        assert clean["id"] == METER_ID
        assert clean["active_power"] == reading["zyggl"]
        assert clean["time"] == datetime.strptime(reading["time"], "%Y%m%d%H%M%S").isoformat()

        # The config sender discovers the meter from that message and sets both intervals.
        wait_for(lambda: meter.received("0000") and meter.received("0001"), timeout=60, interval=0.2)
        stats_topic = "kpm33b/bridge/config_sender/stats"
        wait_for(lambda: (central.json(stats_topic) or {}).get("acked", 0) >= 2, timeout=30, interval=0.2)
        stats = central.json(stats_topic)
        assert stats is not None and stats["alerted"] == 0 and stats["failed"] == 0, stats
        timings["reading forwarded, meter configured"] = time.monotonic() - started

        # A saved site/config.yaml reaches the daemons through the read-only mount.
        edited = yaml.safe_load((site / "config.yaml").read_text())
        edited["meters"]["upload_frequency_seconds"] = 300
        (site / ".config.yaml.new").write_text(yaml.safe_dump(edited, sort_keys=False))
        (site / ".config.yaml.new").replace(site / "config.yaml")  # as editors save
        wait_for(lambda: meter.received("0000", "300"), timeout=30, interval=0.2)

        # What doc/containers.md tells the operator to run.
        checked = run([*compose, "run", "--rm", "--no-deps", "proxy", "check-config"], env)
        assert "/etc/kpm33b/config.yaml: valid (" in checked.stdout
        backup = tmp_path / "backup"
        backup.mkdir()
        volumes = [argument for name in ("accounts", "daemon-accounts", "broker-data", "proxy-state")
                   for argument in ("--volume", f"{project}_{name}:/volumes/{name}:ro")]
        podman("run", "--rm", "--network", "none", "--entrypoint", "tar", "--volume", f"{backup}:/backup",
               *volumes, image, "-C", "/volumes", "-czpf", "/backup/kpm33b-volumes.tar.gz", ".")
        listing = run(["tar", "-tzf", str(backup / "kpm33b-volumes.tar.gz")], env).stdout.split()
        assert {"./accounts/passwd", "./accounts/acl", "./daemon-accounts/secrets-proxy.env",
                "./proxy-state/proxy.lock"} <= set(listing), listing

        # Root only sets up the volumes: the services run as the units' users.
        assert process_users(podman, containers["broker"]) == {"kpm33b-broker"}
        assert process_users(podman, containers["proxy"]) == {"kpm33b"}
        assert process_users(podman, containers["config-sender"]) == {"kpm33b"}

        # The shipped config.yaml as it is: refused, saying what to set.
        shipped = tmp_path / "shipped"
        shipped.mkdir()
        shutil.copy(ROOT / "config.yaml", shipped / "config.yaml")
        refused = podman("run", "--rm", "--network", "none", "--volume", f"{shipped}:/etc/kpm33b:ro", image, "proxy",
                         check=False)
        assert refused.returncode == 2, refused
        assert refused.stderr.splitlines() == [
            "Invalid configuration /etc/kpm33b/config.yaml:",
            "  central_broker.host: not set; set it to the address (IP or host name) of your existing MQTT broker, "
            "for example Home Assistant's",
            "entrypoint: internal_broker.host is 127.0.0.1 in /etc/kpm33b/config.yaml, which in a container is the "
            "container itself: set internal_broker.host: broker (the broker's service in compose.yaml)",
        ]
    except BaseException:
        logs = run([*compose, "logs"], env, check=False)
        print(f"compose logs:\n{logs.stdout}\n{logs.stderr}", file=sys.stderr)
        raise
    finally:
        for client in (meter, central):
            if client is not None:
                client.close()
        started = time.monotonic()
        take_down(podman, compose, env, project, [image, base_image])
        timings["take down"] = time.monotonic() - started
        summary = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in timings.items())
        print(f"\ncontainer test timings: {summary}", file=sys.stderr)

    assert project_leftovers(podman, project, [image, base_image]) == []


def container_of(podman: Podman, project: str, service: str) -> str:
    """The name of the one running container of a compose service."""
    names = podman.lines("ps", "--filter", f"label=io.podman.compose.project={project}",
                         "--filter", f"label=com.docker.compose.service={service}", "--format", "{{.Names}}")
    assert len(names) == 1, f"{service}: {names}"
    return names[0]


def process_users(podman: Podman, container: str) -> set[str]:
    """The users the processes of a container run as."""
    return set(podman.lines("top", container, "user")[1:])


def take_down(podman: Podman, compose: list[str], env: Mapping[str, str], project: str, images: list[str]) -> None:
    """What an operator does to remove the stack: containers and volumes, then the network and the images.

    podman-compose 1.0 leaves the project's network behind; each step runs
    even when one before it failed.
    """
    run([*compose, "down", "--volumes"], env, check=False)
    networks = podman("network", "ls", "--filter", f"label=io.podman.compose.project={project}",
                      "--format", "{{.Name}}", check=False).stdout.split()
    for network in networks:
        podman("network", "rm", network, check=False)
    podman("rmi", "--force", *images, check=False)
