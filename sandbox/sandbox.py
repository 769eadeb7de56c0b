"""One type-agnostic sandbox: namespaces held by an agent, two cgroups, a veth, a rootfs.

    sandbox = Sandbox.create(config, tree, network)     # ~tens of ms: namespaces, rootfs, veth
    sandbox.repurpose(spec)                              # < 1 ms: limits, /function, hostname
    guest = sandbox.spawn([python, "-m", "sandbox.guest", "/function"], control_fd=...)
    stub = sandbox.spawn_stub(restore_fds, control_fd=...)  # stopped, for snapshot.restore
    sandbox.release()                                    # kill instances, scrub (a fresh /tmp); the agent stays
    sandbox.destroy()

The agent (pid 1 inside) lives in the sandbox's *agent* cgroup; guests and stubs join the
*instance* cgroup, which carries the limits and which release() kills. Every process inside
runs as the configured unprivileged uid/gid (a stub gets its uid from the template it becomes),
and every program spawned here under a seccomp filter (a stub gets it from its restore).
"""

from __future__ import annotations

import array
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

from native import mounts, pidfd
from native.restorer import FIRST_RESTORE_FD
from native.seccomp import program as default_seccomp
from sandbox import rootfs
from sandbox.agent import Agent, AgentOptions
from sandbox.cgroups import Cgroup, CgroupTree, Limits
from sandbox.errors import AgentError, InvalidSpec, SandboxError, UnsupportedRestore
from sandbox.network import Lease, Network

FUNCTION_DIR = "/function"
# Where a waiting stub holds its end of the hand-off socket, below the restore fds: the fds it
# receives land at the lowest free numbers (4 on: 0-3 are taken), clear of every place they go.
HANDOFF_FD = FIRST_RESTORE_FD - 1
# What the fds a waiting stub is handed before its restore fds become: the log at 0-2, the
# control socket at 3 (snapshot.restore.Stub.handoff_places).
HANDOFF_PLACES = ((0, 1, 2), (3,))
UNPRIVILEGED_USERFAULTFD = Path("/proc/sys/vm/unprivileged_userfaultfd")
_HOSTNAME = re.compile(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?")  # fullmatch: `$` takes a trailing newline


@dataclass(frozen=True)
class SandboxConfig:
    runtime_dir: Path = Path("/run/thaw/sandboxes")  # where the (empty) rootfs mount points go
    uid: int = 65534
    gid: int = 65534
    tmp_options: str = "mode=1777,size=64m"
    extra_leaves: tuple[str, ...] = ()
    # A user namespace too: root inside (the agent, a stub before its restore) is host uid and gid
    # `userns_root`; uid/gid map to themselves, so guests and instances run as the same unprivileged
    # ids inside and out, and a template captured in any sandbox restores into any other.
    userns: bool = False
    userns_root: int = 100000

    def validate(self) -> SandboxConfig:
        if self.uid == 0 or self.gid == 0:
            raise SandboxError(f"guests must run as an unprivileged uid/gid, not {self.uid}/{self.gid}")
        if self.userns and (self.userns_root in (0, self.uid, self.gid) or self.userns_root < 0):
            raise SandboxError(
                f"userns_root {self.userns_root} must be an unprivileged host id other than the guests' "
                f"uid {self.uid} and gid {self.gid} (one host id maps to one id inside)"
            )
        return self

    def agent_userns(self) -> tuple[int, int] | None:
        return (self.userns_root, self.userns_root) if self.userns else None


@dataclass(frozen=True)
class SandboxSpec:
    """What a function needs of a sandbox."""

    function_dir: Path
    limits: Limits = field(default_factory=Limits)
    env: dict[str, str] = field(default_factory=dict)
    hostname: str = ""

    def validate(self) -> SandboxSpec:
        self.limits.validate()
        if not self.function_dir.is_dir():
            raise InvalidSpec(f"function directory {self.function_dir} does not exist or is not a directory")
        if self.hostname and not _HOSTNAME.fullmatch(self.hostname):
            raise InvalidSpec(f"hostname {self.hostname!r} is not a valid host name")
        if any("=" in k or "\0" in k + v for k, v in self.env.items()):
            raise InvalidSpec("environment names must not contain '=' and nothing may contain NUL bytes")
        return self


@dataclass
class ProcessExit:
    code: int | None  # exit code, or None when killed by a signal
    signal: int | None
    oom_killed: bool

    def describe(self) -> str:
        if self.oom_killed:
            return "killed by the OOM killer (memory limit reached)"
        if self.signal is not None:
            return f"killed by {signal.Signals(self.signal).name}"
        return f"exited with {self.code}"


class SandboxProcess:
    """A guest or stub inside a sandbox. The agent is its parent; exits come from the agent."""

    def __init__(self, sandbox: Sandbox, inner_pid: int, pid: int) -> None:
        self.sandbox, self.inner_pid, self.pid = sandbox, inner_pid, pid
        self.pidfd = pidfd.pidfd_open(pid)
        self.oom_before = sandbox.instance_cgroup.oom_kills()
        self.exit: ProcessExit | None = None

    def wait(self, timeout: float | None = None) -> int | None:
        """Exit code (or -signal) once the process is gone; None while it runs."""
        result = self.wait_exit(timeout)
        if result is None:
            return None
        return result.code if result.code is not None else -(result.signal or 0)

    def wait_exit(self, timeout: float | None = None, killed_by_us: bool = False) -> ProcessExit | None:
        """How it ended, once the agent reaped it; None while it runs. `killed_by_us`: we sent its
        SIGKILL (a release), so the OOM counter need not be read to say whose it was."""
        if self.exit is None:
            status = self.sandbox.agent.wait_exit(self.inner_pid, timeout)
            if status is None:
                return None
            killed = os.WIFSIGNALED(status)
            oom = (
                killed
                and not killed_by_us
                and os.WTERMSIG(status) == signal.SIGKILL
                and self.sandbox.instance_cgroup.oom_kills() > self.oom_before
            )
            self.exit = ProcessExit(
                os.WEXITSTATUS(status) if os.WIFEXITED(status) else None, os.WTERMSIG(status) if killed else None, oom
            )
            os.close(self.pidfd)
        return self.exit

    def kill(self) -> None:
        if self.exit is None:
            with contextlib.suppress(ProcessLookupError):
                pidfd.pidfd_send_signal(self.pidfd, signal.SIGKILL)


def paged_restore_refusal(config: SandboxConfig) -> str:
    """Why sandboxes of `config` cannot host a paged restore (lazy, or of a compressed template),
    or "" when they can. Its userfaultfd must also catch the kernel's own writes (the restore's),
    and the kernel creates such a userfaultfd only for a caller with CAP_SYS_PTRACE in the initial
    user namespace, or anyone when vm.unprivileged_userfaultfd is 1. The stub creates it, and in a
    user namespace the stub is root of that namespace only."""
    if config.userns and UNPRIVILEGED_USERFAULTFD.read_text().strip() != "1":
        return (
            "sandboxes have a user namespace (sandboxes.userns): a lazy restore (or one of a compressed "
            "template) needs a userfaultfd for kernel faults, which the kernel refuses to its stub "
            f"({UNPRIVILEGED_USERFAULTFD} is 0); restore with cow or copy, uncompressed"
        )
    return ""


class Sandbox:
    def __init__(
        self, sandbox_id: str, config: SandboxConfig, agent: Agent, agent_cgroup: Cgroup, instance_cgroup: Cgroup
    ) -> None:
        self.id, self.config, self.agent = sandbox_id, config, agent
        self.agent_cgroup, self.instance_cgroup = agent_cgroup, instance_cgroup
        self.lease: Lease | None = None
        self.network: Network | None = None
        self.spec: SandboxSpec | None = None
        self.limits: Limits | None = None  # what the instance cgroup holds (None: not known)
        self.hostname = f"sbx-{sandbox_id}"
        self.mounted: Path | None = None  # the function directory at /function (kept across a release)
        self.processes: list[SandboxProcess] = []
        self.waiting: WaitingStub | None = None  # a stub stopped in here, waiting for its restore fds

    # -- building ------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        config: SandboxConfig,
        tree: CgroupTree,
        network: Network | None = None,
        netns_fd: int | None = None,
        instance_cgroup: Cgroup | None = None,
    ) -> Sandbox:
        """Build a sandbox; on failure everything built so far is taken down again.
        A container's (daemon/containers.py): `netns_fd` is the network namespace it joins instead
        of a new one (pass no `network`: the pod's is set up already), `instance_cgroup` the cgroup
        its OCI spec names (the caller's to remove)."""
        config.validate()
        sandbox_id = secrets.token_hex(4)
        undo: list[object] = []
        root = config.runtime_dir / sandbox_id
        try:
            agent_cgroup = tree.create(f"agent-{sandbox_id}")
            undo.append(agent_cgroup)
            if instance_cgroup is None:
                instance_cgroup = tree.create(f"sbx-{sandbox_id}")
                undo.append(instance_cgroup)
            root.mkdir(parents=True)
            options = AgentOptions(
                root=root,
                leaves=tuple(rootfs.default_leaves(config.extra_leaves)),
                hostname=f"sbx-{sandbox_id}",
                uid=config.uid,
                gid=config.gid,
                tmp_options=config.tmp_options,
                userns=config.agent_userns(),
                netns_fd=netns_fd,
            )
            agent = Agent.start(options, agent_cgroup.procs_files())
            sandbox = cls(sandbox_id, config, agent, agent_cgroup, instance_cgroup)
            undo.append(sandbox)
            root.rmdir()  # a mount point only inside the sandbox's mount namespace: free on the host
            agent.set_cgroups(instance_cgroup.procs_files())
            if network is not None:
                sandbox.lease = network.attach(sandbox_id, agent.pid, agent.netlink())
                sandbox.network = network
            return sandbox
        except BaseException:
            for thing in reversed(undo):
                if isinstance(thing, Sandbox):
                    thing.agent.close()
                elif isinstance(thing, Cgroup):
                    thing.kill_and_wait()
                    thing.remove()
            shutil.rmtree(root, ignore_errors=True)
            raise

    # -- use -----------------------------------------------------------------------------------------
    def repurpose(self, spec: SandboxSpec) -> None:
        """Make this sandbox the given function's: limits, /function, hostname, env. /tmp is fresh
        already: a sandbox is repurposed only new or released, and nothing runs in it in between.
        What the sandbox holds already is not done again: a function's instances often follow
        each other through the same sandbox (the pool steers them there), and then neither the
        limits, nor the function mount (release keeps it), nor the hostname change: no request
        to the agent at all."""
        spec.validate()
        if spec.limits != self.limits:
            self.limits = None  # unknown until every file is written
            self.instance_cgroup.set_limits(spec.limits)
            self.limits = spec.limits
        if spec.function_dir != self.mounted:
            self.mounted = None  # unknown until the agent says it is done
            mount = mounts.detached_bind(str(spec.function_dir))
            try:
                self.agent.mount_function(mount)
            finally:
                os.close(mount)
            self.mounted = spec.function_dir
        hostname = spec.hostname or f"sbx-{self.id}"
        if hostname != self.hostname:
            self.agent.hostname(hostname)
            self.hostname = hostname
        self.spec = spec

    def ready_for(self, spec: SandboxSpec) -> bool:
        """Whether a repurpose for `spec` would change nothing and a stub waits here."""
        hostname = spec.hostname or f"sbx-{self.id}"
        return (
            self.waiting is not None
            and self.mounted == spec.function_dir
            and self.limits == spec.limits
            and self.hostname == hostname
        )

    def spawn(
        self,
        argv: list[str],
        control_fd: int | None = None,
        log_fd: int | None = None,
        cwd: str = "/",
        seccomp: bytes | None = None,
    ) -> SandboxProcess:
        """Exec `argv` inside (an absolute path: there is no PATH search) with the spec's env, as the
        sandbox uid/gid, under the seccomp filter `seccomp` (a BPF program; default: thaw's filter
        without opt-outs, native.seccomp). fd 3 is `control_fd`, fds 0-2 are `log_fd` (default
        /dev/null)."""
        env = self.exec_env()
        program = seccomp if seccomp is not None else default_seccomp()
        with _fds(control_fd, log_fd) as (control, log):
            inner, pid = self.agent.spawn(argv, env, cwd, self.config.uid, self.config.gid, log, control, program)
        return self._track(inner, pid)

    def exec_env(self) -> dict[str, str]:
        """The environment a process started here gets: the sandbox's basics, then the spec's."""
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "HOSTNAME": self.hostname}
        env.update(self.spec.env if self.spec else {})
        return env

    def spawn_stub(
        self,
        restore_fds: list[int],
        control_fd: int | None = None,
        log_fd: int | None = None,
        paged: bool = False,
    ) -> SandboxProcess:
        """A stopped stub in the instance cgroup holding `restore_fds` from fd 1000 (DESIGN.md, stub
        hand-off). `paged`: the restore will have a pager (`Template.paged(mode)`: a lazy restore,
        or any restore of a compressed template); refused first where this sandbox cannot host one."""
        if paged:
            self.check_paged_restore()
        with _fds(control_fd, log_fd) as (control, log):
            inner, pid = self.agent.stub(log, control, restore_fds, FIRST_RESTORE_FD)
        return self._track(inner, pid)

    def prepare_stub(self) -> None:
        """Leave a stub in this (idle) sandbox, forked and stopped now, off any thaw's path: it
        holds /dev/null at fds 0-3 and one end of a hand-off socket at HANDOFF_FD, and waits
        there for the fds of its restore (take_stub). Its pid counts from the stubs' range, as
        any stub's (the agent forks it), so it never takes a TID a template's thread needs."""
        if self.waiting is not None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            with _fds(None, None) as (control, log):
                inner, pid = self.agent.stub(log, control, [theirs.fileno()], HANDOFF_FD)
            self.waiting = WaitingStub(self._track(inner, pid), ours)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()

    def take_stub(
        self, restore_fds: list[int], control_fd: int, log_fd: int, paged: bool = False
    ) -> tuple[SandboxProcess, int]:
        """A stopped stub for a restore: the one waiting here, handed `log_fd`, `control_fd` and
        `restore_fds` over its hand-off socket (the second value, the fd it receives them on,
        which the restore's first step reads: snapshot.restore.Stub.handoff); else a stub forked
        now that holds them already (-1). `paged` as for spawn_stub."""
        if paged:
            self.check_paged_restore()
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            try:
                waiting.hand(log_fd, control_fd, restore_fds)
                return waiting.process, HANDOFF_FD
            except OSError:  # it died waiting (its socket end is gone): fork one as before
                waiting.process.kill()
            finally:
                waiting.close()
        return self.spawn_stub(restore_fds, control_fd, log_fd, paged=False), -1

    def check_paged_restore(self) -> None:
        """UnsupportedRestore for a paged restore this sandbox cannot host (paged_restore_refusal)."""
        refusal = paged_restore_refusal(self.config)
        if refusal:
            raise UnsupportedRestore(f"sandbox {self.id}: {refusal}")

    def _track(self, inner: int, pid: int) -> SandboxProcess:
        if not pid:
            raise AgentError(f"the agent did not say the host pid of its child {inner}")
        process = SandboxProcess(self, inner, pid)
        self.processes = [p for p in self.processes if p.exit is None] + [process]
        return process

    # -- giving back ---------------------------------------------------------------------------------
    def release(self) -> None:
        """Kill every instance process (a waiting stub too), check the cgroup is empty, give it a
        fresh /tmp and forget the env. The agent survives; SandboxError if the sandbox cannot be
        made clean. The function mount (read-only code), the hostname and the limits stay until
        the next repurpose, which keeps them for the same function and replaces them for another
        before anything runs: nothing runs in a released sandbox."""
        self.instance_cgroup.kill()
        for process in self.processes:  # the agent reports each exit: no polling for these
            process.wait_exit(timeout=5.0, killed_by_us=True)
        if self.instance_cgroup.pids():  # and the rest (children they forked, say): kill again, wait
            self.instance_cgroup.kill_and_wait()
        self.processes = []
        if self.waiting is not None:
            self.waiting.close()
            self.waiting = None
        self.agent.fresh_tmp(self.config.tmp_options)
        self.spec = None

    def destroy(self) -> None:
        """Take everything down: processes, agent, veth, cgroups."""
        errors: list[str] = []
        # The veth goes before the agent: the agent's death tears its netns down asynchronously,
        # taking the veth pair with it while we might be deleting it.
        for step in (self.instance_cgroup.kill_and_wait, self._detach, self.agent.close, self.instance_cgroup.remove):
            try:
                step()
            except (OSError, SandboxError) as e:
                errors.append(str(e))
        for process in self.processes:
            if process.exit is None:
                os.close(process.pidfd)
                process.exit = ProcessExit(None, signal.SIGKILL, False)
        if self.waiting is not None:
            self.waiting.close()
            self.waiting = None
        try:
            self.agent_cgroup.kill_and_wait()
            self.agent_cgroup.remove()
        except (OSError, SandboxError) as e:
            errors.append(str(e))
        if errors:
            raise SandboxError(f"destroying sandbox {self.id}: " + "; ".join(errors))

    def _detach(self) -> None:
        if self.network is not None and self.lease is not None:
            self.network.detach(self.lease)
            self.lease = None

    def alive(self) -> bool:
        return self.agent.alive()


@dataclass(eq=False)
class WaitingStub:
    """A stub stopped in an idle sandbox, and the daemon's end of its hand-off socket."""

    process: SandboxProcess
    sock: socket.socket

    def hand(self, log_fd: int, control_fd: int, restore_fds: list[int]) -> None:
        """Send the fds of its restore, in the order the restore's first step places them (log
        at 0-2, control at 3, the restore fds from FIRST_RESTORE_FD): one message, queued in the
        socket until the stub reads it, even once our end is closed."""
        fds = array.array("i", [log_fd, control_fd, *restore_fds])
        self.sock.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])

    def close(self) -> None:
        self.sock.close()


class _fds:
    """The control and log fds for a new process: the caller's, or /dev/null."""

    def __init__(self, control: int | None, log: int | None) -> None:
        self.control, self.log = control, log
        self.opened: list[int] = []

    def __enter__(self) -> tuple[int, int]:
        def pick(fd: int | None) -> int:
            if fd is not None:
                return fd
            null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
            self.opened.append(null)
            return null

        return pick(self.control), pick(self.log)

    def __exit__(self, *exc: object) -> None:
        for fd in self.opened:
            os.close(fd)
