"""Deployment: `make install`/`make uninstall` into a DESTDIR, and the systemd units.

The units are checked with systemd's own tools, which work without systemd
running (as in this container and in CI):
- `systemd-analyze verify --root=<verify root>` on the installed units. With
  --root it loads units and checks the ExecStart=/ExecReload= binaries inside
  that root, so the root is the DESTDIR tree plus the host's system units
  (sysinit.target, network-online.target …) and the host binaries the units
  name (/usr/sbin/mosquitto, /bin/kill, the interpreter behind the venv).
  It reports problems such as unknown keys only as warnings with exit code 0,
  so its output must also be empty.
- `systemd-analyze security --offline=true <unit file>` for the exposure level.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker import Mosquitto, free_port
from test_internal_broker_config import Client, internal_conf_for_test

ROOT = Path(__file__).resolve().parent.parent
UNITS = ["kpm33b-broker.service", "kpm33b-proxy.service", "kpm33b-config-sender.service"]
MAX_EXPOSURE = 2.0


def make(target: str, destdir: Path, skip_venv: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `make -C <repo> <target> DESTDIR=<destdir>` as an operator would."""
    env = {key: value for key, value in os.environ.items() if key not in ("DESTDIR", "KPM33B_SKIP_VENV")}
    if skip_venv:
        env["KPM33B_SKIP_VENV"] = "1"
    result = subprocess.run(
        ["make", "-s", "-C", str(ROOT), target, f"DESTDIR={destdir}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, f"make {target} failed:\n{result.stdout}\n{result.stderr}"
    return result


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Every Key=value of a unit file, repeated keys kept in order (configparser cannot)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def host_file_into(root: Path, path: str) -> None:
    """Make ``path`` (as seen inside ``root``) exist there, copying it and its symlinks from the host."""
    for _ in range(40):
        inside = root / path.lstrip("/")
        if inside.is_symlink():
            target = os.readlink(inside)
            path = target if target.startswith("/") else os.path.normpath(os.path.join(os.path.dirname(path), target))
            continue
        if inside.exists():
            return
        inside.parent.mkdir(parents=True, exist_ok=True)
        host = Path(path)
        if host.is_symlink():
            inside.symlink_to(os.readlink(host))
            continue
        shutil.copy2(host, inside)
        return
    raise AssertionError(f"symlink loop at {path}")


def verify_root(stage: Path, tmp: Path) -> Path:
    """The staged tree plus what `systemd-analyze verify --root` needs from the host."""
    root = tmp / "verify-root"
    shutil.copytree(stage, root, symlinks=True)
    candidates = [Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")]
    system_units = next((path for path in candidates if (path / "sysinit.target").exists()), None)
    assert system_units is not None, "systemd's own units (sysinit.target …) are not installed"
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
    for unit in UNITS:
        for key in ("ExecStart", "ExecStartPre", "ExecReload"):
            for command in unit_settings(root / "etc/systemd/system" / unit).get(key, []):
                host_file_into(root, command.lstrip("-@:+!").split()[0])
    return root


@pytest.fixture(scope="module")
def staged_with_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real installation, venv included (pip installs requirements.txt)."""
    stage = tmp_path_factory.mktemp("stage-venv")
    make("install", stage, skip_venv=False)
    return stage


@pytest.fixture
def stage(tmp_path: Path) -> Iterator[Path]:
    """A fast installation without the venv (KPM33B_SKIP_VENV=1)."""
    destdir = tmp_path / "stage"
    make("install", destdir)
    yield destdir


def test_install_stages_code_configuration_and_units(stage: Path) -> None:
    opt = stage / "opt/kpm33b-proxy"
    top_level_code = sorted(path.name for path in ROOT.glob("*.py"))
    assert {"kpm33b_proxy.py", "config_sender.py", "sd_notify.py"} <= set(top_level_code)
    for name in [*top_level_code, "requirements.txt", "config.yaml"]:
        assert (opt / name).read_bytes() == (ROOT / name).read_bytes(), name
    for name in ("internal.conf", "acl", "internal-dev.conf", "central-dev.conf"):
        assert (opt / "mosquitto" / name).read_bytes() == (ROOT / "mosquitto" / name).read_bytes()
    assert (opt / "doc/operations.md").is_file()
    assert os.access(opt / "scripts/meter-account.sh", os.X_OK)
    assert not (opt / "venv").exists()
    # Byte code compiled at install: /opt is read-only to the services.
    assert (opt / "__pycache__").is_dir()
    assert any((opt / "__pycache__").glob("kpm33b_proxy.*.pyc"))

    etc = stage / "etc/kpm33b"
    assert (etc / "config.yaml").read_bytes() == (ROOT / "config.yaml").read_bytes()
    assert (etc / "mosquitto/internal.conf").read_bytes() == (ROOT / "mosquitto/internal.conf").read_bytes()
    assert (etc / "mosquitto/acl").read_bytes() == (ROOT / "mosquitto/acl").read_bytes()
    for secret in ("secrets.env", "secrets-proxy.env", "secrets-config-sender.env"):
        assert stat.S_IMODE((etc / secret).stat().st_mode) == 0o600, secret
    for broker_file in ("passwd", "acl"):
        assert stat.S_IMODE((etc / "mosquitto" / broker_file).stat().st_mode) == 0o640
    accounts = [line.split(":")[0] for line in (etc / "mosquitto/passwd").read_text().splitlines()]
    assert accounts == ["kpm33b-proxy", "kpm33b-config-sender"]
    assert "KPM33B_INTERNAL_USERNAME=kpm33b-proxy\n" in (etc / "secrets-proxy.env").read_text()
    assert "KPM33B_INTERNAL_USERNAME=kpm33b-config-sender\n" in (etc / "secrets-config-sender.env").read_text()

    for unit in UNITS:
        assert (stage / "etc/systemd/system" / unit).read_bytes() == (ROOT / "systemd" / unit).read_bytes()
    installed = sorted(str(path.relative_to(stage)) for path in stage.rglob("*") if path.is_file())
    assert all(path.startswith(("opt/kpm33b-proxy/", "etc/kpm33b/", "etc/systemd/system/")) for path in installed)


@pytest.mark.parametrize("script", ["kpm33b_proxy.py", "config_sender.py"])
@pytest.mark.parametrize("check_only", [True, False], ids=["start-check", "start"])
def test_installed_configuration_refuses_to_start_until_the_central_broker_is_set(
    stage: Path, script: str, check_only: bool,
) -> None:
    """The units' ExecStartPre= check and the daemon itself: one line saying what to set, exit code 2.

    The shipped default once pointed at 127.0.0.1:1883, where Debian's own
    mosquitto package listens: every reading went there without a word.
    """
    config = stage / "etc/kpm33b/config.yaml"
    command = [sys.executable, str(stage / "opt/kpm33b-proxy" / script), "--config", str(config)]
    result = subprocess.run([*command, "--check-config"] if check_only else command,
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        f"Invalid configuration {config}:",
        "  central_broker.host: not set; set it to the address (IP or host name) of your existing MQTT broker, "
        "for example Home Assistant's",
    ]

    config.write_text(config.read_text().replace("  host: null ", "  host: 192.0.2.10 ", 1))
    checked = subprocess.run([*command, "--check-config"], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "central broker mqtt://192.0.2.10:1883" in checked.stdout


def test_first_install_ends_with_the_next_steps_and_an_upgrade_does_not_repeat_them(tmp_path: Path) -> None:
    destdir = tmp_path / "stage"
    first = make("install", destdir).stdout
    closing = first[first.index("Next steps"):]
    for step in (
        "central_broker.host in /etc/kpm33b/config.yaml",
        "Home Assistant's",
        "--config /etc/kpm33b/config.yaml --check-config",
        "KPM33B_CENTRAL_USERNAME and KPM33B_CENTRAL_PASSWORD in /etc/kpm33b/secrets.env",
        "/opt/kpm33b-proxy/scripts/meter-account.sh add <meter id>",
        "/opt/kpm33b-proxy/doc/meters.md",
        "systemctl start kpm33b-broker kpm33b-proxy kpm33b-config-sender",
    ):
        assert step in closing, step
    assert closing.index("central_broker.host") < closing.index("secrets.env") < closing.index("meter-account.sh") \
        < closing.index("systemctl start")

    second = make("install", destdir).stdout
    assert "Next steps" not in second
    assert "kept your configuration in /etc/kpm33b" in second


def env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def test_installed_service_accounts_log_in_to_the_installed_broker(stage: Path, tmp_path: Path) -> None:
    etc = stage / "etc/kpm33b"
    workdir = tmp_path / "broker"
    workdir.mkdir()
    shutil.copy(etc / "mosquitto/passwd", workdir / "passwd")
    shutil.copy(etc / "mosquitto/acl", workdir / "acl")
    port = free_port()
    config = workdir / "internal.conf"
    broker = Mosquitto(port=port, config_file=config)
    text = internal_conf_for_test(workdir, port, broker.log_path)
    config.write_text(text)
    broker.start()
    try:
        for name in ("secrets-proxy.env", "secrets-config-sender.env"):
            secrets = env_file(etc / name)
            client = Client(port, secrets["KPM33B_INTERNAL_USERNAME"], secrets["KPM33B_INTERNAL_PASSWORD"])
            assert client.connected, name
            client.close()
        intruder = Client(port, "kpm33b-proxy", "guessed", protocol=mqtt.MQTTv311)
        assert not intruder.connected
        intruder.close()
    finally:
        broker.cleanup()


def test_second_install_keeps_the_operators_files_and_replaces_the_code(stage: Path) -> None:
    etc = stage / "etc/kpm33b"
    opt = stage / "opt/kpm33b-proxy"
    (etc / "config.yaml").write_text("# edited by the operator\n")
    (etc / "secrets.env").write_text("KPM33B_CENTRAL_USERNAME=ha\n")
    meter = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts/meter-account.sh"),
            "--passwd-file",
            str(etc / "mosquitto/passwd"),
            "add",
            "33B1225950027",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert meter.returncode == 0, meter.stderr
    (etc / "mosquitto/internal.conf").write_text("# changed by hand\n")
    (opt / "obsolete_module.py").write_text("")
    keep = {
        name: (etc / name).read_bytes()
        for name in ("config.yaml", "secrets.env", "secrets-proxy.env", "mosquitto/acl", "mosquitto/passwd")
    }

    second = make("install", stage)

    assert {name: (etc / name).read_bytes() for name in keep} == keep
    assert "keeping /etc/kpm33b/config.yaml" in second.stdout
    assert (etc / "mosquitto/internal.conf").read_bytes() == (ROOT / "mosquitto/internal.conf").read_bytes()
    assert (etc / "mosquitto/internal.conf.old").read_text() == "# changed by hand\n"
    assert not (opt / "obsolete_module.py").exists()
    assert (opt / "kpm33b_proxy.py").exists()


def test_uninstall_removes_code_and_units_and_keeps_the_configuration(stage: Path) -> None:
    etc_before = sorted(path.relative_to(stage) for path in (stage / "etc/kpm33b").rglob("*"))

    result = make("uninstall", stage)
    assert "kept /etc/kpm33b" in result.stdout
    assert not (stage / "opt/kpm33b-proxy").exists()
    for unit in UNITS:
        assert not (stage / "etc/systemd/system" / unit).exists()
    assert sorted(path.relative_to(stage) for path in (stage / "etc/kpm33b").rglob("*")) == etc_before

    make("uninstall", stage)  # idempotent
    make("install", stage)
    assert (stage / "opt/kpm33b-proxy/kpm33b_proxy.py").exists()


def test_installed_venv_holds_the_pinned_requirements(staged_with_venv: Path) -> None:
    python = staged_with_venv / "opt/kpm33b-proxy/venv/bin/python"
    pins = dict(
        line.split("==")
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    script = (
        "import importlib.metadata as m, json, sys; "
        "import paho.mqtt.client, yaml, watchdog.observers; "
        "print(json.dumps({name: m.version(name) for name in sys.argv[1:]}))"
    )
    result = subprocess.run([str(python), "-c", script, *pins], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == pins


def test_installed_units_pass_systemd_analyze_verify(staged_with_venv: Path, tmp_path: Path) -> None:
    root = verify_root(staged_with_venv, tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", *UNITS],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root / "etc/systemd/system",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_verify_catches_a_broken_unit(staged_with_venv: Path, tmp_path: Path) -> None:
    """The check above would see a mistake: an unknown key and a missing binary."""
    root = verify_root(staged_with_venv, tmp_path)
    unit = root / "etc/systemd/system/kpm33b-proxy.service"
    unit.write_text(unit.read_text().replace("ProtectHome=yes", "ProtectHomes=yes"))
    (root / "usr/sbin/mosquitto").unlink()
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", *UNITS],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root / "etc/systemd/system",
    )
    assert "Unknown key 'ProtectHomes'" in result.stderr
    assert "/usr/sbin/mosquitto" in result.stderr
    assert result.returncode != 0


@pytest.mark.parametrize("unit", UNITS)
def test_unit_sandbox_exposure_is_at_most_two(unit: str) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(ROOT / "systemd" / unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_daemon_units_follow_the_deployment_contract() -> None:
    for unit, script in (
        ("kpm33b-proxy.service", "kpm33b_proxy.py"),
        ("kpm33b-config-sender.service", "config_sender.py"),
    ):
        settings = unit_settings(ROOT / "systemd" / unit)
        command = f"/opt/kpm33b-proxy/venv/bin/python /opt/kpm33b-proxy/{script} --config /etc/kpm33b/config.yaml"
        assert settings["ExecStart"] == [command]
        assert settings["ExecStartPre"] == [f"{command} --check-config"]
        assert settings["Requires"] == ["kpm33b-broker.service"]
        assert settings["After"] == ["kpm33b-broker.service network-online.target"]
        assert settings["Wants"] == ["network-online.target"]
        assert settings["Type"] == ["notify"]
        assert settings["NotifyAccess"] == ["main"]
        assert settings["WatchdogSec"] == ["30"]
        assert settings["Restart"] == ["on-failure"]
        assert settings["RestartSec"] == ["5"]
        assert settings["User"] == ["kpm33b"] and settings["Group"] == ["kpm33b"]
        assert settings["EnvironmentFile"][0] == "-/etc/kpm33b/secrets.env"
        assert settings["SyslogIdentifier"] == [unit.removesuffix(".service")]
        assert settings["MemoryDenyWriteExecute"] == ["yes"]
        # `systemctl reload`: SIGHUP re-reads the configuration, the daemon goes on running.
        assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
        assert (ROOT / script).is_file()
    assert unit_settings(ROOT / "systemd/kpm33b-proxy.service")["StateDirectory"] == ["kpm33b-proxy"]

    broker = unit_settings(ROOT / "systemd/kpm33b-broker.service")
    assert broker["ExecStart"] == ["/usr/sbin/mosquitto -c /etc/kpm33b/mosquitto/internal.conf"]
    assert broker["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert broker["User"] == ["kpm33b-broker"]
    assert broker["StateDirectory"] == ["kpm33b/mosquitto"]
