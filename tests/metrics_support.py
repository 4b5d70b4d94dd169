"""Helpers of the metrics tests (no tests here): scrape a /metrics page, parse it into samples and
declared types, compare two scrapes, run `promtool check metrics`."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

PROMTOOL = shutil.which("promtool")
_TYPE = re.compile(r"^# TYPE (\S+) (\S+)$", re.MULTILINE)


@dataclass
class Page:
    """One scrape: the text, every sample by (name, sorted labels), every declared family's type."""

    text: str
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    types: dict[str, str]

    def value(self, name: str, **labels: str) -> float:
        """A sample's value; 0 when the page has no such sample (a labelled series not yet seen)."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """Sum over every sample named `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= set(ls))

    def by_label(self, name: str, label: str) -> dict[str, float]:
        return {dict(ls)[label]: v for (n, ls), v in self.samples.items() if n == name and label in dict(ls)}


def parse(text: str) -> Page:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return Page(text, samples, dict(_TYPE.findall(text)))


def scrape(port: int, host: str = "127.0.0.1") -> Page:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(response.read().decode())


def delta(after: Page, before: Page, name: str, **labels: str) -> float:
    return after.total(name, **labels) - before.total(name, **labels)


def promtool_check(text: str) -> subprocess.CompletedProcess:
    """`promtool check metrics` on an exposition (exit 0: valid and lint-clean)."""
    return subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
