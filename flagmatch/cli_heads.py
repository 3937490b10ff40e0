"""The learning loop from the command line: ``flagmatch verdicts``, ``train``, ``score``, ``heads`` and
``finetune``. Thin wrappers over ``indexer.storage.verdicts``, ``indexer.review.heads`` and ``indexer.models.finetune``."""
from __future__ import annotations

import json
from pathlib import Path

import click

from flagmatch import wiring
from flagmatch.commands import Bar, SettingsCommand, Stages, main, with_settings
from flagmatch.settings import Settings


@main.command(cls=SettingsCommand)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@with_settings()
def verdicts(as_json: bool, settings: Settings) -> None:
    """Reviewer verdicts per label: positive and negative (the latest per live image), what training reads."""
    from indexer.storage import verdicts as vd
    store = wiring.open_store(settings)
    per = vd.labels(store.catalog)
    if as_json:
        click.echo(json.dumps({k: {"positive": p, "negative": n} for k, (p, n) in per.items()}, indent=2))
        return
    if not per:
        click.echo("no verdicts yet: every flag, unflag and cluster decision a reviewer makes is one")
    for label, (p, n) in per.items():
        click.echo(f"{label:<24} {p:>8,} positive {n:>8,} negative")


@main.command(cls=SettingsCommand)
@click.option("--label", "labels", multiple=True, help="the label(s) to train (default: every label with verdicts)")
@click.option("--json", "as_json", is_flag=True, help="print the evaluation reports as JSON")
@with_settings("heads")
def train(labels: tuple[str, ...], as_json: bool, settings: Settings) -> None:
    """Fit a calibrated head per label on the stored embeddings from reviewer verdicts, pick its threshold
    for --target-precision on the newest verdicts (held out) and make it the active version."""
    from dataclasses import asdict

    from indexer.errors import NotEnoughVerdicts
    from indexer.review.heads import train_head
    from indexer.storage import verdicts as vd
    store = wiring.open_store(settings)
    todo = list(labels) or list(vd.labels(store.catalog))
    if not todo:
        raise click.ClickException("no verdicts yet: review some images first (flag, unflag, cluster decisions)")
    reports, refused = [], []
    stages = Stages()
    for k, label in enumerate(todo):
        stages("train heads", k, len(todo))
        try:
            _, rep = train_head(store, label, target_precision=settings.target_precision,
                                test_share=settings.head_test_share)
        except NotEnoughVerdicts as exc:
            refused.append(exc.message)
            continue
        reports.append(rep)
    stages("train heads", len(todo), len(todo))
    stages.close()
    if as_json:
        click.echo(json.dumps({"heads": [asdict(r) for r in reports], "refused": refused}, indent=2))
    for r in reports if not as_json else []:
        met = "" if r.target_met else f" (target {r.target_precision:.2f} NOT reached: most precise threshold)"
        click.echo(f"{r.label} v{r.version}: threshold {r.threshold:.3f}{met}; held out precision {r.precision:.3f}, "
                   f"recall {r.recall:.3f}, AP {r.average_precision:.3f}, Brier {r.brier:.3f} ({r.method}); "
                   f"train {r.counts['train_positive']}+/{r.counts['train_negative']}-, test "
                   f"{r.counts['test_positive']}+/{r.counts['test_negative']}-")
    for message in refused:
        click.echo(f"refused: {message}", err=True)
    if refused and not reports:
        raise click.exceptions.Exit(1)


@main.command(cls=SettingsCommand)
@with_settings("index")
def score(settings: Settings) -> None:
    """Apply the active heads to every image: p_<label> stored, images at or above a head's threshold
    flagged (source head:<label>@v<n>) unless a reviewer said otherwise; nothing is unflagged."""
    from indexer.review.heads import load_active, score_catalog
    store = wiring.open_store(settings)
    heads = load_active(store)
    if not heads:
        raise click.ClickException("no trained head: flagmatch train")
    bar = Bar(store.catalog.stats()["images"])
    try:
        counts, newly = score_catalog(store, heads, progress=bar)
    finally:
        bar.close()
    if newly:
        index = wiring.open_index(store, settings)
        index.catch_up()
        index.save(("flagged",))
    heads_txt = ", ".join(f"{h.label} v{h.version} ≥ {h.threshold:.3f}" for h in heads)
    click.echo(f"scored {counts.scored:,} images with {heads_txt}")
    for label, n in sorted(counts.flagged.items()):
        click.echo(f"  flagged {n:,} as {label}")
    if counts.kept_by_verdict:
        click.echo(f"  left {counts.kept_by_verdict:,} above a threshold alone: a reviewer said they are not that label")


@main.group()
def heads() -> None:
    """Trained heads: versions, their reports, which one is active."""


@heads.command("list", cls=SettingsCommand)
@with_settings()
def heads_list(settings: Settings) -> None:
    """Every label's versions, newest first, with its held-out metrics; * marks the active one."""
    from indexer.review.heads import active_labels, reports
    store = wiring.open_store(settings)
    active = dict(active_labels(store))
    if not active:
        click.echo("no trained head: flagmatch train")
    for label in active:
        for r in reports(store, label):
            mark = "*" if r.version == active[label] else " "
            click.echo(f"{mark} {label} v{r.version} {r.trained_at}: threshold {r.threshold:.3f}, precision "
                       f"{r.precision:.3f}, recall {r.recall:.3f}, AP {r.average_precision:.3f}")


@heads.command("activate", cls=SettingsCommand)
@click.argument("label")
@click.argument("version", type=int)
@with_settings()
def heads_activate(label: str, version: int, settings: Settings) -> None:
    """Make VERSION of LABEL's head the one scoring uses (roll back or forward)."""
    from indexer.review.heads import activate
    activate(wiring.open_store(settings), label, version)
    click.echo(f"{label}: v{version} is active; run flagmatch score to apply it")


@main.command(cls=SettingsCommand)
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--label", required=True, help="the policy label whose verdicts it learns")
@click.option("--epochs", default=3, show_default=True, help="epochs for the head, then as many for the last blocks")
@click.option("--blocks", default=1, show_default=True, help="how many of the last transformer blocks are trained")
@click.option("--batch-size", default=8, show_default=True)
@with_settings("model", "heads")
def finetune(out: Path, label: str, epochs: int, blocks: int, batch_size: int, settings: Settings) -> None:
    """Fine-tune the store's timm model on LABEL's verdict images (head first, then the last blocks) and
    write it to OUT in the hub layout (config.json + model.safetensors): load it with --model OUT."""
    from indexer.models.finetune import finetune as run
    store = wiring.open_store(settings)
    rep = run(store, wiring.model_ref(settings, store), label, out, epochs=epochs, blocks=blocks,
              batch_size=batch_size, test_share=settings.head_test_share,
              progress=lambda msg: click.echo(msg, err=True))
    click.echo(f"wrote {out} ({rep['arch']}); held out ({rep['test']} verdicts): fine-tuned AP "
               f"{rep['finetuned_ap']:.3f} vs frozen-embedding head AP {rep['frozen_head_ap']:.3f}")
    click.echo(f"a store is tied to its model: ingest into a new --home with --model {out}, or re-embed "
               f"(see the README)")
