"""The one settings object: every setting is declared once in ``SETTINGS`` (name, type, default,
help); the same list feeds the CLI options, the ``FLAGMATCH_*`` environment variables and the
README table. Precedence: CLI flag → environment → default."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class Setting:
    name: str
    type: Callable[[str], Any]
    default: Any
    help: str

    @property
    def env(self) -> str:
        return "FLAGMATCH_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _bool(v: str | bool) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {v!r}")


def _tokens(v: str | tuple) -> tuple[str, ...]:
    if isinstance(v, tuple):
        return v
    return tuple(t.strip() for t in str(v).split(",") if t.strip())


SETTINGS: tuple[Setting, ...] = (
    Setting("home", str, "./flagmatch-data", "data directory: catalog, raw vectors, indexes, thumbnails"),
    Setting("catalog_url", str, "", "SQLAlchemy URL of the catalog (default: SQLite file in the home directory)"),
    Setting("model", str, "Marqo/nsfw-image-detection-384",
            "model: a hub id, a local directory (config.json + model.safetensors), a .safetensors file "
            "(with --arch), an .onnx file, or the preset 'opennsfw'"),
    Setting("arch", str, "", "timm architecture name, for a bare .safetensors file"),
    Setting("precision", str, "auto", "timm inference precision: auto (bf16 where the CPU has it and it "
            "agrees with fp32 to cosine >= 0.999), fp32 or bf16"),
    Setting("flag_threshold", float, 0.8, "images with P(unsafe) at or above this are flagged (source 'model')"),
    Setting("batch_size", int, 32, "images per model batch"),
    Setting("decode_workers", int, 2, "threads that decode images while the model runs"),
    Setting("torch_threads", int, 0, "torch intra-op threads (0: one per core)"),
    Setting("max_pixels", int, 100_000_000, "largest image accepted, in pixels (checked from the header)"),
    Setting("max_file_bytes", int, 200 * 1024 * 1024, "largest image file accepted, in bytes"),
    Setting("thumb_size", int, 256, "long side of stored thumbnails, in pixels"),
    Setting("exact_threshold", int, 50_000, "below this many vectors the index is exact; above, IVF-PQ"),
    Setting("nlist", int, 0, "IVF lists (0: chosen from N)"),
    Setting("pq_m", int, 0, "PQ sub-quantizers (0: chosen from the dimension)"),
    Setting("opq", str, "auto", "OPQ rotation before PQ: auto, on or off"),
    Setting("nprobe", int, 0, "IVF lists visited per query (0: nlist/32, at least 16)"),
    Setting("rerank", int, 10, "candidates re-ranked exactly from the raw vectors, as a multiple of k"),
    Setting("index_save_seconds", float, 30.0, "during ingest, save the indexes at most this often"),
    Setting("use_gpu", str, "auto", "FAISS on the GPU: auto (when faiss-gpu sees one), on or off"),
    Setting("host", str, "127.0.0.1", "address `serve` listens on"),
    Setting("port", int, 8080, "port `serve` listens on"),
    Setting("workers", int, 1, "server worker processes (each loads the model once)"),
    Setting("threads", int, 4, "request threads per server worker"),
    Setting("api_tokens", _tokens, (), "comma-separated bearer tokens (name:token or token) for the API and viewer"),
    Setting("open_reads", _bool, False, "allow reads without a token (writes always need one)"),
    Setting("max_upload_bytes", int, 32 * 1024 * 1024, "largest request body accepted by the API"),
    Setting("secret_key", str, "", "key that signs viewer sessions (default: generated, kept in the home directory)"),
    Setting("cluster_min_size", int, 0, "HDBSCAN min_cluster_size (0: chosen from N)"),
    Setting("cluster_dims", int, 8, "UMAP dimensions of the clustering space"),
    Setting("cluster_neighbors", int, 15, "UMAP n_neighbors"),
    Setting("cluster_sample", int, 50_000, "above this many flagged images, fit on a sample and predict the rest"),
    Setting("cluster_backend", str, "fast_hdbscan", "HDBSCAN implementation: fast_hdbscan, hdbscan or sklearn"),
    Setting("seed", int, 42, "random seed of the clustering job"),
)

class _SettingsMethods:
    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None,
             environ: Mapping[str, str] | None = None) -> "Settings":
        """CLI overrides (None means 'not given') win over FLAGMATCH_* variables, which win over defaults."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for s in SETTINGS:
            raw = (overrides or {}).get(s.name)
            if raw is None and s.env in environ:
                raw = environ[s.env]
            if raw is None:
                continue
            try:
                values[s.name] = s.type(raw)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"setting {s.name} ({s.env}): {exc}") from None
        return cls(**values)

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser().resolve()  # type: ignore[attr-defined]

    @property
    def resolved_catalog_url(self) -> str:
        return self.catalog_url or f"sqlite:///{self.home_path / 'catalog.sqlite'}"  # type: ignore[attr-defined]


# The typed settings object, built from SETTINGS so that nothing is declared twice.
Settings = dataclasses.make_dataclass(
    "Settings",
    [(s.name, type(s.default), field(default=s.default)) for s in SETTINGS],
    bases=(_SettingsMethods,),
    frozen=True,
)
Settings.__module__ = __name__


def settings_table() -> str:
    """The README's settings table, generated from SETTINGS."""
    rows = ["| setting | env | default | what it does |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = ",".join(s.default) if isinstance(s.default, tuple) else s.default
        rows.append(f"| `{s.flag}` | `{s.env}` | `{default}` | {s.help} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m flagmatch.settings: the README's settings table
    print(settings_table())
