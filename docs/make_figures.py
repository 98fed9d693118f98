"""Make every picture the docs show, from a real run of the demo: the tools run as a user runs them, and their own
output files are copied into docs/figures/.

    uv run docs/make_figures.py                 # about 5 minutes on 2 CPU cores, once the demo-pretrained weights
                                                # exist (a fresh machine adds their 2 minutes)
    uv run docs/make_figures.py --sweep         # also the demo sweep's history (4 more minutes)
    uv run docs/make_figures.py --curves        # also the demo's data-efficiency curves (about 20 more minutes)
    uv run docs/make_figures.py --ladder        # also the demo's ladder, no labels to a fine-tune (about 13 more)

The tools run in a work folder (`--work`, default: a new temporary one) so that the run folders are `runs/demo` and
the pages show what yours will. The web page and TensorBoard are photographed in headless Chromium (Debian's
`chromium`), as the app's test does; without it those two pictures are skipped with a line that says so.
"""

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"
DEMO = ROOT / "configs" / "demo.toml"


def run(work: Path, tool: str, *args: str) -> str:
    """Run a tool in the work folder as `uv run TOOL ARGS` would; its console output is returned and logged."""
    command = [sys.executable, str(ROOT / tool), *args]
    print(f"$ uv run {tool} {' '.join(args)}", flush=True)
    done = subprocess.run(command, cwd=work, capture_output=True, text=True)
    with open(work / "console.log", "a") as log:
        log.write(f"$ uv run {tool} {' '.join(args)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        sys.exit(f"{tool} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return done.stdout


def keep(source: Path, name: str) -> None:
    shutil.copyfile(source, FIGURES / name)
    print(f"  -> docs/figures/{name}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(work: Path, command: list[str], ready: str, log_name: str) -> subprocess.Popen:
    """Start a server in the work folder and wait until its log says `ready`."""
    log = work / log_name
    server = subprocess.Popen(command, cwd=work, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while ready not in log.read_text() and server.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    if ready not in log.read_text():
        server.terminate()
        sys.exit(f"{command[1]} did not start:\n{log.read_text()[-2000:]}")
    return server


def browser(playwright, chromium: str):
    return playwright.chromium.launch(
        executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]
    )


def photograph_app(work: Path, chromium: str, photo: Path) -> None:
    from playwright.sync_api import sync_playwright

    port = free_port()
    server = serve(work, [sys.executable, str(ROOT / "app.py"), "runs/demo", "--port", str(port)], "serving", "app.log")
    try:
        with sync_playwright() as playwright:
            page = browser(playwright, chromium).new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#photo input[type=file]").set_input_files(str(photo))
            page.locator("#top5 h2").wait_for(timeout=60_000)
            page.wait_for_timeout(2_000)  # the CAM arrives with the label; let the page settle
            page.screenshot(path=str(work / "app-predict.png"), full_page=True)
            page.get_by_role("tab", name="Evaluation").click()
            page.locator("#per_class").wait_for(timeout=30_000)
            page.wait_for_timeout(2_000)
            page.screenshot(path=str(work / "app-evaluation.png"), full_page=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    keep(work / "app-predict.png", "app-predict.png")
    keep(work / "app-evaluation.png", "app-evaluation.png")


def photograph_tensorboard(work: Path, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", "runs", "--host", "127.0.0.1", "--port", str(port)]
    server = serve(work, command, "TensorBoard", "tensorboard.log")
    try:
        with sync_playwright() as playwright:
            page = browser(playwright, chromium).new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/?darkMode=false#timeseries")
            page.get_by_text("epoch/test_acc").first.wait_for(timeout=60_000)
            page.wait_for_timeout(5_000)  # the charts draw after their data arrives
            page.screenshot(path=str(work / "tensorboard.png"))
    finally:
        server.terminate()
        server.wait(timeout=30)
    keep(work / "tensorboard.png", "tensorboard.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="where the tools run (default: a new temporary folder)")
    parser.add_argument("--sweep", action="store_true", help="also run the demo sweep for its history plot")
    parser.add_argument("--curves", action="store_true", help="also run the demo's data-efficiency curves")
    parser.add_argument("--ladder", action="store_true", help="also run the demo's ladder, no labels to a fine-tune")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="cars-figures-"))
    work.mkdir(parents=True, exist_ok=True)
    FIGURES.mkdir(exist_ok=True)
    print(f"working in {work}")

    run(work, "inspect_data.py", "--data", "demo", "--config", str(DEMO))
    keep(work / "runs/data-demo/samples.png", "inspect-samples.png")
    keep(work / "runs/data-demo/class_counts.png", "inspect-class-counts.png")
    run(work, "inspect_data.py", "--data", "demo-source", "--config", str(ROOT / "configs" / "demo_source.toml"))
    keep(work / "runs/data-demo-source/samples.png", "inspect-source-samples.png")

    run(work, "train.py", "--config", str(DEMO))
    keep(work / "runs/demo/curves.png", "train-curves.png")
    run(work, "train.py", "--config", str(ROOT / "configs" / "demo_scratch.toml"))

    run(work, "eval.py", "runs/demo")
    for name in ("per_class", "confusion", "gradcam_samples", "gradcam_worst"):
        keep(work / f"runs/demo/eval/{name}.png", f"eval-{name.replace('_', '-')}.png")
    for name in ("weight_change", "cka", "linear_probe"):
        keep(work / f"runs/demo/eval/transfer/{name}.png", f"transfer-{name.replace('_', '-')}.png")

    shutil.copytree(ROOT / "examples", work / "examples", dirs_exist_ok=True)  # the photos the README offers
    photo = work / "examples" / "car.png"
    print(run(work, "predict.py", "runs/demo", "examples/car.png", "--topk", "3", "--cam", "cams"))
    keep(work / "cams/car_cam.png", "predict-cam.png")

    # the interpolation page's run: plain fine-tuning with its epoch chosen on a validation split
    run(
        work,
        "train.py",
        "--config",
        str(ROOT / "configs" / "methods" / "demo" / "0_plain.toml"),
        "--run-dir",
        "runs/plain",
    )
    run(work, "interpolate.py", "runs/plain", "--recalibrate-bn")
    keep(work / "runs/plain/interpolate/interpolation.png", "interpolation.png")

    run(work, "compare.py", "runs/demo", "runs/demo_scratch", "--out", "runs/compare")
    keep(work / "runs/compare/compare.png", "compare.png")
    run(work, "lr_find.py", "--config", str(DEMO), "--steps", "100")
    keep(work / "runs/lr_find-demo/lr_find.png", "lr-find.png")

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("no Chromium here: the web page and TensorBoard pictures were left as they were")
    else:
        photograph_app(work, chromium, photo)
        photograph_tensorboard(work, chromium)  # before the sweep: the demo and the scratch run alone

    if args.sweep:
        run(work, "sweep.py", "--config", str(ROOT / "configs" / "sweeps" / "demo.toml"))
        keep(work / "runs/sweeps/demo/optimization_history.png", "sweep-history.png")
    if args.curves:
        run(work, "curves.py", "--config", str(ROOT / "configs" / "curves" / "demo.toml"))
        keep(work / "runs/curves/demo/curves.png", "data-curves.png")
    if args.ladder:
        run(work, "curves.py", "--config", str(ROOT / "configs" / "curves" / "ladder_demo.toml"))
        keep(work / "runs/curves/ladder_demo/curves.png", "ladder.png")
    print(f"done; every tool's console output is in {work / 'console.log'}")


if __name__ == "__main__":
    main()
