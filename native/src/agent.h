/* The sandbox agent's wire protocol (agent.c; Python side: sandbox/agent.py).
 *
 * One SOCK_SEQPACKET socket between the daemon and the agent. Every message is one packet: a
 * struct thaw_agent_msg, then `len` bytes of payload; fds travel as SCM_RIGHTS. Replies that
 * name a process carry SCM_CREDENTIALS with its pid, which the kernel translates into the
 * receiver's pid namespace: that is how the daemon learns a stub's host pid. Requests are answered
 * in order; EXITED events come whenever the agent reaps a child.
 */
#ifndef THAW_AGENT_H
#define THAW_AGENT_H

#include <stdint.h>

struct thaw_agent_msg {
    uint32_t op;
    int32_t value;
    uint32_t len; /* payload bytes after the header */
    uint32_t pad;
};

#define THAW_AGENT_MAX_PAYLOAD 65536
#define THAW_AGENT_MAX_FDS 64

/* requests */
#define THAW_AGENT_PING 1           /* reply OK */
#define THAW_AGENT_STUB 2           /* fds [log, control, restore...]; value = where the restore fds go */
#define THAW_AGENT_SPAWN 3          /* fds [log, control, seccomp]; value = argc; payload uid, gid, cwd, argv, env
                                     * (NUL-ended). seccomp: a file holding the BPF program (struct sock_filter[])
                                     * the child installs after no_new_privs, just before execve */
#define THAW_AGENT_MOUNT_FUNCTION 4 /* fds [a detached mount (open_tree)] or none: only unmount */
#define THAW_AGENT_FRESH_TMP 5      /* payload: tmpfs options for a new /tmp */
#define THAW_AGENT_HOSTNAME 6       /* payload: the name */
#define THAW_AGENT_NETLINK 7        /* reply carries a NETLINK_ROUTE socket of the sandbox's netns */
#define THAW_AGENT_CGROUPS 8        /* fds: cgroup.procs files new processes write "0" into */

/* replies and events */
#define THAW_AGENT_OK 100     /* value: the new process's pid inside, or 0 */
#define THAW_AGENT_ERROR 101  /* value: errno; payload: what failed */
#define THAW_AGENT_EXITED 102 /* value: pid inside; payload: int32 wait status */
#define THAW_AGENT_READY 103  /* the sandbox is built; credentials carry the agent's pid */

#define THAW_AGENT_FUNCTION_DIR "/function"
#define THAW_AGENT_EXEC_FAILED 127

#endif
