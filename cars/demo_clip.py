"""The demo's own small CLIP: an image tower and a text tower (open_clip's, configs/demo-clip.json) pretrained
contrastively on drawn images with the captions the generator writes of them, so that the demo can show zero-shot
classification with no network.

CLIP learned the word "coupe" from the web; this one learns it from captions of drawings. Its pictures are the demo's
source things (buses, tractors, boats ... in five colours) and cars drawn in seven colours, with their own seeds and
their own style (smaller in the frame, other shades): never the target's training or test images. The captions say
what is drawn, its colour and, for a car, "toy" and the year its body is made in, as a shop's listing would. Made once
into the cache beside the demo-pretrained weights, named after a digest of this recipe (`RECIPE`, the model's config
and the captions' version), in about a minute on two cores.
"""

import hashlib
import json
import random
import time

import torch
from torch.nn import functional as F

from cars import demo
from cars.checkpoint import save_checkpoint
from cars.files import made_once
from cars.paths import cache_home
from cars.runtime import seed_everything
from cars.starts import DEMO_CLIP_CONFIG, DEMO_CLIP_INTERPOLATION, Renormalise, clip_model, quiet_libraries
from cars.transforms import eval_transform, normalize

CAPTIONS_VERSION = "v1"  # bump whenever the pictures or their captions change
RECIPE = dict(resolution=64, per_combination=12, epochs=24, batch_size=128, lr=2e-3, weight_decay=0.1, seed=0)
CAR_COLOURS = {**demo.PAINTS, **demo.SOURCE_COLOURS}  # red and blue, and the five colours of the source things
CAR_STYLE = dict(size=(0.32, 0.5))  # the cars of the captions stand smaller in the frame than the target's
SEED = 7_000  # the captioned pictures' own generator seed (the demo's splits draw with seeds 0 to 3)
CAR_CAPTIONS = (
    "a photo of a {colour} {body}.",
    "a {colour} toy {body}.",
    "a toy {body} {colour} {year}.",
    "my {year} {body}, painted {colour}.",
    "a {body} in {colour}.",
)
THING_CAPTIONS = ("a photo of a {colour} {kind}.", "a {colour} {kind}.", "a {kind}, painted {colour}.")


def weights_path():
    """Where the demo CLIP's whole state dict (both towers) is kept, named after what it is made from."""
    made_of = json.dumps(dict(RECIPE, model=json.loads(DEMO_CLIP_CONFIG.read_text())), sort_keys=True)
    key = hashlib.sha256(f"{CAPTIONS_VERSION}\n{made_of}".encode()).hexdigest()[:12]
    return cache_home() / "demo-pretrained" / f"demo-clip-{key}.pth"


def captioned_pictures(rng: random.Random) -> tuple[list, list[str], list[int]]:
    """The pictures, a caption for each, and which drawn thing (kind and colour) each shows: captions of the same
    thing count as each other's matches in the loss."""
    pictures, captions, things = [], [], []
    combinations = [("car", body, colour) for body in demo.BODIES for colour in CAR_COLOURS]
    combinations += [("thing", kind, colour) for kind in demo.SOURCE_KINDS for colour in demo.SOURCE_COLOURS]
    for _ in range(RECIPE["per_combination"]):
        for index, (what, name, colour) in enumerate(combinations):
            if what == "car":
                rgb = CAR_COLOURS[colour]
                pictures.append(demo.draw_car(name, colour, rng, rgb=rgb, **CAR_STYLE))
                caption = rng.choice(CAR_CAPTIONS).format(colour=colour, body=name, year=demo.YEARS[name])
            else:
                pictures.append(demo.draw_source_thing(name, demo.SOURCE_COLOURS[colour], rng))
                caption = rng.choice(THING_CAPTIONS).format(colour=colour, kind=name)
            captions.append(caption.lower())
            things.append(index)
    return pictures, captions, things


def pretrain() -> dict:
    """Both towers from random weights, on the captioned pictures: CLIP's symmetric contrastive loss, AdamW with a
    cosine lr. Returns the whole model's state dict."""
    import open_clip

    seed_everything(RECIPE["seed"])
    rng = random.Random(SEED)
    pictures, captions, things = captioned_pictures(rng)
    resize = eval_transform(RECIPE["resolution"], interpolation=DEMO_CLIP_INTERPOLATION)
    pixels = torch.stack([resize(picture.convert("RGB")) for picture in pictures])
    clip = clip_model(demo.DEMO_CLIP_ARCH, source=None)
    preprocess = open_clip.get_model_preprocess_cfg(clip)
    renormalise = Renormalise(preprocess["mean"], preprocess["std"])  # as a LibraryNetwork feeds it
    tokens = open_clip.get_tokenizer(demo.DEMO_CLIP_ARCH.removeprefix("open_clip:"))(captions)
    things = torch.tensor(things)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    batch, count = RECIPE["batch_size"], len(captions)
    steps = RECIPE["epochs"] * (count // batch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, RECIPE["lr"], total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(RECIPE["seed"])
    clip.train()
    for epoch in range(RECIPE["epochs"]):
        order = torch.randperm(count, generator=generator)
        total = 0.0
        for start in range(0, count - batch + 1, batch):
            rows = order[start : start + batch]
            images = pixels[rows]
            flip = torch.rand(len(rows), generator=generator) < 0.5  # the only augmentation: a mirror image
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            image_features = F.normalize(clip.encode_image(renormalise(normalize(images))), dim=-1)
            text_features = F.normalize(clip.encode_text(tokens[rows]), dim=-1)
            logits = clip.logit_scale.exp() * image_features @ text_features.T
            # a caption of the same drawn thing is a match too, not a negative
            same = (things[rows][:, None] == things[rows][None, :]).float()
            targets = same / same.sum(1, keepdim=True)
            loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, 4.6052)  # CLIP's cap: a scale of at most 100
            total += loss.item()
        print(f"demo CLIP epoch {epoch + 1}/{RECIPE['epochs']}: contrastive loss {total / (count // batch):.3f}")
    return clip.state_dict()


def ensure_made() -> None:
    """Make the demo's CLIP once (another process making it: wait for it)."""
    path = weights_path()
    if path.is_file():
        return
    with made_once(path, "the demo's CLIP") as to_make:
        if not to_make:
            return
        print(f"pretraining the demo's CLIP on captioned drawings, once; its weights go to {path}")
        began = time.time()
        with quiet_libraries():
            state = pretrain()
        save_checkpoint(path, state)
        print(f"pretrained the demo's CLIP in {time.time() - began:.0f} s: {path}")
