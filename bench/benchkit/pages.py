"""Simulated open live pages: what lb-agent's dashboard (src/dashboard.html) does in a browser.

    python3 -m benchkit.pages HOST:PORT OUT.json PAGES PATH=MS [PATH=MS …]

Each of PAGES pages, once opened, loads the page (`GET /`), then fetches every PATH at once and
again every MS milliseconds (the page's `pollStatus(); pollMetrics();` followed by
`setInterval(…)`), each PATH on its own keep-alive connection (a browser's `fetch` reuses its
connections to the origin), with the request headers a browser's same-origin `fetch(…, {cache:
"no-store"})` sends. The pages open one after the other, spread evenly over the shortest period,
as pages opened at different moments are; each reads and checks every answer (200; /status must
be a JSON object with `pools`), as the page's script parses it.

Prints `pages ready` when every page has opened and fetched each PATH once. Runs until SIGTERM
(or SIGINT), then writes OUT.json: every fetch as [page, path, start (time.monotonic(), the
same clock as the bench's), latency s, HTTP status or null, body bytes, opened a new connection
(0/1), error or null], and the ticks skipped because the previous fetch of that page and path
was still running (a browser's setInterval would have started another fetch meanwhile).
"""

import http.client
import json
import signal
import sys
import threading
import time

UA = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
      "Chrome/124.0 Safari/537.36 (lb-agent bench: simulated live page)")


def headers(origin, document):
    h = {"User-Agent": UA, "Accept-Encoding": "gzip, deflate, br",
         "Accept-Language": "en-US,en;q=0.9", "Connection": "keep-alive"}
    if document:
        h.update({"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
                  "Sec-Fetch-Dest": "document", "Sec-Fetch-Mode": "navigate",
                  "Sec-Fetch-Site": "none", "Upgrade-Insecure-Requests": "1"})
    else:
        # fetch(url, {cache: "no-store"}) from the page itself.
        h.update({"Accept": "*/*", "Cache-Control": "no-cache", "Pragma": "no-cache",
                  "Referer": f"http://{origin}/", "Sec-Fetch-Dest": "empty",
                  "Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "same-origin"})
    return h


class Fetcher:
    """One keep-alive connection of one page, reopened after an error or a close."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.conn = None

    def get(self, path, hdrs):
        """→ (status or None, body bytes or b"", opened a new connection, error or None)."""
        new = self.conn is None
        if new:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
        try:
            self.conn.request("GET", path, headers=hdrs)
            resp = self.conn.getresponse()
            body = resp.read()
            if resp.will_close:
                self.close()
            return resp.status, body, new, None
        except (OSError, http.client.HTTPException) as e:
            self.close()
            return None, b"", new, f"{type(e).__name__}: {e}"

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def check(path, status, body):
    """None when the answer is what the page can use, else why not."""
    if status != 200:
        return f"status {status}"
    if path == "/status":
        try:
            doc = json.loads(body)
        except ValueError as e:
            return f"not JSON: {e}"
        if not isinstance(doc, dict) or "pools" not in doc:
            return "JSON without pools"
    elif not body:
        return "empty body"
    return None


class Page:
    def __init__(self, idx, host, port, polls, open_at, stop, record, first_done):
        self.idx, self.host, self.port = idx, host, port
        self.polls, self.open_at, self.stop, self.record = polls, open_at, stop, record
        self.first_done = first_done
        self.origin = f"{host}:{port}"
        self.opened = threading.Event()
        self.skipped = {p: 0 for p, _ in polls}
        self.threads = [threading.Thread(target=self.poller, args=(i, p, ms), daemon=True)
                        for i, (p, ms) in enumerate(polls)]

    def fetch(self, fetcher, path, document=False):
        t = time.monotonic()
        status, body, new, err = fetcher.get(path, headers(self.origin, document))
        lat = time.monotonic() - t
        if err is None:
            err = check(path, status, body)
        self.record([self.idx, path, round(t, 6), round(lat, 6), status, len(body), int(new),
                     err])

    def poller(self, i, path, ms):
        fetcher = Fetcher(self.host, self.port)
        try:
            if i == 0:
                # The browser loads the page on the connection its first fetch then reuses.
                if self.stop.wait(max(0.0, self.open_at - time.monotonic())):
                    return
                self.fetch(fetcher, "/", document=True)
                self.opened.set()
            elif not self.wait_opened():
                return
            start = time.monotonic()
            self.fetch(fetcher, path)
            self.first_done()
            period, k = ms / 1000, 1
            while True:
                due = start + k * period
                if self.stop.wait(max(0.0, due - time.monotonic())):
                    return
                self.fetch(fetcher, path)
                # Ticks that passed while this fetch ran: setInterval would have started
                # another fetch at each; counted, not sent late.
                late = int((time.monotonic() - start) / period) - k
                if late > 0:
                    self.skipped[path] += late
                k += 1 + max(0, late)
        finally:
            fetcher.close()

    def wait_opened(self):
        while not self.opened.wait(0.05):
            if self.stop.is_set():
                return False
        return True


def main(argv):
    if len(argv) < 4:
        sys.exit(__doc__)
    host, port = argv[0].rsplit(":", 1)
    out, n = argv[1], int(argv[2])
    polls = [(p, int(ms)) for p, ms in (a.rsplit("=", 1) for a in argv[3:])]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    records, lock = [], threading.Lock()

    def record(r):
        with lock:
            records.append(r)

    # Ready once every page has opened and fetched each path once.
    ready, left = threading.Event(), [n * len(polls)]

    def first_done():
        with lock:
            left[0] -= 1
            if left[0] == 0:
                ready.set()

    spread = min(ms for _, ms in polls) / 1000
    t0 = time.monotonic()
    pages = [Page(i, host, int(port), polls, t0 + i * spread / n, stop, record, first_done)
             for i in range(n)]
    for p in pages:
        for t in p.threads:
            t.start()
    while not stop.is_set():
        if ready.wait(0.1):
            print(f"pages ready {n}", flush=True)
            break
    while not stop.wait(1):
        pass
    # A fetch still running ends within its 5 s timeout; the bench waits 5 s for this process.
    deadline = time.monotonic() + 3
    for p in pages:
        for t in p.threads:
            t.join(max(0.0, deadline - time.monotonic()))
    with lock:
        doc = {"pages": n, "polls": dict(polls), "started": round(t0, 6),
               "fetches": records,
               "skipped_ticks": {path: sum(p.skipped[path] for p in pages) for path, _ in polls}}
    with open(out, "w") as f:
        json.dump(doc, f)


if __name__ == "__main__":
    main(sys.argv[1:])
