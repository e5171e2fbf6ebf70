"""The catalog's in-memory view of images follows every write to the image tables."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from crivm.runtime.store import Store
from crivm.storage.catalog import Catalog, ImageRecord, LayerRecord


def _layer(n: int) -> LayerRecord:
    chain = f"sha256:{n + 200:064x}"
    return LayerRecord(chain_id=chain, diff_id=chain, parent="", blob_digest=chain,
                       link_id=f"L{n}", size=1)


def _image(n: int) -> ImageRecord:
    return ImageRecord(
        id=f"sha256:{n}{'a' * 63}", manifest_digest=f"sha256:{n + 100:064x}", index_digest="",
        size=n, pinned=False, created_at=n, config={"config": {"Cmd": ["sh"]}},
        layers=(f"sha256:{n + 200:064x}",), repo_tags=(), repo_digests=(),
    )


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    store = Store.open(tmp_path / "state.db")
    made = Catalog(store)
    for n in (1, 2, 3):
        made.add_layer(_layer(n))
    yield made
    store.close()


def test_reads_see_saves_retags_and_removals(catalog: Catalog) -> None:
    first, second = _image(1), _image(2)
    assert catalog.list_images() == []
    catalog.save_image(first, [("docker.io/library/a:1", "tag")], pinned=False)
    assert catalog.image_id_by_name("docker.io/library/a:1") == first.id
    got = catalog.get_image(first.id)
    assert got is not None and got.repo_tags == ("docker.io/library/a:1",)
    assert got.layers == first.layers and got.config == first.config

    # The tag moves to the second image: the first loses it.
    catalog.save_image(second, [("docker.io/library/a:1", "tag"),
                                ("docker.io/library/a@sha256:" + "e" * 64, "digest")],
                       pinned=True)
    moved = catalog.get_image(first.id)
    assert moved is not None and moved.repo_tags == ()
    latest = catalog.get_image(second.id)
    assert latest is not None and latest.pinned
    assert latest.repo_digests == ("docker.io/library/a@sha256:" + "e" * 64,)
    assert [image.id for image in catalog.list_images()] == [first.id, second.id]
    assert catalog.image_ids_by_prefix("2aaa") == [second.id]
    assert catalog.image_ids_by_prefix("aaaa") == []

    catalog.remove_name("docker.io/library/a:1")
    assert catalog.image_id_by_name("docker.io/library/a:1") is None
    catalog.remove_image(first.id)
    assert catalog.get_image(first.id) is None
    assert [image.id for image in catalog.list_images()] == [second.id]


def test_a_new_catalog_on_the_same_store_reads_the_same(catalog: Catalog,
                                                        tmp_path: Path) -> None:
    catalog.save_image(_image(3), [("docker.io/library/b:2", "tag")], pinned=False)
    other = Store.open(tmp_path / "state.db")
    try:
        again = Catalog(other).get_image(_image(3).id)
        assert again is not None and again.repo_tags == ("docker.io/library/b:2",)
    finally:
        other.close()
