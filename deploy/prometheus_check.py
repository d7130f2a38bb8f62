"""The shipped Prometheus configuration and alert rules, the HPAs' adapter queries and every Grafana panel's
queries, run in a real Prometheus against a running DvD stack on this machine.

    python deploy/prometheus_check.py                    # a tiny checkpoint, written to a temporary folder
    python deploy/prometheus_check.py --model DIR --out benchmarks/results/prometheus_check_cpu_tiny

Needs Debian's `prometheus` package (`apt-get install prometheus`: `prometheus` and `promtool`); without them
it says so and exits 0. What it does:
1. `promtool check config` and `check rules` on deploy/prometheus/, `promtool test rules` on the alerts' tests;
2. `dvd up`'s three servers on free ports, metrics on;
3. Prometheus with the shipped configuration: the same jobs, scrape interval and rule files, each target
   pointed at its local port, and the `namespace`/`pod` labels the Kubernetes ServiceMonitor gives (the
   adapter's queries select on them); compose's language-1, which runs no server here as in the cpu
   profile, at a port where nothing listens;
4. rounds of 4 concurrent chat completions with new images through the gateway (official `openai` client,
   half streamed), each round scraped before the next; the last held open until Prometheus has scraped its
   requests in flight (the HPA queries are also run then), then closed by the client;
5. once Prometheus has scraped them all: every panel query of grafana/dashboards/dvd.json (Grafana's
   `$__rate_interval` set to a window that holds the whole burst), every rule of
   k8s/prometheus-adapter/values.yaml as the adapter sends it (series discovery, then the metrics query for
   the HPA's pods), and the alert rules' health and state.
Writes OUT.json (every query and what it returned) and OUT.md (the same as tables), and exits 1 when a query
returns no series or NaN where the run must have produced data, a rule fails to evaluate, or an alert fires.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
sys.path[:0] = [str(ROOT), str(DEPLOY)]  # the tree this script is in: its launcher, and chat_with_image

import httpx  # noqa: E402
import yaml  # noqa: E402
from chat_with_image import image_data_url  # noqa: E402
from openai import OpenAI  # noqa: E402

from launcher import Stack, free_port  # noqa: E402

PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "dvd.json"
ADAPTER = DEPLOY / "k8s" / "prometheus-adapter" / "values.yaml"
AUTOSCALING = DEPLOY / "k8s" / "base" / "autoscaling.yaml"
NAMESPACE = "dvd"
# The pod each compose target stands for, as the ServiceMonitor would label it.
PODS = {"vision": "dvd-vision-0", "language-0": "dvd-language-0", "language-1": "dvd-language-1",
        "gateway": "dvd-gateway-0"}
HPA_PODS = {"dvd-vision": ["dvd-vision-0"], "dvd-language": ["dvd-language-0", "dvd-language-1"]}
IMAGE_SIZES = [(640, 480), (1600, 1200), (448, 448), (1280, 720)]
MAX_TOKENS = 8
# The held round's limit; the client closes those requests once Prometheus has scraped them in flight, and
# generating this many tokens outlasts a scrape interval (5 s) even at 1 ms a token.
HELD_TOKENS = 7000


@dataclass
class Query:
    source: str  # where it comes from: a dashboard panel, an adapter rule
    expr: str
    result: list[dict] = field(default_factory=list)  # [{"labels": {...}, "value": float}]
    problem: str = ""


def tools() -> tuple[str, str] | None:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    return (prometheus, promtool) if prometheus and promtool else None


def promtool_checks(promtool: str) -> list[dict]:
    """Each check's command, exit status and output; the shipped files as they are."""
    checks = []
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                 ["test", "rules", "alerts-test.yml"]):
        done = subprocess.run([promtool, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)
        checks.append({"command": f"promtool {' '.join(args)}", "exit": done.returncode,
                       "output": (done.stdout + done.stderr).strip()})
    return checks


def local_config(stack: Stack, spare_port: int) -> dict:
    """The shipped configuration with each compose target on its local port, labelled as in Kubernetes."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    ports = {"vision": stack.vision_metrics_port, "language-0": stack.language_metrics_port,
             "language-1": spare_port, "gateway": stack.gateway_port}
    for job in config["scrape_configs"]:
        groups = []
        for group in job["static_configs"]:
            for target in group["targets"]:
                host = target.rsplit(":", 1)[0]
                groups.append({"targets": [f"127.0.0.1:{ports[host]}"],
                               "labels": {**group.get("labels", {}), "namespace": NAMESPACE, "pod": PODS[host]}})
        job["static_configs"] = groups
    config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config.get("rule_files", [])]
    return config


class Prometheus:
    """A Prometheus server on a free loopback port, and its HTTP API."""

    def __init__(self, binary: str, config: dict, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def api(self, path: str, **params) -> dict | list:
        reply = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30).json()
        if reply["status"] != "success":
            raise RuntimeError(f"Prometheus {path} {params}: {reply.get('error')}")
        return reply["data"]

    def query(self, expr: str, at: float) -> list[dict]:
        data = self.api("query", query=expr, time=f"{at:.3f}")
        return [{"labels": r["metric"], "value": float(r["value"][1])} for r in data["result"]]

    def wait_until(self, condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with code {self.process.returncode}")
            try:
                if condition():
                    return
            except (httpx.HTTPError, RuntimeError, KeyError, IndexError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"not within {timeout_s:.0f} s: {what}")
            time.sleep(0.5)

    def wait_for_scrapes(self, selector: str, after: float, timeout_s: float = 60) -> None:
        """Until every target `selector` picks has been scraped since `after` (a Unix time)."""
        self.wait_until(lambda: self.query(f"min(timestamp({selector}))", time.time())[0]["value"] > after,
                        timeout_s, f"Prometheus scrapes {selector} again")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


class Client:
    """Chat completions with images through the gateway (official `openai` client)."""

    def __init__(self, gateway_url: str):
        self.openai = OpenAI(base_url=f"{gateway_url}/v1", api_key="none", timeout=300, max_retries=0)
        self.model = self.openai.models.list().data[0].id
        self.sent = 0

    @staticmethod
    def image(i: int) -> str:
        """A new image for every request: a language server's feature cache answers a repeated one without
        the vision server."""
        width, height = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        return image_data_url(width + 8 * (i // len(IMAGE_SIZES)), height)

    def request(self, images: list[str], max_tokens: int) -> dict:
        content = [{"type": "text", "text": "Describe the image."}]
        content += [{"type": "image_url", "image_url": {"url": url}} for url in images]
        return dict(model=self.model, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True},
                    messages=[{"role": "user", "content": content}])

    def streamed(self, kwargs: dict, stop: threading.Event | None = None) -> int:
        """Output chunks received; closes the stream (the gateway then aborts the request) once `stop` is set."""
        chunks = self.openai.chat.completions.create(stream=True, **kwargs)
        received = 0
        with chunks:
            for chunk in chunks:
                received += bool(chunk.choices and chunk.choices[0].delta.content)
                if stop is not None and stop.is_set():
                    break
        return received

    def one(self, i: int) -> int:
        """Request i: 1-2 new images, MAX_TOKENS tokens, every other one streamed."""
        kwargs = self.request([self.image(2 * i + k) for k in range(1 + i % 2)], MAX_TOKENS)
        return self.streamed(kwargs) if i % 2 else self.openai.chat.completions.create(**kwargs).usage.completion_tokens

    def round(self, concurrency: int = 4) -> dict:
        start, first = time.time(), self.sent
        self.sent += concurrency
        with ThreadPoolExecutor(concurrency) as pool:
            outputs = list(pool.map(self.one, range(first, self.sent)))
        return {"started": start, "seconds": round(time.time() - start, 2), "requests": concurrency,
                "images": sum(1 + i % 2 for i in range(first, self.sent)), "streamed": concurrency // 2,
                "max_tokens": MAX_TOKENS, "output_chunks_or_tokens": outputs}

    def held_round(self, during: Callable[[], dict], concurrency: int = 4) -> dict:
        """`concurrency` streamed requests of HELD_TOKENS tokens, one small new image each, running until
        `during()` returns; then the client closes them (the gateway counts 499, the servers `cancelled`)."""
        start, first, stop = time.time(), self.sent, threading.Event()
        self.sent += concurrency
        with ThreadPoolExecutor(concurrency) as pool:
            futures = [pool.submit(self.streamed, self.request([image_data_url(448 + 8 * i, 448)], HELD_TOKENS), stop)
                       for i in range(first, self.sent)]
            try:
                seen = during()
            finally:
                stop.set()
            outputs = [f.result() for f in futures]
        return {"started": start, "seconds": round(time.time() - start, 2), "requests": concurrency,
                "images": concurrency, "streamed": concurrency, "max_tokens": HELD_TOKENS,
                "output_chunks_or_tokens": outputs, "during": seen}


def dashboard_queries(rate_interval: str) -> list[Query]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [Query(f"dashboard: {panel['title']} / {target.get('legendFormat', target['refId'])}",
                  target["expr"].replace("$__rate_interval", rate_interval))
            for panel in dashboard["panels"] for target in panel["targets"]]


def adapter_queries() -> list[tuple[dict, Query, Query]]:
    """Per HPA metric: the HPA and its target, the adapter's series discovery, and its metrics query for the
    HPA's pods, with the adapter's template filled in as it fills it (pod=~"a|b", grouped by pod)."""
    rules = {rule["name"]["as"]: rule for rule in yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]}
    out = []
    for hpa in yaml.safe_load_all(AUTOSCALING.read_text()):
        target = hpa["spec"]["scaleTargetRef"]["name"]
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] != "Pods":
                continue
            name = metric["pods"]["metric"]["name"]
            rule = rules[name]
            matchers = f'namespace="{NAMESPACE}",pod=~"{"|".join(HPA_PODS[target])}"'
            expr = (rule["metricsQuery"].replace("<<.Series>>", name).replace("<<.LabelMatchers>>", matchers)
                    .replace("<<.GroupBy>>", "pod"))
            hpa_info = {"hpa": hpa["metadata"]["name"], "metric": name,
                        "target_average": metric["pods"]["target"]["averageValue"]}
            out.append((hpa_info, Query(f"adapter series: {name}", rule["seriesQuery"]),
                        Query(f"HPA {hpa_info['hpa']}: {name} (target {hpa_info['target_average']} per pod)", expr)))
    return out


def judge(query: Query) -> None:
    if not query.result:  # the servers create their labelled series at zero, so every query has one
        query.problem = "no series"
    elif any(math.isnan(r["value"]) for r in query.result):
        query.problem = "NaN: no observations in the window"


def under_load(prometheus: Prometheus) -> dict:
    """While the held round runs: once Prometheus has scraped the language server with requests in flight, the
    HPA queries as the adapter sends them then."""
    seen = "max(dvd_language_requests_in_flight) > 0"
    prometheus.wait_until(lambda: prometheus.query(seen, time.time()), 120, "a scrape with requests in flight")
    at = time.time()
    return {"query_time": at, "in_flight": prometheus.query("dvd_language_requests_in_flight", at),
            "hpa": {q.expr: prometheus.query(q.expr, at) for _, _, q in adapter_queries()}}


def observe(prometheus: Prometheus, gateway_url: str, rounds: int) -> dict:
    """Send the rounds of requests, each scraped before the next, the last one held open until Prometheus has
    scraped it in flight; then run every query. A counter with labels (requests by status or outcome) has no
    series until its first request, so rate() sees nothing of the first round, only of the rounds after it."""
    live = 'up{job=~"dvd-.*", pod!="' + PODS["language-1"] + '"}'
    prometheus.wait_until(lambda: len(prometheus.query(f"{live} == 1", time.time())) == 3, 60,
                          "Prometheus scrapes the three servers")
    client, done = Client(gateway_url), []
    for i in range(rounds):
        done.append(client.round() if i < rounds - 1 else client.held_round(lambda: under_load(prometheus)))
        prometheus.wait_for_scrapes(live, after=time.time())
    at = time.time()
    window = f"{max(60, math.ceil(at - done[0]['started']) + 15)}s"
    observed: dict = {
        "requests": {"model": client.model, "rounds": done,
                     **{k: sum(r[k] for r in done) for k in ("requests", "images", "streamed")}},
        "query_time": at, "rate_interval": window,
        # The counters themselves beside what rate()/increase() make of them (the lazily made label series).
        "counted": {"requests sent": client.sent,
                    **{expr: prometheus.query(expr, at) for expr in (
                        "sum by (status) (dvd_gateway_requests_total)",
                        f"sum by (status) (increase(dvd_gateway_requests_total[{window}]))",
                        "sum by (outcome) (dvd_vision_requests_total)",
                        "sum by (outcome) (dvd_language_requests_total)")}},
        "targets": [{"job": t["labels"]["job"], "pod": t["labels"]["pod"], "health": t["health"],
                     "url": t["scrapeUrl"]} for t in prometheus.api("targets")["activeTargets"]]}

    observed["dashboard"] = dashboard_results(prometheus, window, at)
    observed["hpa"] = hpa_results(prometheus, at, done[-1].get("during", {}).get("hpa", {}))
    observed["alerts"] = alert_states(prometheus)
    return observed


def dashboard_results(prometheus: Prometheus, window: str, at: float) -> list[dict]:
    """Every dashboard query at `at`, judged."""
    dashboard = dashboard_queries(window)
    for query in dashboard:
        query.result = prometheus.query(query.expr, at)
        judge(query)
    return [asdict(q) for q in dashboard]


def hpa_results(prometheus: Prometheus, at: float, held: dict) -> list[dict]:
    """Each autoscaler's metric as the adapter finds it (series discovery) and queries it, judged; `held`: the
    same queries' results while the last round was in flight."""
    results = []
    for hpa, discovery, metric_query in adapter_queries():
        discovery.result = [{"labels": s, "value": None}
                            for s in prometheus.api("series", **{"match[]": discovery.expr})]
        discovery.problem = "" if discovery.result else "no series"
        metric_query.result = prometheus.query(metric_query.expr, at)
        judge(metric_query)
        results.append({**hpa, "discovery": asdict(discovery), "query": asdict(metric_query),
                        "under_load": held.get(metric_query.expr)})
    return results


def alert_states(prometheus: Prometheus) -> list[dict]:
    """Every alert rule once Prometheus has evaluated them all."""
    def rules() -> list[dict]:
        return [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]

    prometheus.wait_until(lambda: all(not r["lastEvaluation"].startswith("0001") for r in rules()), 60,
                          "the alert rules have been evaluated")  # 0001-01-01: Go's zero time, never evaluated
    return [{"name": r["name"], "health": r["health"], "state": r.get("state"),
             "error": r.get("lastError", ""), "query": r["query"]} for r in rules()]


def failures_in(report: dict) -> list[str]:
    queries = report["dashboard"] + [h[k] for h in report["hpa"] for k in ("discovery", "query")]
    return ([f"{c['command']}: exit {c['exit']}" for c in report["promtool"] if c["exit"]]
            + [f"{q['source']}: {q['problem']}" for q in queries if q["problem"]]
            + [f"alert {a['name']}: {a['health']} {a['error']}".strip() for a in report["alerts"]
               if a["health"] != "ok"]
            + [f"alert {a['name']} is {a['state']} on a healthy stack" for a in report["alerts"]
               if a["state"] != "inactive"])


def run(model: str | None, out: Path | None, rounds: int, workdir: Path, binaries: tuple[str, str]) -> int:
    prometheus_bin, promtool = binaries
    version = subprocess.run([prometheus_bin, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    report: dict = {"machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                                "load_before": [round(v, 2) for v in os.getloadavg()]},
                    "prometheus": version, "promtool": promtool_checks(promtool)}
    if model is None:
        model = str(workdir / "tiny")
        subprocess.run([sys.executable, "-m", "dvd.cli", "checkpoint", model, "--preset", "tiny"], check=True,
                       cwd=ROOT, capture_output=True)
    stack = Stack(model=model, gateway_port=free_port(), vision_port=free_port(), language_port=free_port(),
                  feature_port=free_port(), vision_metrics_port=free_port(), language_metrics_port=free_port())
    (workdir / "logs").mkdir()
    with stack.servers(workdir / "logs").running(stack.ready(), what="the gateway reports both servers up"):
        prometheus = Prometheus(prometheus_bin, local_config(stack, spare_port=free_port()), workdir)
        try:
            report |= observe(prometheus, stack.gateway_url, rounds)
        finally:
            prometheus.stop()
    report["machine"]["load_after"] = [round(v, 2) for v in os.getloadavg()]
    report["failures"] = failures_in(report)
    markdown = to_markdown(report)
    print(markdown)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown)
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 1 if report["failures"] else 0


def cell(text: str) -> str:
    """Text for a Markdown table cell (PromQL's `a|b` would split it)."""
    return text.replace("|", "\\|")


def shown(result: list[dict], limit: int = 4) -> str:
    def one(r: dict) -> str:
        labels = {k: v for k, v in r["labels"].items() if k not in ("__name__", "namespace", "pod", "job")}
        value = "" if r["value"] is None else f" = {r['value']:.4g}"
        return (",".join(f"{k}={v}" for k, v in labels.items()) or "(all)") + value

    text = "; ".join(one(r) for r in result[:limit])
    return text + (f"; … {len(result) - limit} more" if len(result) > limit else "")


def to_markdown(report: dict) -> str:
    requests = report["requests"]
    lines = [
        "# Prometheus against a running CPU stack (deploy/prometheus_check.py)", "",
        f"{report['prometheus']}; host {report['machine']['host']}, {report['machine']['cpus']} CPUs, load "
        f"{report['machine']['load_before']} before, {report['machine']['load_after']} after.",
        f"Requests: {requests['requests']} chat completions ({requests['streamed']} streamed), {requests['images']} "
        f"images (each new), in {len(requests['rounds'])} rounds of 4 concurrent ones of up to "
        f"{', '.join(str(r['max_tokens']) for r in requests['rounds'])} tokens (`ignore_eos`), taking "
        f"{', '.join(str(r['seconds']) + ' s' for r in requests['rounds'])}, each round scraped before the next, "
        f"the last closed by the client once scraped in flight (model {requests['model']}). Queries at "
        f"{time.strftime('%H:%M:%S', time.gmtime(report['query_time']))} UTC, `$__rate_interval` = "
        f"{report['rate_interval']}.",
        "Counted: " + "; ".join(f"`{k}`: {v if isinstance(v, int) else shown(v)}"
                                for k, v in report["counted"].items()) + ".", "",
        "| promtool | result |", "|---|---|",
        *[f"| `{c['command']}` | {'SUCCESS' if c['exit'] == 0 else 'FAILED'}: "
          f"{' '.join(c['output'].split())[:120]} |" for c in report["promtool"]], "",
        "| target job | pod label | health |", "|---|---|---|",
        *[f"| {t['job']} | {t['pod']} | {t['health']} |" for t in report["targets"]], "",
        "## HPA queries (prometheus-adapter rules, as the adapter sends them)", "",
        "Series discovery (the adapter's `seriesQuery`), then the metrics query for the HPA's pods, after the run "
        "and while the last round ran (the scrape then read "
        f"{shown(report['requests']['rounds'][-1]['during']['in_flight'])} Generate calls in flight).", "",
        "| HPA metric (target per pod) | query | series | returned after the run | returned under load |",
        "|---|---|---|---|---|"]
    for hpa in report["hpa"]:
        for key in ("discovery", "query"):
            q = hpa[key]
            loaded = shown(hpa["under_load"] or []) if key == "query" else ""
            lines.append(f"| {hpa['metric']} ({hpa['target_average']}) | `{cell(q['expr'])}` | {len(q['result'])} | "
                         f"{cell(q['problem'] or shown(q['result']))} | {cell(loaded)} |")
    lines += ["", "## Grafana panel queries", "", "| panel / legend | query | series | returned |",
              "|---|---|---|---|"]
    for q in report["dashboard"]:
        lines.append(f"| {cell(q['source'].removeprefix('dashboard: '))} | `{cell(q['expr'])}` | {len(q['result'])} | "
                     f"{cell(q['problem'] or shown(q['result']))} |")
    lines += ["", "## Alert rules (deploy/prometheus/alerts.yml)", "", "| alert | health | state |", "|---|---|---|",
              *[f"| {a['name']} | {a['health']} {a['error']} | {a['state']} |" for a in report["alerts"]], "",
              f"Failures: {'; '.join(report['failures']) or 'none'}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: a tiny one, written to a temporary folder)")
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of 4 concurrent requests (at least 2)")
    args = parser.parse_args(argv)
    binaries = tools()
    if binaries is None:
        print("prometheus-check: SKIPPED, `prometheus` and `promtool` are not installed "
              "(Debian: apt-get install prometheus)")
        return 0
    with tempfile.TemporaryDirectory(prefix="dvd-prometheus-check.") as workdir:
        return run(args.model, args.out, args.rounds, Path(workdir), binaries)


if __name__ == "__main__":
    sys.exit(main())
