"""The guest: the program thaw starts inside a sandbox to run one function.

`python -m sandbox.guest FUNCTION_DIR [--handler module:callable]` imports the function from its
directory, runs its init, reports READY on fd 3 and stops itself (SIGSTOP) so the daemon can capture
it into a template. Every process thawed from that template continues right there: it re-seeds
its random generators and runs the function's after-thaw hooks (`hooks`), reports RESTORED with
its own pid, and serves invocations from fd 3 until fd 3 closes. `protocol` is the wire format;
`runtime` is the program.
"""
