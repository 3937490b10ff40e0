"""Fine-tuning the seed timm model on reviewer verdicts for one label.

The verdicts are split by time as heads are (the newest share held out). Images come from their
originals when still on disk with the same bytes, else from the stored thumbnail (256 px: a little soft
for a 384 px model, but always there). Training uses timm's own utilities — ``create_optimizer_v2``
(AdamW, no weight decay on norms and biases), ``LabelSmoothingCrossEntropy``, cosine schedule — in two
phases on the CPU with small batches: the classifier alone, then the last ``blocks`` transformer blocks
and the final norm with a tenth of the learning rate. A positive verdict is the model's "unsafe" class.

The result is a hub layout directory (``config.json`` + ``model.safetensors``) that ``--model DIR``
loads. It is measured against what the store already has: a head fitted on the frozen embeddings of the
same training verdicts, both scored by average precision on the held-out verdicts."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from indexer.storage import verdicts as vd
from indexer.media.decode import DEFAULT_LIMITS, decode
from indexer.models.embed import TimmEmbedder, load_model, to_input
from indexer.errors import FlagmatchError, InvalidInputError, NotEnoughVerdicts
from indexer.storage.verdicts import MIN_PER_CLASS, MIN_TEST_PER_CLASS
from indexer.storage.store import Store, read_original


def _pixels(store: Store, image_id: int, emb: TimmEmbedder) -> np.ndarray | None:
    """Model input pixels of a stored image: from its original when it is still there, else its thumbnail."""
    rec = store.catalog.get(image_id)
    found = read_original(rec.paths, rec.sha256, 200 * 1024 * 1024)
    if found.data is not None:
        try:
            return decode(found.data, emb.info.input, DEFAULT_LIMITS, thumb_size=0, pdq=False).pixels
        except FlagmatchError:
            pass
    thumb = store.thumb_path(rec.thumb_key) if rec.thumb_key else None
    if thumb is not None and thumb.is_file():
        return decode(thumb.read_bytes(), emb.info.input, DEFAULT_LIMITS, thumb_size=0, pdq=False).pixels
    return None


def finetune(store: Store, model_ref: str, label: str, out: Path, *, epochs: int = 3, blocks: int = 1,
             batch_size: int = 8, lr: float = 1e-3, test_share: float = 0.2, seed: int = 0,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    import timm
    import torch
    from safetensors.torch import save_file
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2

    say = progress or (lambda _m: None)
    emb = load_model(model_ref, precision="fp32")
    if not isinstance(emb, TimmEmbedder):
        raise InvalidInputError("fine-tuning needs a timm model (the store's is not one): --model DIR", code="not_timm")
    if epochs < 1 or blocks < 0 or batch_size < 1:
        raise InvalidInputError("epochs and batch size are at least 1, blocks at least 0", code="bad_parameter")
    data = vd.latest(store.catalog, vd.clean_label(label))
    pos, neg = data.counts
    if pos < MIN_PER_CLASS or neg < MIN_PER_CLASS:
        raise NotEnoughVerdicts(f"label {label!r} has {pos} positive and {neg} negative verdicts; fine-tuning "
                                f"needs at least {MIN_PER_CLASS} of each")
    px, ys, kept = [], [], []
    for image_id, positive in zip(data.image_ids, data.positive):
        p = _pixels(store, image_id, emb)
        if p is not None:
            px.append(p)
            ys.append(int(positive))
            kept.append(image_id)
    y = np.asarray(ys)
    n_test = max(int(round(len(y) * test_share)), 2 * MIN_TEST_PER_CLASS)
    tr, te = np.arange(len(y) - n_test), np.arange(len(y) - n_test, len(y))
    if min(y[te].sum(), (1 - y[te]).sum()) < MIN_TEST_PER_CLASS:
        raise NotEnoughVerdicts("the newest verdicts (held out) need a few of each kind")
    pixels = np.stack(px)

    # the baseline: a head on the frozen embeddings of the same training verdicts
    frozen, _ = emb.embed(pixels)
    base = LogisticRegression(class_weight="balanced", max_iter=2000).fit(frozen[tr], y[tr])
    frozen_ap = float(average_precision_score(y[te], base.predict_proba(frozen[te])[:, 1]))

    torch.manual_seed(seed)
    model = emb.model
    unsafe = emb.unsafe_index
    other = 1 - unsafe if model.num_classes == 2 else None  # type: ignore[attr-defined]
    if other is None:
        raise InvalidInputError("fine-tuning expects the seed model's two classes (unsafe / safe)", code="not_binary")
    device = emb.device  # the GPU where the model runs on one
    target = torch.tensor(np.where(y == 1, unsafe, other)).to(device)
    x_all = torch.from_numpy(to_input(pixels, emb.info.norm)).to(device)
    loss_fn = LabelSmoothingCrossEntropy(smoothing=0.1)
    rng = np.random.default_rng(seed)

    def run(phase: str, params_on: Callable[[str], bool], rate: float) -> None:
        for name, prm in model.named_parameters():  # type: ignore[attr-defined]
            prm.requires_grad = params_on(name)
        opt = create_optimizer_v2(model, opt="adamw", lr=rate, weight_decay=0.01)
        steps = epochs * max(1, -(-len(tr) // batch_size))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        model.train()  # type: ignore[attr-defined]
        for epoch in range(epochs):
            order = rng.permutation(tr)
            total = 0.0
            for i in range(0, len(order), batch_size):
                b = order[i:i + batch_size]
                xb = x_all[b]
                if rng.random() < 0.5:  # mirror: a re-upload edit the label does not care about
                    xb = torch.flip(xb, dims=[3])
                loss = loss_fn(model(xb), target[b])  # type: ignore[operator]
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(b)
            say(f"{phase} epoch {epoch + 1}/{epochs}: loss {total / len(tr):.4f}")
        model.eval()  # type: ignore[attr-defined]

    n_blocks = len(getattr(model, "blocks", []))
    last = {f"blocks.{i}." for i in range(max(0, n_blocks - blocks), n_blocks)}
    run("head", lambda n: n.startswith("head"), lr)
    if blocks > 0:
        run("last blocks", lambda n: n.startswith("head") or n.startswith("norm") or n.startswith("fc_norm")
            or any(n.startswith(b) for b in last), lr / 10)
    for prm in model.parameters():  # type: ignore[attr-defined]
        prm.requires_grad = False
    with torch.inference_mode():
        p = torch.softmax(model(x_all[te]), dim=-1)[:, unsafe].cpu().numpy()  # type: ignore[operator]
    tuned_ap = float(average_precision_score(y[te], p))

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))  # type: ignore[attr-defined]
    cfg = model.pretrained_cfg  # type: ignore[attr-defined]
    labels = ["SFW", "SFW"]
    labels[unsafe] = "NSFW"
    arch = str(cfg.get("architecture") or "")
    if not arch:
        raise FlagmatchError("the model does not name its timm architecture: cannot write a loadable config",
                             code="no_architecture")
    (out / "config.json").write_text(json.dumps({
        "architecture": arch, "num_classes": 2, "num_features": int(model.num_features),  # type: ignore[attr-defined]
        "label_names": labels,
        "pretrained_cfg": {"input_size": list(cfg["input_size"]), "interpolation": cfg["interpolation"],
                           "mean": list(cfg["mean"]), "std": list(cfg["std"]), "crop_pct": cfg["crop_pct"],
                           "num_classes": 2, "label_names": labels},
        "fine_tuned": {"from": emb.info.model_id, "label": data.label, "train": int(len(tr)), "test": int(len(te)),
                       "epochs": epochs, "blocks": blocks, "held_out_ap": tuned_ap, "frozen_head_ap": frozen_ap},
    }, indent=2))
    return {"arch": arch, "train": int(len(tr)), "test": int(len(te)), "finetuned_ap": tuned_ap,
            "frozen_head_ap": frozen_ap, "images_used": len(kept)}
