"""The load balancers under test, each configured the same way, and the fake pods.

Every contender gets: the pod list, the per-pod cap (`limit`), one worker thread, a queue
(where it has one) of `max_waiting` requests waiting up to `queue_timeout` seconds, and no
per-request access log (lb-agent runs with RUST_LOG=warn, HAProxy without `log`, NGINX with
`access_log off`), so that none of them pays for logging the others skip.

* lb-agent: `limit` per route, `threads: 1`.
* HAProxy: `balance leastconn`, `maxconn <limit>` per server, `timeout queue`, `nbthread 1`.
* NGINX OSS: `least_conn`, `max_conns=<limit>` per server, `worker_processes 1`. It has no
  queue: when every server is at max_conns the request fails at once (502).
* pingora (bare): Pingora 0.9 itself, a `ProxyHttp` whose `upstream_peer` returns one fixed peer
  (examples/bare_pingora.rs), one thread, no logging, default release build. It has no cap, no
  queue and only one peer: it is the floor lb-agent stands on, run in the overhead part and for
  the cost of an idle connection in the queue part.
* random: a model of kube-proxy's iptables mode, a TCP forwarder that picks a pod uniformly
  at random per connection (randfwd.py). It has no cap and no queue.

With `h2c=True` the client side is cleartext HTTP/2 with prior knowledge (the pods stay
HTTP/1.1): lb-agent's port speaks it anyway, HAProxy gets `bind … proto h2`, NGINX
`listen … http2`. The random model forwards bytes, so its pods must speak HTTP/2 themselves:
give it the addresses of an `H2cShim`.
"""

import json
import os
import socket
import sys

from .procs import (BenchError, Proc, free_port, http_get_sync, read_all, wait_http_ok,
                    wait_tcp)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# lb-agent as the image ships it: the `dist` profile (release + LTO, one codegen unit).
LB_AGENT = os.environ.get("LB_AGENT_BIN", os.path.join(ROOT, "target", "dist", "lb-agent"))
# The floor: a Pingora proxy with one fixed peer and no logic (examples/bare_pingora.rs), built
# with the plain `release` profile.
BARE_PINGORA = os.environ.get("BARE_PINGORA_BIN",
                              os.path.join(ROOT, "target", "release", "examples", "bare_pingora"))
# The fake pods are not part of the product: they are the testkit crate's binary.
TESTKIT = os.environ.get("TESTKIT_BIN", os.path.join(ROOT, "target", "release", "testkit"))
HOST = "127.0.0.1"


class FakePods:
    """`testkit fakepods`: `count` pods on first, first+1, … sharing one port. Subclasses serve
    other testkit pods that start and count alike (`kind`, and `extra` arguments)."""

    kind = "fakepods"
    extra = []

    def __init__(self, workdir, first, count, workers=None, cpus=None):
        argv = [TESTKIT, self.kind, "--first", first, "--count", str(count), "--port", "0",
                *self.extra]
        if workers:
            argv += ["--workers", str(workers)]
        self.proc = Proc(self.kind, argv, os.path.join(workdir, f"{self.kind}.log"), cpus=cpus,
                         stdout_pipe=True)
        line = self.proc.read_line(10)
        # "fakepods ready 127.0.1.1..127.0.1.4 port 40123"
        if not line.startswith(f"{self.kind} ready"):
            raise BenchError(f"{self.kind} said {line!r}")
        self.port = int(line.rsplit(" ", 1)[1])
        base = [int(x) for x in first.split(".")]
        n0 = (base[0] << 24) | (base[1] << 16) | (base[2] << 8) | base[3]
        self.ips = [".".join(str((n0 + i) >> s & 255) for s in (24, 16, 8, 0)) for i in range(count)]
        self.addrs = [f"{ip}:{self.port}" for ip in self.ips]

    def stats(self):
        out = []
        for ip in self.ips:
            status, body = http_get_sync(ip, self.port, "/_stats")
            if status != 200:
                raise BenchError(f"GET {ip}:{self.port}/_stats answered {status}")
            out.append(json.loads(body))
        return out

    def reset(self):
        for ip in self.ips:
            status, _ = http_get_sync(ip, self.port, "/_stats/reset", method="POST")
            if status != 200:
                raise BenchError(f"POST {ip}:{self.port}/_stats/reset answered {status}")

    def stop(self):
        self.proc.stop()


class Contender:
    name = "?"
    has_queue = True
    has_cap = True

    def __init__(self, workdir, pods, limit, max_waiting=1000, queue_timeout=30, cpus=None,
                 h2c=False):
        self.workdir = os.path.join(workdir, self.name)
        os.makedirs(self.workdir, exist_ok=True)
        self.pods, self.limit = pods, limit
        self.h2c = h2c
        self.max_waiting, self.queue_timeout = max_waiting, queue_timeout
        self.port = free_port()
        self.cpus = cpus
        self.proc = None
        self.start()

    @property
    def entry(self):
        return (HOST, self.port)

    def stop(self):
        if self.proc:
            self.proc.stop()

    def queue_depth(self):
        """Requests waiting in the balancer's queue right now."""
        raise NotImplementedError

    def write(self, name, text):
        path = os.path.join(self.workdir, name)
        with open(path, "w") as f:
            f.write(text)
        return path


class LbAgent(Contender):
    name = "lb-agent"
    # YAML lines appended to the one route (indented 4), e.g. an `async:` block.
    route_extra = ""

    def start(self):
        self.admin = free_port()
        eps = ", ".join(f'"{a}"' for a in self.pods)
        cfg = self.write(
            "config.yaml",
            f"""listen: {HOST}:{self.port}
admin_listen: {HOST}:{self.admin}
threads: 1
shutdown_delay: 0s
queue: {{max_waiting: {self.max_waiting}, timeout: {self.queue_timeout}s}}
routes:
  - uri: /
    match: prefix
    limit: {self.limit}
    endpoints: [{eps}]
{self.route_extra}""",
        )
        self.proc = Proc(self.name, [LB_AGENT, "-c", cfg], os.path.join(self.workdir, "log"),
                         cpus=self.cpus, env={"RUST_LOG": "warn"})
        wait_http_ok(HOST, self.admin, "/readyz", 20, self.proc)
        wait_tcp(HOST, self.port, 10, self.proc)

    def queue_depth(self):
        status, body = http_get_sync(HOST, self.admin, "/metrics")
        if status != 200:
            raise BenchError(f"lb-agent /metrics answered {status}")
        for line in body.splitlines():
            if line.startswith("lb_queue_depth"):
                return int(float(line.rsplit(" ", 1)[1]))
        raise BenchError("lb-agent /metrics has no lb_queue_depth")


class HAProxy(Contender):
    name = "haproxy"

    def start(self):
        self.sock = os.path.join(self.workdir, "stats.sock")
        servers = "\n".join(
            f"  server pod{i} {a} maxconn {self.limit}" for i, a in enumerate(self.pods)
        )
        # maxconn: enough for max_waiting queued clients plus every slot. With a hard fd limit
        # below 2×maxconn HAProxy would refuse to start (strict-limits), although a queued
        # request holds only its client connection: `no strict-limits` lets it use what it has.
        maxconn = self.max_waiting + 1000
        cfg = self.write(
            "haproxy.cfg",
            f"""global
  nbthread 1
  maxconn {maxconn}
  no strict-limits
  stats socket {self.sock} mode 600 level admin

defaults
  mode http
  timeout connect 2s
  timeout client {self.queue_timeout + 30}s
  timeout server {self.queue_timeout + 30}s
  timeout queue {self.queue_timeout}s

frontend fe
  bind {HOST}:{self.port}{" proto h2" if self.h2c else ""}
  maxconn {maxconn}
  default_backend pods

backend pods
  balance leastconn
{servers}
""",
        )
        self.proc = Proc(self.name, ["haproxy", "-db", "-f", cfg],
                         os.path.join(self.workdir, "log"), cpus=self.cpus)
        wait_tcp(HOST, self.port, 10, self.proc)

    def queue_depth(self):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.sock)
            s.sendall(b"show stat\n")
            data = read_all(s)
        lines = data.decode().splitlines()
        cols = lines[0].lstrip("# ").split(",")
        q = cols.index("qcur")
        total = 0
        for line in lines[1:]:
            f = line.split(",")
            if len(f) > q and f[0] == "pods" and f[q]:
                total += int(f[q])  # backend queue + per-server queues
        return total


def nginx_preamble(workdir, connections, extra=""):
    """The start of an NGINX config shared by the contender and the overhead backend: one
    worker, no daemon, every path under `workdir`, no access log, long keep-alive. The caller
    appends its `upstream`/`server` blocks and closes the `http` block."""
    w = workdir
    return f"""worker_processes 1;
daemon off;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
{extra}events {{ worker_connections {connections}; }}
http {{
  access_log off;
  client_body_temp_path {w}/body;
  proxy_temp_path {w}/proxy;
  fastcgi_temp_path {w}/fastcgi;
  uwsgi_temp_path {w}/uwsgi;
  scgi_temp_path {w}/scgi;
  keepalive_requests 1000000;
"""


class Nginx(Contender):
    name = "nginx"
    has_queue = False

    def start(self):
        servers = "\n".join(f"    server {a} max_conns={self.limit};" for a in self.pods)
        w = self.workdir
        cfg = self.write(
            "nginx.conf",
            nginx_preamble(w, 20000, f"worker_rlimit_nofile {os.sysconf('SC_OPEN_MAX')};\n")
            + f"""  upstream pods {{
    least_conn;
{servers}
    keepalive 64;
    keepalive_requests 1000000;
  }}
  server {{
    listen {HOST}:{self.port}{" http2" if self.h2c else ""};
    location / {{
      proxy_pass http://pods;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_read_timeout {self.queue_timeout + 30}s;
    }}
  }}
}}
""",
        )
        self.proc = Proc(self.name, ["nginx", "-p", w, "-c", cfg], os.path.join(w, "log"),
                         cpus=self.cpus)
        wait_tcp(HOST, self.port, 10, self.proc)


class BarePingora(Contender):
    name = "pingora"
    has_queue = False
    has_cap = False

    def start(self):
        if len(self.pods) != 1:
            raise BenchError(f"pingora (bare) proxies to one fixed peer, not {len(self.pods)}")
        self.proc = Proc(self.name, [BARE_PINGORA, f"{HOST}:{self.port}", self.pods[0]],
                         os.path.join(self.workdir, "log"), cpus=self.cpus)
        wait_tcp(HOST, self.port, 10, self.proc)


class Random(Contender):
    name = "random"
    has_queue = False
    has_cap = False

    def start(self):
        argv = [sys.executable, "-m", "benchkit.randfwd", f"{HOST}:{self.port}", *self.pods]
        self.proc = Proc(self.name, argv, os.path.join(self.workdir, "log"), cpus=self.cpus,
                         env={"PYTHONPATH": os.path.dirname(os.path.dirname(__file__))})
        wait_tcp(HOST, self.port, 10, self.proc)


class H2cShim:
    """Gives each HTTP/1.1 fake pod a cleartext HTTP/2 front door of its own, as a gRPC pod
    would have: one HAProxy with one `proto h2` listener per pod, each passing every stream to
    that pod alone, with no cap and no queue (each stream becomes one HTTP/1.1 request on its
    own upstream connection, so the pod sees every stream the client sends it at once).

    Only the random model needs it: a TCP forwarder passes the client's HTTP/2 bytes through
    unchanged, so whatever it connects to must speak HTTP/2. `addrs[i]` is pod i's h2c door."""

    def __init__(self, workdir, pods):
        self.workdir = os.path.join(workdir, "h2c-shim")
        os.makedirs(self.workdir, exist_ok=True)
        self.ports = [free_port() for _ in pods]
        self.addrs = [f"{HOST}:{p}" for p in self.ports]
        doors = "".join(
            f"""
frontend pod{i}
  bind {HOST}:{port} proto h2
  default_backend pod{i}

backend pod{i}
  server pod{i} {pod}
""" for i, (port, pod) in enumerate(zip(self.ports, pods)))
        cfg = os.path.join(self.workdir, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(f"""global
  nbthread 1
  maxconn 4000
  no strict-limits

defaults
  mode http
  timeout connect 2s
  timeout client 120s
  timeout server 120s
{doors}""")
        self.proc = Proc("h2c shim haproxy", ["haproxy", "-db", "-f", cfg],
                         os.path.join(self.workdir, "log"))
        for port in self.ports:
            wait_tcp(HOST, port, 10, self.proc)

    def stop(self):
        self.proc.stop()


class Backend:
    """The fast keep-alive backend of the overhead scenario: NGINX `return 200`."""

    def __init__(self, workdir, ip, cpus=None):
        self.workdir = os.path.join(workdir, "backend")
        os.makedirs(self.workdir, exist_ok=True)
        self.ip, self.port = ip, free_port(ip)
        w = self.workdir
        cfg = os.path.join(w, "nginx.conf")
        with open(cfg, "w") as f:
            f.write(nginx_preamble(w, 4096) + f"""  server {{
    listen {ip}:{self.port};
    location / {{ return 200 "ok\\n"; }}
  }}
}}
""")
        self.proc = Proc("backend nginx", ["nginx", "-p", w, "-c", cfg], os.path.join(w, "log"),
                         cpus=cpus)
        wait_tcp(ip, self.port, 10, self.proc)
        self.addr = f"{ip}:{self.port}"

    def stop(self):
        self.proc.stop()


ALL = {"lb-agent": LbAgent, "haproxy": HAProxy, "nginx": Nginx, "random": Random,
       "pingora": BarePingora}
