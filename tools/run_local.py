"""Run the whole system on this machine: ``make demo`` and ``make run``.

Starts the internal broker (11883) and a local central broker (11884) from
``mosquitto/*-dev.conf``, both daemons with a configuration derived from
``config.yaml`` (central broker → the local one), and with ``--demo`` the
meter simulator: three answering meters, one whose clock reads 2005 and one
that never answers (so an ALERT shows). Everything they log and every clean
message on the central broker is printed, prefixed by where it came from.
Ctrl-C stops everything it started.

``make run`` is the same without the simulator, for real meters on the LAN:
the internal broker then listens on all interfaces, without accounts; the
production set-up (accounts, ACL, systemd) is ``sudo make install``.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import yaml

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / "run"
INTERNAL_PORT = 11883
CENTRAL_PORT = 11884
COLOURS = {"internal": "35", "central": "90", "proxy": "36", "sender": "33", "meters": "32", "clean": "1;37"}


def port_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:port."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def wait_for_port(port: int, timeout: float = 10) -> None:
    """Wait until a broker accepts connections on ``port``."""
    deadline = time.monotonic() + timeout
    while port_free(port):
        if time.monotonic() > deadline:
            raise SystemExit(f"nothing listens on port {port} after {timeout} s")
        time.sleep(0.05)


def demo_config(source: Path, demo: bool) -> dict:
    """config.yaml with the central broker replaced by the local one."""
    document = yaml.safe_load(source.read_text()) or {}
    document.setdefault("internal_broker", {}).update(host="127.0.0.1", port=INTERNAL_PORT)
    document.setdefault("central_broker", {}).update(host="127.0.0.1", port=CENTRAL_PORT, tls=False)
    if demo:
        # Fast enough to watch: power every 30 s, energy every minute.
        document.setdefault("meters", {}).update(upload_frequency_seconds=30, upload_frequency_minutes=1)
    return document


class Runner:
    """The processes started, their output relayed line by line with a prefix."""

    def __init__(self, colour: bool) -> None:
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.colour = colour
        self.print_lock = threading.Lock()

    def say(self, name: str, line: str) -> None:
        """Print one line with the source's name in front."""
        prefix = f"[{name:>8}]"
        if self.colour:
            prefix = f"\033[{COLOURS.get(name, '0')}m{prefix}\033[0m"
        with self.print_lock:
            print(f"{prefix} {line}", flush=True)

    def start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        """Start a process, relaying its output."""
        process = subprocess.Popen(command, cwd=RUN_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes.append((name, process))
        threading.Thread(target=self._relay, args=(name, process.stdout), daemon=True).start()
        return process

    def _relay(self, name: str, stream: IO[bytes] | None) -> None:
        assert stream is not None
        for raw in stream:
            self.say(name, raw.decode(errors="replace").rstrip())

    def stop_all(self) -> None:
        """SIGTERM everything, newest first, each after the previous one ended.

        The daemons go before the brokers, so that they can still deliver what
        they hold and publish their offline state.
        """
        for name, process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
            self.say(name, f"stopped (exit code {code})")

    def first_exited(self) -> tuple[str, int] | None:
        """A process that ended by itself, if any."""
        for name, process in self.processes:
            code = process.poll()
            if code is not None:
                return name, code
        return None


def main() -> int:
    """Start everything, relay output until Ctrl-C or a process fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="also run simulated meters")
    parser.add_argument("--config", default=str(ROOT / "config.yaml"), help="base configuration")
    parser.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: never)")
    args = parser.parse_args()

    for port in (INTERNAL_PORT, CENTRAL_PORT):
        if not port_free(port):
            print(f"Port {port} is in use (another `make demo` or `make run`?). Stop it first.", file=sys.stderr)
            return 1
    RUN_DIR.mkdir(exist_ok=True)
    config_path = RUN_DIR / "config.yaml"
    config_path.write_text("# Written by tools/run_local.py from config.yaml; edit config.yaml instead.\n"
                           + yaml.safe_dump(demo_config(Path(args.config), args.demo), sort_keys=False))
    internal_conf = (ROOT / "mosquitto" / "internal-dev.conf").read_text()
    if not args.demo:
        # Real meters are on the LAN: listen on every interface.
        internal_conf = internal_conf.replace(f"listener {INTERNAL_PORT} 127.0.0.1", f"listener {INTERNAL_PORT}")
    (RUN_DIR / "internal.conf").write_text(internal_conf)

    runner = Runner(colour=sys.stdout.isatty())
    # The handlers only append to a list: a signal interrupts the main thread between two bytecodes,
    # perhaps inside a lock (an Event's, while it waits), which setting an Event would wait for for ever.
    stop: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, _frame: stop.append(signum))
    signal.signal(signal.SIGTERM, lambda signum, _frame: stop.append(signum))
    python = sys.executable
    try:
        runner.start("internal", ["mosquitto", "-c", str(RUN_DIR / "internal.conf")])
        runner.start("central", ["mosquitto", "-c", str(ROOT / "mosquitto" / "central-dev.conf")])
        wait_for_port(INTERNAL_PORT)
        wait_for_port(CENTRAL_PORT)
        runner.start("clean", ["mosquitto_sub", "-p", str(CENTRAL_PORT), "-v", "-t", "kpm33b/#",
                               "-t", "homeassistant/#"])
        runner.start("proxy", [python, str(ROOT / "kpm33b_proxy.py"), "--config", str(config_path)])
        runner.start("sender", [python, str(ROOT / "config_sender.py"), "--config", str(config_path)])
        if args.demo:
            runner.start("meters", [python, str(ROOT / "tools" / "meter_simulator.py"), "--port",
                                    str(INTERNAL_PORT), "--meters", "5", "--silent", "1", "--clock-2005", "1",
                                    "--seconds-interval", "30", "--minutes-interval", "60", "--spurious"])
        else:
            runner.say("run", f"internal broker on port {INTERNAL_PORT} (all interfaces, no accounts): point "
                              "the meters here; clean messages on 127.0.0.1:11884")
        runner.say("run", "Ctrl-C stops everything")
        deadline = time.monotonic() + args.duration if args.duration else None
        while not stop:
            time.sleep(0.2)
            exited = runner.first_exited()
            if exited is not None:
                runner.say(exited[0], f"exited by itself with code {exited[1]}")
                return 1
            if deadline is not None and time.monotonic() > deadline:
                break
    finally:
        runner.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
