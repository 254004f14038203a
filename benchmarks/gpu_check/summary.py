"""gpu-check.json and gpu-check.md: rewritten after every step, so a run killed at any point returns what it found.

A family passes only if every test step of it passed (a dry run: collected at least one test without error) and
every sanitizer run of it (each tool under each backend) reached its workload's end with no error. Anything else
fails it: "fail", "timeout", "not run", "not reached", "skipped", "workload failed", a missing tool.
"""

from __future__ import annotations

import json
import os
import threading
import time

PASSING_TESTS = {"gpu": ("pass",), "dry-run": ("collected",)}


class Summary:
    def __init__(self, out: str, mode: str, header: dict):
        self.out, self.started = out, time.time()
        # A dry run's phases record side by side: every change of ``data`` and every save holds this.
        self.lock = threading.RLock()
        self.data = {"mode": mode, **header, "wall_s": 0.0, "phases": {}, "tools": {}, "tests": {}, "sanitizer": {},
                     "bench": {}, "families": {}}

    def phase(self, name: str, **fields) -> None:
        with self.lock:
            self.data["phases"].setdefault(name, {}).update(fields)
            self.save()

    def save(self) -> None:
        with self.lock:
            self.data["wall_s"] = round(time.time() - self.started, 1)
            self.data["families"] = {f: family_verdict(self.data, f) for f in self.data["plan"]["families"]}
            texts = (("gpu-check.json", json.dumps(self.data, indent=1)), ("gpu-check.md", markdown(self.data)))
            os.makedirs(self.out, exist_ok=True)
            for name, text in texts:
                tmp = os.path.join(self.out, name + ".tmp")
                with open(tmp, "w") as f:
                    f.write(text)
                os.replace(tmp, os.path.join(self.out, name))  # never a half-written file, even if killed here

    def failed_families(self) -> list[str]:
        return [f for f, v in self.data["families"].items() if v != "pass"]


def family_verdict(data: dict, family: str) -> str:
    """"pass" or "FAIL: <why>" from the tests and the sanitizer runs recorded so far (none recorded: not run)."""
    ok_tests = PASSING_TESTS[data["mode"]]
    why = [f"tests {name}: {r['status']}" for name, r in data["tests"].items()
           if r["family"] == family and r["status"] not in ok_tests]
    if not any(r["family"] == family for r in data["tests"].values()):
        why.append("tests: not run")
    runs = data["sanitizer"].get(family, {})
    if not runs:
        why.append("sanitizer: not run")
    why += [f"{tool} {backend}: {verdict}" for backend, tools in runs.items() for tool, verdict in tools.items()
            if verdict != "pass"]
    return "pass" if not why else "FAIL: " + "; ".join(why)


def markdown(data: dict) -> str:
    lines = [f"# make gpu-check ({data['mode']}): {data.get('device')}", "",
             f"torch {data.get('torch')}, triton {data.get('triton')}, python {data.get('python')}, commit "
             f"{data.get('commit')}, {data.get('date')}, {data['wall_s']:.0f} s so far", "",
             "| phase | status | seconds | limit |", "|---|---|---:|---:|"]
    for name, p in data["phases"].items():
        lines.append(f"| {name} | {p.get('status', 'running')} | {p.get('s', 0):.0f} | {p.get('limit_s', 0):.0f} |")
    tools = ", ".join(f"{k}: {v}" for k, v in data["tools"].items())
    lines += ["", f"Tools: {tools or 'not checked yet'}", "", "| family | verdict |", "|---|---|"]
    lines += [f"| {f} | {v} |" for f, v in data["families"].items()]
    lines += ["", "| test step | status | selected | passed | failed | skipped | seconds | Triton compiles |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in data["tests"].items():
        cells = [r.get(k, "") for k in ("selected", "passed", "failed", "skipped")]
        lines.append(f"| {name} | {r['status']} | " + " | ".join(map(str, cells)) +
                     f" | {r.get('s', 0):.0f} | {r.get('compiles', '')} |")
    failures = [(name, t) for name, r in data["tests"].items() for t in r.get("failures", [])]
    if failures:
        lines += ["", "Failed tests:", ""] + [f"- {name}: `{t}`" for name, t in failures[:50]]
    lines += ["", "| family | backend | " + " | ".join(data["plan"]["sanitizer_tools"]) + " |",
              "|---|---|" + "---|" * len(data["plan"]["sanitizer_tools"])]
    for family, runs in data["sanitizer"].items():
        for backend, tools in runs.items():
            cells = " | ".join(tools.get(t, "not run") for t in data["plan"]["sanitizer_tools"])
            lines.append(f"| {family} | {backend} | {cells} |")
    bench = data.get("bench", {})
    lines += ["", f"Benchmarks: {bench.get('status', 'not run')} (bench.md, bench.png; ceilings "
              f"{bench.get('ceilings', {})})"]
    if data.get("retry"):
        lines += ["", "Second, targeted run for the time left:", "", f"    {data['retry']}"]
    return "\n".join(lines) + "\n"
