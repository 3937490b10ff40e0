"""Hash exchanges through threatexchange's ``SignalExchangeAPI`` classes — the framework Open Media Match
uses — so ThreatExchange, NCMEC, StopNCII, Tech Against Terrorism, a local file and the static sample are
configured and fetched the same way: an exchange is an API name, the API's collaboration config (its
dataclass, as JSON) and a bank of the same name that the fetch keeps in step with the exchange.

A fetch runs the API's ``fetch_iter`` from the stored checkpoint; each batch (``FetchDelta``) is applied to
the bank — new signals added, updated ones kept, a key whose value is ``None`` removes what that key banked —
and the batch's checkpoint is stored in the same transaction, so a crash mid-fetch resumes from the last
applied batch with the bank in step with it. Which fetch key banked a signal is the entry's ``external_id``
(``exchange:<key>``). Signal types map onto flagmatch's (PDQ; MD5 for threatexchange's ``video_md5``);
the others an exchange carries are skipped and counted."""
from __future__ import annotations

import dataclasses
import json
import types
import typing as t
from dataclasses import MISSING, dataclass
from enum import Enum
from pathlib import Path

from threatexchange.exchanges import auth
from threatexchange.exchanges.impl.fb_threatexchange_api import FBThreatExchangeSignalExchangeAPI
from threatexchange.exchanges.impl.file_api import LocalFileSignalExchangeAPI
from threatexchange.exchanges.impl.ncmec_api import NCMECSignalExchangeAPI
from threatexchange.exchanges.impl.static_sample import StaticSampleSignalExchangeAPI
from threatexchange.exchanges.impl.stop_ncii_api import StopNCIISignalExchangeAPI
from threatexchange.exchanges.impl.techagainstterrorism_api import TATSignalExchangeAPI
from threatexchange.signal_type.md5 import VideoMD5Signal
from threatexchange.signal_type.pdq.signal import PdqSignal
from threatexchange.utils import dataclass_json

from indexer.errors import InvalidInputError, NotFoundError
from indexer.media.hashes import canonical_type, validate_signal
from indexer.storage.audit import AuditLog
from indexer.storage.banks import BankStore, NewEntry
from indexer.storage.exchanges import Exchange, ExchangeStore

APIS: dict[str, type] = {c.get_name(): c for c in (StaticSampleSignalExchangeAPI, LocalFileSignalExchangeAPI,
                                                      FBThreatExchangeSignalExchangeAPI, NCMECSignalExchangeAPI,
                                                      StopNCIISignalExchangeAPI, TATSignalExchangeAPI)}
SIGNAL_TYPES = (PdqSignal, VideoMD5Signal)   # what flagmatch banks: PDQ, and MD5 of the bytes
CONFIG_IGNORE_FIELDS = frozenset({"name", "api", "enabled"})
MAX_KEY = 190


def api_class(name: str) -> type:
    cls = APIS.get(name)
    if cls is None:
        raise NotFoundError(f"no such Exchange API '{name}' (flagmatch has {', '.join(sorted(APIS))})")
    return cls


def supports_auth(cls: type) -> bool:
    return issubclass(cls, auth.SignalExchangeWithAuth)


def parse_config(api: str, name: str, api_json: dict[str, t.Any], *, enabled: bool = True) -> t.Any:
    """The API's collaboration config from a client's ``api_json`` (OMM's rehydration: name, api and enabled
    are set here), or InvalidInputError saying what is wrong."""
    cls = api_class(api)
    body = {**api_json, "name": name, "api": api, "enabled": enabled}
    try:
        return dataclass_json.dataclass_load_dict(body, cls.get_config_cls())
    except Exception as exc:  # threatexchange raises what the dataclass constructor raises
        raise InvalidInputError(f"Failed to parse `api_json` - {exc}") from None


def dump_config(config: t.Any) -> str:
    return dataclass_json.dataclass_dumps(config)


def parse_credentials(api: str, cred_json: dict[str, t.Any]) -> str:
    cls = api_class(api)
    if not supports_auth(cls):
        raise InvalidInputError(f"Exchange API '{api}' takes no credentials")
    try:
        creds = dataclass_json.dataclass_load_dict(cred_json, cls.get_credential_cls())
    except Exception as exc:
        raise InvalidInputError(f"Failed to parse `credential_json` - {exc}") from None
    return json.dumps(dataclass_json.dataclass_dump_dict(creds))


# ------------------------------------------------------------------ schema (OMM's form descriptors)

def _kind(typ: t.Any) -> tuple[str, list[t.Any] | None]:
    origin = t.get_origin(typ)
    if isinstance(typ, type) and issubclass(typ, Enum):
        return "enum", [m.value for m in typ]
    if origin is not None:
        args = [a for a in t.get_args(typ) if a is not type(None)]
        if origin in (t.Union, types.UnionType) and len(args) == 1:
            return _kind(args[0])
        if origin in (set, frozenset, list) and args:
            sub, _ = _kind(args[0])
            return (f"set_of_{sub}" if origin in (set, frozenset) else f"list_of_{sub}"), None
    if typ is bool:
        return "boolean", None
    if typ in (int, float):
        return "number", None
    return "string", None


def _json_default(v: t.Any) -> t.Any:
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, (set, frozenset, list, tuple)):
        return [_json_default(x) for x in v]
    return v if isinstance(v, (str, int, float, bool)) or v is None else str(v)


def field_descriptors(cls: type, ignore: frozenset[str] = frozenset()) -> list[dict[str, t.Any]]:
    hints = t.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in ignore:
            continue
        kind, choices = _kind(hints.get(f.name, str))
        required = f.default is MISSING and f.default_factory is MISSING
        default = None
        if not required:
            default = _json_default(f.default_factory() if f.default_factory is not MISSING else f.default)
        out.append({"name": f.name, "type": kind, "required": required, "default": default,
                    "help": (f.metadata or {}).get("help", ""), "choices": choices})
    return out


def api_schema(api: str) -> dict[str, t.Any]:
    cls = api_class(api)
    return {"config_schema": {"fields": field_descriptors(cls.get_config_cls(), CONFIG_IGNORE_FIELDS)},
            "credentials_schema": ({"fields": field_descriptors(cls.get_credential_cls())}
                                   if supports_auth(cls) else None)}


# ------------------------------------------------------------------ fetching

@dataclass
class FetchReport:
    exchange: str
    batches: int = 0
    added: int = 0
    removed: int = 0
    skipped: int = 0      # signals of a type flagmatch does not bank, or malformed
    ok: bool = True
    error: str | None = None

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _key(k: t.Any) -> str:
    text = json.dumps(list(k) if isinstance(k, tuple) else k, default=str)
    return "exchange:" + text[:MAX_KEY]


def fetch(exchanges: ExchangeStore, banks: BankStore, audit: AuditLog, name: str, *, actor: str,
          max_batches: int | None = None) -> FetchReport:
    """Fetch exchange ``name`` from its checkpoint into its bank (see the module's docstring). Each applied
    batch is audited as ``exchange_fetch`` (its counts, by ``actor``) in the transaction that applies it."""
    ex = exchanges.get(name)
    cls = api_class(ex.api)
    report = FetchReport(name)
    collab = dataclass_json.dataclass_loads(ex.config, cls.get_config_cls())
    exchanges.start(name)
    up_to_date = False
    try:
        if supports_auth(cls):
            raw = exchanges.credential(ex.api)
            creds = dataclass_json.dataclass_load_dict(json.loads(raw), cls.get_credential_cls()) if raw else None
            api = cls.for_collab(collab, creds)
        else:
            api = cls.for_collab(collab)
        checkpoint = (dataclass_json.dataclass_loads(ex.checkpoint, cls.get_checkpoint_cls())
                      if ex.checkpoint else None)
        it = api.fetch_iter(list(SIGNAL_TYPES), checkpoint)
        for delta in it:
            _apply(exchanges, banks, audit, actor, ex, cls, collab, delta, report)
            if max_batches is not None and report.batches >= max_batches:
                break
        else:
            up_to_date = True
    except Exception as exc:  # an exchange's own failure (network, auth, a bad file): recorded, not raised
        report.ok, report.error = False, f"{type(exc).__name__}: {exc}"
    exchanges.finish(name, ok=report.ok, error=report.error, up_to_date=up_to_date and report.ok)
    return report


def _apply(exchanges: ExchangeStore, banks: BankStore, audit: AuditLog, actor: str, ex: Exchange, cls: type,
           collab: t.Any, delta: t.Any, report: FetchReport) -> None:
    skipped = report.skipped
    adds: list[NewEntry] = []
    gone: list[str] = []
    for k, v in delta.updates.items():
        key = _key(k)
        if v is None:
            gone.append(key)
            continue
        converted = cls.naive_convert_to_signal_type(list(SIGNAL_TYPES), collab, {k: v})
        if not converted:
            report.skipped += 1
        for st, signals in converted.items():
            for sig in signals:
                try:
                    ours = canonical_type(st.get_name())
                    adds.append(NewEntry(ours, validate_signal(ours, sig), external_id=key,
                                         tags=(f"exchange:{ex.name}",)))
                except InvalidInputError:
                    report.skipped += 1
    cp = delta.checkpoint
    with banks.catalog.transaction() as tx:
        removed = banks.remove_external(ex.name, gone, tx=tx) if gone else 0
        added = len(banks.add(ex.name, adds, tx=tx)[0]) if adds else 0
        exchanges.advance(ex.name, json.dumps(dataclass_json.dataclass_dump_dict(cp)),
                          cp.get_progress_timestamp() if cp is not None else None, len(delta.updates), tx=tx)
        audit.record(actor, "exchange_fetch", f"exchange:{ex.name}", tx=tx, batch=report.batches + 1,
                     added=added, removed=removed, skipped=report.skipped - skipped, items=len(delta.updates))
    report.added += added
    report.removed += removed
    report.batches += 1


def local_file_allowed(api: str, config: t.Any, base: Path) -> None:
    """A local-file exchange made through the API reads only files under ``base`` (the store's
    ``exchanges/`` directory): a client must not be able to make the server read its other files."""
    if api != LocalFileSignalExchangeAPI.get_name():
        return
    path = Path(str(getattr(config, "filename", ""))).expanduser()
    try:
        path.resolve().relative_to(base.resolve())
    except ValueError:
        raise InvalidInputError(f"a local_file exchange made over HTTP reads files under {base} only") from None


__all__ = ["APIS", "FetchReport", "api_class", "api_schema", "fetch", "parse_config", "parse_credentials", "dump_config",
           "supports_auth", "local_file_allowed"]
