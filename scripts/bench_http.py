"""HTTP clients and process meters for scripts/bench: the raw, small-request and memory sections.

The clients are C programs wherever the client could be the bottleneck: `curl` moves blobs,
`wrk` (or `ab -k` when wrk is missing) drives small keep-alive requests, and `curl --parallel`
does so through an HTTPS_PROXY, which wrk cannot use. Python's http.client only holds 100 idle
connections open, where speed does not matter.

Every path between client and registry is an `Endpoint`: where the client sends its requests, how
it trusts TLS and which forward proxy it goes through, and a `session()` that yields what a client
sends (a fresh Bearer token: registry and proxy tokens live five minutes) and which processes sit
in the middle (to meter their CPU time and memory).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import ssl
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode, urljoin, urlsplit

MiB = 1 << 20
GiB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Whatever proxy the caller's environment names must not carry a path that has none of its own.
CLIENT_ENV = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
ACCEPT_MANIFESTS = ", ".join((
    "application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json"))
TRANSFER_TIMEOUT = 1800  # seconds for one curl run; a 512 MiB blob takes seconds on loopback


class HttpBenchError(RuntimeError):
    """A client run failed or was refused: no figure can be made of it."""


def load1() -> float:
    """The 1-minute load average now: the bench's own processes count too (expect 1-3 from them)."""
    return os.getloadavg()[0]


# -- /proc readings --------------------------------------------------------------------------------


def proc_status_kib(pid: int, field_name: str) -> int | None:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM), or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may contain spaces; count fields after its closing ')'.
        return f.read().rsplit(")", 1)[1].split()


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: fields 14 and 15 of proc(5)


def child_pids(parent: int) -> list[int]:
    """Processes whose parent is `parent` (nginx's workers), from a scan of /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat_fields(int(entry))[1]) == parent:  # field 4 of proc(5): ppid
                    children.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue  # exited while we looked
    return children


@dataclass
class Processes:
    """The process(es) between client and registry, read as one: nginx's master and its workers."""

    pid: int
    with_children: bool = False

    def pids(self) -> list[int]:
        return [self.pid, *(child_pids(self.pid) if self.with_children else [])]

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += proc_cpu_seconds(pid)
        return total

    def rss_kib(self) -> int:
        return sum(proc_status_kib(pid, "VmRSS") or 0 for pid in self.pids())

    def hwm_kib(self) -> int:
        """Peak resident memory since start, or since the last `reset_hwm()`."""
        return sum(proc_status_kib(pid, "VmHWM") or 0 for pid in self.pids())

    def reset_hwm(self) -> bool:
        """Restart the kernel's peak-RSS count (proc(5): clear_refs `5`), so a section sees its own peak."""
        try:
            for pid in self.pids():
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")
            return True
        except OSError:
            return False


class RssSampler:
    """Reads the RSS of `processes` every `interval` seconds in a thread and keeps the maximum."""

    def __init__(self, processes: Processes, interval: float = 0.1) -> None:
        self.processes, self.interval = processes, interval
        self.max_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.processes.rss_kib()
            if not rss:
                return  # gone
            self.max_kib = max(self.max_kib, rss)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


@dataclass
class CpuMeter:
    """CPU seconds of the middle process(es) and of the registry over a `with` block."""

    middle: Processes | None  # None: direct, nothing in the middle
    registry: Processes
    middle_seconds: float | None = None  # set when the block ends
    registry_seconds: float = 0.0
    _start: tuple[float, float] = (0.0, 0.0)

    def __enter__(self) -> CpuMeter:
        self._start = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._read()
        self.middle_seconds = end[0] - self._start[0] if self.middle is not None else None
        self.registry_seconds = end[1] - self._start[1]

    def _read(self) -> tuple[float, float]:
        return (self.middle.cpu_seconds() if self.middle is not None else 0.0, self.registry.cpu_seconds())


# -- tokens ----------------------------------------------------------------------------------------


_CHALLENGE_PARAM_RE = re.compile(r'(\w+)="([^"]*)"')


def _opener(cafile: Path | None) -> urllib.request.OpenerDirector:
    context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))


@dataclass(frozen=True)
class TokenSource:
    """The registry token flow, as a client does it: a 401's Bearer challenge names the realm and the
    service; the realm gives a token for the scopes, with Basic `user:password`."""

    challenge_url: str
    user: str
    password: str
    scopes: tuple[str, ...]
    cafile: Path | None = None  # the CA the challenge URL and the realm are verified with

    def token(self) -> str:
        opener = _opener(self.cafile)
        try:
            opener.open(self.challenge_url, timeout=10).close()
            raise HttpBenchError(f"{self.challenge_url} answered without asking for a token")
        except urllib.error.HTTPError as e:
            challenge = e.headers.get("WWW-Authenticate", "")
        if not challenge.lower().startswith("bearer "):
            raise HttpBenchError(f"{self.challenge_url}: expected a Bearer challenge, got {challenge!r}")
        params = dict(_CHALLENGE_PARAM_RE.findall(challenge))
        if "realm" not in params:
            raise HttpBenchError(f"{self.challenge_url}: a Bearer challenge without a realm: {challenge!r}")
        query = urlencode([("service", params.get("service", ""))] + [("scope", s) for s in self.scopes])
        basic = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request = urllib.request.Request(f"{params['realm']}?{query}", headers={"Authorization": f"Basic {basic}"})
        with opener.open(request, timeout=10) as resp:
            body = json.load(resp)
        return body.get("token") or body["access_token"]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}


# -- endpoints -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForwardProxy:
    """An HTTPS_PROXY: the client sends CONNECT there (with Basic proxy credentials, if any)."""

    host: str
    port: int
    credentials: tuple[str, str] | None = None  # (user, password)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def authorization(self) -> str | None:
        if self.credentials is None:
            return None
        return "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()


@dataclass
class Session:
    """What a client of one path sends for a while, and which processes sit in the middle."""

    headers: dict[str, str]
    middle: Processes | None  # None: the client talks to the registry itself


@dataclass
class Endpoint:
    """One path from client to registry (direct, a peer, the proxy)."""

    name: str
    origin: str  # scheme://host:port the client addresses (the registry's own in forward mode)
    session: Callable[[], AbstractContextManager[Session]]
    repo_prefix: str = ""  # the proxy's path form: "namespaces/<ns>/connectors/<name>/"
    cafile: Path | None = None  # the CA the client trusts for `origin` (HTTPS only)
    forward_proxy: ForwardProxy | None = None

    def url(self, repo: str, rest: str) -> str:
        return f"{self.origin}/v2/{self.repo_prefix}{repo}/{rest}"

    def curl_args(self) -> list[str]:
        args = ["--cacert", str(self.cafile)] if self.cafile else []
        if self.forward_proxy is None:
            return [*args, "--noproxy", "*"]
        args += ["--proxy", self.forward_proxy.url]
        if self.forward_proxy.credentials:
            args += ["--proxy-user", ":".join(self.forward_proxy.credentials)]
        return args


@contextlib.contextmanager
def token_session(tokens: TokenSource | None, middle: Processes | None) -> Iterator[Session]:
    """A session with a fresh token from `tokens` (None: the client sends no Authorization)."""
    yield Session(tokens.headers() if tokens else {}, middle)


# -- curl ------------------------------------------------------------------------------------------


@dataclass
class CurlResult:
    status: int
    seconds: float  # curl's time_total: no process start-up in it
    downloaded: int
    uploaded: int
    headers: dict[str, list[str]]

    def location(self, request_url: str) -> str:
        values = self.headers.get("location")
        if not values:
            raise HttpBenchError(f"{request_url}: {self.status} without a Location header")
        return urljoin(request_url, values[0])


def curl(endpoint: Endpoint, session: Session, method: str, url: str, *, upload: Path | None = None,
         extra_headers: dict[str, str] | None = None, expect: int) -> CurlResult:
    """One request with curl; the response body is discarded, its status must be `expect`."""
    headers = {**session.headers, **(extra_headers or {})}
    cmd = ["curl", "--silent", "--show-error", "--http1.1", "--output", "/dev/null",
           "--write-out", "%{json}%{header_json}", *endpoint.curl_args()]
    if method != ("PUT" if upload else "GET"):  # what curl does anyway (it says so when told)
        cmd += ["--request", method]
    # Expect: 100-continue would add a round trip (and a 1 s wait where nobody answers 100) that no
    # registry client makes.
    cmd += ["--header", "Expect:"]
    for name, value in headers.items():
        cmd += ["--header", f"{name}: {value}"]
    if upload is not None:
        cmd += ["--upload-file", str(upload)]
    proc = subprocess.run([*cmd, url], capture_output=True, text=True, env=CLIENT_ENV,
                          stdin=subprocess.DEVNULL, timeout=TRANSFER_TIMEOUT)
    if proc.returncode != 0:
        raise HttpBenchError(f"{endpoint.name}: curl {method} {url} exited {proc.returncode}: {proc.stderr.strip()}")
    return _curl_result(endpoint, method, url, proc.stdout, expect)


def _curl_result(endpoint: Endpoint, method: str, url: str, stdout: str, expect: int) -> CurlResult:
    decoder = json.JSONDecoder()
    info, end = decoder.raw_decode(stdout)
    headers, _ = decoder.raw_decode(stdout[end:].lstrip())
    result = CurlResult(int(info["http_code"]), float(info["time_total"]), int(info["size_download"]),
                        int(info["size_upload"]), {k.lower(): v for k, v in headers.items()})
    if result.status != expect:
        raise HttpBenchError(f"{endpoint.name}: {method} {url} answered {result.status}, expected {expect}")
    return result


# -- raw transfers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlobFile:
    """Random data on disk, with its digest (computed while writing, outside any timing)."""

    path: Path
    digest: str
    size: int


def random_blob(path: Path, size: int, chunk: int = 4 * MiB) -> BlobFile:
    """Fresh random data: a new digest, so the registry stores a new blob (a real upload)."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            data = os.urandom(min(chunk, left))
            digest.update(data)
            f.write(data)
            left -= len(data)
    return BlobFile(path, f"sha256:{digest.hexdigest()}", size)


def _check_same_origin(endpoint: Endpoint, url: str) -> None:
    """An upload Location must lead back through this path, or the path would measure another one."""
    if urlsplit(url).netloc != urlsplit(endpoint.origin).netloc:
        raise HttpBenchError(f"{endpoint.name}: the upload Location {url} leaves this path ({endpoint.origin})")


def _with_digest(location: str, digest: str) -> str:
    return f"{location}{'&' if '?' in location else '?'}{urlencode({'digest': digest})}"


def get_blob(endpoint: Endpoint, session: Session, repo: str, blob: BlobFile) -> float:
    """GET a blob (body discarded); returns curl's seconds."""
    result = curl(endpoint, session, "GET", endpoint.url(repo, f"blobs/{blob.digest}"), expect=200)
    if result.downloaded != blob.size:
        raise HttpBenchError(f"{endpoint.name}: blob GET returned {result.downloaded} of {blob.size} bytes")
    return result.seconds


def upload_blob(endpoint: Endpoint, session: Session, repo: str, blob: BlobFile, *, chunked: bool) -> float:
    """Upload a blob: POST a session, then either PUT it whole with the digest (monolithic) or PATCH
    it as one chunk and PUT the digest with an empty body (chunked). Returns the requests' seconds."""
    start_url = endpoint.url(repo, "blobs/uploads/")
    started = curl(endpoint, session, "POST", start_url, extra_headers={"Content-Length": "0"}, expect=202)
    location = started.location(start_url)
    _check_same_origin(endpoint, location)
    octets = {"Content-Type": "application/octet-stream"}
    if not chunked:
        put = curl(endpoint, session, "PUT", _with_digest(location, blob.digest), upload=blob.path,
                   extra_headers=octets, expect=201)
        moved, seconds = put.uploaded, started.seconds + put.seconds
    else:
        patch = curl(endpoint, session, "PATCH", location, upload=blob.path, extra_headers=octets, expect=202)
        location = patch.location(location)
        _check_same_origin(endpoint, location)
        commit = curl(endpoint, session, "PUT", _with_digest(location, blob.digest),
                      extra_headers={"Content-Length": "0"}, expect=201)
        moved, seconds = patch.uploaded, started.seconds + patch.seconds + commit.seconds
    if moved != blob.size:
        raise HttpBenchError(f"{endpoint.name}: uploaded {moved} of {blob.size} bytes")
    return seconds


def concurrent_gets(endpoint: Endpoint, session: Session, repo: str, blob: BlobFile, count: int) -> list[float]:
    """`count` curl GETs of the blob at once (one process each); each one's seconds."""
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(lambda _: get_blob(endpoint, session, repo, blob), range(count)))


# -- small requests --------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """One run of a load generator: keep-alive requests at a fixed concurrency."""

    tool: str
    requests: int
    seconds: float
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    non_2xx: int  # responses outside 2xx (wrk: outside 2xx/3xx)
    errors: int  # connect/read/write errors and timeouts

    def check(self, what: str, tolerance: float = 0.01) -> None:
        """A run of refusals or errors measured the refusal, not the path (a stray timeout under
        load is reported, not fatal)."""
        if self.requests == 0 or self.non_2xx + self.errors > tolerance * self.requests:
            raise HttpBenchError(f"{what}: {self.requests} requests, {self.non_2xx} non-2xx responses, "
                                 f"{self.errors} errors ({self.tool}): not a measurement")


def small_request_tool(endpoint: Endpoint) -> str:
    """wrk where it can go (no forward proxy), else ab -k, else curl --parallel (which speaks to proxies)."""
    if endpoint.forward_proxy is None and shutil.which("wrk"):
        return "wrk"
    if endpoint.forward_proxy is None and shutil.which("ab"):
        return "ab"
    return "curl"


@dataclass
class LoadPlan:
    """One load-generator run, ready to go: for curl, sized by a warm-up run already made."""

    tool: str  # "wrk", "ab" or "curl"
    endpoint: Endpoint
    url: str
    headers: dict[str, str]  # the session's, and the request's own
    connections: int
    seconds: float
    count: int = 0  # curl: requests to make (it has no duration option)


def plan_load(tool: str, endpoint: Endpoint, session: Session, url: str, headers: dict[str, str],
              connections: int, seconds: float) -> LoadPlan:
    """A run of `tool`; for curl, a short warm-up run first (outside any metering) sizes it to
    last about `seconds`."""
    plan = LoadPlan(tool, endpoint, url, {**session.headers, **headers}, connections, seconds)
    if tool == "curl":
        warm = _curl_batch(endpoint, url, plan.headers, connections, 20 * connections)
        plan.count = max(100, round(warm.requests_per_second * seconds))
    return plan


def run_load(plan: LoadPlan) -> LoadResult:
    if plan.tool == "wrk":
        return wrk_load(plan.url, plan.headers, plan.connections, plan.seconds)
    if plan.tool == "ab":
        return ab_load(plan.url, plan.headers, plan.connections, plan.seconds)
    return _curl_batch(plan.endpoint, plan.url, plan.headers, plan.connections, plan.count)


_DURATION_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if not m:
        raise HttpBenchError(f"wrk: unexpected duration {value!r}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def wrk_load(url: str, headers: dict[str, str], connections: int, seconds: float) -> LoadResult:
    cmd = ["wrk", "--threads", str(min(connections, 2)), "--connections", str(connections),
           "--duration", f"{seconds:g}s", "--timeout", "10s", "--latency"]
    for name, value in headers.items():
        cmd += ["--header", f"{name}: {value}"]
    proc = subprocess.run([*cmd, url], capture_output=True, text=True, env=CLIENT_ENV,
                          stdin=subprocess.DEVNULL, timeout=seconds + 60)
    out = proc.stdout
    if proc.returncode != 0 or "Requests/sec" not in out:
        raise HttpBenchError(f"wrk exited {proc.returncode}: {proc.stderr.strip() or out.strip()}")
    done = re.search(r"(\d+) requests in ([\d.]+\w+)", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    percentile = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.MULTILINE))
    if done is None or rate is None or set(percentile) != {"50", "99"}:
        raise HttpBenchError(f"wrk: cannot read its output:\n{out}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return LoadResult(
        "wrk", int(done.group(1)), _ms(done.group(2)) / 1e3, float(rate.group(1)),
        _ms(percentile["50"]), _ms(percentile["99"]),
        int(non_2xx.group(1)) if non_2xx else 0,
        sum(map(int, socket_errors.groups())) if socket_errors else 0)


def ab_load(url: str, headers: dict[str, str], connections: int, seconds: float) -> LoadResult:
    # -t alone caps the run at 50000 requests; -n after it lifts the cap (ab reads options in order).
    cmd = ["ab", "-k", "-q", "-c", str(connections), "-t", str(max(1, round(seconds))), "-n", "100000000"]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    proc = subprocess.run([*cmd, url], capture_output=True, text=True, env=CLIENT_ENV,
                          stdin=subprocess.DEVNULL, timeout=seconds + 60)
    out = proc.stdout
    if proc.returncode != 0 or "Requests per second" not in out:
        raise HttpBenchError(f"ab exited {proc.returncode}: {proc.stderr.strip() or out.strip()}")

    def number(pattern: str, default: str | None = None) -> float:
        m = re.search(pattern, out, re.MULTILINE)
        if m is None and default is None:
            raise HttpBenchError(f"ab: no {pattern!r} in its output")
        return float(m.group(1) if m else default)  # type: ignore[arg-type]

    return LoadResult("ab -k", int(number(r"Complete requests:\s+(\d+)")), number(r"Time taken for tests:\s+([\d.]+)"),
                      number(r"Requests per second:\s+([\d.]+)"), number(r"^\s+50%\s+(\d+)"),
                      number(r"^\s+99%\s+(\d+)"), int(number(r"Non-2xx responses:\s+(\d+)", "0")),
                      int(number(r"Failed requests:\s+(\d+)", "0")))


def _curl_batch(endpoint: Endpoint, url: str, headers: dict[str, str], connections: int, count: int) -> LoadResult:
    config = "".join(f'url = "{url}"\noutput = "/dev/null"\n' for _ in range(count))
    cmd = ["curl", "--silent", "--show-error", "--http1.1", "--parallel", "--parallel-immediate",
           "--parallel-max", str(connections), "--write-out", "%{http_code} %{time_total}\\n",
           *endpoint.curl_args(), "--config", "-"]
    for name, value in headers.items():
        cmd += ["--header", f"{name}: {value}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, input=config, capture_output=True, text=True, env=CLIENT_ENV,
                          timeout=TRANSFER_TIMEOUT)
    wall = time.perf_counter() - t0
    lines = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    statuses = [int(code) for code, _ in lines]
    latencies = sorted(float(t) * 1e3 for _, t in lines)
    if not latencies:
        raise HttpBenchError(f"{endpoint.name}: curl --parallel exited {proc.returncode}: {proc.stderr.strip()}")
    return LoadResult("curl --parallel", len(lines), wall, len(lines) / wall,
                      statistics.median(latencies), latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
                      sum(1 for s in statuses if not 200 <= s < 300), count - len(lines) + (proc.returncode != 0))


# -- many idle connections -------------------------------------------------------------------------


def _connect(endpoint: Endpoint) -> http.client.HTTPConnection:
    origin = urlsplit(endpoint.origin)
    host, port = origin.hostname or "", origin.port or (443 if origin.scheme == "https" else 80)
    if origin.scheme == "http":
        return http.client.HTTPConnection(host, port, timeout=60)
    context = ssl.create_default_context(cafile=str(endpoint.cafile) if endpoint.cafile else None)
    proxy = endpoint.forward_proxy
    if proxy is None:
        return http.client.HTTPSConnection(host, port, timeout=60, context=context)
    conn = http.client.HTTPSConnection(proxy.host, proxy.port, timeout=60, context=context)
    authorization = proxy.authorization()
    conn.set_tunnel(host, port, headers={"Proxy-Authorization": authorization} if authorization else None)
    return conn


@dataclass
class OpenConnections:
    """Keep-alive connections that each answered one request and stay open."""

    connections: list[http.client.HTTPConnection] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)


@contextlib.contextmanager
def open_connections(endpoint: Endpoint, session: Session, url: str, headers: dict[str, str],
                     count: int) -> Iterator[OpenConnections]:
    """`count` connections, all connected first, then each sending one GET of `url` at about the same
    time; all stay open (keep-alive, response read) until the block ends."""
    path = urlsplit(url)._replace(scheme="", netloc="").geturl()
    start = threading.Barrier(count)
    held = OpenConnections()
    lock = threading.Lock()

    def one(_: int) -> int:
        conn = _connect(endpoint)
        with lock:
            held.connections.append(conn)  # closed at the end whatever happens
        try:
            conn.connect()
            start.wait(timeout=120)
        except Exception:
            start.abort()  # the others stop waiting for this one
            raise
        conn.request("GET", path, headers={**session.headers, **headers})
        resp = conn.getresponse()
        resp.read()
        return resp.status

    try:
        try:
            with ThreadPoolExecutor(max_workers=count) as pool:
                held.statuses = list(pool.map(one, range(count)))
        except (OSError, http.client.HTTPException, threading.BrokenBarrierError) as e:
            raise HttpBenchError(f"{endpoint.name}: {count} connections: {e!r}") from None
        yield held
    finally:
        for conn in held.connections:
            conn.close()
