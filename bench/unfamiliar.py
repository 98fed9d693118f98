"""How well the unfamiliar-input check tells the demo's test cars from things it never learned.

    uv run eval.py runs/demo                  # calibrates the check: runs/demo/eval/familiarity.safetensors
    uv run bench/unfamiliar.py runs/demo

Scores every test image of the demo (familiar: the classes it learned) and of the demo's source task (buses,
tractors, houses ...: none of them a car class) with the check eval.py calibrated, and prints the AUROC of the
familiarity score, beside the AUROC of the usual stand-in, one minus the top softmax probability, on the same images;
then how many of each the threshold flags. (Real photos are not used: no machine here reaches the network.)
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from cars import familiarity, finetune  # noqa: E402
from cars.data import load_splits  # noqa: E402
from cars.engine import Device  # noqa: E402
from cars.inference import load_trained  # noqa: E402
from cars.loaders import eval_loader  # noqa: E402
from cars.models import head_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a demo run folder that eval.py has evaluated")
    args = parser.parse_args()
    trained = load_trained(args.run)
    check = familiarity.load_for(trained)
    if check is None:
        sys.exit(f"{args.run} has no familiarity check yet: run uv run eval.py {args.run} first")
    device = Device("cpu")
    scores, unlike_softmax = {}, {}
    for name, data in (("demo test (familiar)", "demo"), ("demo-source test (unfamiliar)", "demo-source")):
        split = load_splits(data).eval
        loader = eval_loader(
            split,
            resolution=trained.resolution,
            interpolation=trained.interpolation,
            cache="off",
            skip_bad_images=False,
            batch_size=64,
            workers=0,
        )
        features, _ = finetune.head_inputs(trained.model, loader, device, description=name)
        scores[name] = check.scores(features)
        with torch.no_grad():
            logits = trained.model.get_submodule(head_name(trained.model))(features)
        unlike_softmax[name] = 1 - logits.softmax(1).max(1).values
    familiar, unfamiliar = scores.values()
    truth = [0] * len(familiar) + [1] * len(unfamiliar)
    print(f"{args.run}: {len(familiar)} demo test images, {len(unfamiliar)} demo-source test images")
    mahalanobis = roc_auc_score(truth, torch.cat([familiar, unfamiliar]))
    softmax = roc_auc_score(truth, torch.cat(list(unlike_softmax.values())))
    print(f"AUROC, familiarity score (Mahalanobis): {mahalanobis:.3f}")
    print(f"AUROC, 1 - top softmax probability:    {softmax:.3f}")
    print(
        f"threshold {check.threshold:.1f}: flags {100 * float((familiar > check.threshold).float().mean()):.1f} % of "
        f"the demo's test images and {100 * float((unfamiliar > check.threshold).float().mean()):.1f} % of the "
        "source task's"
    )


if __name__ == "__main__":
    main()
