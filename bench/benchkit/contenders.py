"""The load balancers under test, each configured the same way, and the fake pods.

Every contender gets: the pod list, the per-pod cap (`limit`), THREADS worker thread(s), a queue
(where it has one) of `max_waiting` requests waiting up to `queue_timeout` seconds, and no
per-request access log (lb-agent runs with RUST_LOG=warn, HAProxy without `log`, NGINX with
`access_log off`), so that none of them pays for logging the others skip.

* lb-agent: `limit` per route, `threads: 1`; the `dist` cargo profile; Pingora's runtime with
  `work_stealing: false` (set in src/).
* HAProxy: `balance leastconn`, `maxconn <limit>` per server, `http-reuse always` (idle server
  connections shared across client connections), `timeout queue`, `nbthread 1`.
* NGINX OSS (`nginx`): `least_conn`, `max_conns=<limit>` per server, `worker_processes 1`. It
  has no queue: when every server is at max_conns the request fails at once (502).
* NGINX OSS, plain `least_conn` (`nginx-lc`): the same without `max_conns`: no cap, no failures,
  every request goes to the server with the fewest active connections.
* pingora (bare): Pingora 0.9 itself, a `ProxyHttp` whose `upstream_peer` returns one fixed peer
  (examples/bare_pingora.rs), built with the same `dist` profile as lb-agent, THREADS threads
  (its third argument), no logging; its runtime (`work_stealing`) is what the example's
  ServerConf sets, which describe() reads from the source for the results files. It has no
  cap, no queue and only one peer: it is the floor lb-agent stands on, run in the overhead part
  and for the cost of an idle connection in the queue part.
* random: a model of kube-proxy's iptables mode, a TCP forwarder that picks a pod uniformly
  at random per connection (randfwd.py, one asyncio thread). It has no cap and no queue.

With `h2c=True` the client side is cleartext HTTP/2 with prior knowledge (the pods stay
HTTP/1.1): lb-agent's port speaks it anyway, HAProxy gets `bind … proto h2`, NGINX
`listen … http2`. The random model forwards bytes, so its pods must speak HTTP/2 themselves:
give it the addresses of an `H2cShim`.
"""

import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys

from .procs import (BenchError, Proc, free_port, http_get_sync, read_all, wait_http_ok,
                    wait_tcp)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# How bench/run builds each binary (keep the two in step). lb-agent as the image ships it, the
# `dist` profile (release + LTO, one codegen unit); the floor, a Pingora proxy with one fixed
# peer and no logic (examples/bare_pingora.rs, an example of the same package), with the same
# profile; the fake pods, not part of the product, are the testkit crate's binary.
BUILD = {"lb-agent": ("cargo build --profile dist -p lb-agent --bin lb-agent", "dist"),
         "pingora": ("cargo build --profile dist -p lb-agent --example bare_pingora", "dist"),
         "testkit": ("cargo build --release -p testkit", "release")}
DEFAULT_BIN = {"lb-agent": os.path.join(ROOT, "target", "dist", "lb-agent"),
               "pingora": os.path.join(ROOT, "target", "dist", "examples", "bare_pingora"),
               "testkit": os.path.join(ROOT, "target", "release", "testkit")}
LB_AGENT = os.environ.get("LB_AGENT_BIN", DEFAULT_BIN["lb-agent"])
BARE_PINGORA = os.environ.get("BARE_PINGORA_BIN", DEFAULT_BIN["pingora"])
TESTKIT = os.environ.get("TESTKIT_BIN", DEFAULT_BIN["testkit"])
BARE_PINGORA_SRC = os.path.join(ROOT, "examples", "bare_pingora.rs")
HOST = "127.0.0.1"
# Worker threads of every contender: lb-agent `threads`, HAProxy `nbthread`, NGINX
# `worker_processes` (bare Pingora: what its source sets, see describe()).
THREADS = 1


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
threads: {THREADS}
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
        # http-reuse always: an idle server connection serves any client connection (HAProxy's
        # default, `safe`, gives a client connection's first request a server connection of its
        # own), as lb-agent's and NGINX's upstream pools do.
        # maxconn: enough for max_waiting queued clients plus every slot. With a hard fd limit
        # below 2×maxconn HAProxy would refuse to start (strict-limits), although a queued
        # request holds only its client connection: `no strict-limits` lets it use what it has.
        maxconn = self.max_waiting + 1000
        cfg = self.write(
            "haproxy.cfg",
            f"""global
  nbthread {THREADS}
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
  http-reuse always
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
    return f"""worker_processes {THREADS};
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
    # Written after each `server` address: the per-server cap.
    server_args = " max_conns={limit}"

    def start(self):
        args = self.server_args.format(limit=self.limit)
        servers = "\n".join(f"    server {a}{args};" for a in self.pods)
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


class NginxLeastConn(Nginx):
    """NGINX OSS with plain `least_conn`: no `max_conns`, so no cap and nothing refused."""

    name = "nginx-lc"
    has_cap = False
    server_args = ""


class BarePingora(Contender):
    name = "pingora"
    has_queue = False
    has_cap = False

    def start(self):
        if len(self.pods) != 1:
            raise BenchError(f"pingora (bare) proxies to one fixed peer, not {len(self.pods)}")
        self.proc = Proc(self.name, [BARE_PINGORA, f"{HOST}:{self.port}", self.pods[0],
                                     str(THREADS)],
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
  http-reuse always
  server pod{i} {pod}
""" for i, (port, pod) in enumerate(zip(self.ports, pods)))
        cfg = os.path.join(self.workdir, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(f"""global
  nbthread {THREADS}
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


ALL = {"lb-agent": LbAgent, "haproxy": HAProxy, "nginx": Nginx, "nginx-lc": NginxLeastConn,
       "random": Random, "pingora": BarePingora}


# --- how each contender is built and configured (recorded in every results file) ------------


def _profile(name):
    """Cargo.toml's settings of the cargo profile `name`, with what it inherits, e.g.
    `dist`: lto = "fat", codegen-units = 1, debug = 1 (on Cargo's `release` defaults)."""
    try:
        import tomllib

        with open(os.path.join(ROOT, "Cargo.toml"), "rb") as f:
            profiles = tomllib.load(f).get("profile", {})
    except (ImportError, OSError, ValueError) as e:
        return f"`{name}` (Cargo.toml not read: {e})"
    settings, p, base = {}, name, name
    while p in profiles:
        for k, v in profiles[p].items():
            if k != "inherits":
                settings.setdefault(k, v)
        base, p = p, profiles[p].get("inherits")
    base = p or base
    return (f"`{name}`: " + (", ".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
                             or "no settings") + f" (on Cargo's `{base}` defaults)")


def _rust_setting(paths, key):
    """What a Rust struct literal in `paths` sets `key` to (`work_stealing: false,` → "false"),
    or None when none does."""
    for path in paths:
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        m = re.search(rf"\b{key}\s*:\s*([\w.]+)\s*,", text)
        if m:
            return m.group(1)
    return None


def _version(argv):
    if not shutil.which(argv[0]):
        return f"{argv[0]} not installed"
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{argv[0]}: {e}"
    return ((out.stdout or out.stderr).strip().splitlines() or ["?"])[0]


def _built(key, path):
    how, profile = BUILD[key]
    if path != DEFAULT_BIN[key]:
        return {"built": f"given by the caller ({path})", "profile": "unknown"}
    return {"built": f"`{how}`", "profile": _profile(profile)}


def describe():
    """How every contender of this harness is built and configured, for the results files
    (suite.py records it in each part's `meta.contenders`) and the report's contenders table.
    Whether a runtime is work-stealing is read from the sources (the `work_stealing:` of the
    ServerConf that examples/bare_pingora.rs and src/ build; Pingora's default, true, when the
    example sets none)."""
    src = sorted(glob.glob(os.path.join(ROOT, "src", "**", "*.rs"), recursive=True))
    lb_ws = _rust_setting(src, "work_stealing")
    bare_ws = _rust_setting([BARE_PINGORA_SRC], "work_stealing")
    haproxy, nginx = _version(["haproxy", "-v"]), _version(["nginx", "-v"])
    nginx_common = (f"`worker_processes {THREADS}` (the master process serves no request), "
                    "upstream `keepalive 64`, `access_log off`")
    return {
        "lb-agent": {
            **_built("lb-agent", LB_AGENT),
            "threads": f"{THREADS} (`threads: {THREADS}`)",
            "work_stealing": lb_ws or "not found in src/",
            "config": "`limit` per route, least in flight, FIFO queue (`queue.max_waiting`, "
                      "`queue.timeout`), `RUST_LOG=warn`; the admin listener runs on threads "
                      "of its own",
        },
        "pingora": {
            **_built("pingora", BARE_PINGORA),
            "threads": f"{THREADS} (its THREADS argument)",
            "work_stealing": (f"{bare_ws} (set in examples/bare_pingora.rs)" if bare_ws
                              else "true (Pingora's default; examples/bare_pingora.rs sets none)"),
            "config": "`ProxyHttp` with one fixed peer, no logic, no logger, Pingora's default "
                      "server settings otherwise",
        },
        "haproxy": {
            "built": haproxy, "profile": "distribution package",
            "threads": f"{THREADS} (`nbthread {THREADS}`)", "work_stealing": "—",
            "config": "`balance leastconn`, `maxconn <limit>` per server, `http-reuse always`, "
                      "`timeout queue`, no `log`",
        },
        "nginx": {
            "built": nginx, "profile": "distribution package",
            "threads": f"{THREADS} worker", "work_stealing": "—",
            "config": f"`least_conn`, `max_conns=<limit>` per server (no queue: 502 when all "
                      f"are full), {nginx_common}",
        },
        "nginx-lc": {
            "built": nginx, "profile": "distribution package",
            "threads": f"{THREADS} worker", "work_stealing": "—",
            "config": f"`least_conn` only, no `max_conns` (no cap), {nginx_common}",
        },
        "random": {
            "built": f"bench/benchkit/randfwd.py, Python {sys.version.split()[0]}",
            "profile": "—", "threads": "1 (asyncio)", "work_stealing": "—",
            "config": "a pod uniformly at random per TCP connection, no cap, no queue",
        },
    }
