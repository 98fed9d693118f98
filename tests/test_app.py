"""app.py, the web page: served on 127.0.0.1, answered through Gradio's own client, and used in a real
headless Chromium the way a person would: upload a photo, read the top-1 car name off the page."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_args, write_hub_folder
from PIL import Image

import eval as eval_tool
import predict
import train
from cars.data import load_splits

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny trained and evaluated run, served by `app.py RUN --port N` in its own process."""
    root = tmp_path_factory.mktemp("app")
    data = write_hub_folder(root / "data")
    train.main(tiny_args(data, root / "run", "--epochs", "1"))
    eval_tool.main([str(root / "run"), "--workers", "0", "--num-gradcam", "2"])
    port = free_port()
    log = root / "server.log"  # the server's own log, read by the tests
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), str(root / "run"), "--port", str(port)],
        cwd=root,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
    )
    deadline = time.time() + 120
    while (
        "serving" not in log.read_text() and server.poll() is None and time.time() < deadline
    ):  # printed once it listens
        time.sleep(0.1)
    line = log.read_text()
    assert line.startswith(f"serving {root / 'run' / 'best.pt'} at http://127.0.0.1:{port}"), line
    image = root / "car.png"
    load_splits(str(data)).eval.open(1).save(image)
    yield f"http://127.0.0.1:{port}/", root, image
    server.terminate()
    server.wait(timeout=30)


def predict_py(run: Path, image: Path, capsys) -> dict:
    capsys.readouterr()
    predict.main([str(run), str(image), "--json"])
    return json.loads(capsys.readouterr().out)[0]


def top1_by_predict_py(run: Path, image: Path, capsys) -> str:
    return predict_py(run, image, capsys)["predictions"][0]["class"]


def test_the_page_answers_as_predict_py_and_survives_bad_photos(served, tmp_path, capsys):
    from gradio_client import Client, handle_file

    url, root, image = served
    client = Client(url, verbose=False)
    top5, cam, note = client.predict(handle_file(str(image)), "gradcam", api_name="/predict")
    answer = predict_py(root / "run", image, capsys)
    assert top5["label"] == answer["predictions"][0]["class"]
    # eval.py calibrated the unfamiliar-input check: the page says what predict.py's JSON says, in words
    assert isinstance(answer["unfamiliar"], bool) and answer["familiarity_score"] >= 0
    assert note.startswith("**This photo is unlike" if answer["unfamiliar"] else "Like the training images")
    # and it shows predict.py's probabilities, both divided by eval.py's temperature, and says so
    assert "Probabilities calibrated by eval.py's temperature" in note and answer["temperature"] != 1
    shown = {c["label"]: c["confidence"] for c in top5["confidences"]}
    assert shown == pytest.approx({p["class"]: p["probability"] for p in answer["predictions"]}, abs=1e-6)
    # every class of 3; the CAM computed at the model's 32 px, drawn at 224 px beside the photo as it was
    width, height = Image.open(cam).size
    assert len(top5["confidences"]) == 3 and width >= 2 * 224 and height >= 224

    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("this is text, not a photo")
    bomb = tmp_path / "bomb.png"  # 200 megapixels in a few hundred kB: PIL refuses to decode it
    Image.new("1", (14_200, 14_200)).save(bomb)
    huge = tmp_path / "huge.png"  # over the page's 20 MB upload limit
    huge.write_bytes(os.urandom(21 * 2**20))
    logged_before = (root / "server.log").read_text()
    for bad, message in (
        (not_an_image, "not a photo the model can read: cannot read image notes.jpg: "),
        (bomb, "not a photo the model can read: cannot read image bomb.png: "),
        (huge, "exceed|too large|max"),
    ):
        with pytest.raises(Exception, match=message) as refused:
            client.predict(handle_file(str(bad)), "gradcam", api_name="/predict")
        assert "gradio" not in str(refused.value)  # nothing of the server's own upload folder
    log = (root / "server.log").read_text()[len(logged_before) :]
    refusals = [line for line in log.splitlines() if line.startswith("refused an upload: ")]
    assert len(refusals) == 2 and "Traceback" not in log and "notes.jpg" in refusals[0] and "bomb.png" in refusals[1], (
        log
    )
    again, _, _ = client.predict(handle_file(str(image)), "eigencam", api_name="/predict")  # still serving
    assert again["label"] == top5["label"]


def test_requests_that_run_the_model_wait_for_each_other(served):
    """A CAM hooks the model it explains: the page's first confused pair, loading while a photo is uploaded, once
    crashed the upload's CAM ("cannot call bump_version() on undefined tensor"). Every event that runs the model
    shares one queue of one, so many at once all answer, as they do one by one."""
    from gradio_client import Client, handle_file

    url, root, image = served
    # not downloading the answers' images: Gradio writes equal images to one cached file, which the requests here
    # would race to read as it is rewritten
    client = Client(url, verbose=False, download_files=False)
    pair = 0 if (root / "run" / "eval" / "confused_pairs.csv").read_text().count("\n") > 1 else None
    top5 = client.predict(handle_file(str(image)), "gradcam", api_name="/predict")[0]

    def captions(galleries):  # the two galleries' captions: which images were shown, and as what
        return [[shown["caption"] for shown in gallery] for gallery in galleries]

    shown = captions(client.predict(pair, api_name="/show_pair"))
    logged_before = (root / "server.log").read_text()
    jobs = []
    for _ in range(10):  # interleaved, so that the two queues of old ran side by side
        jobs += [client.submit(handle_file(str(image)), "gradcam", api_name="/predict")]
        jobs += [client.submit(pair, api_name="/show_pair")]
    answers = [job.result(timeout=120) for job in jobs]
    assert all(answer[0] == top5 for answer in answers[0::2])
    assert all(captions(answer) == shown for answer in answers[1::2])
    assert "Traceback" not in (root / "server.log").read_text()[len(logged_before) :]


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium on this machine: install Debian's chromium (.ci/run does) to run the browser test",
)
def test_in_a_real_browser_an_uploaded_photo_shows_its_top_car(served, capsys):
    from playwright.sync_api import sync_playwright

    url, root, image = served
    expected = top1_by_predict_py(root / "run", image, capsys)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.locator("#photo input[type=file]").set_input_files(str(image))
        top1 = page.locator("#top5 h2")  # the label's heading: the most probable class
        top1.wait_for(timeout=60_000)
        deadline = time.time() + 60
        while top1.inner_text().strip() != expected and time.time() < deadline:
            time.sleep(0.2)
        assert top1.inner_text().strip() == expected

        page.get_by_role("tab", name="Evaluation").click()
        table = page.locator("#per_class")
        table.wait_for(timeout=30_000)
        names = load_splits(str(root / "data")).class_names
        assert all(name in table.inner_text() for name in names)
        browser.close()
    assert re.match(r"\S", expected)
