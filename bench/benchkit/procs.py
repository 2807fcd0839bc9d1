"""Child processes of the bench: start, wait until ready, measure from /proc, always stop.

Every child is registered in PROCS and killed by `stop_all` (called from atexit and from the
SIGINT/SIGTERM handlers in suite.py). As a safety net each child also gets SIGTERM from the
kernel if the bench itself dies (PR_SET_PDEATHSIG), so nothing outlives a crashed run.
"""

import ctypes
import os
import signal
import socket
import subprocess
import time

PROCS = []
CLK_TCK = os.sysconf("SC_CLK_TCK")
_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


class BenchError(RuntimeError):
    """A failure that stops the bench with a message (never swallowed)."""


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def die_with_bench():
    """preexec_fn for a child: SIGTERM it when the bench dies (see the module docstring)."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Proc:
    def __init__(self, name, argv, log_path, cpus=None, env=None, stdout_pipe=False):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        log = open(log_path, "wb")

        def pre():
            die_with_bench()
            if cpus is not None:
                os.sched_setaffinity(0, cpus)

        self.p = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE if stdout_pipe else log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            preexec_fn=pre,
        )
        log.close()
        PROCS.append(self)

    @property
    def pid(self):
        return self.p.pid

    def check_alive(self):
        if self.p.poll() is not None:
            raise BenchError(
                f"{self.name} exited with status {self.p.returncode}; "
                f"its log {self.log_path}:\n{tail(self.log_path)}"
            )

    def read_line(self, timeout):
        """First stdout line (for children that announce readiness), within `timeout` s."""
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.p.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise BenchError(f"{self.name} printed nothing within {timeout} s\n{tail(self.log_path)}")
        line = self.p.stdout.readline().decode().strip()
        if not line:
            self.check_alive()
        return line

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        if self.p.stdout:
            self.p.stdout.close()
        if self in PROCS:
            PROCS.remove(self)


def stop_all():
    for p in list(reversed(PROCS)):
        try:
            p.stop()
        except Exception as e:  # keep stopping the others
            print(f"bench: could not stop {p.name}: {e}")


def tail(path, n=30):
    try:
        with open(path, "rb") as f:
            return b"".join(f.readlines()[-n:]).decode(errors="replace")
    except OSError:
        return ""


def wait_until(ready, timeout, proc, failure):
    """Polls `ready()` (OSError counts as not ready) every 50 ms; raises BenchError(failure)
    after `timeout` s, or at once if `proc` died meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except OSError:
            pass
        if proc is not None:
            proc.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(failure)
        time.sleep(0.05)


def wait_tcp(host, port, timeout, proc=None):
    def connects():
        with socket.create_connection((host, port), timeout=0.5):
            return True

    wait_until(connects, timeout, proc, f"nothing listens on {host}:{port} after {timeout} s")


def read_all(sock):
    """Everything the peer sends until it closes."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def http_get_sync(host, port, path, timeout=2.0, method="GET"):
    """A tiny blocking HTTP/1.1 request (Connection: close) → (status, body)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(
            f"{method} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n"
            f"content-length: 0\r\n\r\n".encode()
        )
        data = read_all(s)
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body.decode(errors="replace")


def wait_http_ok(host, port, path, timeout, proc=None):
    wait_until(lambda: http_get_sync(host, port, path)[0] == 200, timeout, proc,
               f"http://{host}:{port}{path} did not answer 200 within {timeout} s")


def _children_map():
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree(pid):
    """pid and all its descendants (nginx master + worker, for example)."""
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_seconds(pid):
    """User + system CPU seconds of a process tree (all threads), from /proc/<pid>/stat."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLK_TCK


def thread_cpu_seconds(pid):
    """User + system CPU seconds of every thread of a process tree, summed by thread name
    (`/proc/<pid>/task/<tid>/comm`: Pingora names a service's threads after the service)."""
    out = {}
    for p in tree(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tids:
            try:
                with open(f"/proc/{p}/task/{t}/comm") as f:
                    name = f.read().strip()
                with open(f"/proc/{p}/task/{t}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def rss_kib(pid):
    """Resident set size of a process tree, in KiB (VmRSS of each process, summed)."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def machine_busy():
    """(busy, total) jiffies of the whole machine from /proc/stat, for the load of others."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def loadavg():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class OtherLoad:
    """Samples, once a second in a thread, the CPU used by processes that are not the bench or
    its children (another build, say), so that a disturbed run shows in the results."""

    def __init__(self, interval=1.0):
        import threading

        self.interval = interval
        self.samples = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _snapshot():
        mine = set(tree(os.getpid()))
        ticks = {}
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) in mine:
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks[int(d)] = int(fields[11]) + int(fields[12])
        return ticks

    def _run(self):
        prev, t_prev = self._snapshot(), time.monotonic()
        while not self._stop.wait(self.interval):
            cur, t_cur = self._snapshot(), time.monotonic()
            # A process new since the last sample used all its CPU within the interval.
            used = sum(v - prev.get(p, 0) for p, v in cur.items())
            self.samples.append(used / CLK_TCK / (t_cur - t_prev))
            prev, t_prev = cur, t_cur

    def stop(self):
        """Stops sampling; returns (mean, peak) cores used by other processes."""
        self._stop.set()
        self._thread.join()
        if not self.samples:
            return 0.0, 0.0
        return sum(self.samples) / len(self.samples), max(self.samples)
