"""The daemon's side of a sandbox agent (native/src/agent.c, protocol in native/src/agent.h).

`Agent.start(...)` execs native/thaw-agent (never a fork of the daemon), which joins the agent
cgroup, unshares the namespaces, forks the agent as pid 1 of the new pid namespace, builds the
rootfs and says READY; the starter process stays as the agent's parent in the host's pid
namespace, so the daemon reaps it like any child and no orphan is left to init. With
`AgentOptions.userns` the sandbox has a user namespace too (see agent.c: enter_user_namespaces).

Requests go over one SOCK_SEQPACKET socket and are answered in order; EXITED events (the agent
reaped a child) arrive in between and are kept by pid. A reply that names a new process carries
SCM_CREDENTIALS with its pid, which the kernel translates into our pid namespace: the host pid the
tracer needs. One lock serializes requests, so any thread may use an Agent.

Every program the agent execs gets a seccomp filter (sent with the spawn as a memfd holding the
BPF program, installed after no_new_privs, just before execve); stubs get none, since their
restore needs what the filter denies and the restorer installs it as its last step.
"""

from __future__ import annotations

import array
import contextlib
import math
import os
import select
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from native._native import lib

import native
from native.seccomp import check_program
from sandbox.errors import AgentError

AGENT_PROGRAM = Path(native.__file__).parent / "thaw-agent"
HEADER = struct.Struct("<IiII")
CREDENTIALS = struct.Struct("<iII")
MAX_PAYLOAD = int(lib.THAW_AGENT_MAX_PAYLOAD)
MAX_FDS = int(lib.THAW_AGENT_MAX_FDS)
PING, STUB, SPAWN = int(lib.THAW_AGENT_PING), int(lib.THAW_AGENT_STUB), int(lib.THAW_AGENT_SPAWN)
MOUNT_FUNCTION, FRESH_TMP = int(lib.THAW_AGENT_MOUNT_FUNCTION), int(lib.THAW_AGENT_FRESH_TMP)
HOSTNAME, NETLINK, CGROUPS = int(lib.THAW_AGENT_HOSTNAME), int(lib.THAW_AGENT_NETLINK), int(lib.THAW_AGENT_CGROUPS)
OK, ERROR, EXITED, READY = (
    int(lib.THAW_AGENT_OK),
    int(lib.THAW_AGENT_ERROR),
    int(lib.THAW_AGENT_EXITED),
    int(lib.THAW_AGENT_READY),
)
START_TIMEOUT = 10.0
REQUEST_TIMEOUT = 10.0


@dataclass
class Message:
    op: int
    value: int
    payload: bytes
    fds: list[int] = field(default_factory=list)
    pid: int = 0  # from SCM_CREDENTIALS, in our pid namespace


@dataclass(frozen=True)
class AgentOptions:
    root: Path  # an empty directory the rootfs is mounted on (inside the new mount namespace only)
    leaves: tuple[str, ...]  # host paths bind-mounted read-only at the same path
    hostname: str
    uid: int
    gid: int
    tmp_options: str
    userns: tuple[int, int] | None = None  # a user namespace whose root is this host uid, gid
    netns_fd: int | None = None  # join this network namespace (a container's) instead of a new one


class Agent:
    def __init__(self, sock: socket.socket, starter: subprocess.Popen[bytes], pid: int) -> None:
        self.sock, self.starter, self.pid = sock, starter, pid
        self.exits: dict[int, int] = {}  # pid inside -> wait status, for children the agent reaped
        self.lock = threading.Lock()

    # -- life ----------------------------------------------------------------------------------------
    @classmethod
    def start(cls, options: AgentOptions, cgroup_procs: list[Path]) -> Agent:
        """Start an agent in a new sandbox; AgentError (with the agent's words) if it cannot be built."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        cgroup_fds = [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in cgroup_procs]
        try:
            argv = [str(AGENT_PROGRAM), "--control", str(theirs.fileno()), "--root", str(options.root)]
            for leaf in options.leaves:
                argv += ["--ro", leaf]
            for fd in cgroup_fds:
                argv += ["--cgroup-fd", str(fd)]
            argv += ["--hostname", options.hostname, "--uid", str(options.uid), "--gid", str(options.gid)]
            argv += ["--tmp", options.tmp_options]
            if options.userns is not None:
                argv += ["--userns", "{}:{}".format(*options.userns)]
            netns = [] if options.netns_fd is None else [options.netns_fd]
            argv += [arg for fd in netns for arg in ("--netns-fd", str(fd))]
            starter = subprocess.Popen(
                argv,
                pass_fds=[theirs.fileno(), *cgroup_fds, *netns],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        finally:
            theirs.close()
            for fd in cgroup_fds:
                os.close(fd)
        agent = cls(ours, starter, 0)
        try:
            ready = agent._receive(START_TIMEOUT, expect=(READY,))
        except BaseException:
            agent.close()
            raise
        agent.pid = ready.pid
        return agent

    def alive(self) -> bool:
        return self.starter.poll() is None

    def close(self, timeout: float = 5.0) -> None:
        """End the sandbox: closing the socket makes the agent exit, and with it (pid 1) everything in
        its pid namespace. Kills the agent if it does not go in `timeout` seconds."""
        self.sock.close()
        try:
            self.starter.wait(timeout)
        except subprocess.TimeoutExpired:
            if self.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, 9)
            self.starter.wait()
        if self.starter.stderr:
            self.starter.stderr.close()

    # -- requests ------------------------------------------------------------------------------------
    def request(self, op: int, value: int = 0, payload: bytes = b"", fds: list[int] | None = None) -> Message:
        if len(payload) > MAX_PAYLOAD:
            raise AgentError(f"request of {len(payload)} bytes exceeds the agent's {MAX_PAYLOAD}-byte limit")
        with self.lock:
            data = HEADER.pack(op, value, len(payload), 0) + payload
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
            try:
                self.sock.sendmsg([data], ancillary)
            except OSError as e:
                raise AgentError(f"the sandbox agent (pid {self.pid}) is gone: {e}") from e
            return self._receive(REQUEST_TIMEOUT, expect=(OK,))

    def ping(self) -> None:
        self.request(PING)

    def stub(self, log_fd: int, control_fd: int, restore_fds: list[int], first: int) -> tuple[int, int]:
        """Fork a stopped stub holding `restore_fds` from `first`; returns (pid inside, host pid)."""
        reply = self.request(STUB, first, fds=[log_fd, control_fd, *restore_fds])
        return reply.value, reply.pid

    def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        uid: int,
        gid: int,
        log_fd: int,
        control_fd: int,
        seccomp: bytes,
    ) -> tuple[int, int]:
        """Exec `argv` inside as uid/gid with no capabilities, no_new_privs and the seccomp filter
        `seccomp` (a BPF program, native.seccomp); returns (pid inside, host pid)."""
        strings = [str(uid), str(gid), cwd, *argv, *(f"{k}={v}" for k, v in env.items())]
        if any("\0" in s for s in strings):
            raise AgentError("argv, env and cwd must not contain NUL bytes")
        try:
            check_program(seccomp)
        except ValueError as e:
            raise AgentError(f"spawning {argv[0]}: {e}") from e
        payload = b"".join(s.encode() + b"\0" for s in strings)
        program = os.memfd_create("thaw-seccomp", os.MFD_CLOEXEC)  # the agent reads it before it forks
        try:
            os.write(program, seccomp)  # a memfd takes the whole write (at most 32 KiB)
            reply = self.request(SPAWN, len(argv), payload, [log_fd, control_fd, program])
        finally:
            os.close(program)
        return reply.value, reply.pid

    def mount_function(self, detached_mount: int | None) -> None:
        self.request(MOUNT_FUNCTION, fds=[detached_mount] if detached_mount is not None else [])

    def fresh_tmp(self, options: str) -> None:
        self.request(FRESH_TMP, payload=options.encode() + b"\0")

    def hostname(self, name: str) -> None:
        self.request(HOSTNAME, payload=name.encode())

    def netlink(self) -> int:
        """A NETLINK_ROUTE socket in the sandbox's network namespace (the caller owns the fd)."""
        reply = self.request(NETLINK)
        if len(reply.fds) != 1:
            raise AgentError(f"the agent sent {len(reply.fds)} fds for a netlink socket")
        return reply.fds[0]

    def set_cgroups(self, procs_files: list[Path]) -> None:
        fds = [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in procs_files]
        try:
            self.request(CGROUPS, fds=fds)
        finally:
            for fd in fds:
                os.close(fd)

    # -- exits ---------------------------------------------------------------------------------------
    def wait_exit(self, inner_pid: int, timeout: float | None) -> int | None:
        """The wait status of child `inner_pid` once the agent reaped it; None while it runs."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.lock:
                if inner_pid in self.exits:
                    return self.exits.pop(inner_pid)
                left = 0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic()))
                self._drain(left)
                if inner_pid in self.exits:
                    return self.exits.pop(inner_pid)
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def _drain(self, timeout: float) -> None:
        """Read whatever events arrive within `timeout` seconds (the lock is held)."""
        while _readable(self.sock, timeout):
            message = self._read()
            if message.op != EXITED:
                raise AgentError(f"the agent sent an unexpected message {message.op} between requests")
            timeout = 0

    # -- reading -------------------------------------------------------------------------------------
    def _receive(self, timeout: float, expect: tuple[int, ...]) -> Message:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not _readable(self.sock, left):
                raise AgentError(f"the sandbox agent (pid {self.pid}) did not answer within {timeout} s")
            message = self._read()
            if message.op in expect:
                return message
            if message.op == ERROR:
                raise AgentError(message.payload.decode(errors="replace"), message.value)
            if message.op != EXITED:
                raise AgentError(f"the agent sent message {message.op}, expected {expect}")

    def _read(self) -> Message:
        fd_space = socket.CMSG_SPACE(MAX_FDS * 4) + socket.CMSG_SPACE(CREDENTIALS.size)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(HEADER.size + MAX_PAYLOAD, fd_space, socket.MSG_CMSG_CLOEXEC)
        except OSError as e:
            raise AgentError(f"reading from the sandbox agent: {e}") from e
        if not data:
            raise AgentError(self._death_note())
        op, value, length, _ = HEADER.unpack_from(data)
        message = Message(op, value, data[HEADER.size : HEADER.size + length])
        for level, kind, raw in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(raw) - len(raw) % 4
                message.fds.extend(array.array("i", raw[:usable]))
            elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                message.pid = CREDENTIALS.unpack(raw[: CREDENTIALS.size])[0]
        if op == EXITED:
            self.exits[value] = struct.unpack("<i", message.payload[:4])[0]
        return message

    def _death_note(self) -> str:
        code = self.starter.poll()
        err = b""
        if code is not None and self.starter.stderr is not None:
            err = self.starter.stderr.read() or b""
        detail = (
            f" (exit {code}{': ' + err.decode(errors='replace').strip() if err else ''})" if code is not None else ""
        )
        return f"the sandbox agent closed its control socket{detail}"


def _readable(sock: socket.socket, timeout: float) -> bool:
    """Whether `sock` has something to read within `timeout` seconds. poll, not select: thawd holds
    thousands of fds (every template keeps the files it maps open), and select takes none past 1023."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(max(0, math.ceil(timeout * 1000))))
