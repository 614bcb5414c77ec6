#!/usr/bin/env python3
"""krill benchmarks, side by side with Serf and Mosquitto, in the mesh lab.

Run by scripts/bench (root: network namespaces). Every figure is the median of
several runs with min and max. Writes bench/report.md and bench/latency.png.
The measuring process joins the lab's hub namespace, so all traffic stays on the
lab's own bridge.
"""

import ctypes
import http.client
import json
import os
import platform
import re
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB = os.path.join(ROOT, "scripts", "mesh-lab")
BIN = os.path.join(ROOT, "target", "release", "krill")
PREFIX = "kb"
DIR = f"/tmp/krill-lab-{PREFIX}"
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
LOAD = os.path.join(ROOT, "target", "release", "examples", "krill-load")
UPDATES = 1000  # per propagation run
SETTLE = 12  # seconds after the mesh forms before an idle figure is read
ENV = dict(os.environ, KRILL_LAB=PREFIX, KRILL_BIN=BIN)
CTX = ssl.create_default_context()
CTX.check_hostname = False
CTX.verify_mode = ssl.CERT_NONE  # measurement only; the product pins certificates

results = {}  # section -> rows


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sh(*args, check=True, quiet=True):
    r = subprocess.run(args, env=ENV, capture_output=quiet, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{args}: {r.stderr}")
    return r.stdout if quiet else ""


def lab(*args):
    return sh(LAB, *args)


def enter_hub():
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(f"/run/netns/{PREFIX}-hub", os.O_RDONLY)
    if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
        raise OSError(ctypes.get_errno(), "setns")
    os.close(fd)


def up(n, *opts):
    lab("up", str(n), *opts)
    enter_hub()


def addr(i):
    try:
        return open(f"{DIR}/{i}/addr").read().strip()
    except OSError:
        return f"10.77.0.{10 + i}"


def bearer(i):
    return open(f"{DIR}/{i}/cred/pin_derived_key").read().strip()


def install_id(i):
    for _ in range(200):
        try:
            return open(f"{DIR}/{i}/state/install_id").read().strip()
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"host {i} has no install_id")


def call(i, method, path, body=None, timeout=2):
    c = http.client.HTTPSConnection(addr(i), 8442, context=CTX, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {bearer(i)}"}
        data = None
        if body is not None:
            data = json.dumps(body)
            headers["Content-Type"] = "application/json"
        c.request(method, path, body=data, headers=headers)
        r = c.getresponse()
        text = r.read()
        return r.status, (json.loads(text) if text else None)
    finally:
        c.close()


def peers(i):
    try:
        s, v = call(i, "GET", "/network/peers")
        return {p["installId"]: p["status"] for p in v["peers"]} if s == 200 else {}
    except (OSError, http.client.HTTPException, ValueError):
        return {}


def wait(cond, limit):
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


def full_mesh(hosts):
    ids = {i: install_id(i) for i in hosts}
    for i in hosts:
        p = peers(i)
        if any(p.get(ids[j]) != "connected" for j in hosts if j != i):
            return False
    return True


def pid_of(i):
    return int(open(f"{DIR}/{i}/pid").read())


def rss_threads(pid):
    st = open(f"/proc/{pid}/status").read()
    rss = int(re.search(r"VmRSS:\s+(\d+)", st).group(1))
    threads = int(re.search(r"Threads:\s+(\d+)", st).group(1))
    return rss, threads


def anon_kib(pid):
    """Private memory: RSS less the pages of the binary and libraries (shared, and
    dropped first under memory pressure)."""
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith("Anonymous:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def med(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    return (statistics.median(xs), min(xs), max(xs))


def fmt(m, unit="", scale=1.0, digits=0):
    if m == "n/a":
        return "n/a"
    md, lo, hi = (v * scale for v in m)
    return f"{md:.{digits}f}{unit} ({lo:.{digits}f}–{hi:.{digits}f})"


# ---- Serf ---------------------------------------------------------------------

def serf_start(i, join=None):
    a = addr(i)
    args = ["ip", "netns", "exec", f"{PREFIX}-{i}", "serf", "agent", f"-node=h{i}",
            f"-bind={a}:7946", "-rpc-addr=127.0.0.1:7373", "-log-level=err"]
    # Serf's mDNS discovery (-discover) polls IPv6 ff02::fb, which the lab does not
    # route; every agent but the first joins the first instead (Serf's usual setup).
    args += [f"-join={join}"] if join else []
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p


def serf_members(i):
    r = subprocess.run(["ip", "netns", "exec", f"{PREFIX}-{i}", "serf", "members",
                        "-rpc-addr=127.0.0.1:7373", "-format=json"], capture_output=True, text=True)
    try:
        return {m["name"]: m["status"] for m in json.loads(r.stdout)["members"]}
    except (ValueError, KeyError):
        return {}


def serf_full(hosts):
    for i in hosts:
        m = serf_members(i)
        if any(m.get(f"h{j}") != "alive" for j in hosts):
            return False
    return True


def serf_cluster(n):
    """A lab of n hosts with no krill running, and a Serf agent on each."""
    up(n, "--conf", "beacons = false")
    for i in range(1, n + 1):
        lab("kill", str(i), "KILL")
    time.sleep(0.3)
    first = serf_start(1)
    time.sleep(0.3)
    return [first] + [serf_start(i, join=f"{addr(1)}:7946") for i in range(2, n + 1)]


# ---- sections --------------------------------------------------------------------

def footprint():
    rows = []
    for peers_n in (0, 4, 15):
        rss, thr, anon = [], [], []
        for _ in range(RUNS):
            up(peers_n + 1)
            if peers_n:
                wait(lambda: full_mesh(list(range(1, peers_n + 2))), 20)
            # Idle = settled: connection threads of the start-up calls (trust, health,
            # peer exchange) leave 5 s after their last request.
            time.sleep(SETTLE)
            r, t = rss_threads(pid_of(1))
            anon.append(anon_kib(pid_of(1)) / 1024)
            rss.append(r / 1024)
            thr.append(t)
        rows.append((f"krill, {peers_n} peers", fmt(med(rss), " MiB", digits=1), fmt(med(anon), " MiB", digits=1), fmt(med(thr))))
    # CPU per idle minute with 15 peers (a 20 s window, scaled).
    cpu = []
    for _ in range(RUNS):
        up(16)
        wait(lambda: full_mesh(list(range(1, 17))), 20)
        time.sleep(2)
        c0 = cpu_seconds(pid_of(1))
        time.sleep(20)
        cpu.append((cpu_seconds(pid_of(1)) - c0) * 3)
    results["cpu_krill"] = fmt(med(cpu), " s", digits=2)
    results["cpu15"] = med(cpu)[0] if cpu else None
    # Serf in the same 16-host lab.
    srss, sthr, scpu, sanon = [], [], [], []
    for _ in range(RUNS):
        procs = serf_cluster(16)
        wait(lambda: serf_full(list(range(1, 17))), 30)
        time.sleep(SETTLE)
        pid = procs[0].pid
        # ip netns exec execs serf: the same pid.
        r, t = rss_threads(pid)
        srss.append(r / 1024)
        sanon.append(anon_kib(pid) / 1024)
        sthr.append(t)
        c0 = cpu_seconds(pid)
        time.sleep(20)
        scpu.append((cpu_seconds(pid) - c0) * 3)
        for p in procs:
            p.kill()
    rows.append(("serf agent, 15 peers", fmt(med(srss), " MiB", digits=1), fmt(med(sanon), " MiB", digits=1), fmt(med(sthr))))
    results["cpu_serf"] = fmt(med(scpu), " s", digits=2)
    results["footprint"] = rows
    size = os.path.getsize(BIN) / 1024 / 1024
    serf_bin = subprocess.run(["sh", "-c", "command -v serf"], capture_output=True, text=True).stdout.strip()
    results["size"] = (f"{size:.2f} MiB", f"{os.path.getsize(serf_bin) / 1024 / 1024:.2f} MiB")
    results["rss15"] = (med(rss)[0] if rss else None, med(srss)[0] if srss else None)
    results["threads15"] = med(thr)[0] if thr else None


def discovery():
    rows = []
    for n in (4, 8, 16):
        k, s = [], []
        for _ in range(RUNS):
            # From the last start (the lab starts every server at the end of `up`).
            up(n)
            k.append(wait(lambda: full_mesh(list(range(1, n + 1))), 30))
            procs = serf_cluster(n)
            t0 = time.monotonic()
            t = wait(lambda: serf_full(list(range(1, n + 1))), 30)
            s.append(t)
            for p in procs:
                p.kill()
        rows.append((n, fmt(med(k), " s", digits=2), fmt(med(s), " s", digits=2)))
    results["discovery"] = rows


def failure():
    rows = []
    n = 6
    for fault in ("SIGKILL", "link down", "SIGTERM"):
        k, s = [], []
        for _ in range(RUNS):
            up(n)
            wait(lambda: full_mesh(list(range(1, n + 1))), 20)
            gone = install_id(n)
            t0 = time.monotonic()
            if fault == "SIGKILL":
                lab("kill", str(n), "KILL")
            elif fault == "SIGTERM":
                lab("kill", str(n), "TERM")
            else:
                lab("link", str(n), "down")
            t = wait(lambda: all(peers(i).get(gone) not in ("connected", None) for i in range(1, n)), 30)
            k.append(t)
            procs = serf_cluster(n)
            wait(lambda: serf_full(list(range(1, n + 1))), 30)
            t0 = time.monotonic()
            if fault == "SIGKILL":
                procs[-1].kill()
            elif fault == "SIGTERM":
                procs[-1].send_signal(2)  # SIGINT: serf's graceful leave (SIGTERM is not, by default)
            else:
                lab("link", str(n), "down")
            t = wait(lambda: all(serf_members(i).get(f"h{n}") in ("failed", "left") for i in range(1, n)), 30)
            s.append(t)
            for p in procs:
                p.kill()
        rows.append((fault, fmt(med(k), " s", digits=2), fmt(med(s), " s", digits=2)))
        results.setdefault("failure_num", {})[fault] = (med(k), med(s))
    results["failure"] = rows


def sse_listener(i, node_id, seen, stop):
    """Reads host i's /sse?scope=all and records when each value of node_id arrives."""
    c = http.client.HTTPSConnection(addr(i), 8442, context=CTX, timeout=10)
    c.request("GET", "/sse?scope=all", headers={"Authorization": f"Bearer {bearer(i)}"})
    r = c.getresponse()
    buf = b""
    while not stop.is_set():
        chunk = r.read1(65536)
        if not chunk:
            break
        now = time.monotonic()
        buf += chunk
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            if b"event: node" not in ev:
                continue
            data = ev.split(b"data: ", 1)[1]
            n = json.loads(data)
            if n.get("id") == node_id:
                seen.setdefault(n["meta"]["value"], now)
    c.close()


def krill_latency():
    """One run: 1000 values set on host 1 of a 2-host lab, seen on host 2's SSE."""
    up(2)
    wait(lambda: full_mesh([1, 2]), 20)
    call(1, "PUT", "/nodes/lat", {"type": "DataPoint", "name": "lat", "meta": {"value": -1}})
    time.sleep(1)
    seen, stop = {}, threading.Event()
    th = threading.Thread(target=sse_listener, args=(2, "lat", seen, stop), daemon=True)
    th.start()
    time.sleep(0.5)
    c = http.client.HTTPSConnection(addr(1), 8442, context=CTX, timeout=5)
    sent = {}
    for v in range(UPDATES):
        body = json.dumps({"value": v})
        sent[v] = time.monotonic()
        c.request("POST", "/nodes/lat/value", body=body,
                  headers={"Authorization": f"Bearer {bearer(1)}", "Content-Type": "application/json"})
        c.getresponse().read()
        time.sleep(0.005)
    time.sleep(1)
    stop.set()
    c.close()
    lab("down")
    return latencies(sent, seen)


def latencies(sent, seen):
    """Milliseconds from sending to seeing each value that arrived, sorted."""
    return sorted((seen[v] - sent[v]) * 1000 for v in sent if v in seen)


def mosquitto_latency(tls):
    """One run: two Mosquitto brokers bridged, publish on one, subscribe on the other;
    with `tls`, every hop is TLS (as krill's always are), with a self-signed P-256
    certificate that neither the bridge nor the clients check (nor does this bench
    check krill's: the product pins them)."""
    import paho.mqtt.client as mqtt  # installed by scripts/bench

    up(2)  # the lab's namespaces; its krill servers make way for the brokers
    lab("kill", "1", "KILL")
    lab("kill", "2", "KILL")
    port = 8883 if tls else 1883
    tls_conf, cert = "", f"{DIR}/mosq-cert.pem"
    if tls:
        sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
           "-nodes", "-subj", "/CN=bench", "-days", "2", "-keyout", f"{DIR}/mosq-key.pem", "-out", cert)
        os.chmod(f"{DIR}/mosq-key.pem", 0o644)  # the broker drops root before reading it
        tls_conf = f"certfile {cert}\nkeyfile {DIR}/mosq-key.pem\n"
    procs = []
    for i in (1, 2):
        bridge = ""
        if i == 2:
            bridge = f"connection br\naddress {addr(1)}:{port}\ntopic # both 0\n"
            if tls:
                bridge += f"bridge_cafile {cert}\nbridge_insecure true\n"
        conf = f"{DIR}/mosq{i}.conf"
        open(conf, "w").write(f"per_listener_settings false\nlistener {port} {addr(i)}\n{tls_conf}"
                              f"allow_anonymous true\npersistence false\n{bridge}")
        procs.append(subprocess.Popen(["ip", "netns", "exec", f"{PREFIX}-{i}", "mosquitto", "-c", conf],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(2)

    def client():
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2) if hasattr(mqtt, "CallbackAPIVersion") else mqtt.Client()
        if tls:
            c.tls_set(cert_reqs=ssl.CERT_NONE)
            c.tls_insecure_set(True)
        return c

    mseen = {}
    sub = client()
    sub.on_message = lambda c, u, m: mseen.setdefault(int(m.payload), time.monotonic())
    sub.connect(addr(2), port)
    sub.subscribe("bench/lat", 0)
    sub.loop_start()
    pub = client()
    pub.connect(addr(1), port)
    pub.loop_start()
    time.sleep(1)
    msent = {}
    for v in range(UPDATES):
        msent[v] = time.monotonic()
        pub.publish("bench/lat", str(v), qos=0).wait_for_publish()
        time.sleep(0.005)
    time.sleep(1)
    sub.loop_stop()
    pub.loop_stop()
    for p in procs:
        p.kill()
        p.wait()
    lab("down")
    return latencies(msent, mseen)


# key, table row, chart line, one run's measurement
PROPAGATION = (("krill", "krill", "krill (HTTPS POST -> SSE)", krill_latency),
               ("mosq", "Mosquitto bridge", "Mosquitto bridge (publish -> subscribe)",
                lambda: mosquitto_latency(False)),
               ("mosq_tls", "Mosquitto bridge over TLS", "Mosquitto bridge over TLS",
                lambda: mosquitto_latency(True)))


def propagation():
    """Each run measures all three in turn, so they share the machine's state."""
    for _ in range(RUNS):
        for key, _, _, measure in PROPAGATION:
            lat = measure()
            results.setdefault(f"{key}_runs", []).append(lat)
            log(f"  {key}: p50 {pct(lat, 50):.2f} ms, p99 {pct(lat, 99):.2f} ms, lost {UPDATES - len(lat)}")


def pct(xs, p):
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def load(n, conns, batch, rate, secs=5):
    """One krill-load run against host 1 of an n-host lab, watching the others."""
    watch = ",".join(f"{addr(i)}:8442" for i in range(2, n + 1))
    r = subprocess.run([LOAD, "--post", f"{addr(1)}:8442", "--watch", watch, "--bearer", bearer(1),
                        "--node", "tp", "--conns", str(conns), "--secs", str(secs), "--rate", str(rate),
                        "--batch", str(batch)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"krill-load: {r.stderr}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["lost"] = max(w["missing"] for w in out["watchers"].values())
    out["resyncs"] = max(w["snapshots"] - 1 for w in out["watchers"].values())
    return out


def throughput():
    """Updates from one host that all 3 others receive, every one of them (each
    other host's /sse?scope=all is read to check). Two ways of sending: one HTTPS
    request per value, and POST /values batches of 10. First as fast as the
    acknowledgements allow, then at offered rates stepping up until values are lost
    or the acknowledged rate falls short of the offered one."""
    n = 4
    rows = []
    for mode, conns, batch in (("one value per request", 32, 1), ("batches of 10 values", 8, 10)):
        best, top = [], []
        for _ in range(RUNS):
            up(n)
            wait(lambda: full_mesh(list(range(1, n + 1))), 20)
            call(1, "PUT", "/nodes/tp", {"type": "DataPoint", "name": "tp", "meta": {"value": -1}})
            time.sleep(1)
            free = load(n, conns, batch, 0)
            log(f"  {mode}: unpaced {free['rate']:.0f}/s, lost {free['lost']}")
            sustained, limit = None, None
            if free["lost"] == 0:
                sustained = free["rate"]
            rate = 5000
            while rate <= 200000:
                r = load(n, conns, batch, rate)
                ok = r["lost"] == 0 and r["errors"] == 0 and r["rate"] >= 0.97 * rate
                log(f"  {mode}: offered {rate}/s -> {r['rate']:.0f}/s, lost {r['lost']}, ok={ok}")
                if not ok:
                    limit = (rate, r["rate"], r["lost"])
                    break
                sustained = max(sustained or 0, r["rate"])
                rate *= 2 if rate < 20000 else 1.5
                rate = int(rate)
            best.append(sustained)
            top.append(limit)
        lim = [t for t in top if t]
        results.setdefault("tp_num", {})[mode] = med(best)
        rows.append((mode, conns, fmt(med(best), "/s"),
                     "; ".join(f"offered {o}/s: {a:.0f}/s acknowledged, {lost} lost" for o, a, lost in lim) or "not reached"))
    results["throughput"] = rows


def targets():
    """The issue's targets, each met or not with the measured ratio."""
    rows = []

    def row(what, value, limit, ok):
        rows.append(f"| {what} | {value} | {limit} | {'met' if ok else '**not met**'} |")

    def m(x):
        return x[0] if isinstance(x, tuple) else None

    if "rss15" in results:
        k, sf = results["rss15"]
        if k and sf:
            row("idle RSS, 15 peers", f"{k:.1f} MiB ({k / 8:.2f} of 8 MiB, {k / sf:.2f} of Serf's {sf:.1f})",
                "≤ 8 MiB and ≤ 0.5 × Serf", k <= 8 and k <= sf / 2)
        t = results.get("threads15")
        if t:
            row("threads, 15 peers", f"{t:.0f} ({t / 36:.2f} of 36)", "≤ 6 + 2 × 15 = 36", t <= 36)
        c = results.get("cpu15")
        if c is not None:
            row("idle CPU, 15 peers", f"{c:.2f} s/min ({c / 0.5:.2f} of 0.5)", "< 0.5 s/min", c < 0.5)
    f = results.get("failure_num", {})
    if "link down" in f:
        k, sf = m(f["link down"][0]), m(f["link down"][1])
        if k is not None and sf is not None:
            row("silent failure (link down)", f"{k:.2f} s ({k / 3:.2f} of 3 s, {k / sf:.2f} of Serf's {sf:.2f} s)",
                "≤ 3 s and faster than Serf", k <= 3 and k < sf)
    if "SIGTERM" in f and m(f["SIGTERM"][0]) is not None:
        k = m(f["SIGTERM"][0])
        row("SIGTERM noticed", f"{k:.2f} s ({k / 0.5:.2f} of 0.5 s)", "< 0.5 s", k < 0.5)
    k, mq, mt = (m(med([pct(x, 99) for x in results.get(f"{key}_runs", [])])) for key, *_ in PROPAGATION)
    if k is not None and mq is not None:
        tls = f"; {k / mt:.2f} of the TLS bridge's {mt:.2f} ms" if mt else ""
        row("propagation p99", f"{k:.2f} ms ({k / 5:.2f} of 5 ms, {k / mq:.2f} of Mosquitto's {mq:.2f} ms{tls})",
            "≤ 5 ms and ≤ Mosquitto bridge", k <= 5 and k <= mq)
    for mode, v in results.get("tp_num", {}).items():
        x = m(v)
        if x is not None:
            row(f"throughput, {mode}", f"{x:.0f}/s ({x / 20000:.2f} of 20 000)", "≥ 20 000/s, none lost", x >= 20000)
    if not rows:
        return []
    return ["## Targets (issue 7)", "", "| target | measured (ratio) | limit | |", "|---|---|---|---|"] + rows + [""]


def report():
    os.makedirs(os.path.join(ROOT, "bench"), exist_ok=True)
    # Chart: latency distributions, all runs pooled (gnuplot).
    pooled = [(title, sorted(x for run in results.get(f"{key}_runs", []) for x in run))
              for key, _, title, _ in PROPAGATION]
    pooled = [(t, xs) for t, xs in pooled if xs]
    data = os.path.join(ROOT, "bench", "latency.dat")
    if pooled:
        with open(data, "w") as f:
            for n, (_, xs) in enumerate(pooled):
                if n:
                    f.write("\n\n")
                f.writelines(f"{x} {(i + 1) / len(xs):.5f}\n" for i, x in enumerate(xs))
        png = os.path.join(ROOT, "bench", "latency.png")
        plots = ", ".join(f"'{data}' index {n} using 1:2 with lines lw 2 title '{t}'" for n, (t, _) in enumerate(pooled))
        subprocess.run(["gnuplot", "-e", f"""
            set terminal pngcairo size 900,500; set output '{png}';
            set title 'Propagation latency, one host to another ({RUNS} runs of {UPDATES} updates)';
            set xlabel 'latency (ms)'; set ylabel 'fraction of updates'; set logscale x; set grid;
            set key bottom right;
            plot {plots}
        """], check=False)
        os.remove(data)
    v = subprocess.run([BIN, "--version"], capture_output=True, text=True).stdout.strip()
    serf_v = subprocess.run(["serf", "version"], capture_output=True, text=True).stdout.splitlines()[0]
    mosq_v = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "mosquitto"], capture_output=True, text=True).stdout
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
    steal = ""
    if "cpu_start" in results:
        d = [b - a for a, b in zip(results["cpu_start"], cpu_times())]
        if sum(d[:8]) > 0:
            # A virtual machine's cores are shared: how much of their time the host
            # gave to others, which slows every figure here, krill's and the rest.
            steal = f"; CPU steal during the run {100 * d[7] / sum(d[:8]):.0f} %"
    started = os.environ.get("BENCH_STARTED")
    whole = ""
    if started:
        t = round(time.time() - int(started))
        whole = f"; the whole `scripts/bench`, installs and build included: {t // 60} min {t % 60} s"
    lines = [
        "# krill benchmarks",
        "",
        f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {RUNS} runs per figure: median (min–max).",
        f"Machine: {cpu}, {os.cpu_count()} cores, Linux {platform.release()}{steal}.",
        f"Sections took: {', '.join(results.get('took', []))}{whole}.",
        f"Versions: {v}, serf {serf_v.split()[-1]}, mosquitto {mosq_v}. All in the mesh lab (network namespaces on one bridge).",
        "krill finds peers by multicast beacons; Serf agents join the first agent (its mDNS discovery",
        "polls IPv6, which the lab does not route). A Serf failure counts when every other agent says",
        "`failed` or `left`; Serf's graceful leave is SIGINT, used for its SIGTERM row.",
        "",
    ]
    if "footprint" in results:
        lines += [f"## Footprint (idle, {SETTLE} s after the mesh formed)", "",
                  "Private = RSS less the pages of the binary and shared libraries.", "",
                  "| server | RSS | private | threads |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in results["footprint"]]
        lines += ["", f"CPU per idle minute with 15 peers: krill {results['cpu_krill']}, serf {results['cpu_serf']}.",
                  f"Stripped binary: krill {results['size'][0]}; serf {results['size'][1]}.", ""]
    if "discovery" in results:
        lines += ["## Discovery: last start to full membership everywhere", "", "| servers | krill | serf |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in results["discovery"]]
        lines += [""]
    if "failure" in results:
        lines += ["## Failure detection: fault to every other server marking the host gone (6 servers)", "",
                  "| fault | krill | serf (failed/left) |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in results["failure"]]
        lines += [""]
    if pooled:
        lines += [f"## Propagation latency ({UPDATES} updates a run, one host to another)", "",
                  "Set on host 1 (krill: HTTPS `POST /nodes/lat/value`; Mosquitto: QoS 0 publish), seen by a",
                  "subscriber of host 2 (krill: `/sse?scope=all`). Python clients (http.client + ssl, paho-mqtt)",
                  "on both sides, one update every 5 ms. The TLS bridge row is for comparison: krill's hops are",
                  "always TLS, the plain bridge's are not.", "",
                  "| | p50 | p99 | max | lost |", "|---|---|---|---|---|"]
        for key, label, _, _ in PROPAGATION:
            runs = results.get(f"{key}_runs", [])
            if runs:
                cells = [fmt(med([pct(x, q) for x in runs]), " ms", digits=2) for q in (50, 99)]
                cells.append(fmt(med([x[-1] if x else None for x in runs]), " ms", digits=2))
                lost = sum(UPDATES - len(x) for x in runs)
                lines.append(f"| {label} | {' | '.join(cells)} | {lost} |")
        lines += ["", "![latency distributions](latency.png)", ""]
    if "throughput" in results:
        lines += ["## Throughput: updates from one host that each of 3 others receives, none lost", "",
                  "`examples/krill-load` (Rust, keep-alive HTTPS) posts to host 1 and reads `/sse?scope=all` of",
                  "hosts 2-4, checking every acknowledged value arrived at each. All 4 servers and the load",
                  "generator share the machine's cores. Sustained = highest acknowledged rate with nothing lost;",
                  "tops out = the first offered rate that lost values or fell short of the offer.", "",
                  "| sending | connections | sustained | tops out |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in results["throughput"]]
        lines += [""]
    lines += targets()
    open(os.path.join(ROOT, "bench", "report.md"), "w").write("\n".join(lines))
    print("\n".join(lines))


def cpu_times():
    return [int(x) for x in open("/proc/stat").readline().split()[1:]]


def main():
    sections = sys.argv[1:] or ["footprint", "discovery", "failure", "propagation", "throughput"]
    results["cpu_start"] = cpu_times()
    try:
        for s in sections:
            log(f"== {s}")
            t0 = time.monotonic()
            globals()[s]()
            took = time.monotonic() - t0
            results.setdefault("took", []).append(f"{s} {took:.0f} s")
            log(f"== {s}: {took:.0f} s")
    finally:
        subprocess.run(["pkill", "-x", "serf"])
        subprocess.run(["pkill", "-x", "mosquitto"])
        lab("down")
    report()


if __name__ == "__main__":
    main()
