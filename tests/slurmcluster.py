"""A real single-node Slurm for the tests: munged, MariaDB + slurmdbd (accounting, so that submitit learns
when a job was killed), slurmctld and slurmd on 127.0.0.1, with every file under one folder, stopped by PID.

Written for these tests from the project's notes on running Slurm on these machines (Debian's packages,
root, no systemd). `start` raises `Unavailable` with the reason when the daemons cannot be had here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PORT_NAMES = ("ctld", "slurmd", "dbd", "db")


class Unavailable(Exception):
    pass


def _run(*cmd: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)


def _wait(check, seconds: float, what: str) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.1)
    raise Unavailable(f"{what} did not come up in {seconds:.0f} s")


def _free_ports(names) -> dict[str, int]:
    """Ports the kernel hands out as free, all at once (so distinct), for the daemons to bind: fixed ones
    collide with another cluster, or another test run, on the same machine."""
    socks = [socket.socket() for _ in names]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return {name: s.getsockname()[1] for name, s in zip(names, socks, strict=True)}
    finally:
        for s in socks:
            s.close()


class Cluster:
    def __init__(self, base: Path) -> None:
        self.base = base  # must be reachable by the munge user: not under a 0700 folder
        self.conf = base / "etc" / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.mariadb: subprocess.Popen | None = None  # our child: waited for, so that it leaves no zombie
        self.ports: dict[str, int] = {}

    def start(self) -> Cluster:
        if os.geteuid() != 0:
            raise Unavailable("starting Slurm's daemons needs root")
        missing = [b for b in ("slurmctld", "slurmd", "munged", "slurmdbd", "mariadbd") if not shutil.which(b)]
        if missing:  # installed by `make test` (Debian packages, as root), never from inside a test
            raise Unavailable(f"{', '.join(missing)} not installed (`make slurm-packages` installs them)")
        self.ports = _free_ports(PORT_NAMES)
        for sub in ("etc", "state", "spool", "run", "log", "munge", "mysql"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        self._munge()
        self._accounting()
        self._slurm()
        return self

    def _munge(self) -> None:
        m = self.base / "munge"
        shutil.chown(m, "munge", "munge")
        m.chmod(0o755)  # the socket's folder must be searchable by everyone
        _run("runuser", "-u", "munge", "--", "mungekey", "--create", f"--keyfile={m}/munge.key")
        r = _run("runuser", "-u", "munge", "--", "munged", f"--socket={m}/munge.socket", f"--key-file={m}/munge.key",
                 f"--log-file={m}/munged.log", f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed")
        if r.returncode:
            raise Unavailable(f"munged: {r.stderr.strip()[-300:]}")

    def _accounting(self) -> None:
        db = self.base / "mysql"
        sock = db / "mysqld.sock"
        r = _run("mariadb-install-db", "--no-defaults", "--user=root", f"--datadir={db}/data",
                 "--auth-root-authentication-method=socket", "--skip-test-db")
        if r.returncode:
            raise Unavailable(f"mariadb-install-db: {r.stderr.strip()[-300:]}")
        self.mariadb = subprocess.Popen(
            ["mariadbd", "--no-defaults", "--user=root", f"--datadir={db}/data", f"--socket={sock}",
             f"--port={self.ports['db']}", "--bind-address=127.0.0.1", f"--pid-file={db}/mysqld.pid",
             f"--log-error={db}/error.log", "--skip-log-bin", "--innodb-buffer-pool-size=64M"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        _wait(lambda: _run("mariadb", "--no-defaults", "-S", str(sock), "-e", "select 1").returncode == 0, 30,
              "MariaDB")
        _run("mariadb", "--no-defaults", "-S", str(sock), "-e",
             "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm'; "
             "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")
        munge = self.base / "munge" / "munge.socket"
        dbd = self.base / "etc" / "slurmdbd.conf"
        dbd.write_text(f"AuthType=auth/munge\nAuthInfo=socket={munge}\nDbdHost=localhost\nDbdPort={self.ports['dbd']}\n"
                       f"SlurmUser=root\nLogFile={self.base}/log/slurmdbd.log\nPidFile={self.base}/run/slurmdbd.pid\n"
                       f"StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\nStoragePort={self.ports['db']}\n"
                       "StorageUser=slurm\nStoragePass=slurm\nStorageLoc=slurm_acct_db\n")
        dbd.chmod(0o600)
        self._write_conf()
        r = _run("slurmdbd", env=self.env)
        if r.returncode:
            raise Unavailable(f"slurmdbd: {r.stderr.strip()[-300:]}")
        _wait(lambda: _run("sacctmgr", "-n", "list", "cluster", env=self.env).returncode == 0, 30, "slurmdbd")
        _run("sacctmgr", "-i", "add", "cluster", "local", env=self.env)

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        probe = _run("slurmd", "-C").stdout
        memory = int(probe.split("RealMemory=")[1].split()[0]) * 9 // 10 if "RealMemory=" in probe else 4096
        cpus = os.cpu_count() or 1
        b = self.base
        self.conf.write_text("\n".join([
            "ClusterName=local", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={self.ports['ctld']}", f"SlurmdPort={self.ports['slurmd']}", "AuthType=auth/munge",
            "CredType=cred/munge", f"AuthInfo=socket={b}/munge/munge.socket", f"StateSaveLocation={b}/state",
            f"SlurmdSpoolDir={b}/spool", f"SlurmctldPidFile={b}/run/slurmctld.pid", f"SlurmdPidFile={b}/run/slurmd.pid",
            f"SlurmctldLogFile={b}/log/slurmctld.log", f"SlurmdLogFile={b}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/slurmdbd", "AccountingStorageHost=localhost",
            f"AccountingStoragePort={self.ports['dbd']}", f"AccountingStoragePass={b}/munge/munge.socket",
            "JobCompType=jobcomp/none", "MpiDefault=none",
            "SwitchType=switch/none", "MailProg=/bin/true", "SchedulerType=sched/backfill",
            "SchedulerParameters=batch_sched_delay=0", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory", "DefMemPerCPU=1024", "ReturnToService=2", "KillWait=5",
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 "
            f"RealMemory={memory} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))

    def _slurm(self) -> None:
        for cmd in (("slurmctld", "-i", "-f", str(self.conf)), ("slurmd", "-f", str(self.conf))):
            r = _run(*cmd, env=self.env)
            if r.returncode:
                raise Unavailable(f"{cmd[0]}: {r.stderr.strip()[-300:]}")
        _wait(lambda: _run("sinfo", "-h", "-N", "-o", "%T", env=self.env).stdout.strip() == "idle", 30,
              "the Slurm node")

    def stop(self) -> None:
        if (self.base / "run" / "slurmctld.pid").is_file():
            _run("scancel", "--user=root", env=self.env)
            _wait(lambda: not _run("squeue", "-h", env=self.env).stdout.strip(), 15, "the cancelled jobs' end")
        for pid_file in ("run/slurmd.pid", "run/slurmctld.pid", "run/slurmdbd.pid", "mysql/mysqld.pid",
                         "munge/munged.pid"):
            path = self.base / pid_file
            if not path.is_file():
                continue
            pid = int(path.read_text().split()[0])
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
                if self.mariadb is not None and self.mariadb.poll() is not None:
                    break  # our own child has exited (a zombie until polled, which answers kill(0) too)
            else:
                os.kill(pid, signal.SIGKILL)
