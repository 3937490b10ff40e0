"""Hash exchanges in the catalog: which exchange API (threatexchange's SignalExchangeAPI name) fills which
bank, its collaboration config and checkpoint (JSON, as threatexchange dumps them), the last fetch's
outcome, and each API's credentials. What the APIs are and how a fetch runs is ``indexer.hashbanks.exchanges``'
work, above this."""
from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import delete, select, update

from indexer.errors import InvalidInputError, NotFoundError
from indexer.storage.catalog import Catalog, Transaction
from indexer.storage.tables import ExchangeCredentialRow, ExchangeRow, SignalTypeRow


@dataclass(frozen=True)
class Exchange:
    name: str
    api: str
    config: str            # JSON of the API's collaboration config
    enabled: bool
    checkpoint: str | None
    checkpoint_ts: int | None
    running_since: int | None
    last_complete_ts: int | None
    last_succeeded: bool | None
    last_error: str | None
    up_to_date: bool
    fetched_items: int

    def status_json(self) -> dict[str, object]:
        """OMM's FetchStatus."""
        return {"checkpoint_ts": self.checkpoint_ts, "running_fetch_start_ts": self.running_since,
                "last_fetch_complete_ts": self.last_complete_ts, "last_fetch_succeeded": self.last_succeeded,
                "up_to_date": self.up_to_date, "fetched_items": self.fetched_items, "last_error": self.last_error}


def _exchange(r: ExchangeRow) -> Exchange:
    return Exchange(r.name, r.api, r.config, r.enabled, r.checkpoint, r.checkpoint_ts, r.running_since,
                    r.last_complete_ts, r.last_succeeded, r.last_error, r.up_to_date, r.fetched_items)


class ExchangeStore:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def list(self) -> list[Exchange]:
        with self.catalog.session() as s:
            return [_exchange(r) for r in s.scalars(select(ExchangeRow).order_by(ExchangeRow.name))]

    def get(self, name: str) -> Exchange:
        with self.catalog.session() as s:
            r = s.get(ExchangeRow, name)
            if r is None:
                raise NotFoundError(f"Exchange '{name}' not found")
            return _exchange(r)

    def create(self, name: str, api: str, config: str, *, enabled: bool = True,
               tx: Transaction | None = None) -> None:
        with self.catalog.transaction(tx) as s:
            if s.get(ExchangeRow, name) is not None:
                raise InvalidInputError(f"exchange {name} already exists", code="conflict")
            s.add(ExchangeRow(name=name, api=api, config=config, enabled=enabled, up_to_date=False,
                              fetched_items=0))

    def set_enabled(self, name: str, enabled: bool, *, tx: Transaction | None = None) -> None:
        with self.catalog.transaction(tx) as s:
            if not s.execute(update(ExchangeRow).where(ExchangeRow.name == name)
                             .values(enabled=enabled)).rowcount:
                raise NotFoundError(f"Exchange '{name}' not found")

    def delete(self, name: str, *, tx: Transaction | None = None) -> bool:
        with self.catalog.transaction(tx) as s:
            return bool(s.execute(delete(ExchangeRow).where(ExchangeRow.name == name)).rowcount)

    # -- a fetch's bookkeeping
    def start(self, name: str) -> None:
        with self.catalog.transaction() as s:
            s.execute(update(ExchangeRow).where(ExchangeRow.name == name).values(running_since=int(time.time())))

    def advance(self, name: str, checkpoint: str, checkpoint_ts: int | None, items: int, *,
                tx: Transaction) -> None:
        """Record a fetched batch's checkpoint in the transaction that applied the batch to the bank: a crash
        leaves the bank and the checkpoint in step, and the next fetch resumes from there."""
        with self.catalog.transaction(tx) as s:
            r = s.get(ExchangeRow, name)
            if r is None:
                raise NotFoundError(f"Exchange '{name}' not found")
            r.checkpoint, r.checkpoint_ts = checkpoint, checkpoint_ts
            r.fetched_items = int(r.fetched_items or 0) + items

    def finish(self, name: str, *, ok: bool, error: str | None = None, up_to_date: bool = False) -> None:
        with self.catalog.transaction() as s:
            s.execute(update(ExchangeRow).where(ExchangeRow.name == name).values(
                running_since=None, last_complete_ts=int(time.time()), last_succeeded=ok,
                last_error=(error or None) and error[:2000], up_to_date=up_to_date))

    # -- credentials
    def credential(self, api: str) -> str | None:
        with self.catalog.session() as s:
            r = s.get(ExchangeCredentialRow, api)
            return r.credential if r is not None else None

    def set_credential(self, api: str, credential: str | None, *, tx: Transaction | None = None) -> None:
        with self.catalog.transaction(tx) as s:
            s.execute(delete(ExchangeCredentialRow).where(ExchangeCredentialRow.api == api))
            if credential is not None:
                s.add(ExchangeCredentialRow(api=api, credential=credential))


class SignalTypeSwitches:
    """HMA's per-signal-type ``enabled_ratio`` (a type switched to 0 is refused by lookups)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def all(self) -> dict[str, float]:
        with self.catalog.session() as s:
            return {r.name: float(r.enabled_ratio) for r in s.scalars(select(SignalTypeRow))}

    def set(self, name: str, ratio: float, *, tx: Transaction | None = None) -> None:
        with self.catalog.transaction(tx) as s:
            r = s.get(SignalTypeRow, name)
            if r is None:
                s.add(SignalTypeRow(name=name, enabled_ratio=ratio))
            else:
                r.enabled_ratio = ratio
