import base64
import csv
import html
import re
import shutil
import subprocess
import time
from pathlib import Path

import matplotlib.image
import pytest

from quicktrain import cli
from quicktrain.report import (
    COLUMNS,
    RunRecord,
    Section,
    environment_info,
    render_html,
    run_rows,
    runs_section,
)

ENV = {"host": "testbox", "cuda device": "none"}


def fake_run(name: str, scale: float = 1.0) -> RunRecord:
    epochs = [
        {
            "epoch": e,
            "wall": 0.5 * e,
            "train_loss": 2.0 / e,
            "val_loss": 2.1 / e,
            "val_acc": 0.5 + 0.1 * e * scale,
            "test_acc": 0.45 + 0.1 * e * scale,
            "test_loss": 2.2 / e,
        }
        for e in (1, 2, 3)
    ]
    return RunRecord(name, {"model": "cnn", "dataset": "digits"}, epochs)


def attribute_urls(page: str) -> list[str]:
    return re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, flags=re.IGNORECASE)


def test_html_is_self_contained_and_shows_the_table(tmp_path):
    runs = [fake_run("adamw"), fake_run("sgd", scale=0.8)]
    section = runs_section(runs, tmp_path / "curves.png")
    page = render_html([section], tmp_path / "report.html", title="t", environment=ENV).read_text()

    urls = attribute_urls(page)
    assert urls and all(u.startswith("data:") for u in urls), urls
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    (image_uri,) = re.findall(r'<img src="([^"]+)"', page)
    assert image_uri.startswith("data:image/png;base64,")
    assert base64.b64decode(image_uri.partition(",")[2]) == (tmp_path / "curves.png").read_bytes()
    for column in COLUMNS:
        assert f"<th>{column}</th>" in page
    for row in run_rows(runs):
        for cell in row:
            assert f">{cell}</td>" in page
    assert "<td>testbox</td>" in page


def test_text_tables_and_titles_are_escaped(tmp_path):
    evil = "<script>alert(1)</script>"
    section = runs_section([fake_run(evil)], tmp_path / "c.png", title=f"sweep {evil}")
    section.text = f'a "quoted" & {evil}'
    section.tables.append((["k", "v"], [[evil, "1"]]))
    page = render_html([section], tmp_path / "r.html", title=evil, environment={evil: evil}).read_text()
    assert "<script" not in page.lower()
    assert page.count(html.escape(evil)) == 8  # title, h1, env key and value, section title, text, 2 tables


def test_extra_sections_downloads_and_clear_errors(tmp_path):
    csv_file = tmp_path / "sweep.csv"
    csv_file.write_text("rank,acc\n4,0.91\n")
    sweep = Section("kron sweep", "rank vs accuracy", tables=[(["rank", "acc"], [["4", "0.91"]])], downloads=[csv_file])
    page = render_html([sweep], tmp_path / "r.html", environment=ENV).read_text()
    assert "<h2>kron sweep</h2>" in page and 'download="sweep.csv"' in page
    assert "data:text/csv;base64," + base64.b64encode(csv_file.read_bytes()).decode() in page

    with pytest.raises(FileNotFoundError, match="missing.png not found"):
        render_html([Section("s", images=[tmp_path / "missing.png"])], tmp_path / "x.html", environment=ENV)
    with pytest.raises(ValueError, match="row 0 has 1 cells but there are 2 columns"):
        render_html([Section("s", tables=[(["a", "b"], [["1"]])])], tmp_path / "x.html", environment=ENV)
    with pytest.raises(ValueError, match="at least one run"):
        runs_section([], tmp_path / "c.png")


def test_environment_info_names_the_machine_and_versions():
    info = environment_info()
    for key in ("date", "host", "python", "torch", "cpu", "cores", "cuda device"):
        assert info[key].strip(), key
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", info["date"])


def train_two_runs(root: Path) -> list[Path]:
    """Two short real runs (a CNN and an MLP on digits, ~1 s each)."""
    folders = [root / "cnn-run", root / "mlp-run"]
    for folder, model in zip(folders, ("cnn", "mlp"), strict=True):
        args = ["train", "--dataset", "digits", "--model", model, "--epochs", "2", "--max-steps-per-epoch", "10"]
        cli.main([*args, "--out", str(folder), "--no-progress"])
    return folders


def find_chromium() -> str:
    """The headless Chromium binary; the calling test fails (never skips) without one."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail(
            "headless Chromium is needed for the report screenshot test but neither `chromium` nor "
            "`chromium-browser` is on PATH; install it with `apt-get install -y chromium` (Debian/Ubuntu, as root)"
        )
    return binary


def test_cli_html_report_renders_in_headless_chromium(tmp_path, capsys):
    chromium = find_chromium()  # first, so a missing browser fails before any training
    runs = train_two_runs(tmp_path / "runs")
    report_html = tmp_path / "out" / "report.html"
    png = tmp_path / "out" / "report.png"
    cli.main(["report", *map(str, runs), "--out", str(png), "--html", str(report_html)])
    assert f"html: {report_html}" in capsys.readouterr().out
    with (tmp_path / "out" / "report.csv").open(newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header == list(COLUMNS) and [r[0] for r in rows] == ["cnn-run", "mlp-run"]
    page = report_html.read_text()
    assert all(f">{cell}</td>" in page for row in rows for cell in row)

    shot = tmp_path / "shot.png"
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,1600",
        report_html.resolve().as_uri(),
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=90)
    seconds = time.perf_counter() - start
    assert done.returncode == 0 and shot.is_file(), f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (1600, 1200)
    non_white = (pixels.min(axis=-1) < 0.9).mean()
    coloured = (pixels.max(axis=-1) - pixels.min(axis=-1) > 0.3).mean()
    # measured: blank page 0 / 0 / 0; report without its plot std 0.07, non-white 1.6%, coloured 0.03%
    print(f"chromium {seconds:.1f}s; std {pixels.std():.3f}, non-white {non_white:.1%}, coloured {coloured:.2%}")
    assert pixels.std() > 0.05, "the screenshot is (nearly) blank"
    assert non_white > 0.02, f"only {non_white:.1%} of the screenshot is not white"
    assert coloured > 0.002, f"only {coloured:.2%} coloured pixels: the embedded plot did not render"
