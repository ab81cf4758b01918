"""Open an HTML report in headless Chromium: console errors, index rows, one card, a screenshot.

    python bench/open_report.py checkpoints/smollm2-l15-topk/layers.15/report.html --feature 123 --png /tmp/r.png

Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian: chromium chromium-driver) and
selenium. Prints what the page shows as JSON: the load time, the console's SEVERE entries,
the index's first rows, and the opened card's promoted tokens (logit effects).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from browser import start_chromium  # noqa: E402


def until(driver, script: str, timeout: float = 60.0):
    end = time.time() + timeout
    while time.time() < end:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(script)


@click.command()
@click.argument("report", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--feature",
    type=int,
    default=None,
    help="Open this feature's card (default: the first index row).",
)
@click.option(
    "--png",
    type=click.Path(path_type=Path),
    default=None,
    help="Save a screenshot of the card here.",
)
def main(report: Path, feature: int | None, png: Path | None) -> None:
    with tempfile.TemporaryDirectory() as profile:
        driver = start_chromium(profile, console_log=True)
        try:
            start = time.time()
            driver.get(report.resolve().as_uri())
            rows = until(
                driver,
                "const r = [...document.querySelectorAll('#feature-index tbody tr')]"
                ".map(tr => Number(tr.dataset.f)); return r.length ? r : null",
            )
            loaded = time.time() - start
            f = rows[0] if feature is None else feature
            driver.get(report.resolve().as_uri() + f"#f={f}")
            driver.refresh()
            until(
                driver,
                "const h = document.querySelector('#card h2'); return h && h.textContent === "
                f"'Feature {f}' && !document.querySelector('#card').textContent.includes('loading')",
            )
            card = driver.execute_script("return document.querySelector('#card').innerText")
            if png is not None:
                driver.save_screenshot(str(png))
            severe = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        finally:
            driver.quit()
    print(
        json.dumps(
            {
                "report": str(report),
                "bytes": report.stat().st_size,
                "index_rows_s": round(loaded, 2),
                "first_rows": rows[:10],
                "feature": f,
                "console_errors": severe,
                "card_text": card[:1500],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
