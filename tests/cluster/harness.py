"""A two-node cluster on one machine, for the `cluster` tests: SLURM (munge, slurmctld, two
slurmd) and sshd for the DeepSpeed launcher's pdsh runner, brought up from Debian's packages.

    python3 tests/cluster/harness.py up      # idempotent; prints the state folder
    python3 tests/cluster/harness.py status
    python3 tests/cluster/harness.py down    # stops what `up` started, by PID

Needs root and apt-get (Debian). Standard library only, so that it runs before the package
is installed. The fake nodes are loopback aliases in /etc/hosts (node1 127.0.0.2,
node2 127.0.0.3; node3 127.0.0.4 has no sshd: the unreachable host of the bad-input tests).
Everything else lives in the state folder (SFRIK_CLUSTER_DIR, default
/tmp/sfrik-cluster): configs, keys, spool, logs, PID files. Outside it `up` writes only
what the tools read from fixed places, each marked and removed by `down`:
  * /etc/hosts lines ending in "# sfrik-cluster";
  * /etc/slurm/slurm.conf, a link to the state folder's (srun inside a job reads it there);
  * /etc/ssh/ssh_config.d/sfrik-cluster.conf: the key and no host-key prompt for node1-3.

Gotchas met (see the issue): munged refuses root, so it runs as the munge user;
RealMemory is set below what `slurmd -C` reports or the node drains; a requeued job is held
for cred_expire + 1 s, so cred_expire is 10 s; there is no accounting (use scontrol).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ.get("SFRIK_CLUSTER_DIR", "/tmp/sfrik-cluster"))
PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client", "openssh-server", "openssh-client", "pdsh"]
NODES = {"node1": "127.0.0.2", "node2": "127.0.0.3"}
UNREACHABLE = {"node3": "127.0.0.4"}  # a name that resolves but where nothing listens
MARK = "# sfrik-cluster"
SLURM_CONF_LINK = Path("/etc/slurm/slurm.conf")
SSH_CLIENT_CONF = Path("/etc/ssh/ssh_config.d/sfrik-cluster.conf")
CRED_EXPIRE_S = 10
PARTITION = "debug"


class Unavailable(RuntimeError):
    """The cluster cannot be brought up here (not root, no apt, a daemon did not start)."""


# ------------------------------------------------------------------ helpers
def _run(cmd, check=True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids() -> dict:
    path = STATE / "pids.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save_pids(pids: dict) -> None:
    (STATE / "pids.json").write_text(json.dumps(pids, indent=1))


def _alive(pid: int, exe: str) -> bool:
    """pid is a live (not zombie) process named `exe`: a recycled PID is not ours."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return comm == exe[:15] and state != "Z"


def _wait_for(check, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise Unavailable(f"{what} did not come up within {timeout:.0f} s (logs: {STATE / 'log'})")


def _port_open(addr: str, port: int) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=0.5):
            return True
    except OSError:
        return False


def env() -> dict:
    """Environment for the SLURM clients (sbatch, scontrol, ...): they find slurm.conf in /etc/slurm too."""
    e = dict(os.environ)
    e["SLURM_CONF"] = str(STATE / "slurm.conf")
    return e


# ------------------------------------------------------------------ prerequisites
def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise Unavailable("cluster tests need root (daemons, /etc/hosts)")
    missing = [p for p in PACKAGES if _run(["dpkg-query", "-W", "-f=${Status}", p], check=False).stdout
               != "install ok installed"]
    if not missing:
        return
    if not shutil.which("apt-get"):
        raise Unavailable(f"cluster tests need apt-get to install {' '.join(missing)}")
    e = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    if _run(install, check=False, env=e).returncode != 0:
        _run(["apt-get", "update", "-qq"], check=False, env=e)
        proc = _run(install, check=False, env=e)
        if proc.returncode != 0:
            raise Unavailable(f"apt-get install {' '.join(missing)} failed: {proc.stderr.strip()[-300:]}")


# ------------------------------------------------------------------ configuration
def _hosts() -> None:
    path = Path("/etc/hosts")
    lines = [ln for ln in path.read_text().splitlines() if not ln.endswith(MARK)]
    lines += [f"{addr} {name} {MARK}" for name, addr in {**NODES, **UNREACHABLE}.items()]
    path.write_text("\n".join(lines) + "\n")


def _real_memory_mb() -> int:
    out = _run(["slurmd", "-C"]).stdout
    mem = int(out.split("RealMemory=")[1].split()[0])
    return max(100, int(mem * 0.9) // len(NODES))  # two nodes share the machine; below `slurmd -C` or it drains


def _cpus() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def _write_slurm_conf(ports: dict) -> None:
    for sub in ("log", "ctld", "spool", "munge"):
        (STATE / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    mem = _real_memory_mb()
    nodes = "\n".join(f"NodeName={n} NodeAddr={a} NodeHostname={n} Port={ports[n]} CPUs={_cpus()} "
                      f"RealMemory={mem} State=UNKNOWN" for n, a in NODES.items())
    (STATE / "slurm.conf").write_text(f"""{MARK}: generated by tests/cluster/harness.py
ClusterName=sfrik
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports['slurmctld']}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={STATE / 'munge' / 'munge.socket.2'},cred_expire={CRED_EXPIRE_S}
StateSaveLocation={STATE / 'ctld'}
SlurmdSpoolDir={STATE / 'spool'}/%n
SlurmctldPidFile={STATE}/slurmctld.pid
SlurmdPidFile={STATE}/slurmd-%n.pid
SlurmctldLogFile={STATE / 'log'}/slurmctld.log
SlurmdLogFile={STATE / 'log'}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
{nodes}
PartitionName={PARTITION} Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")
    SLURM_CONF_LINK.parent.mkdir(parents=True, exist_ok=True)
    if SLURM_CONF_LINK.is_symlink() or not SLURM_CONF_LINK.exists():
        if SLURM_CONF_LINK.is_symlink():
            SLURM_CONF_LINK.unlink()
        SLURM_CONF_LINK.symlink_to(STATE / "slurm.conf")
    elif MARK not in SLURM_CONF_LINK.read_text():
        raise Unavailable(f"{SLURM_CONF_LINK} exists and is not ours: not touching a real SLURM setup")


def _write_munge_key() -> Path:
    key = STATE / "munge" / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    for p in (STATE / "munge", key):
        shutil.chown(p, "munge", "munge")
    key.chmod(0o400)
    (STATE / "munge").chmod(0o700)
    return key


def _write_ssh() -> None:
    ssh = STATE / "ssh"
    ssh.mkdir(exist_ok=True)
    ssh.chmod(0o700)
    for kind, path in (("ed25519", ssh / "host_key"), ("ed25519", ssh / "id_ed25519")):
        if not path.exists():
            _run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)])
    shutil.copy(ssh / "id_ed25519.pub", ssh / "authorized_keys")
    listen = "\n".join(f"ListenAddress {a}:22" for a in NODES.values())
    (ssh / "sshd_config").write_text(f"""{MARK}
{listen}
HostKey {ssh / 'host_key'}
PidFile {ssh / 'sshd.pid'}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile {ssh / 'authorized_keys'}
StrictModes no
UsePAM no
PermitUserEnvironment no
AcceptEnv LANG LC_*
MaxStartups 100:30:200
MaxSessions 100
LogLevel ERROR
""")
    names = " ".join([*NODES, *UNREACHABLE, *NODES.values(), *UNREACHABLE.values()])
    SSH_CLIENT_CONF.parent.mkdir(parents=True, exist_ok=True)
    SSH_CLIENT_CONF.write_text(f"""{MARK}: generated by tests/cluster/harness.py, removed by its `down`
Host {names}
    User root
    IdentityFile {ssh / 'id_ed25519'}
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
    ConnectTimeout 5
    BatchMode yes
""")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory


# ------------------------------------------------------------------ daemons
def _start(name: str, exe: str, cmd: list, pids: dict, user: str | None = None) -> None:
    old = pids.get(name)
    if old and _alive(old["pid"], exe):
        return
    log = open(STATE / "log" / f"{name}.out", "ab")
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)
    log.close()
    pid = proc.pid
    if user:  # runuser forks the daemon as its child; record the daemon's own PID
        deadline = time.time() + 5
        while time.time() < deadline:
            kids = _children(pid)
            if kids:
                pid = kids[0]
                break
            time.sleep(0.05)
    pids[name] = {"pid": pid, "exe": exe}
    _save_pids(pids)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _scontrol_ping() -> bool:
    proc = _run(["scontrol", "ping"], check=False, env=env(), timeout=20)
    return "is UP" in proc.stdout


def _nodes_idle() -> bool:
    proc = _run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, env=env(), timeout=20)
    states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
    return all(states.get(n, "").rstrip("*") in ("idle", "mix", "alloc") for n in NODES)


def up() -> Path:
    """Bring everything up (or leave it up): returns the state folder."""
    check_prerequisites()
    STATE.mkdir(parents=True, exist_ok=True)
    STATE.chmod(0o755)
    (STATE / "log").mkdir(exist_ok=True)
    pids = _pids()
    ports_file = STATE / "ports.json"
    running = any(_alive(v["pid"], v["exe"]) for v in pids.values())
    if running and ports_file.exists():
        ports = json.loads(ports_file.read_text())
    else:
        ports = {"slurmctld": _free_port(), **{n: _free_port() for n in NODES}}
        ports_file.write_text(json.dumps(ports))
    _hosts()
    _write_slurm_conf(ports)
    key = _write_munge_key()
    _write_ssh()
    sock = STATE / "munge" / "munge.socket.2"
    _start("munged", "munged", ["munged", "-F", "--force", f"--socket={sock}", f"--key-file={key}",
                                f"--pid-file={STATE / 'munge' / 'munged.pid'}",
                                f"--log-file={STATE / 'munge' / 'munged.log'}",
                                f"--seed-file={STATE / 'munge' / 'munged.seed'}"], pids, user="munge")
    _wait_for(sock.exists, 15, "munged")
    _start("sshd", "sshd", ["/usr/sbin/sshd", "-D", "-f", str(STATE / "ssh" / "sshd_config")], pids)
    conf = str(STATE / "slurm.conf")
    _start("slurmctld", "slurmctld", ["slurmctld", "-D", "-f", conf], pids)
    _wait_for(_scontrol_ping, 30, "slurmctld")
    for n in NODES:
        _start(f"slurmd-{n}", "slurmd", ["slurmd", "-D", "-N", n, "-f", conf], pids)
    _wait_for(lambda: all(_port_open(a, 22) for a in NODES.values()), 15, "sshd")
    try:
        _wait_for(_nodes_idle, 30, "the two slurmd (sinfo idle)")
    except Unavailable:
        for n in NODES:  # a node drained by an earlier run: resume it once
            _run(["scontrol", "update", f"NodeName={n}", "State=RESUME"], check=False, env=env())
        _wait_for(_nodes_idle, 15, "the two slurmd (sinfo idle)")
    return STATE


def is_up() -> bool:
    pids = _pids()
    names = ["munged", "sshd", "slurmctld", *(f"slurmd-{n}" for n in NODES)]
    return all(n in pids and _alive(pids[n]["pid"], pids[n]["exe"]) for n in names)


def down() -> None:
    """Stop every daemon `up` started (by its PID), cancel leftover jobs, remove what `up` wrote outside STATE."""
    pids = _pids()
    if pids.get("slurmctld") and _alive(pids["slurmctld"]["pid"], "slurmctld"):
        _run(["scancel", "--full", "--user=root"], check=False, env=env(), timeout=20)
    order = [f"slurmd-{n}" for n in NODES] + ["slurmctld", "sshd", "munged"]
    for name in order + [n for n in pids if n not in order]:
        info = pids.get(name)
        if not info or not _alive(info["pid"], info["exe"]):
            continue
        os.kill(info["pid"], signal.SIGTERM)
        deadline = time.time() + 10
        while time.time() < deadline and _alive(info["pid"], info["exe"]):
            time.sleep(0.1)
        if _alive(info["pid"], info["exe"]):
            os.kill(info["pid"], signal.SIGKILL)
    _save_pids({}) if STATE.is_dir() else None
    if SLURM_CONF_LINK.is_symlink() and Path(os.readlink(SLURM_CONF_LINK)) == STATE / "slurm.conf":
        SLURM_CONF_LINK.unlink()
    if SSH_CLIENT_CONF.exists() and MARK in SSH_CLIENT_CONF.read_text():
        SSH_CLIENT_CONF.unlink()
    hosts = Path("/etc/hosts")
    lines = hosts.read_text().splitlines()
    if any(ln.endswith(MARK) for ln in lines):
        hosts.write_text("\n".join(ln for ln in lines if not ln.endswith(MARK)) + "\n")


def main(argv: list[str]) -> int:
    what = argv[1] if len(argv) > 1 else "status"
    try:
        if what == "up":
            print(up())
        elif what == "down":
            down()
        elif what == "status":
            print("up" if is_up() else "down")
            return 0 if is_up() else 1
        else:
            print(__doc__)
            return 2
    except Unavailable as err:
        print(f"cluster: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
