"""The catalog on a real SQLite file: the model binding, references, batches, flags with their history,
deletion, heads and checkpoints."""
from __future__ import annotations

import hashlib

import pytest

from indexer.storage.catalog import Catalog, Checkpoint, FlagRequest, NewImage
from indexer.errors import InvalidInputError, ModelMismatchError, NotFoundError


def sha(i: int) -> str:
    return hashlib.sha256(f"image {i}".encode()).hexdigest()


def image(i: int, *paths: tuple[str, str | None]) -> NewImage:
    return NewImage(i, sha(i), 100, "PNG", 10, 10, 1, 0.1 * i, f"k{i}", paths or ((f"/in/{i}.png", None),))


@pytest.fixture
def catalog(tmp_path):
    c = Catalog(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    c.bind_model("m@1", 8, "{}", "some/model")
    yield c
    c.close()


def test_model_binding_is_recorded_once_and_refuses_another(catalog):
    catalog.bind_model("m@1", 8, "{}")  # the same model again: fine
    assert catalog.model_meta()["model_source"] == "some/model"
    with pytest.raises(ModelMismatchError, match="m@1"):
        catalog.bind_model("other@2", 8, "{}")
    with pytest.raises(ModelMismatchError):
        catalog.bind_model("m@1", 16, "{}")


def test_references_resolve_by_id_sha_and_external_id(catalog):
    catalog.write_batch([image(1, ("/a/1.png", "case-7")), image(2, ("/a/2.png", "case-8"), ("/b/2.png", "dup"))],
                        "m@1")
    assert catalog.resolve(1) == 1 and catalog.resolve("2") == 2
    assert catalog.resolve(sha(2)) == 2 and catalog.resolve(sha(2).upper()) == 2
    assert catalog.resolve("case-7") == 1 and catalog.resolve("dup") == 2
    with pytest.raises(NotFoundError):
        catalog.resolve("no-such-thing")
    catalog.write_batch([image(3, ("/c/3.png", "case-7"))], "m@1")
    with pytest.raises(InvalidInputError, match="2 different images"):
        catalog.resolve("case-7")
    rec = catalog.get(2)
    assert set(rec.paths) == {"/a/2.png", "/b/2.png"} and set(rec.external_ids) == {"case-8", "dup"}


def test_flags_keep_their_history_and_move_the_head(catalog):
    catalog.write_batch([image(i) for i in range(1, 6)], "m@1", flags=[(2, FlagRequest("model", None, "model"))])
    assert catalog.head() == (5, 1)
    assert catalog.set_flag([2, 3], FlagRequest("review", "spam", "rita", "seen before"), flag=True) == [2, 3]
    assert catalog.set_flag([3], FlagRequest("review", "spam", "rita"), flag=True) == []  # no change, no event
    assert catalog.set_flag([2], FlagRequest("review", None, "sam", "false positive"), flag=False) == [2]
    assert catalog.live([1, 2, 3, 4], flagged=True) == {3}
    history = catalog.get(2).history
    assert [(e.action, e.source, e.actor) for e in history] == [("flag", "model", "model"), ("flag", "review", "rita"),
                                                                 ("unflag", "review", "sam")]
    events = catalog.flag_events_after(1)
    assert [e.image_id for e in events] == [2, 3, 2] and catalog.head() == (5, 4)
    with pytest.raises(InvalidInputError, match="flag source"):
        catalog.set_flag([1], FlagRequest("whoever", None, "x"), flag=True)
    with pytest.raises(NotFoundError):
        catalog.set_flag([99], FlagRequest("review", None, "x"), flag=True)


def test_deletion_keeps_only_the_hash_and_the_trail(catalog):
    catalog.write_batch([image(1, ("/secret/1.png", "ext-1"))], "m@1", flags=[(1, FlagRequest("model", None, "model"))])
    catalog.mark_deleted([1], "rita", "legal request")
    rec = catalog.get(1)
    assert rec.deleted and not rec.flagged and rec.paths == () and rec.external_ids == () and rec.thumb_key == ""
    assert catalog.deleted_sha(sha(1)) and catalog.known_sha(sha(1)) == 1
    assert catalog.live([1]) == set() and catalog.image_ids() == []
    assert [e.action for e in rec.history] == ["flag", "unflag"] and rec.history[-1].reason == "legal request"


def test_checkpoints_round_trip(catalog):
    assert catalog.checkpoint("all") is None
    cp = Checkpoint("all", 10, 3, 2, 9, {"kind": "flat", "dim": 8, "space_version": 1}, "ab" * 32)
    catalog.save_checkpoint(cp)
    catalog.save_checkpoint(Checkpoint("all", 12, 3, 2, 11, cp.params, "cd" * 32))
    got = catalog.checkpoint("all")
    assert (got.image_id, got.ntotal, got.params["space_version"], got.checksum) == (12, 11, 1, "cd" * 32)
