"""A person's changes to hash banks, one function each, for the CLI, the viewer and the HMA routes: the bank change and its
audit row commit in one transaction (a crash leaves both or neither). The bank index hears of it from the
bank entries' id range and the bank list, which it reads on every lookup (``indexer.hashbanks.hash_index``)."""
from __future__ import annotations

from typing import Any

from indexer.media.hashes import PDQ_DEFAULT_THRESHOLD
from indexer.storage.audit import AuditLog
from indexer.storage.banks import Bank, BankStore, NewEntry


def create_bank(banks: BankStore, audit: AuditLog, name: str, *, actor: str, source: str = "", role: str = "match",
                enabled: bool = True, pdq_threshold: int = PDQ_DEFAULT_THRESHOLD) -> Bank:
    with banks.catalog.transaction() as tx:
        b = banks.create(name, source=source, role=role, enabled=enabled, pdq_threshold=pdq_threshold, tx=tx)
        audit.record(actor, "bank_create", f"bank:{b.name}", tx=tx, source=source, role=role,
                     pdq_threshold=pdq_threshold, enabled=b.enabled)
    return b


def update_bank(banks: BankStore, audit: AuditLog, name: str, *, actor: str, enabled: bool | None = None,
                pdq_threshold: int | None = None, role: str | None = None, source: str | None = None,
                rename: str | None = None) -> Bank:
    """Switch a bank, or change its threshold, role, source or name; the audit row holds what was asked."""
    asked: dict[str, Any] = {k: v for k, v in {"enabled": enabled, "pdq_threshold": pdq_threshold, "role": role,
                                                "source": source, "renamed_from": name if rename else None}.items()
                             if v is not None}
    with banks.catalog.transaction() as tx:
        b = banks.update(name, enabled=enabled, pdq_threshold=pdq_threshold, role=role, source=source, rename=rename,
                         tx=tx)
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
    """Take one entry out of a bank; returns how many went (0 or 1). Audited as ``bank_remove`` in the same
    transaction when one did."""
    with banks.catalog.transaction() as tx:
        n = banks.remove_entry(name, entry_id, tx=tx)
        if n:
            audit.record(actor, "bank_remove", f"bank:{name}", tx=tx, ids=[entry_id])
    return n
