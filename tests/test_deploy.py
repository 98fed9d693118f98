"""The model outside training: exports that check themselves (safetensors, ONNX, torch.export), ONNX Runtime in
predict.py and eval.py."""

import csv
import json
import shutil

import onnx
import pytest
import torch
from conftest import tiny_args, write_hub_folder
from PIL import Image
from safetensors.torch import load_file, save_file

import eval as eval_tool
import export
import predict
import train
from cars.data import load_splits
from cars.errors import UserError


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny trained run, exported in every format. At 64 px (not 32) the last feature map is larger than one pixel at
    every TTA scale, so torch.export's program takes all of them too."""
    root = tmp_path_factory.mktemp("deploy")
    data = write_hub_folder(root / "data")
    train.main(tiny_args(data, root / "run", "--epochs", "1", "--resolution", "64"))
    export.main([str(root / "run"), "--format", "safetensors,onnx,torch-export", "--check-images", "9"])
    # and one format alone, checked on 3 images: what the overwrite tests replace with an export checked on 4 (their
    # model.json tells the old export from the new, and --verify loads one model, not three)
    export.main([str(root / "run"), "--out", str(root / "safetensors-only"), "--check-images", "3"])
    return root


def test_every_format_is_written_checked_and_recorded(exported, capsys):
    out = exported / "run" / "export"
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.onnx", "model.pt2", "model.safetensors"]
    info = json.loads((out / "model.json").read_text())
    assert info["arch"] == "resnet18" and info["resolution"] == 64 and len(info["class_names"]) == 3
    assert list(info["formats"]) == ["safetensors", "onnx", "torch-export"]
    for entry in info["formats"].values():
        check = entry["check"]
        assert (
            check["passed"]
            and check["top1_agreement"] == 100.0
            and check["images"] == f"9 test images of {exported / 'data'}"
        )
        assert check["max_abs_logit_diff"] <= check["allowed"]
    assert info["formats"]["safetensors"]["check"]["max_abs_logit_diff"] == 0  # the same weights in the same model
    assert info["formats"]["torch-export"]["check"]["max_abs_logit_diff"] == 0  # the same kernels
    # the ONNX graph takes any batch size, height and width
    graph_input = onnx.load(str(out / "model.onnx")).graph.input[0]
    batch, channels, height, width = graph_input.type.tensor_type.shape.dim
    assert batch.dim_param == "batch" and channels.dim_value == 3 and height.dim_param and width.dim_param
    export.main([str(exported / "run"), "--verify"])
    assert capsys.readouterr().out.count("passes") == 3


def predict_label(run, image) -> str:
    """The top-1 class PyTorch gives for one image, as predict.py computes it."""
    from cars.inference import load_trained
    from cars.transforms import eval_transform

    trained = load_trained(run)
    return trained.classify(
        eval_transform(trained.resolution, interpolation=trained.interpolation)(Image.open(image).convert("RGB")), 1
    )[0]["class"]


def predictions_of(args, capsys) -> list[dict]:
    capsys.readouterr()
    predict.main(args)
    return json.loads(capsys.readouterr().out)


def test_onnx_runtime_predicts_and_evaluates_as_pytorch_does(exported, tmp_path, capsys):
    run, out = exported / "run", exported / "run" / "export"
    images = []
    for i in range(3):
        images.append(tmp_path / f"car{i}.png")
        load_splits(str(exported / "data")).eval.open(i).save(images[-1])
    by_pytorch = predictions_of([str(run), *map(str, images), "--json"], capsys)
    for given in (out, out / "model.onnx", run):  # the export folder, the file, or the run folder holding export/
        by_onnx = predictions_of([str(given), *map(str, images), "--json", "--backend", "onnxruntime"], capsys)
        for a, b in zip(by_pytorch, by_onnx, strict=True):
            assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]
            assert [p["probability"] for p in a["predictions"]] == pytest.approx(
                [p["probability"] for p in b["predictions"]], abs=1e-5
            )

    eval_tool.main([str(run), "--out", str(tmp_path / "eval-pt"), "--workers", "0"])
    eval_tool.main([str(out), "--out", str(tmp_path / "eval-onnx"), "--workers", "0", "--backend", "onnxruntime"])
    rows = [list(csv.DictReader(open(tmp_path / folder / "predictions.csv"))) for folder in ("eval-pt", "eval-onnx")]
    assert [(r["true"], r["predicted"]) for r in rows[0]] == [(r["true"], r["predicted"]) for r in rows[1]]
    assert [float(r["confidence"]) for r in rows[0]] == pytest.approx(
        [float(r["confidence"]) for r in rows[1]], abs=2e-4
    )
    summaries = [json.loads((tmp_path / folder / "summary.json").read_text()) for folder in ("eval-pt", "eval-onnx")]
    assert summaries[0]["top1"] == summaries[1]["top1"] and summaries[0]["top5"] == summaries[1]["top5"]
    assert (
        "it compares the model's weights, which ONNX Runtime does not give"
        in (tmp_path / "eval-onnx" / "report.md").read_text()
    )
    assert (tmp_path / "eval-pt" / "gradcam_samples.png").exists() and not (
        tmp_path / "eval-onnx" / "gradcam_samples.png"
    ).exists()
    assert "ONNX Runtime gives none" in (tmp_path / "eval-onnx" / "report.md").read_text()


def test_onnx_tta_and_other_resolutions_equal_pytorch(exported, tmp_path):
    """The ONNX graph and torch.export's program take every TTA scale and another --resolution, with the logits
    of the PyTorch model within the export tolerance; eval.py --tta gives the same numbers on both backends."""
    from cars.cli import TTA_SCALES
    from cars.inference import OnnxRuntimeModel, load_trained

    run, out = exported / "run", exported / "run" / "export"
    model, onnx_model = load_trained(run).model, OnnxRuntimeModel(out / "model.onnx")
    program = torch.export.load(str(out / "model.pt2")).module()
    for size in sorted({round(64 * s) for s in TTA_SCALES} | {80}):
        images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            expected = model(images)
            allowed = export.TOLERANCE * max(1.0, expected.abs().max().item())
            assert (onnx_model(images) - expected).abs().max().item() <= allowed, size
            assert (program(images) - expected).abs().max().item() <= allowed, size

    eval_tool.main([str(run), "--out", str(tmp_path / "pt"), "--workers", "0", "--tta", "--num-gradcam", "0"])
    eval_tool.main([str(out), "--out", str(tmp_path / "onnx"), "--workers", "0", "--tta", "--backend", "onnxruntime"])
    tta = [json.loads((tmp_path / folder / "summary.json").read_text())["tta"] for folder in ("pt", "onnx")]
    assert tta[0] == tta[1] and tta[0]["scales"] == [56, 64, 72]
    eval_tool.main(
        [
            str(out),
            "--out",
            str(tmp_path / "onnx-80"),
            "--workers",
            "0",
            "--backend",
            "onnxruntime",
            "--resolution",
            "80",
        ]
    )
    assert json.loads((tmp_path / "onnx-80" / "summary.json").read_text())["resolution"] == 80


def tamper_onnx(path):
    model = onnx.load(str(path))
    weight = next(t for t in model.graph.initializer if len(t.dims) == 4)  # a convolution's kernel
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] += 1.0
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(model, str(path))


def tamper_safetensors(path):
    state = load_file(str(path))
    state["conv1.weight"][0, 0, 0, 0] += 1.0
    save_file(state, str(path))


def tamper_pt2(path):
    program = torch.export.load(str(path))
    weight = next(iter(program.state_dict))
    program.state_dict[weight].data[0] += 1.0
    torch.export.save(program, str(path))


@pytest.mark.parametrize(
    "name, tamper", [("model.onnx", tamper_onnx), ("model.safetensors", tamper_safetensors), ("model.pt2", tamper_pt2)]
)
def test_a_tampered_export_fails_its_check(exported, tmp_path, name, tamper):
    copy = tmp_path / "export"
    shutil.copytree(exported / "run" / "export", copy)  # the fixture's export of every format, checked on 9 images
    export.main([str(exported / "run"), "--out", str(copy), "--verify", "--check-images", "9"])  # passes as copied
    tamper(copy / name)
    with pytest.raises(
        UserError, match=f"{name} fails its parity check: its logits differ from the PyTorch model's by up to"
    ):
        export.main([str(exported / "run"), "--out", str(copy), "--verify", "--check-images", "9"])


def test_an_export_that_fails_its_check_is_never_kept(exported, tmp_path, monkeypatch):
    write = export.write_export

    def wrong_weights(fmt, path, model, example):  # as a broken exporter would: another model under the name
        with torch.no_grad():
            model.fc.bias += 1.0
        try:
            write(fmt, path, model, example)
        finally:
            with torch.no_grad():
                model.fc.bias -= 1.0

    monkeypatch.setattr(export, "write_export", wrong_weights)
    with pytest.raises(UserError, match="model.onnx fails its parity check"):
        export.main([str(exported / "run"), "--out", str(tmp_path / "bad"), "--format", "onnx", "--check-images", "4"])
    # neither the failed file nor a model.json that lists it, nor the staging folder
    assert list(tmp_path.iterdir()) == []


def test_bad_export_and_backend_requests_are_one_clear_line(exported, tmp_path):
    run = str(exported / "run")
    with pytest.raises(UserError, match="--format pickle is not a format; choose from safetensors, onnx, torch-export"):
        export.main([run, "--format", "onnx,pickle"])
    with pytest.raises(UserError, match="export folder .* already exists; pass --overwrite"):
        export.main([run, "--format", "onnx"])
    with pytest.raises(UserError, match="--cam needs the PyTorch model's gradients"):
        predict.main([run, "x.png", "--backend", "onnxruntime", "--cam", str(tmp_path)])
    with pytest.raises(UserError, match="has no model.onnx; export one with"):
        predict.main([str(tmp_path), "x.png", "--backend", "onnxruntime"])
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match="cannot load .*broken.onnx with ONNX Runtime"):
        predict.main([str(tmp_path / "broken.onnx"), "x.png", "--backend", "onnxruntime"])
    with pytest.raises(UserError, match="holds no export written by export.py"):
        export.main([run, "--out", str(tmp_path), "--verify"])


def test_the_web_page_runs_an_onnx_export_without_cams(exported, tmp_path):
    from gradio_client import Client, handle_file
    from test_app import free_port

    from app import build_app
    from cars.inference import load_onnx

    image = tmp_path / "car.png"
    load_splits(str(exported / "data")).eval.open(0).save(image)
    trained = load_onnx(exported / "run" / "export")
    assert trained.classify(torch.zeros(3, 64, 64, dtype=torch.uint8), 5)[0]["class"] in trained.class_names
    app = build_app(trained, eval_dir=None)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_error=True)
    try:
        top5, cam, note = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            handle_file(str(image)), "gradcam", api_name="/predict"
        )
    finally:
        app.close()
    expected = predict_label(exported / "run", image)
    assert top5["label"] == expected and cam is None
    assert note.startswith("No check of how familiar the photo is")  # ONNX Runtime gives no features to check


def test_a_bare_state_dict_is_checked_on_random_pixels_and_says_so(exported, tmp_path, capsys):
    from cars.checkpoint import load_checkpoint

    torch.save(load_checkpoint(exported / "run" / "best.pt")["model"], tmp_path / "weights.pt")
    export.main(
        [
            str(tmp_path / "weights.pt"),
            "--arch",
            "resnet18",
            "--resolution",
            "64",
            "--format",
            "onnx",
            "--check-images",
            "4",
        ]
    )
    check = json.loads((tmp_path / "export" / "model.json").read_text())["formats"]["onnx"]["check"]
    assert (
        check["images"] == "4 images of random pixels (no dataset known: pass --data for test images)"
        and check["passed"]
    )
    assert "note: checking on random pixels" in capsys.readouterr().out


KILLER = """
import json, os, signal, sys
from cars import files
import export

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

def kill_at(point):
    if point == "while writing":
        export.check = die
    elif point == "before the swap":
        export.replace_folder = die
    elif point == "between the moves":  # where a system cannot swap two folders in one step
        files.exchange = lambda a, b: False
        rename = os.rename
        os.rename = lambda a, b: die() if str(a).endswith(".new") else rename(a, b)  # after the old export moved aside

# torch imported once, then a child per point, all at once; each child's end (a wait status) printed as JSON
children = {}
for point, arguments in json.loads(sys.argv[1]).items():
    children[point] = os.fork()
    if children[point] == 0:
        kill_at(point)
        export.main(arguments)
        os._exit(0)  # it was not killed
print(json.dumps({point: os.waitpid(pid, 0)[1] for point, pid in children.items()}))
"""


def test_a_killed_overwrite_leaves_one_whole_export(exported, tmp_path, capsys):
    """--overwrite writes the new export beside the old one and swaps it in: killed at any moment (while writing,
    before the swap, between the two moves where a system cannot swap folders in one step), the folder holds one
    complete export that passes --verify, and nothing of the old one is lost before the new one has passed. The three
    kills run at once, each on its own copy of the export."""
    import os
    import shutil
    import signal
    import subprocess
    import sys

    points = ["while writing", "before the swap", "between the moves"]
    outs, commands = {}, {}
    for i, point in enumerate(points):
        outs[point] = tmp_path / f"kill{i}" / "export"
        shutil.copytree(exported / "safetensors-only", outs[point])
        flags = ["--out", str(outs[point]), "--format", "safetensors", "--check-images", "4", "--overwrite"]
        commands[point] = [str(exported / "run"), *flags]
    killers = subprocess.run([sys.executable, "-c", KILLER, json.dumps(commands)], capture_output=True, text=True)
    assert killers.returncode == 0, killers.stderr[-2000:]
    ends = json.loads(killers.stdout.splitlines()[-1])
    for point, out in outs.items():
        assert os.WIFSIGNALED(ends[point]) and os.WTERMSIG(ends[point]) == signal.SIGKILL, (point, killers.stderr)
        before = json.loads((exported / "safetensors-only" / "model.json").read_text())
        # puts back what a kill moved aside
        capsys.readouterr()
        export.main([str(exported / "run"), "--out", str(out), "--verify", "--check-images", "4"])
        after = json.loads((out / "model.json").read_text())
        assert after == before and sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"], point
        assert capsys.readouterr().out.count("passes") == 1, point
        export.main(
            [str(exported / "run"), "--out", str(out), "--format", "safetensors", "--check-images", "4", "--overwrite"]
        )
        # the new export alone: no staging or old folder left
        assert sorted(p.name for p in out.parent.iterdir()) == ["export"], point
        assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"], point


def test_overwrite_never_replaces_a_folder_that_is_not_an_export(exported, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not an export folder this project wrote .*notes.txt"):
        export.main([str(exported / "run"), "--out", str(tmp_path), "--format", "safetensors", "--overwrite"])
    assert (tmp_path / "notes.txt").read_text() == "mine"
