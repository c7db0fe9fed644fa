"""Reading a service's /metrics endpoint back: for benchmarks and tests, not for production."""

from __future__ import annotations

import re

import aiohttp

_METRIC_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


async def scrape(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """Prometheus samples as {"name{labels}": value}, labels as the endpoint prints them."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{host}:{port}/metrics") as response,
    ):
        text = await response.text()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        match = _METRIC_LINE.match(line)
        if match and not line.startswith("#"):
            key = match["name"] + (f"{{{match['labels']}}}" if match["labels"] else "")
            samples[key] = float(match["value"])
    return samples


def total(samples: dict[str, float], name: str, *, containing: str = "") -> float:
    """The sum of a metric's samples (every label set, or those whose labels contain a text)."""
    return sum(
        value
        for key, value in samples.items()
        if (key == name or key.startswith(name + "{")) and containing in key
    )
