"""Request path cost, per step: what lb-agent's own code costs each request, in instructions.

One fast keep-alive backend (NGINX `return 200` on 127.0.2.1, as in the overhead part), and
lb-agent (configured exactly as the overhead part configures it) and bare Pingora in front of
it in turn, each run twice:

1. under `valgrind --tool=callgrind --dump-instr=no --separate-threads=yes`: CONNS keep-alive
   connections (the overhead part's wrk count) opened, WARMUP requests, `callgrind_control -z`,
   N requests on the same connections, `callgrind_control -d`, stop. Instructions (Ir, user
   space) per request = the dump's total / N, for every thread and for the thread(s) serving
   the requests (those that run Pingora's request task; the others run by the clock);
2. natively under `strace -f -c` (attached to every thread after the same warm-up, detached
   after the N requests; skipped when strace is missing or cannot attach): syscalls per
   request, per syscall name.

The client is the small asyncio one below: each connection sends `GET /` (the request wrk
sends in the overhead part: a Host header and nothing else), reads and checks the answer,
sends the next.

The steps are read on the serving thread's dump, merged by symbol: LTO splits a function into
pieces that callgrind lists apart, so costs are merged by name (and `lb_agent::proxy::LbProxy`
/ `bare_pingora::Bare` both read as APP, so that a step is looked up alike in both). A step's
cost is the inclusive cost of its symbols, the calls into them from functions outside them (a
callback's method, its `{{closure}}` future, nested closures and the future's drop are one
step), plus its code inlined into other symbols: a function LTO inlined has no symbol left (or
only some of its copies have one), so each instruction of the symbols that ran code of the
step's source files gets its inline chain from the binary's debug info (`nm`, `objdump -d`,
`addr2line -i`: the binary as built, no source needed), and a source line's cost in such a
symbol counts for the step when all of that line's instructions there are inlined from it (a
call made there: when the call instructions to that callee there are). A line shared with
other inlined code is only estimated, by instruction counts, and kept apart ("uncertain").
A step with no symbol shows as "inlined", never as a silent 0. Steps overlap: one nested in
another (normalize_path in request_filter, Balancer::acquire in upstream_peer) is inside it.
"""

import asyncio
import collections
import contextlib
import glob
import os
import re
import shutil
import signal
import subprocess
import time

from . import contenders as C
from .overhead import CONNS
from .procs import BenchError

N = int(os.environ.get("BENCH_REQPATH_N", "3000"))
WARMUP = int(os.environ.get("BENCH_REQPATH_WARMUP", "500"))
# Valgrind starts a 90 MB binary slowly: the contenders' start-up timeouts are stretched.
SLOW = 10
PHASE_TIMEOUT = 900  # s, for any one phase of requests (callgrind runs ~50x slower)
ORDER = ["lb-agent", "pingora"]


# --- the client ---------------------------------------------------------------------------


class Client:
    """CONNS keep-alive HTTP/1.1 connections to (host, port), kept open from the warm-up to the
    end, so that the measured requests include no connection set-up. Every phase is bounded."""

    def __init__(self, host, port, conns):
        self.host, self.port, self.conns = host, port, conns
        self.req = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
        self.loop = asyncio.new_event_loop()
        self.streams = []

    def _run(self, coro, timeout):
        try:
            return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))
        except asyncio.TimeoutError:
            raise BenchError(f"reqpath: the client did not finish within {timeout} s")
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            raise BenchError(f"reqpath: client error: {e!r}")

    def open(self):
        async def one():
            return await asyncio.open_connection(self.host, self.port)

        async def all_():
            return await asyncio.gather(*(one() for _ in range(self.conns)))

        self.streams = self._run(all_(), 60)

    def requests(self, total, timeout=PHASE_TIMEOUT):
        """Sends `total` requests over the connections (each one at a time); returns the count
        answered 200. Anything else is an error: the profile would be of another path."""
        per = [total // self.conns + (1 if i < total % self.conns else 0)
               for i in range(self.conns)]

        async def one(r, w, n):
            ok = 0
            for _ in range(n):
                w.write(self.req)
                await w.drain()
                head = await r.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split()[1])
                length = None
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    k = k.strip().lower()
                    if k == "content-length":
                        length = int(v)
                    elif k == "transfer-encoding":
                        raise ValueError(f"unexpected transfer-encoding {v.strip()}")
                    elif k == "connection" and v.strip().lower() == "close":
                        raise ValueError("the server closed the keep-alive connection")
                if length is None:
                    raise ValueError("answer without content-length")
                if length:
                    await r.readexactly(length)
                if status != 200:
                    raise ValueError(f"answer {status}, not 200")
                ok += 1
            return ok

        async def all_():
            return await asyncio.gather(*(one(r, w, n) for (r, w), n in zip(self.streams, per)))

        done = sum(self._run(all_(), timeout))
        if done != total:
            raise BenchError(f"reqpath: {done} of {total} requests answered 200")
        return done

    def close(self):
        for _, w in self.streams:
            w.close()
        self.streams = []
        self.loop.close()


# --- starting the contenders (the overhead part's classes, under a command prefix) -----------


@contextlib.contextmanager
def prefixed(prefix, slow=1):
    """Within the block, the contenders of contenders.py start as `prefix + their argv`, with
    their start-up timeouts × `slow`: their configuration stays exactly theirs."""
    saved = C.Proc, C.wait_http_ok, C.wait_tcp
    proc, http_ok, tcp = saved
    C.Proc = lambda name, argv, *a, **k: proc(name, prefix + list(argv), *a, **k)
    C.wait_http_ok = lambda h, p, path, t, pr=None: http_ok(h, p, path, t * slow, pr)
    C.wait_tcp = lambda h, p, t, pr=None: tcp(h, p, t * slow, pr)
    try:
        yield
    finally:
        C.Proc, C.wait_http_ok, C.wait_tcp = saved


def start(name, workdir, backend, prefix=None):
    """The contender `name` as the overhead part starts it (cap far above the load)."""
    with prefixed(prefix or [], SLOW if prefix else 1):
        return C.ALL[name](workdir, [backend.addr], 100000)


def callgrind_control(*args):
    out = subprocess.run(["callgrind_control", *args], capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0:
        raise BenchError(f"callgrind_control {' '.join(args)} failed: {out.stdout}{out.stderr}")


def measured_dumps(base, pid, timeout=120):
    """The files of the `measured` dump (one per thread), once complete."""
    deadline = time.monotonic() + timeout
    while True:
        files = []
        for path in sorted(glob.glob(f"{base}.{pid}*")):
            with open(path, errors="replace") as f:
                text = f.read()
            if re.search(r"^desc: Trigger: .*measured", text, re.M) and "\ntotals:" in text:
                files.append(path)
        if files:
            return files
        if time.monotonic() > deadline:
            raise BenchError(f"reqpath: no complete callgrind dump {base}.{pid}* after {timeout} s")
        time.sleep(0.5)


def profile(name, workdir, backend, log):
    base = os.path.join(workdir, f"callgrind-{name}")
    prefix = ["valgrind", "--tool=callgrind", "--dump-instr=no", "--separate-threads=yes",
              f"--callgrind-out-file={base}.%p"]
    t0 = time.monotonic()
    c = start(name, workdir, backend, prefix)
    client = None
    try:
        log(f"reqpath: {name} under callgrind up after {time.monotonic() - t0:.0f} s")
        client = Client(*c.entry, CONNS)
        client.open()
        client.requests(WARMUP)
        callgrind_control("-z", str(c.proc.pid))
        t1 = time.monotonic()
        client.requests(N)
        secs = time.monotonic() - t1
        callgrind_control("-d", "measured", str(c.proc.pid))
        files = measured_dumps(base, c.proc.pid)
    finally:
        if client:
            client.close()
        c.stop()
    log(f"reqpath: {name}: {N} requests under callgrind in {secs:.1f} s, {len(files)} thread "
        "dump(s)")
    return files, secs


# --- syscalls -----------------------------------------------------------------------------


def traced(pid):
    """Whether every thread of `pid` has a tracer attached."""
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/status") as f:
                if not re.search(r"^TracerPid:\s*[1-9]", f.read(), re.M):
                    return False
        except OSError:  # the thread has ended
            continue
    return True


def syscalls(name, workdir, backend, log):
    """Syscalls per request of `name` run natively, from `strace -f -c` attached to every
    thread for the N measured requests (after the warm-up), or {"skipped": why}."""
    if not shutil.which("strace"):
        return {"skipped": "strace is not installed"}
    out_path = os.path.join(workdir, f"strace-{name}.txt")
    c = start(name, workdir, backend)
    client = st = None
    try:
        client = Client(*c.entry, CONNS)
        client.open()
        client.requests(WARMUP)
        pid = c.proc.pid
        argv = ["strace", "-f", "-c", "-o", out_path]
        for t in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
            argv += ["-p", t]
        st = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while not traced(pid):
            if st.poll() is not None or time.monotonic() > deadline:
                st.kill()
                err = st.communicate(timeout=10)[1]
                return {"skipped": f"strace could not attach: {err.strip()[:300]}"}
            time.sleep(0.05)
        t1 = time.monotonic()
        client.requests(N)
        secs = time.monotonic() - t1
        st.send_signal(signal.SIGINT)
        try:
            st.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            st.kill()
            st.communicate(timeout=10)
            return {"skipped": "strace did not detach within 30 s"}
        st = None
    finally:
        if st and st.poll() is None:
            st.kill()
            st.wait(10)
        if client:
            client.close()
        c.stop()
    calls, errors = {}, {}
    with open(out_path) as f:
        for line in f:
            p = line.split()
            if len(p) < 5 or not re.fullmatch(r"[\d.]+", p[0]) or p[-1] == "total":
                continue
            calls[p[-1]] = int(p[3])
            if len(p) == 6:
                errors[p[-1]] = int(p[4])
    total = sum(calls.values())
    log(f"reqpath: {name}: {total / N:.1f} syscalls per request (strace, {secs:.1f} s)")
    return {"per_request": {k: v / N for k, v in sorted(calls.items(), key=lambda kv: -kv[1])},
            "errors_per_request": {k: v / N for k, v in errors.items()},
            "total_per_request": total / N, "seconds": secs, "requests": N}


# --- the callgrind dump, by symbol and by source line ---------------------------------------

APP = re.compile(r"lb_agent::proxy::LbProxy|bare_pingora::Bare")


def norm(name):
    return APP.sub("APP", name)


def plain(name):
    """Without a symbol version or PLT suffix (`malloc@GLIBC_2.2.5`, `malloc@plt`)."""
    return re.sub(r"@+[\w.]+$", "", name)


class Profile:
    """A callgrind dump (all its thread files) merged by symbol:
    selfc[f]: exclusive Ir; edge[(u, f)]: inclusive Ir of the calls from u to f; calls[(u, f)];
    lself[file][line][f]: exclusive Ir of `f` at that source line (inlined code carries its own
    file and line); lcall[file][line][(u, f)]: calls made from that line."""

    def __init__(self):
        self.total = 0
        self.threads = []
        self.selfc = collections.Counter()
        self.edge = collections.Counter()
        self.calls = collections.Counter()
        self.lself = collections.defaultdict(lambda: collections.defaultdict(collections.Counter))
        self.lcall = collections.defaultdict(lambda: collections.defaultdict(collections.Counter))
        # The same by function: fnlines[f][(file, line)], fncalls[f][(file, line, callee)].
        self.fnlines = collections.defaultdict(collections.Counter)
        self.fncalls = collections.defaultdict(collections.Counter)
        self.files = set()
        self._out = None

    def add(self, path):
        names = {"fn": {}, "fl": {}}

        def name(kind, rest):
            m = re.match(r"\((\d+)\)(?: (.*))?$", rest)
            if not m:
                return rest
            if m.group(2) is not None:
                names[kind][m.group(1)] = m.group(2)
            return names[kind].get(m.group(1), "?" + m.group(1))

        fn = cfn = fl = cur = None
        pending = None
        ln = 0
        total = 0
        thread = "?"
        with open(path, errors="replace") as f:
            for line in f:
                line = line.rstrip("\n")
                if not line or line[0] == "#":
                    continue
                c0 = line[0]
                if c0.isdigit() or c0 in "+-*":
                    p = line.split()
                    pos = p[0]
                    if pos[0] == "+":
                        ln += int(pos[1:])
                    elif pos[0] == "-":
                        ln -= int(pos[1:])
                    elif pos != "*":
                        ln = int(pos)
                    cost = int(p[1]) if len(p) > 1 else 0
                    if pending is not None:
                        self.edge[(fn, cfn)] += cost
                        self.calls[(fn, cfn)] += pending
                        self.lcall[cur][ln][(fn, cfn)] += cost
                        self.fncalls[fn][(cur, ln, cfn)] += cost
                        pending = None
                    else:
                        self.selfc[fn] += cost
                        self.lself[cur][ln][fn] += cost
                        self.fnlines[fn][(cur, ln)] += cost
                        total += cost
                    continue
                key, _, rest = line.partition("=")
                if key == "fn":
                    fn = norm(name("fn", rest))
                    cur = fl
                elif key == "cfn":
                    cfn = norm(name("fn", rest))
                elif key == "fl":
                    fl = cur = name("fl", rest)
                    self.files.add(fl)
                elif key in ("fi", "fe"):
                    cur = name("fl", rest)
                    self.files.add(cur)
                elif key in ("cfi", "cfl"):
                    self.files.add(name("fl", rest))
                elif key == "calls":
                    pending = int(rest.split()[0])
                elif line.startswith("thread:"):
                    thread = line.split(":", 1)[1].strip()
        self.total += total
        self.threads.append({"thread": thread, "ir": total, "file": os.path.basename(path)})
        self._out = None

    def out(self):
        """Callees of each function."""
        if self._out is None:
            self._out = collections.defaultdict(set)
            for (u, f) in self.edge:
                if u != f:
                    self._out[u].add(f)
        return self._out

    def reach(self, roots):
        """Every function called, directly or not, from `roots`."""
        out, seen, todo = self.out(), set(), list(roots)
        while todo:
            for f in out.get(todo.pop(), ()):
                if f not in seen:
                    seen.add(f)
                    todo.append(f)
        return seen

    def symbols(self):
        return set(self.selfc) | {f for _, f in self.edge}


def parse(paths):
    p = Profile()
    for path in paths:
        p.add(path)
    return p


# --- inlined code: which function each instruction of a symbol was inlined from -------------


class Inlines:
    """For symbols of the binary, the inline chain of each of their instructions (innermost
    function first, the symbol itself last), from the binary's own debug info: address ranges
    from `nm`, instructions (and the targets of calls) from `objdump -d`, chains from one
    `addr2line -i` for all of them. An inlined function is so found by its name, as the build
    made it, without its source."""

    def __init__(self, binary):
        self.binary = binary
        self.why = None
        for tool in ("nm", "objdump", "addr2line"):
            if not shutil.which(tool):
                self.why = f"{tool} (binutils) is not installed"
        self._ranges = None
        self._done = {}

    @staticmethod
    def _name(raw):
        return plain(norm(re.sub(r"\.llvm\.\d+$", "", raw.strip())))

    def ranges(self):
        if self._ranges is None:
            self._ranges = collections.defaultdict(list)
            out = subprocess.run(["nm", "-C", "-S", "--defined-only", self.binary],
                                 capture_output=True, text=True, timeout=300).stdout
            for line in out.splitlines():
                p = line.split(" ", 3)
                if len(p) == 4 and p[2] in "tTwW" and p[1]:
                    self._ranges[self._name(p[3])].append((int(p[0], 16), int(p[1], 16)))
        return self._ranges

    def load(self, symbols):
        """Reads the chains of `symbols` (all in one addr2line run)."""
        todo = [s for s in dict.fromkeys(symbols) if s not in self._done]
        if self.why or not todo:
            return
        insns = {}  # symbol -> [(address, call target or None)]
        for sym in todo:
            insns[sym] = []
            for start, size in self.ranges().get(sym, []):
                out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn",
                                      f"--start-address={start:#x}",
                                      f"--stop-address={start + size:#x}", self.binary],
                                     capture_output=True, text=True, timeout=300).stdout
                for m in re.finditer(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$", out, re.M):
                    op, arg = m.group(2), m.group(3)
                    target = None
                    if op.startswith("call"):
                        t = re.search(r"<(.*)>\s*$", arg)
                        target = self._name(t.group(1)) if t and "+0x" not in t.group(1) else "*"
                    elif op.startswith("jmp"):
                        t = re.search(r"<(.*)>\s*$", arg)
                        if t and "+0x" not in t.group(1) and self._name(t.group(1)) != sym:
                            target = self._name(t.group(1))  # a tail call
                        elif "*" in arg:
                            target = "*"
                    insns[sym].append((int(m.group(1), 16), target))
        addrs = sorted({a for v in insns.values() for a, _ in v})
        where = {}
        if addrs:
            out = subprocess.run(["addr2line", "-i", "-f", "-C", "-a", "-e", self.binary],
                                 input="".join(f"{a:#x}\n" for a in addrs),
                                 capture_output=True, text=True, timeout=900).stdout
            for block in re.split(r"^(?=0x[0-9a-f]+$)", out, flags=re.M):
                lines = block.rstrip("\n").split("\n")
                if len(lines) < 3 or not lines[0].startswith("0x"):
                    continue
                fns = tuple(self._name(f) for f in lines[1::2])
                m = re.match(r"(.*):(\d+)", lines[2])
                if m:
                    where[int(lines[0], 16)] = ((m.group(1), int(m.group(2))), fns)
        for sym, v in insns.items():
            selfpos = collections.defaultdict(collections.Counter)
            callpos = collections.defaultdict(lambda: collections.defaultdict(
                collections.Counter))
            for a, target in v:
                if a in where:
                    pos, fns = where[a]
                    selfpos[pos][fns] += 1
                    if target:
                        callpos[pos][target][fns] += 1
            self._done[sym] = (selfpos, callpos)

    def chains(self, sym):
        """(selfpos, callpos): {(file, line): Counter(chain)} over the symbol's instructions,
        and {(file, line): {call target: Counter(chain)}} over its calls ("*": indirect)."""
        if sym not in self._done:
            self.load([sym])
        return self._done.get(sym, ({}, {}))


# --- the steps -----------------------------------------------------------------------------

CL = r"(?:::\{\{closure\}\})*"
TRAIT = (r"(?:<APP as pingora_proxy::proxy_trait::ProxyHttp>|"
         r"pingora_proxy::proxy_trait::ProxyHttp)::")
CALLBACKS = ["new_ctx", "early_request_filter", "request_filter", "upstream_peer",
             "upstream_request_filter", "connected_to_upstream", "upstream_response_filter",
             "upstream_response_body_filter", "request_body_filter", "logging"]
# Source files (as the debug info names them) where a step's inlined copies can be.


def own(path_re):
    """A source file of this repository, as the debug info names it (absolute)."""
    return re.compile("^" + re.escape(C.ROOT) + "/" + path_re + "$")


PROXY_RS = own(r"src/proxy(?:\.rs|/[^/]+\.rs)")
FRONT_RS = own(r"src/front\.rs")
BARE_RS = own(r"examples/bare_pingora\.rs")
TRAIT_RS = re.compile(r"/pingora-proxy-[^/]+/src/proxy_trait\.rs$")
TIMEOUT_RS = re.compile(r"/pingora-timeout-[^/]+/src/")
TOKIO_TIME_RS = re.compile(r"/tokio-[^/]+/src/(?:time|runtime/time)/")
SESSION_LOOP = r"^<T as pingora_core::apps::ServerApp>::process_new::\{\{closure\}\}$"
REQUEST_TASK = (r"^<pingora_proxy::HttpProxy<SV,C> as pingora_core::apps::HttpServerApp>::"
                r"process_new_http::\{\{closure\}\}$")
RAW_STREAM = r"pingora_core::protocols::l4::stream::Stream as "
ALLOC = r"^(malloc|calloc|realloc|free|cfree|_int_\w+|__memcpy\w*|__memmove\w*|__memset\w*)$"
DROP = "core::ptr::drop_in_place<"


def callback(name):
    """A ProxyHttp callback: the method, its future (`{{closure}}`, nested ones) and the
    future's drop; APP's own or the trait's default."""
    return rf"^(?:core::ptr::drop_in_place<)?{TRAIT}{name}{CL}>?$"


def side(sym, files=(), inline=None, exclude=(), plus_self=None, plus_edges=()):
    """How a step is found in one binary. sym: regex of its symbols; files: the source files
    (regexes of the paths the debug info names) where its code may also be inlined into other
    symbols; inline: regex of the function names that are the step in an inline chain (sym by
    default); exclude: [(caller regex, callee regex)] calls from the step not counted (an inner
    layer both binaries have); plus_self: symbols whose exclusive cost only is added;
    plus_edges: [(caller regex, callee regex)] calls added."""
    return {"sym": sym, "files": list(files), "inline": inline or sym,
            "exclude": list(exclude), "plus_self": plus_self, "plus_edges": list(plus_edges)}


def steps():
    lb_only = None
    s = []

    def step(key, label, lb, bare, note=""):
        s.append({"key": key, "label": label, "lb-agent": lb, "pingora": bare, "note": note})

    step("request_task", "request task, whole (Pingora's per-request future)",
         side(REQUEST_TASK), side(REQUEST_TASK),
         "contains the callbacks below and Pingora's own request handling")
    step("front_process_new", "front door: Front::process_new (per connection)",
         side(r"^(?:core::ptr::drop_in_place<)?<lb_agent::front::Front<P> as "
              r"pingora_core::apps::ServerApp>::process_new" + CL + ">?$", [FRONT_RS],
              exclude=[(".", r"^(?:core::ptr::drop_in_place<)?<T as pingora_core::apps::"
                            r"ServerApp>::process_new")]),
         lb_only, "the connection task's outer future, polled at each wake-up (the guard and "
                  "h2 peek of a new connection: none here, the connections are opened before "
                  "the measurement); the session loop under it not counted")
    step("session_loop", "session loop: Pingora's HTTP loop per request (lb-agent: with "
         "Sessions)",
         side(SESSION_LOOP + r"|^<lb_agent::front::Sessions<P> as pingora_core::apps::"
              r"HttpServerApp>::process_new_http", [FRONT_RS],
              exclude=[(".", REQUEST_TASK)]),
         side(SESSION_LOOP, exclude=[(".", REQUEST_TASK)]),
         "the request task it runs not counted: compare the two sides here")
    step("sessions", "  of which lb-agent's Sessions layer",
         side(r"^<lb_agent::front::Sessions<P> as pingora_core::apps::HttpServerApp>::"
              r"process_new_http" + CL + "$", [FRONT_RS],
              exclude=[(".", r"^<pingora_proxy::HttpProxy<SV,C> as pingora_core::apps::"
                            r"HttpServerApp>::process_new_http")]),
         lb_only, "Pingora's process_new_http under it not counted")
    step("guarded", "front door: Guarded stream (reads, writes, digests)",
         side(r"^(?:core::ptr::drop_in_place<)?<lb_agent::front::Guarded as ", [FRONT_RS],
              exclude=[(".", RAW_STREAM)]),
         lb_only, "the raw stream under it (which bare Pingora calls directly) not counted")
    for name in CALLBACKS:
        step(name, name, side(callback(name), [PROXY_RS, TRAIT_RS]),
             side(callback(name), [BARE_RS, TRAIT_RS]), "ProxyHttp callback")
        if name == "request_filter":
            step("check_and_normalize", "  of which check_and_normalize (Host, request rules, "
                 "normalize_path)",
                 side(r"^lb_agent::proxy::check_and_normalize$", [PROXY_RS]), lb_only)
            step("normalize_path", "    of which path::normalize_path",
                 side(r"^lb_agent::path::normalize_path$", [own(r"src/path\.rs")]),
                 lb_only)
            step("handle_in_path", "  of which jobs::handle_in_path",
                 side(r"^lb_agent::jobs::handle_in_path$",
                      [own(r"src/jobs/mod\.rs")]), lb_only)
            step("route_lookup", "  of which route lookup",
                 side(r"^lb_agent::route::.*::lookup$", [own(r"src/route\.rs")]),
                 lb_only)
        if name == "upstream_peer":
            step("acquire", "  of which Balancer::acquire",
                 side(r"^(?:core::ptr::drop_in_place<)?lb_agent::balance::Balancer::acquire"
                      + CL + ">?$", [own(r"src/balance/mod\.rs")]), lb_only)
            step("client_gone", "  of which client_already_gone / client_gone / "
                 "connection_closed",
                 side(r"^(?:core::ptr::drop_in_place<)?lb_agent::proxy::(?:client_gone|"
                      r"client_already_gone|connection_closed|body_fits_retry_buffer)" + CL
                      + ">?$", [PROXY_RS]), lb_only,
                 "watching for a client that left while the request waits for a slot")
        if name == "upstream_response_body_filter":
            step("slot_release", "  slot release (LocalSlot drop → LocalLedger::release)",
                 side(r"^(?:<lb_agent::balance::ledger::LocalSlot as core::ops::drop::Drop>"
                      r"::drop|lb_agent::balance::ledger::LocalLedger::release)$",
                      [own(r"src/balance/ledger\.rs")]),
                 lb_only, "wherever the slot is dropped (the last body piece, or the "
                          "request's end)")
    others = "|".join(CALLBACKS)
    other = rf"^(?:core::ptr::drop_in_place<)?{TRAIT}(?!(?:{others})(?:$|::|>))\w+{CL}>?$"
    step("other_callbacks", "other ProxyHttp callbacks", side(other, [PROXY_RS, TRAIT_RS]),
         side(other, [BARE_RS, TRAIT_RS]), "Pingora's defaults mostly (response_filter, …)")
    timer_fns = (r"^(?:core::ptr::drop_in_place<)?<?pingora_timeout::(?!.*TimerManager::"
                 r"clock_thread)(?!Timeout<T,F> as core::future::future::Future>::poll$)")
    poll = r"^<pingora_timeout::Timeout<T,F> as core::future::future::Future>::poll$"
    timers = side(timer_fns, [TIMEOUT_RS], plus_self=poll, plus_edges=[(poll, ALLOC)])
    step("pingora_timers", "Pingora's timers (pingora_timeout: per-request timeouts)", timers,
         timers, "registering and polling the timers of Pingora's read/write/connect "
                 "timeouts (the future a timeout bounds not counted)")
    tokio_time = side(r"^(?:core::ptr::drop_in_place<)?<?tokio::(?:time|runtime::time)::",
                      [TOKIO_TIME_RS],
                      exclude=[(".", r"tokio::runtime::(?:io|driver|park|scheduler)|mio::|"
                                     r"epoll")])
    step("tokio_timers", "tokio timers (sleeps, the timer wheel)", tokio_time, tokio_time,
         "lb-agent's own sleeps (the front door's header and idle clocks) and tokio's wheel; "
         "the I/O driver under the time driver not counted")
    return s


def _set(prof, spec):
    return {f for f in prof.symbols() if re.search(spec["sym"], f)}


def candidates(prof, spec, n):
    """Symbols the step does not call (what it calls is counted already) that ran code of its
    source files: where its code may have been inlined. Under half an instruction per request
    left out."""
    L = _set(prof, spec)
    inside = L | prof.reach(L)
    cands = collections.Counter()
    for f in prof.files:
        if any(p.search(f) for p in spec["files"]):
            for d in prof.lself.get(f, {}).values():
                for u, c in d.items():
                    if u not in inside:
                        cands[u] += c
            for d in prof.lcall.get(f, {}).values():
                for (u, _), c in d.items():
                    if u not in inside:
                        cands[u] += c
    return [u for u, c in cands.most_common() if c >= n * 0.5]


def measure(prof, inl, spec, n):
    """One step in one profile, per request: {"ir", "how", …}. The inclusive cost of the
    step's symbols (calls into them from outside them), plus its code inlined into other
    symbols: their cost at each source line shared out by how many of that line's
    instructions there are inlined from the step, and the calls made from the step's inlined
    code (the call instructions to that callee at that line, by their inline chains)."""
    syms = prof.symbols()
    L = _set(prof, spec)

    def excluded(u, f):
        return any(re.search(cu, u) and re.search(cf, f) for cu, cf in spec["exclude"])

    incl = calls = 0
    for (u, f), c in prof.edge.items():
        if f in L and u not in L:
            incl += c
            calls += prof.calls[(u, f)]
        elif u in L and f not in L and excluded(u, f):
            incl -= c
    if spec["plus_self"]:
        for f in syms:
            if re.search(spec["plus_self"], f):
                incl += prof.selfc[f]
                L.add(f)
    for cu, cf in spec["plus_edges"]:
        for (u, f), c in prof.edge.items():
            if re.search(cu, u) and re.search(cf, f):
                incl += c

    exact = uncertain = 0.0
    where = collections.Counter()
    why = inl.why
    rx = re.compile(spec["inline"])

    def share(counter):
        total = sum(counter.values())
        hit = sum(k for ch, k in counter.items() if any(rx.search(x) for x in ch[:-1]))
        return hit / total if total else 0.0

    if not why and spec["files"]:
        for u in candidates(prof, spec, n):
            selfpos, callpos = inl.chains(u)
            found = []
            for pos, c in prof.fnlines[u].items():
                found.append((share(selfpos[pos]) if pos in selfpos else 0.0, c))
            for (file, ln, f), c in prof.fncalls[u].items():
                if f in L or excluded(u, f):
                    continue
                at = callpos.get((file, ln), {})
                cs = at.get(plain(f)) or at.get("*") or selfpos.get((file, ln))
                found.append((share(cs) if cs else 0.0, c))
            for fr, c in found:
                if fr >= 1:
                    exact += c
                    where[u] += c
                elif fr > 0:
                    uncertain += fr * c
    body = {f for f in L if not f.startswith(DROP)}
    r = {"symbols": sorted(L), "calls_per_request": calls / n,
         "symbol_ir_per_request": incl / n, "inlined_ir_per_request": exact / n,
         # Code at source lines (or calls) that the step shares, in one symbol, with code
         # inlined from elsewhere: its part is estimated by instruction counts, not counted.
         "uncertain_ir_per_request": uncertain / n,
         "inlined_into": [{"symbol": f, "ir_per_request": c / n}
                          for f, c in where.most_common(3)],
         "ir": (incl + exact) / n}
    if body and (incl or calls):
        r["how"] = "symbol"
    elif exact or uncertain:
        r["how"] = "inlined"
    elif body:
        r["how"] = "not called"
    elif not spec["files"]:
        r["how"], r["ir"], r["why"] = "not found", None, "no symbol matches"
    elif why:
        r["how"], r["ir"], r["why"] = "inlined, not measured", None, why
    else:
        r["how"] = "inlined, none found"
    return r


def split_threads(files):
    """The dump's thread files parsed one by one; which of them serve the requests (they run
    Pingora's request task), and the profile of those merged (the steps are read there)."""
    per = []
    for path in files:
        p = parse([path])
        serves = sum(c for (_, f), c in p.calls.items() if re.search(REQUEST_TASK, f)) > 0
        per.append((path, p, serves))
    req = [path for path, _, serves in per if serves] or files
    return per, parse(req)


def summarize(per, n, secs, binary):
    threads = []
    for path, p, serves in sorted(per, key=lambda x: -x[1].total):
        threads.append({"file": os.path.basename(path), "serves_requests": serves,
                        "ir_per_request": p.total / n,
                        "top_self": [{"symbol": f, "ir_per_request": c / n}
                                     for f, c in p.selfc.most_common(3)]})
    total = sum(p.total for _, p, _ in per)
    serving = sum(p.total for _, p, s in per if s)
    return {"ir_per_request": total / n, "request_threads_ir_per_request": serving / n,
            "other_threads_ir_per_request": (total - serving) / n, "threads": threads,
            "seconds_under_callgrind": secs,
            "binary": {"path": binary,
                       "built": time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                              time.localtime(os.path.getmtime(binary)))}}


def self_diff(a, b, n, top=30):
    """Symbols whose exclusive cost differs most between profiles a and b (per request)."""
    keys = set(a.selfc) | set(b.selfc)
    rows = sorted(keys, key=lambda k: -abs(a.selfc[k] - b.selfc[k]))[:top]
    return [{"symbol": k, "lb-agent": a.selfc[k] / n, "pingora": b.selfc[k] / n} for k in rows]


def run(workdir, log):
    for tool in ("valgrind", "callgrind_control"):
        if not shutil.which(tool):
            raise BenchError(f"{tool} is not installed (Debian: apt-get install valgrind)")
    bins = {"lb-agent": C.LB_AGENT, "pingora": C.BARE_PINGORA}
    backend = C.Backend(workdir, "127.0.2.1")
    profs, results, sys_ = {}, {}, {}
    try:
        for name in ORDER:
            files, secs = profile(name, workdir, backend, log)
            per, profs[name] = split_threads(files)
            results[name] = summarize(per, N, secs, bins[name])
            r = results[name]
            log(f"reqpath: {name}: {r['ir_per_request']:,.0f} Ir per request, of which "
                f"{r['request_threads_ir_per_request']:,.0f} on the thread serving them")
        for name in ORDER:
            sys_[name] = syscalls(name, workdir, backend, log)
    finally:
        backend.stop()
    t0 = time.monotonic()
    specs = steps()
    inl = {name: Inlines(bins[name]) for name in ORDER}
    for name in ORDER:  # every symbol to look into, in one addr2line run per binary
        inl[name].load([u for st in specs if st[name] and st[name]["files"]
                        for u in candidates(profs[name], st[name], N)])
    table = []
    for st in specs:
        row = {"key": st["key"], "label": st["label"], "note": st["note"]}
        for name in ORDER:
            row[name] = measure(profs[name], inl[name], st[name], N) if st[name] else None
        table.append(row)
    log(f"reqpath: steps attributed in {time.monotonic() - t0:.0f} s")
    lb, bare = results["lb-agent"], results["pingora"]
    return {
        "setup": {"requests": N, "warmup": WARMUP, "connections": CONNS, "request": "GET /",
                  "backend": "NGINX `return 200` on 127.0.2.1",
                  "valgrind": subprocess.run(["valgrind", "--version"], capture_output=True,
                                             text=True).stdout.strip(),
                  "callgrind": "--dump-instr=no --separate-threads=yes",
                  "strace": shutil.which("strace") is not None},
        "results": results,
        "excess_ir_per_request": lb["ir_per_request"] - bare["ir_per_request"],
        "excess_request_threads_ir_per_request": (lb["request_threads_ir_per_request"]
                                                  - bare["request_threads_ir_per_request"]),
        "steps": table,
        "syscalls": sys_,
        "self_diff": self_diff(profs["lb-agent"], profs["pingora"], N),
    }
