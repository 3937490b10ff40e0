"""A person's changes to hash banks, one function each, for the CLI, the viewer and the HMA routes: the bank change and its
audit row commit in one transaction (a crash leaves both or neither). The bank index hears of it from the
bank entries' id range and the bank list, which it reads on every lookup (``indexer.hashbanks.hash_index``)."""
from __future__ import annotations

import time
from typing import Any, Sequence

from indexer.media.hashes import PDQ_DEFAULT_THRESHOLD
from indexer.errors import NotFoundError
from indexer.storage.audit import AuditLog
from indexer.storage.exchanges import ExchangeStore, SignalTypeSwitches
from indexer.storage.banks import UNSET, Bank, BankEntry, BankStore, NewEntry


def create_bank(banks: BankStore, audit: AuditLog, name: str, *, actor: str, source: str = "", role: str = "match",
                enabled: bool = True, pdq_threshold: int = PDQ_DEFAULT_THRESHOLD,
                enabled_ratio: float | None = None) -> Bank:
    with banks.catalog.transaction() as tx:
        b = banks.create(name, source=source, role=role, enabled=enabled, pdq_threshold=pdq_threshold,
                         enabled_ratio=enabled_ratio, tx=tx)
        audit.record(actor, "bank_create", f"bank:{b.name}", tx=tx, source=source, role=role,
                     pdq_threshold=pdq_threshold, enabled=b.enabled, enabled_ratio=b.enabled_ratio)
    return b


def update_bank(banks: BankStore, audit: AuditLog, name: str, *, actor: str, enabled: bool | None = None,
                pdq_threshold: int | None = None, role: str | None = None, source: str | None = None,
                rename: str | None = None, enabled_ratio: float | None = None) -> Bank:
    """Switch a bank (on/off, or HMA's fractional ratio), or change its threshold, role, source or name; the
    audit row holds what was asked."""
    asked: dict[str, Any] = {k: v for k, v in {"enabled": enabled, "enabled_ratio": enabled_ratio,
                                                "pdq_threshold": pdq_threshold, "role": role, "source": source,
                                                "renamed_from": name if rename else None}.items()
                             if v is not None}
    with banks.catalog.transaction() as tx:
        b = banks.update(name, enabled=enabled, pdq_threshold=pdq_threshold, role=role, source=source, rename=rename,
                         enabled_ratio=enabled_ratio, tx=tx)
        audit.record(actor, "bank_update", f"bank:{b.name}", tx=tx, **asked)
    return b


def delete_bank(banks: BankStore, audit: AuditLog, name: str, *, actor: str) -> int:
    """Delete a bank and its entries; returns how many entries went."""
    with banks.catalog.transaction() as tx:
        n = banks.delete(name, tx=tx)
        audit.record(actor, "bank_delete", f"bank:{name}", tx=tx, entries=n)
    return n


def add_entries(banks: BankStore, audit: AuditLog, name: str, entries: list[NewEntry], *, actor: str
                ) -> tuple[list[int], int]:
    """Bank signals (entries already there are kept); returns (the new entries' ids, how many were banked
    already). Audited as ``bank_add`` with the new ids, in the same transaction."""
    with banks.catalog.transaction() as tx:
        new, dup = banks.add(name, entries, tx=tx)
        if new:
            audit.record(actor, "bank_add", f"bank:{name}", tx=tx, ids=new,
                         signal_types=sorted({e.signal_type for e in entries}))
    return new, dup


def remove_entry(banks: BankStore, audit: AuditLog, name: str, entry_id: int, *, actor: str) -> int:
    """Take one content (its every signal) out of a bank; returns how many went (0 or 1). Audited as ``bank_remove`` in the same
    transaction when one did."""
    with banks.catalog.transaction() as tx:
        n = banks.remove_entry(name, entry_id, tx=tx)
        if n:
            audit.record(actor, "bank_remove", f"bank:{name}", tx=tx, ids=[entry_id])
    return n


def add_content(banks: BankStore, audit: AuditLog, name: str, entries: Sequence[NewEntry], *, actor: str,
                disable_until_ts: int | None = None) -> int:
    """Bank one piece of content (its signals share one content id, answered); audited as ``bank_add`` in the
    same transaction when anything was new."""
    with banks.catalog.transaction() as tx:
        cid, new = banks.add_content(name, entries, disable_until_ts=disable_until_ts, tx=tx)
        if new:
            audit.record(actor, "bank_add", f"bank:{name}", tx=tx, content_id=cid,
                         signal_types=sorted({e.signal_type for e in entries}))
    return cid


def update_content(banks: BankStore, audit: AuditLog, name: str, content_id: int, *, actor: str,
                   note: object = UNSET, disable_until_ts: object = UNSET) -> list[BankEntry]:
    """Set a banked content's note or the time it is disabled until; audited as ``bank_content_update``."""
    asked = {k: v for k, v in {"note": note, "disable_until_ts": disable_until_ts}.items() if v is not UNSET}
    with banks.catalog.transaction() as tx:
        out = banks.update_content(name, content_id, note=note, disable_until_ts=disable_until_ts, now=time.time(),
                                   tx=tx)
        audit.record(actor, "bank_content_update", f"bank:{name}", tx=tx, content_id=content_id, **asked)
    return out


def create_exchange(banks: BankStore, exchanges: ExchangeStore, audit: AuditLog, name: str, api: str,
                    config_json: str, *, actor: str, enabled: bool = True) -> None:
    """An exchange and the bank it fills (same name), one transaction with its audit row. The bank must not
    exist yet (an exchange owns its bank: a fetch adds and removes its entries)."""
    with banks.catalog.transaction() as tx:
        banks.create(name, source=f"exchange:{api}", tx=tx)
        exchanges.create(name, api, config_json, enabled=enabled, tx=tx)
        audit.record(actor, "exchange_create", f"exchange:{name}", tx=tx, api=api)


def set_exchange_enabled(exchanges: ExchangeStore, audit: AuditLog, name: str, enabled: bool, *, actor: str) -> None:
    with exchanges.catalog.transaction() as tx:
        exchanges.set_enabled(name, enabled, tx=tx)
        audit.record(actor, "exchange_update", f"exchange:{name}", tx=tx, enabled=enabled)


def delete_exchange(banks: BankStore, exchanges: ExchangeStore, audit: AuditLog, name: str, *, actor: str) -> bool:
    """Delete an exchange and the bank it filled; False (nothing recorded) when there was none."""
    with banks.catalog.transaction() as tx:
        if not exchanges.delete(name, tx=tx):
            return False
        n = 0
        try:
            n = banks.delete(name, tx=tx)
        except NotFoundError:
            pass  # its bank was deleted by hand before
        audit.record(actor, "exchange_delete", f"exchange:{name}", tx=tx, entries=n)
    return True


def set_exchange_credentials(exchanges: ExchangeStore, audit: AuditLog, api: str, credential: str | None, *,
                             actor: str) -> None:
    """Set (or, with None, unset) an exchange API's credentials; the audit row says which, never what."""
    with exchanges.catalog.transaction() as tx:
        exchanges.set_credential(api, credential, tx=tx)
        audit.record(actor, "exchange_credentials", f"exchange_api:{api}", tx=tx, set=credential is not None)


def set_signal_type(switches: SignalTypeSwitches, audit: AuditLog, name: str, ratio: float, *, actor: str) -> None:
    """Switch an HMA signal type (a type at 0 is refused by lookups)."""
    with switches.catalog.transaction() as tx:
        switches.set(name, ratio, tx=tx)
        audit.record(actor, "signal_type_update", f"signal_type:{name}", tx=tx, enabled_ratio=ratio)
